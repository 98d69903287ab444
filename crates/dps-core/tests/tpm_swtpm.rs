//! The authentication-key blob against a real (software) TPM: starts `swtpm` as a TPM 2.0
//! socket simulator on free local ports, creates the EK and SRK the SDKs use, builds the blob
//! with [`dps_core::tpm::build_authentication_key`], then does the device side of
//! protocol.md §6.4 with tpm2-tools — `TPM2_ActivateCredential` (EK under a
//! PolicySecret(TPM_RH_ENDORSEMENT) session), `TPM2_Import` under the SRK, `TPM2_Load`,
//! `TPM2_EvictControl`, `TPM2_HMAC` — and checks the TPM's HMAC equals HMAC-SHA-256 with the
//! key in software.
//!
//! Skips (passing, with a message) when `swtpm` or the tpm2-tools are not on PATH. On Debian:
//! `apt-get install swtpm swtpm-tools tpm2-tools`. Every command it runs is printed
//! (`cargo test -p dps-core --test tpm_swtpm -- --nocapture`); by hand the same steps are:
//!
//! ```text
//! swtpm socket --tpm2 --server type=tcp,port=P,bindaddr=127.0.0.1 \
//!     --ctrl type=tcp,port=P+1,bindaddr=127.0.0.1 --tpmstate dir=STATE \
//!     --flags not-need-init,startup-clear
//! export TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=P
//! tpm2_createek -G rsa -c 0x81010001 -u ek.pub
//! tpm2_createprimary -C o -G rsa2048:aes128cfb -g sha256 \
//!     -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt' -c srk.ctx
//! tpm2_evictcontrol -C o -c srk.ctx 0x81000001; tpm2_flushcontext -t
//! tpm2_readpublic -c 0x81000001 -o srk.pub -n srk.name
//! #   (blob = build_authentication_key(ek.pub, srk.pub, key); items 1+2 → cred.blob with the
//! #    tpm2_makecredential header BADCC0DE 00000001; items 3, 4, 5 → key.dup, key.seed, key.pub)
//! tpm2_startauthsession --policy-session -S session.ctx
//! tpm2_policysecret -S session.ctx -c e
//! tpm2_activatecredential -c 0x81000001 -C 0x81010001 -i cred.blob -o inner.key -P session:session.ctx
//! tpm2_flushcontext session.ctx
//! tpm2_import -C 0x81000001 -k inner.key -u key.pub -i key.dup -s key.seed -r key.priv
//! tpm2_load -C 0x81000001 -u key.pub -r key.priv -c key.ctx
//! tpm2_evictcontrol -C o -c key.ctx 0x81000100; tpm2_flushcontext -t
//! tpm2_hmac -c 0x81000100 -g sha256 -o hmac.out data.txt
//! ```

use std::path::Path;
use std::process::{Command, Stdio};

use dps_proto::tpm::{tpm2b, AuthenticationKeyBlob, TpmPublic};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

const TOOLS: [&str; 12] = [
    "swtpm",
    "tpm2_createek",
    "tpm2_createprimary",
    "tpm2_evictcontrol",
    "tpm2_flushcontext",
    "tpm2_readpublic",
    "tpm2_startauthsession",
    "tpm2_policysecret",
    "tpm2_activatecredential",
    "tpm2_import",
    "tpm2_load",
    "tpm2_hmac",
];

#[path = "../../../tests/support/swtpm.rs"]
mod swtpm;

use swtpm::{on_path, Swtpm};

