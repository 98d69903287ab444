//! The device side of TPM attestation against a real (software) TPM: starts `swtpm` as a TPM
//! 2.0 socket simulator on free local ports and drives it through `dps_device::tpm` —
//! the EK and SRK created from the standard templates and persisted, an authentication-key
//! blob built by the server's own builder ([`dps_core::tpm::build_authentication_key`])
//! imported (ActivateCredential, Import, Load, EvictControl), and `TPM2_HMAC` with the
//! imported key compared with HMAC-SHA-256 in software.
//!
//! Skips (passing, with a message) when `swtpm` is not on PATH (Debian: `apt-get install swtpm
//! swtpm-tools`). Needs the `tpm` feature: `cargo test -p dps-device --features tpm --test
//! tpm_swtpm -- --nocapture`.
#![cfg(feature = "tpm")]

use std::process::Command;

use dps_device::tpm::{Tpm, EK_ATTRIBUTES, EK_HANDLE, SRK_ATTRIBUTES, SRK_HANDLE};
use dps_device::{DeviceError, TpmConfig, DEFAULT_AUTH_KEY_HANDLE};
use dps_proto::tpm::{AuthenticationKeyBlob, TpmPublic};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

#[path = "../../../tests/support/swtpm.rs"]
mod swtpm;

use swtpm::{free_port_pair, on_path, Swtpm};

/// Starts a swtpm, or `None` (the test skips) when swtpm is not installed.
fn start_swtpm() -> Option<Swtpm> {
    if !on_path("swtpm") {
        eprintln!("SKIPPED: `swtpm` is not on PATH (apt-get install swtpm swtpm-tools)");
        return None;
    }
    Some(Swtpm::start())
}

impl Swtpm {
    fn config(&self) -> TpmConfig {
        TpmConfig::new(&self.tcti())
    }

    /// Transient objects and sessions left in the TPM (tpm2-tools' view), when tpm2_getcap is
    /// installed.
    fn leftovers(&self) -> Option<String> {
        if !on_path("tpm2_getcap") {
            return None;
        }
        let mut all = String::new();
        for cap in ["handles-transient", "handles-loaded-session", "handles-saved-session"] {
            let out = Command::new("tpm2_getcap")
                .arg(cap)
                .env("TPM2TOOLS_TCTI", self.tcti())
                .output()
                .expect("tpm2_getcap runs");
            assert!(out.status.success(), "tpm2_getcap {cap}: {}", String::from_utf8_lossy(&out.stderr));
            all.push_str(String::from_utf8_lossy(&out.stdout).trim());
        }
        Some(all)
    }
}

fn software_hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn blob_for(ek: &[u8], srk: &[u8], key: &[u8]) -> Vec<u8> {
    let ek = TpmPublic::parse_tpm2b(ek).expect("the EK parses");
    let srk = TpmPublic::parse_tpm2b(srk).expect("the SRK parses");
    dps_core::tpm::build_authentication_key(&ek, &srk, key, &mut rand::thread_rng()).expect("blob")
}

fn sign(config: &TpmConfig, handle: u32, data: &[u8]) -> Result<Vec<u8>, DeviceError> {
    Tpm::open(config)?.hmac_sha256(handle, data)
}

