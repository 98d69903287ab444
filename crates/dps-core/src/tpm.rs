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
use cfb_mode::cipher::{AsyncStreamCipher, KeyIvInit};
use dps_proto::tpm::{
    attrs, tpm2b, AuthenticationKeyBlob, KeyedHashSensitive, SymDefObject, TpmPublic, MAX_SYM_DATA, TPM_ALG_AES,
    TPM_ALG_CFB, TPM_ALG_SHA256,
};
use hmac::{Hmac, Mac};
use rand::{CryptoRng, RngCore};
use rsa::{BigUint, Oaep, RsaPublicKey};
use sha2::{Digest, Sha256};

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
    /// The modulus and exponent do not form an RSA key the `rsa` crate accepts, or encryption
    /// to it failed.
    #[error("the {which} cannot be used for RSA-OAEP: {source}")]
    Rsa {
        /// `endorsement key` or `storage root key`.
        which: &'static str,
        /// What the `rsa` crate reported.
        source: rsa::Error,
    },
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
    let ek_key = rsa_target(ek, EK)?;
    let srk_key = rsa_target(srk, SRK)?;
    let srk_name = srk.name()?;

    // 2–3. The credential: the inner wrap key, encrypted to the EK, bound to the SRK's Name.
    let inner_key: [u8; INNER_KEY_LEN] = random(rng);
    let seed1: [u8; 32] = random(rng);
    let enc_secret1 = ek_key
        .encrypt(rng, Oaep::new_with_label::<Sha256, _>("IDENTITY\0"), &seed1)
        .map_err(|source| TpmError::Rsa { which: EK, source })?;
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
    let enc_secret2 = srk_key
        .encrypt(rng, Oaep::new_with_label::<Sha256, _>("DUPLICATE\0"), &seed2)
        .map_err(|source| TpmError::Rsa { which: SRK, source })?;
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
    use dps_proto::tpm::{PublicParams, RsaPublic, RsaScheme};
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use rsa::traits::PublicKeyParts;
    use rsa::RsaPrivateKey;

    const EK_POLICY: [u8; 32] = [
        0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24, 0xfd, 0x52,
        0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
    ];

    fn public_of(key: &RsaPrivateKey, attributes: u32, policy: &[u8]) -> TpmPublic {
        TpmPublic {
            name_alg: TPM_ALG_SHA256,
            object_attributes: attributes,
            auth_policy: policy.to_vec(),
            params: PublicParams::Rsa(RsaPublic {
                symmetric: Some(AES_128_CFB),
                scheme: RsaScheme::Null,
                key_bits: 2048,
                exponent: 0,
                modulus: key.n().to_bytes_be(),
            }),
        }
    }

    fn cfb_decrypt(key: &[u8], buf: &mut [u8]) {
        cfb_mode::Decryptor::<Aes128>::new_from_slices(key, &[0u8; 16]).unwrap().decrypt(buf);
    }

    /// Reads a TPM2B off the front of `bytes`.
    fn split2b(bytes: &[u8]) -> (&[u8], &[u8]) {
        let len = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
        (&bytes[2..2 + len], &bytes[2 + len..])
    }

    /// Everything a TPM does with the blob (ActivateCredential, Import), in software.
    fn device_side(blob: &[u8], ek: &RsaPrivateKey, srk: &RsaPrivateKey, srk_name: &[u8]) -> Vec<u8> {
        let blob = AuthenticationKeyBlob::parse(blob).unwrap();
        // ActivateCredential.
        let seed1 = ek.decrypt(Oaep::new_with_label::<Sha256, _>("IDENTITY\0"), &blob.encrypted_secret).unwrap();
        let (integrity, enc_identity) = split2b(&blob.id_object);
        let hmac_key1 = kdfa(&seed1, b"INTEGRITY", &[], &[], 256);
        assert_eq!(integrity, hmac_sha256(&hmac_key1, &[enc_identity, srk_name]));
        let mut credential = enc_identity.to_vec();
        cfb_decrypt(&kdfa(&seed1, b"STORAGE", srk_name, &[], 128), &mut credential);
        let (inner_key, rest) = split2b(&credential);
        assert!(rest.is_empty());
        assert_eq!(inner_key.len(), INNER_KEY_LEN);
        // Import: outer wrapper.
        let public = TpmPublic::parse(&blob.public).unwrap();
        assert_eq!(public.object_attributes, HMAC_KEY_ATTRIBUTES);
        let key_name = public.name().unwrap();
        let seed2 = srk.decrypt(Oaep::new_with_label::<Sha256, _>("DUPLICATE\0"), &blob.import_seed).unwrap();
        let (outer_hmac, dup_sensitive) = split2b(&blob.duplicate);
        let hmac_key2 = kdfa(&seed2, b"INTEGRITY", &[], &[], 256);
        assert_eq!(outer_hmac, hmac_sha256(&hmac_key2, &[dup_sensitive, &key_name]));
        let mut enc_sensitive = dup_sensitive.to_vec();
        cfb_decrypt(&kdfa(&seed2, b"STORAGE", &key_name, &[], 128), &mut enc_sensitive);
        // Inner wrapper.
        cfb_decrypt(inner_key, &mut enc_sensitive);
        let (inner_integrity, sens2b) = split2b(&enc_sensitive);
        assert_eq!(inner_integrity, &Sha256::new().chain_update(sens2b).chain_update(&key_name).finalize()[..]);
        let (sensitive, rest) = split2b(sens2b);
        assert!(rest.is_empty());
        assert_eq!(sensitive[..2], [0x00, 0x08], "KEYEDHASH");
        let (auth, rest) = split2b(&sensitive[2..]);
        assert!(auth.is_empty());
        let (seed_value, rest) = split2b(rest);
        let (key, rest) = split2b(rest);
        assert!(rest.is_empty());
        // The public area is bound to this secret.
        let PublicParams::KeyedHash(kh) = &public.params else { panic!("not KEYEDHASH") };
        assert_eq!(kh.unique, Sha256::new().chain_update(seed_value).chain_update(key).finalize().to_vec());
        assert!(blob.enc_uri_data.is_empty());
        key.to_vec()
    }

    #[test]
    fn the_blob_opens_to_the_hmac_key_in_software() {
        let mut rng = StdRng::seed_from_u64(7);
        let ek_priv = RsaPrivateKey::new(&mut rng, 2048).unwrap();
        let srk_priv = RsaPrivateKey::new(&mut rng, 2048).unwrap();
        let ek = public_of(&ek_priv, 0x000300B2, &EK_POLICY);
        let srk = public_of(&srk_priv, 0x00030472, &[]);
        // The SDKs marshal these exactly like this.
        let ek = TpmPublic::parse_tpm2b(&ek.marshal_tpm2b().unwrap()).unwrap();
        let hmac_key = [0x42u8; 32];
        let blob = build_authentication_key(&ek, &srk, &hmac_key, &mut rng).unwrap();
        assert_eq!(blob.len(), 766, "protocol.md §6.5 step 7");
        assert_eq!(blob[blob.len() - 2..], [0, 0], "item 6 is empty");
        assert_eq!(device_side(&blob, &ek_priv, &srk_priv, &srk.name().unwrap()), hmac_key);
        // Fresh seeds every time; other key lengths work.
        let again = build_authentication_key(&ek, &srk, &hmac_key, &mut rng).unwrap();
        assert_ne!(blob, again);
        let short = build_authentication_key(&ek, &srk, b"k", &mut rng).unwrap();
        assert_eq!(device_side(&short, &ek_priv, &srk_priv, &srk.name().unwrap()), b"k");
        let long = build_authentication_key(&ek, &srk, &[9; MAX_SYM_DATA], &mut rng).unwrap();
        assert_eq!(device_side(&long, &ek_priv, &srk_priv, &srk.name().unwrap()), [9; MAX_SYM_DATA]);
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
