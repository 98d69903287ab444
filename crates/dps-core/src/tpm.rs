//! The server side of TPM attestation: building the authentication-key blob (protocol.md
//! §6.4–§6.5) that hands a device an HMAC key only its TPM can use.
//!
//! The blob carries two nested protections. A *credential* (`MakeCredential`, TPM 2.0 Part 1
//! §24) encrypted to the device's endorsement key and bound to the Name of its storage root key
//! yields a 16-byte inner wrap key after `TPM2_ActivateCredential`. A *duplication blob*
//! (Part 1 §23) of a KEYEDHASH HMAC key, inner-wrapped with that key (AES-128-CFB) and
//! outer-wrapped to the SRK, is then `TPM2_Import`ed and `TPM2_Load`ed under the SRK. The
//! device signs its SAS tokens with `TPM2_HMAC` over that key; the server verifies them with
//! the same key bytes in software.

use aes::Aes128;
use aws_lc_rs::rsa::{OaepPublicEncryptingKey, PublicEncryptingKey, OAEP_SHA256_MGF1SHA256};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use cfb_mode::cipher::{AsyncStreamCipher, KeyIvInit};
use dps_proto::tpm::{
    attrs, tpm2b, AuthenticationKeyBlob, KeyedHashSensitive, SymDefObject, TpmPublic, MAX_SYM_DATA, TPM_ALG_AES,
    TPM_ALG_CFB, TPM_ALG_SHA256,
};
use hmac::{Hmac, Mac};
use rand::{CryptoRng, RngCore};
use rsa::pkcs8::EncodePublicKey;
use rsa::{BigUint, RsaPublicKey};
use sha2::{Digest, Sha256};

pub mod software;

type HmacSha256 = Hmac<Sha256>;

/// Length of the inner wrap key (the credential): AES-128, which the C, C# and IoT Edge
/// clients hard-code.
pub const INNER_KEY_LEN: usize = 16;

/// Object attributes of the duplicated HMAC key: `sign | userWithAuth | noDA`. Not fixedTPM or
/// fixedParent (it is imported), not restricted or decrypt (`TPM2_HMAC` needs an unrestricted
/// signing key), not sensitiveDataOrigin (the server chose the key).
pub const HMAC_KEY_ATTRIBUTES: u32 = attrs::SIGN_ENCRYPT | attrs::USER_WITH_AUTH | attrs::NO_DA;

/// The symmetric definition both EK and SRK must have: it sets the credential's and the outer
/// wrapper's cipher (AES-128-CFB).
const AES_128_CFB: SymDefObject = SymDefObject { algorithm: TPM_ALG_AES, key_bits: 128, mode: TPM_ALG_CFB };