#[test]
fn keys_import_and_sign_against_swtpm() {
    let Some(swtpm) = start_swtpm() else { return };
    let config = swtpm.config();

    // First read: EK and SRK are created from the templates and persisted.
    let keys = Tpm::open(&config).expect("the TPM opens").keys().expect("EK and SRK");
    let ek = TpmPublic::parse_tpm2b(&keys.endorsement_key).expect("the EK is a TPM2B_PUBLIC");
    let srk = TpmPublic::parse_tpm2b(&keys.storage_root_key).expect("the SRK is a TPM2B_PUBLIC");
    assert_eq!(ek.object_attributes, EK_ATTRIBUTES, "EK attributes of protocol.md §6.2");
    assert_eq!(srk.object_attributes, SRK_ATTRIBUTES, "SRK attributes of protocol.md §6.2");
    assert_eq!(ek.rsa().map(|r| r.key_bits), Some(2048));
    dps_core::tpm::check_device_key(&ek, dps_core::tpm::DeviceKey::Endorsement).expect("the server takes the EK");
    dps_core::tpm::check_device_key(&srk, dps_core::tpm::DeviceKey::StorageRoot).expect("the server takes the SRK");
    // Second read: the persisted keys, the same ones.
    let again = Tpm::open(&config).unwrap().keys().unwrap();
    assert_eq!(again, keys, "the persisted EK and SRK are read back");

    // Import a key DPS built for this TPM, sign with it.
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    let blob = blob_for(&keys.endorsement_key, &keys.storage_root_key, &key);
    Tpm::open(&config).unwrap().import_authentication_key(&blob, DEFAULT_AUTH_KEY_HANDLE).expect("import");
    let message = b"0ne00000001%2Fregistrations%2Ftpm-device-1\n1800000000";
    let from_tpm = sign(&config, DEFAULT_AUTH_KEY_HANDLE, message).expect("TPM2_HMAC");
    assert_eq!(from_tpm, software_hmac(&key, message), "the TPM signs with exactly the key in the blob");
    // Up to MAX_HMAC_DATA bytes in one TPM2_HMAC; more is refused clearly.
    let long = vec![b'x'; dps_device::tpm::MAX_HMAC_DATA];
    assert_eq!(sign(&config, DEFAULT_AUTH_KEY_HANDLE, &long).unwrap(), software_hmac(&key, &long));
    let too_long = vec![b'x'; dps_device::tpm::MAX_HMAC_DATA + 1];
    assert!(
        matches!(sign(&config, DEFAULT_AUTH_KEY_HANDLE, &too_long), Err(DeviceError::Tpm(m)) if m.contains("at most 1024"))
    );

    // A tampered blob is refused by the TPM, and the key in place stays.
    let mut key2 = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key2);
    let good2 = blob_for(&keys.endorsement_key, &keys.storage_root_key, &key2);
    let items = AuthenticationKeyBlob::parse(&good2).unwrap();
    let mut tampered_dup = items.clone();
    tampered_dup.duplicate[40] ^= 1;
    let mut tampered_cred = items.clone();
    tampered_cred.id_object[5] ^= 1;
    for (what, bad) in [("duplicate", tampered_dup), ("credential", tampered_cred)] {
        let err = Tpm::open(&config)
            .unwrap()
            .import_authentication_key(&bad.marshal().unwrap(), DEFAULT_AUTH_KEY_HANDLE)
            .expect_err("a tampered blob must not import");
        let DeviceError::Tpm(message) = &err else { panic!("{what}: {err:?}") };
        eprintln!("tampered {what}: {err}");
        assert!(message.contains("refused") && message.contains("integrity"), "{what}: {message}");
    }
    let truncated = &good2[..good2.len() - 3];
    let err = Tpm::open(&config).unwrap().import_authentication_key(truncated, DEFAULT_AUTH_KEY_HANDLE).unwrap_err();
    assert!(matches!(&err, DeviceError::Tpm(m) if m.contains("malformed")), "{err}");
    // A blob made for another TPM's keys (here: with the EK and SRK swapped) is refused too.
    let wrong = blob_for(&keys.storage_root_key, &keys.endorsement_key, &key2);
    assert!(Tpm::open(&config).unwrap().import_authentication_key(&wrong, DEFAULT_AUTH_KEY_HANDLE).is_err());
    assert_eq!(sign(&config, DEFAULT_AUTH_KEY_HANDLE, message).unwrap(), software_hmac(&key, message), "old key kept");

    // Importing again replaces the key at the handle.
    Tpm::open(&config).unwrap().import_authentication_key(&good2, DEFAULT_AUTH_KEY_HANDLE).expect("second import");
    assert_eq!(sign(&config, DEFAULT_AUTH_KEY_HANDLE, message).unwrap(), software_hmac(&key2, message));

    // Another handle (IoT Edge's auth_key_index), and a handle without a key.
    Tpm::open(&config).unwrap().import_authentication_key(&blob, 0x8100_0200).expect("import at 0x81000200");
    assert_eq!(sign(&config, 0x8100_0200, message).unwrap(), software_hmac(&key, message));
    assert_eq!(sign(&config, DEFAULT_AUTH_KEY_HANDLE, message).unwrap(), software_hmac(&key2, message));
    let err = sign(&config, 0x8100_0300, message).unwrap_err();
    assert!(matches!(&err, DeviceError::Tpm(m) if m.contains("no key at 0x81000300")), "{err}");
    let err = Tpm::open(&config).unwrap().import_authentication_key(&blob, EK_HANDLE).unwrap_err();
    assert!(matches!(err, DeviceError::Config(_)));
    let err = Tpm::open(&config).unwrap().import_authentication_key(&blob, SRK_HANDLE).unwrap_err();
    assert!(matches!(err, DeviceError::Config(_)));

    // Nothing transient is left behind (no resource manager between us and swtpm).
    if let Some(left) = swtpm.leftovers() {
        assert!(left.is_empty(), "transient objects or sessions left in the TPM: {left}");
    }
}

#[test]
fn unreachable_tpm_and_bad_tcti_are_clear_errors() {
    let port = free_port_pair();
    let err = Tpm::open(&TpmConfig::new(&format!("swtpm:host=127.0.0.1,port={port}"))).unwrap_err();
    assert!(matches!(&err, DeviceError::Tpm(m) if m.contains("cannot open the TPM")), "{err}");
    let err = Tpm::open(&TpmConfig::new("nonsense:x=1")).unwrap_err();
    assert!(matches!(&err, DeviceError::Config(m) if m.contains("nonsense:x=1")), "{err}");
}