impl Swtpm {
    /// Runs a tpm2-tools command against this TPM in its directory; panics with the command,
    /// its output and the TPM's error text when it fails.
    fn tool(&self, args: &[&str]) -> String {
        self.try_tool(args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_tool(&self, args: &[&str]) -> Result<String, String> {
        eprintln!("$ {}", args.join(" "));
        let out = Command::new(args[0])
            .args(&args[1..])
            .current_dir(self.dir())
            .env("TPM2TOOLS_TCTI", self.tcti())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{}: cannot run: {e}", args[0]))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "`{}` failed with {}\nstdout:\n{stdout}\nstderr:\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

#[test]
fn swtpm_imports_the_authentication_key_and_signs_with_it() {
    if let Some(missing) = TOOLS.iter().find(|t| !on_path(t)) {
        eprintln!(
            "SKIPPED tpm_swtpm: `{missing}` is not on PATH (needs swtpm and tpm2-tools: \
             apt-get install swtpm swtpm-tools tpm2-tools)"
        );
        return;
    }
    let tpm = Swtpm::start();

    // The EK of the SDK template (RSA-2048, PolicySecret(TPM_RH_ENDORSEMENT)) and the SRK, at
    // the SDKs' persistent handles. Without a resource manager transient objects pile up, so
    // they are flushed after each step that leaves one.
    tpm.tool(&["tpm2_createek", "-G", "rsa", "-c", "0x81010001", "-u", "ek.pub"]);
    tpm.tool(&["tpm2_flushcontext", "-t"]);
    tpm.tool(&[
        "tpm2_createprimary",
        "-C",
        "o",
        "-G",
        "rsa2048:aes128cfb",
        "-g",
        "sha256",
        "-a",
        "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt",
        "-c",
        "srk.ctx",
    ]);
    tpm.tool(&["tpm2_evictcontrol", "-C", "o", "-c", "srk.ctx", "0x81000001"]);
    tpm.tool(&["tpm2_flushcontext", "-t"]);
    tpm.tool(&["tpm2_readpublic", "-c", "0x81000001", "-o", "srk.pub", "-n", "srk.name"]);
    tpm.tool(&["tpm2_readpublic", "-c", "0x81010001", "-o", "ek2.pub", "-n", "ek.name"]);

    // What a device sends: both as marshalled TPM2B_PUBLIC.
    let ek_bytes = read(&tpm.path("ek.pub"));
    let ek = TpmPublic::parse_tpm2b(&ek_bytes).expect("the swtpm EK parses");
    let srk = TpmPublic::parse_tpm2b(&read(&tpm.path("srk.pub"))).expect("the swtpm SRK parses");
    assert_eq!(ek.object_attributes, 0x000300B2, "EK attributes of protocol.md §6.2");
    assert_eq!(srk.object_attributes, 0x00030472, "SRK attributes of protocol.md §6.2");
    assert_eq!(
        ek.auth_policy,
        [
            0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24, 0xfd, 0x52,
            0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa
        ]
    );
    assert_eq!(ek.marshal_tpm2b().unwrap(), ek_bytes, "parsing is canonical");
    assert!(ek.same_rsa_key(&TpmPublic::parse_tpm2b(&read(&tpm.path("ek2.pub"))).unwrap()));
    assert!(!ek.same_rsa_key(&srk));
    // Our Name computation agrees with the TPM's.
    assert_eq!(srk.name().unwrap(), read(&tpm.path("srk.name")), "SRK Name");
    assert_eq!(ek.name().unwrap(), read(&tpm.path("ek.name")), "EK Name");

    let mut rng = rand::thread_rng();
    let mut hmac_key = [0u8; 32];
    rng.fill_bytes(&mut hmac_key);
    let blob = dps_core::tpm::build_authentication_key(&ek, &srk, &hmac_key, &mut rng).expect("blob");
    eprintln!("authentication key: {} bytes", blob.len());
    let items = AuthenticationKeyBlob::parse(&blob).expect("the blob parses");

    // tpm2_makecredential's output format: magic, version, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
    let mut cred = vec![0xBA, 0xDC, 0xC0, 0xDE, 0, 0, 0, 1];
    cred.extend(tpm2b("id object", &items.id_object).unwrap());
    cred.extend(tpm2b("secret", &items.encrypted_secret).unwrap());
    write(&tpm.path("cred.blob"), &cred);
    write(&tpm.path("key.dup"), &tpm2b("duplicate", &items.duplicate).unwrap());
    write(&tpm.path("key.seed"), &tpm2b("seed", &items.import_seed).unwrap());
    write(&tpm.path("key.pub"), &tpm2b("public", &items.public).unwrap());
    let data = b"dps.example/registrations/tpm-device-1\n1800000000";
    write(&tpm.path("data.txt"), data);

    // TPM2_ActivateCredential: the EK is used under PolicySecret(TPM_RH_ENDORSEMENT).
    tpm.tool(&["tpm2_startauthsession", "--policy-session", "-S", "session.ctx"]);
    tpm.tool(&["tpm2_policysecret", "-S", "session.ctx", "-c", "e"]);
    tpm.tool(&[
        "tpm2_activatecredential",
        "-c",
        "0x81000001",
        "-C",
        "0x81010001",
        "-i",
        "cred.blob",
        "-o",
        "inner.key",
        "-P",
        "session:session.ctx",
    ]);
    tpm.tool(&["tpm2_flushcontext", "session.ctx"]);
    assert_eq!(read(&tpm.path("inner.key")).len(), 16, "the credential is the AES-128 inner wrap key");

    // A tampered duplicate is refused by the TPM (the outer HMAC covers it).
    let mut bad = tpm2b("duplicate", &items.duplicate).unwrap();
    bad[40] ^= 1;
    write(&tpm.path("bad.dup"), &bad);
    // TPM2_Import of a duplicate under the SRK, inner wrapper AES-128-CFB with the credential.
    let import = |duplicate: &str, private: &str| {
        tpm.try_tool(&[
            "tpm2_import",
            "-C",
            "0x81000001",
            "-k",
            "inner.key",
            "-u",
            "key.pub",
            "-i",
            duplicate,
            "-s",
            "key.seed",
            "-r",
            private,
        ])
    };
    let err = import("bad.dup", "bad.priv").expect_err("a tampered duplicate must not import");
    assert!(err.contains("integrity check failed"), "TPM_RC_INTEGRITY expected: {err}");
    eprintln!("tampered duplicate refused (TPM_RC_INTEGRITY), as it must be");

    // TPM2_Import (inner wrapper AES-128-CFB with the credential), TPM2_Load, TPM2_EvictControl
    // to the SDKs' DPS key handle, TPM2_HMAC.
    import("key.dup", "key.priv").expect("the duplicate imports");
    tpm.tool(&["tpm2_load", "-C", "0x81000001", "-u", "key.pub", "-r", "key.priv", "-c", "key.ctx"]);
    tpm.tool(&["tpm2_evictcontrol", "-C", "o", "-c", "key.ctx", "0x81000100"]);
    tpm.tool(&["tpm2_flushcontext", "-t"]);
    tpm.tool(&["tpm2_hmac", "-c", "0x81000100", "-g", "sha256", "-o", "hmac.out", "data.txt"]);

    let from_tpm = read(&tpm.path("hmac.out"));
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&hmac_key).unwrap();
    mac.update(data);
    let in_software = mac.finalize().into_bytes().to_vec();
    eprintln!("TPM2_HMAC: {}", hex(&from_tpm));
    eprintln!("software:  {}", hex(&in_software));
    assert_eq!(from_tpm, in_software, "the TPM signs with exactly the key DPS put in the blob");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