/// Why an authentication key cannot be built for the keys a device presented.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// A public area or a marshalled structure is malformed.
    #[error(transparent)]
    Wire(#[from] dps_proto::tpm::TpmError),
    /// The EK or SRK is not an RSA key.
    #[error("the {0} is not an RSA key")]
    NotRsa(&'static str),
    /// The EK or SRK has a name algorithm other than SHA-256.
    #[error("the {which} has nameAlg 0x{alg:04x}; only SHA-256 (0x000b) is supported")]
    NameAlg {
        /// `endorsement key` or `storage root key`.
        which: &'static str,
        /// The nameAlg found.
        alg: u16,
    },
    /// The EK or SRK is not a storage-type key with AES-128-CFB as its symmetric definition.
    #[error("the {0} does not have the AES-128-CFB symmetric definition of the SDK EK/SRK templates")]
    Symmetric(&'static str),
    /// The HMAC key is empty or longer than a KEYEDHASH object can hold.
    #[error("the HMAC key is {0} bytes; a TPM KEYEDHASH key holds 1 to {MAX_SYM_DATA} bytes")]
    HmacKeyLength(usize),
    /// The EK or SRK is a usable RSA key, but not one made from the standard template the
    /// device SDKs use (protocol.md §6.2).
    #[error("the {which} {reason}; devices create it from the standard RSA-2048 template")]
    Template {
        /// `endorsement key` or `storage root key`.
        which: &'static str,
        /// What differs.
        reason: String,
    },
    /// A blob did not open with this TPM's keys (software TPM: a wrong key, or a blob that was
    /// changed on the way).
    #[error("the authentication key does not open with this TPM: {0}")]
    Open(&'static str),
    /// The key cannot be used for RSA-OAEP (the OAEP implementation refused it or failed).
    #[error("the {0} cannot be used for RSA-OAEP")]
    Oaep(&'static str),
    /// The modulus and exponent do not form an RSA key the `rsa` crate accepts.
    #[error("the {which} cannot be used for RSA-OAEP: {source}")]
    Rsa {
        /// `endorsement key` or `storage root key`.
        which: &'static str,
        /// What the `rsa` crate reported.
        source: rsa::Error,
    },
}

/// Which of a device's TPM keys a public area is meant to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKey {
    /// The endorsement key (`endorsementKey`): the credential is encrypted to it.
    Endorsement,
    /// The storage root key (`storageRootKey`): the HMAC key is imported under it.
    StorageRoot,
}

impl DeviceKey {
    /// How messages name it.
    pub fn noun(self) -> &'static str {
        match self {
            DeviceKey::Endorsement => "endorsement key",
            DeviceKey::StorageRoot => "storage root key",
        }
    }
}

/// Checks that a public area is an EK or SRK a device's TPM can receive the authentication
/// key with, as the SDKs' templates make them (protocol.md §6.2): an RSA-2048 restricted
/// decryption (storage) key, fixedTPM and fixedParent, nameAlg SHA-256, symmetric AES-128-CFB,
/// no scheme. The authPolicy and the user/admin attributes only matter to the device itself
/// and are not checked.
pub fn check_device_key(public: &TpmPublic, which: DeviceKey) -> Result<(), TpmError> {
    let noun = which.noun();
    rsa_target(public, noun)?;
    let template = |reason: String| TpmError::Template { which: noun, reason };
    let rsa = public.rsa().ok_or(TpmError::NotRsa(noun))?;
    if rsa.key_bits != 2048 {
        return Err(template(format!("is RSA-{}", rsa.key_bits)));
    }
    if rsa.scheme != dps_proto::tpm::RsaScheme::Null {
        return Err(template("has a scheme (a storage key has none)".into()));
    }
    let must = attrs::RESTRICTED | attrs::DECRYPT | attrs::FIXED_TPM | attrs::FIXED_PARENT;
    if public.object_attributes & must != must || public.object_attributes & attrs::SIGN_ENCRYPT != 0 {
        return Err(template(format!(
            "has objectAttributes 0x{:08x}, not a restricted decryption key of this TPM (fixedTPM, fixedParent, restricted, decrypt; not sign)",
            public.object_attributes
        )));
    }
    Ok(())
}

/// Decodes and checks a TPM key sent as base64 of a marshalled TPM2B_PUBLIC: by a device
/// (`tpm.endorsementKey` of a register request) or an operator (`attestation.tpm.…` of an
/// enrollment). `field` names it in the error, a 400 with code 400004.
pub fn parse_device_key(field: &str, text: &str, which: DeviceKey) -> Result<TpmPublic, crate::error::Error> {
    let bad =
        |message: String| crate::error::Error::bad_request(dps_proto::error::ErrorCode::INVALID_ARGUMENT, message);
    let bytes = BASE64.decode(text.trim()).map_err(|_| bad(format!("{field} is not valid base64")))?;
    let public =
        TpmPublic::parse_tpm2b(&bytes).map_err(|e| bad(format!("{field} is not a marshalled TPM2B_PUBLIC: {e}")))?;
    check_device_key(&public, which).map_err(|e| bad(format!("{field}: {e}")))?;
    Ok(public)
}

/// An RSA key, checked to be usable as a credential or duplication target.
fn rsa_target(public: &TpmPublic, which: &'static str) -> Result<RsaPublicKey, TpmError> {
    let rsa = public.rsa().ok_or(TpmError::NotRsa(which))?;
    if public.name_alg != TPM_ALG_SHA256 {
        return Err(TpmError::NameAlg { which, alg: public.name_alg });
    }
    if rsa.symmetric != Some(AES_128_CFB) {
        return Err(TpmError::Symmetric(which));
    }
    RsaPublicKey::new(BigUint::from_bytes_be(&rsa.modulus), BigUint::from(u64::from(rsa.exponent_value())))
        .map_err(|source| TpmError::Rsa { which, source })
}

/// The key in the form the OAEP implementation takes (aws-lc: assembly bignums; the `rsa`
/// crate's took four times as long per operation, protocol work BENCHMARKS.md measured).
fn oaep_target(public: &TpmPublic, which: &'static str) -> Result<OaepPublicEncryptingKey, TpmError> {
    let key = rsa_target(public, which)?;
    let der = key.to_public_key_der().map_err(|_| TpmError::Oaep(which))?;
    PublicEncryptingKey::from_der(der.as_bytes())
        .ok()
        .and_then(|k| OaepPublicEncryptingKey::new(k).ok())
        .ok_or(TpmError::Oaep(which))
}

/// RSA-OAEP with SHA-256 and MGF1-SHA-256 under `label` (TPM 2.0 Part 1 §B.10.3: the label's
/// trailing NUL included).
fn oaep_encrypt(
    key: &OaepPublicEncryptingKey,
    label: &[u8],
    plaintext: &[u8],
    which: &'static str,
) -> Result<Vec<u8>, TpmError> {
    let mut out = vec![0u8; key.ciphertext_size()];
    let len = key
        .encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, Some(label))
        .map_err(|_| TpmError::Oaep(which))?
        .len();
    out.truncate(len);
    Ok(out)
}

/// HMAC-SHA-256 over the concatenation of `parts`.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts every key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// `KDFa` with SHA-256 (TPM 2.0 Part 1 §11.4.10.2, SP 800-108 counter mode): the concatenation
/// of `HMAC(key, i ‖ label ‖ 00 ‖ context_u ‖ context_v ‖ bits)` for `i = 1, 2, …`, cut to
/// `bits` (a multiple of 8 here).
fn kdfa(key: &[u8], label: &[u8], context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let len = usize::try_from(bits / 8).unwrap_or(usize::MAX);
    let mut out = Vec::with_capacity(len + 32);
    let mut counter: u32 = 1;
    while out.len() < len {
        out.extend_from_slice(&hmac_sha256(
            key,
            &[&counter.to_be_bytes(), label, &[0], context_u, context_v, &bits.to_be_bytes()],
        ));
        counter += 1;
    }
    out.truncate(len);
    out
}

/// AES-128 in CFB mode (full-block feedback) with an all-zero IV, in place, as the TPM uses it
/// for credential and duplication wrapping.
fn cfb_encrypt(key: &[u8; 16], buf: &mut [u8]) {
    cfb_mode::Encryptor::<Aes128>::new(key.into(), &[0u8; 16].into()).encrypt(buf);
}

fn key16(bytes: &[u8]) -> [u8; 16] {
    let mut key = [0u8; 16];
    key.copy_from_slice(&bytes[..16]);
    key
}

fn random<const N: usize>(rng: &mut (impl RngCore + CryptoRng)) -> [u8; N] {
    let mut bytes = [0u8; N];
    rng.fill_bytes(&mut bytes);
    bytes
}

/// Builds the authentication-key blob for a device with endorsement key `ek` and storage root
/// key `srk` (both as parsed from the registration request) that, once activated and imported
/// by that device's TPM, is an HMAC-SHA-256 key with the secret `hmac_key` (1 to 128 bytes;
/// the DPS/IoT Hub symmetric key of the registration).
///
/// Follows protocol.md §6.5: a 16-byte inner wrap key as a credential to the EK bound to the
/// SRK's Name (seed OAEP-encrypted with label `IDENTITY\0`); the KEYEDHASH key duplicated under
/// the SRK with that inner wrapper (AES-128-CFB) and an outer wrapper whose seed is
/// OAEP-encrypted to the SRK with label `DUPLICATE\0`; items 1–6 of §6.4 with item 6 empty
/// (`00 00`). Both keys must be RSA with nameAlg SHA-256 and the AES-128-CFB symmetric
/// definition of the SDK templates. Every call draws fresh seeds from `rng`.
pub fn build_authentication_key(
    ek: &TpmPublic,
    srk: &TpmPublic,
    hmac_key: &[u8],
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<Vec<u8>, TpmError> {
    const EK: &str = "endorsement key";
    const SRK: &str = "storage root key";
    if hmac_key.is_empty() || hmac_key.len() > MAX_SYM_DATA {
        return Err(TpmError::HmacKeyLength(hmac_key.len()));
    }
    let ek_key = oaep_target(ek, EK)?;
    let srk_key = oaep_target(srk, SRK)?;
    let srk_name = srk.name()?;

    // 2–3. The credential: the inner wrap key, encrypted to the EK, bound to the SRK's Name.
    let inner_key: [u8; INNER_KEY_LEN] = random(rng);
    let seed1: [u8; 32] = random(rng);
    let enc_secret1 = oaep_encrypt(&ek_key, b"IDENTITY\0", &seed1, EK)?;
    let sym_key1 = key16(&kdfa(&seed1, b"STORAGE", &srk_name, &[], 128));
    let mut enc_identity = tpm2b("credential", &inner_key)?;
    cfb_encrypt(&sym_key1, &mut enc_identity);
    let hmac_key1 = kdfa(&seed1, b"INTEGRITY", &[], &[], 256);
    let integrity1 = hmac_sha256(&hmac_key1, &[&enc_identity, &srk_name]);
    let mut id_object = tpm2b("credential integrityHMAC", &integrity1)?;
    id_object.extend_from_slice(&enc_identity);

    // 4. The HMAC key object.
    let obfuscate: [u8; 32] = random(rng);
    let unique = Sha256::new().chain_update(obfuscate).chain_update(hmac_key).finalize().to_vec();
    let public = TpmPublic::hmac_sha256_key(HMAC_KEY_ATTRIBUTES, unique);
    let public_bytes = public.marshal()?;
    let key_name = public.name()?;
    let sensitive =
        KeyedHashSensitive { auth_value: Vec::new(), seed_value: obfuscate.to_vec(), key: hmac_key.to_vec() };
    let sens2b = sensitive.marshal_tpm2b()?;

    // 5. Inner wrapper, with the credential as key.
    let inner_integrity = Sha256::new().chain_update(&sens2b).chain_update(&key_name).finalize();
    let mut enc_sensitive = tpm2b("inner integrity", &inner_integrity)?;
    enc_sensitive.extend_from_slice(&sens2b);
    cfb_encrypt(&inner_key, &mut enc_sensitive);

    // 6. Outer wrapper, to the SRK.
    let seed2: [u8; 32] = random(rng);
    let enc_secret2 = oaep_encrypt(&srk_key, b"DUPLICATE\0", &seed2, SRK)?;
    let sym_key2 = key16(&kdfa(&seed2, b"STORAGE", &key_name, &[], 128));
    let mut dup_sensitive = enc_sensitive;
    cfb_encrypt(&sym_key2, &mut dup_sensitive);
    let hmac_key2 = kdfa(&seed2, b"INTEGRITY", &[], &[], 256);
    let outer_hmac = hmac_sha256(&hmac_key2, &[&dup_sensitive, &key_name]);
    let mut duplicate = tpm2b("outer integrityHMAC", &outer_hmac)?;
    duplicate.extend_from_slice(&dup_sensitive);

    let blob = AuthenticationKeyBlob {
        id_object,
        encrypted_secret: enc_secret1,
        duplicate,
        import_seed: enc_secret2,
        public: public_bytes,
        enc_uri_data: Vec::new(),
    };
    Ok(blob.marshal()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dps_proto::tpm::PublicParams;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use rsa::RsaPrivateKey;

    use software::{SoftwareTpm, EK_ATTRIBUTES, EK_AUTH_POLICY, SRK_ATTRIBUTES};

    use software::template as public_of;

    #[test]
    fn the_blob_opens_to_the_hmac_key_in_software() {
        let mut rng = StdRng::seed_from_u64(7);
        let tpm = SoftwareTpm::generate(&mut rng).unwrap();
        // The SDKs marshal these exactly like this.
        let ek = TpmPublic::parse_tpm2b(&tpm.endorsement_key().marshal_tpm2b().unwrap()).unwrap();
        let srk = tpm.storage_root_key();
        check_device_key(&ek, DeviceKey::Endorsement).unwrap();
        check_device_key(srk, DeviceKey::StorageRoot).unwrap();
        let hmac_key = [0x42u8; 32];
        let blob = build_authentication_key(&ek, srk, &hmac_key, &mut rng).unwrap();
        assert_eq!(blob.len(), 766, "protocol.md §6.5 step 7");
        assert_eq!(blob[blob.len() - 2..], [0, 0], "item 6 is empty");
        assert_eq!(tpm.import(&blob).unwrap(), hmac_key);
        // Fresh seeds every time; other key lengths work.
        let again = build_authentication_key(&ek, srk, &hmac_key, &mut rng).unwrap();
        assert_ne!(blob, again);
        let short = build_authentication_key(&ek, srk, b"k", &mut rng).unwrap();
        assert_eq!(tpm.import(&short).unwrap(), b"k");
        let long = build_authentication_key(&ek, srk, &[9; MAX_SYM_DATA], &mut rng).unwrap();
        assert_eq!(tpm.import(&long).unwrap(), [9; MAX_SYM_DATA]);
        // Every byte counts: a flipped bit anywhere, or another TPM, does not open it.
        for at in [10, 100, 300, 500, 700] {
            let mut bad = blob.clone();
            bad[at] ^= 1;
            assert!(tpm.import(&bad).is_err(), "a flipped bit at {at} went unnoticed");
        }
        let other = SoftwareTpm::generate(&mut rng).unwrap();
        assert!(other.import(&blob).unwrap_err().to_string().contains("not encrypted to this EK"));
    }

    #[test]
    fn device_keys_must_follow_the_templates() {
        let mut rng = StdRng::seed_from_u64(9);
        let key = RsaPrivateKey::new(&mut rng, 2048).unwrap();
        assert!(check_device_key(&public_of(&key, EK_ATTRIBUTES, &EK_AUTH_POLICY), DeviceKey::Endorsement).is_ok());
        assert!(check_device_key(&public_of(&key, SRK_ATTRIBUTES, &[]), DeviceKey::StorageRoot).is_ok());
        // A signing key, and one that is not restricted.
        let err = check_device_key(&public_of(&key, 0x0004_0072, &[]), DeviceKey::Endorsement).unwrap_err();
        assert!(err.to_string().starts_with("the endorsement key has objectAttributes 0x00040072"), "{err}");
        assert!(check_device_key(&public_of(&key, 0x0002_00B2, &[]), DeviceKey::StorageRoot).is_err());
        let mut rsa1024 = public_of(&RsaPrivateKey::new(&mut rng, 1024).unwrap(), EK_ATTRIBUTES, &[]);
        if let PublicParams::Rsa(rsa) = &mut rsa1024.params {
            rsa.key_bits = 1024;
        }
        assert_eq!(
            check_device_key(&rsa1024, DeviceKey::Endorsement).unwrap_err().to_string(),
            "the endorsement key is RSA-1024; devices create it from the standard RSA-2048 template"
        );
        let kh = TpmPublic::hmac_sha256_key(0, vec![0; 32]);
        assert_eq!(
            check_device_key(&kh, DeviceKey::StorageRoot).unwrap_err().to_string(),
            "the storage root key is not an RSA key"
        );
    }

    #[test]
    fn kdfa_matches_the_definition() {
        let key = [1u8; 32];
        let one = kdfa(&key, b"STORAGE", b"u", b"v", 128);
        assert_eq!(one, hmac_sha256(&key, &[&1u32.to_be_bytes(), b"STORAGE\0uv", &128u32.to_be_bytes()])[..16]);
        let two = kdfa(&key, b"X", &[], &[], 512);
        assert_eq!(two.len(), 64);
        assert_eq!(two[32..], hmac_sha256(&key, &[&2u32.to_be_bytes(), b"X\0", &512u32.to_be_bytes()]));
    }

    #[test]
    fn refuses_unusable_keys() {
        let mut rng = StdRng::seed_from_u64(8);
        let key = RsaPrivateKey::new(&mut rng, 2048).unwrap();
        let good = public_of(&key, 0x00030472, &[]);
        let err = |ek: &TpmPublic, srk: &TpmPublic, k: &[u8]| {
            build_authentication_key(ek, srk, k, &mut StdRng::seed_from_u64(1)).unwrap_err().to_string()
        };
        assert_eq!(err(&good, &good, &[]), "the HMAC key is 0 bytes; a TPM KEYEDHASH key holds 1 to 128 bytes");
        assert!(err(&good, &good, &[0; 129]).contains("129 bytes"));
        let kh = TpmPublic::hmac_sha256_key(0, vec![0; 32]);
        assert_eq!(err(&kh, &good, b"k"), "the endorsement key is not an RSA key");
        assert_eq!(err(&good, &kh, b"k"), "the storage root key is not an RSA key");
        let mut no_sym = good.clone();
        if let PublicParams::Rsa(rsa) = &mut no_sym.params {
            rsa.symmetric = None;
        }
        assert!(err(&good, &no_sym, b"k").contains("storage root key does not have the AES-128-CFB"));
        let mut sha384 = good.clone();
        sha384.name_alg = dps_proto::tpm::TPM_ALG_SHA384;
        assert_eq!(
            err(&sha384, &good, b"k"),
            "the endorsement key has nameAlg 0x000c; only SHA-256 (0x000b) is supported"
        );
        // A "2048-bit" modulus that is really 3: too small for OAEP.
        let mut bad = good.clone();
        if let PublicParams::Rsa(rsa) = &mut bad.params {
            rsa.modulus = [0; 256].to_vec();
            rsa.modulus[255] = 3;
        }
        assert!(err(&bad, &good, b"k").starts_with("the endorsement key cannot be used for RSA-OAEP"));
    }
}
