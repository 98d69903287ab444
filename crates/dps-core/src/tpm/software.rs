//! A TPM in software, for tests and the load generator: it holds the private halves of an
//! endorsement key and a storage root key and does what a device's TPM does with the
//! authentication-key blob (`TPM2_ActivateCredential`, then `TPM2_Import` of the duplicated
//! HMAC key), checking every integrity value on the way as a TPM does. It is *not* a proof
//! that a real TPM accepts the blob: `crates/dps-core/tests/tpm_swtpm.rs` and the official
//! client's compat tests are.

use aes::Aes128;
use aws_lc_rs::rsa::{OaepPrivateDecryptingKey, PrivateDecryptingKey, OAEP_SHA256_MGF1SHA256};
use cfb_mode::cipher::{AsyncStreamCipher, KeyIvInit};
use dps_proto::tpm::{
    AuthenticationKeyBlob, PublicParams, RsaPublic, RsaScheme, TpmPublic, TPM_ALG_KEYEDHASH, TPM_ALG_SHA256,
};
use rand::{CryptoRng, RngCore};
use rsa::pkcs8::EncodePrivateKey;
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use sha2::{Digest, Sha256};

use super::{hmac_sha256, kdfa, TpmError, AES_128_CFB, INNER_KEY_LEN};

/// The EK template's authPolicy: `PolicySecret(TPM_RH_ENDORSEMENT)` (protocol.md §6.2).
pub const EK_AUTH_POLICY: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24, 0xfd, 0x52, 0xd7,
    0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];
/// The EK template's objectAttributes.
pub const EK_ATTRIBUTES: u32 = 0x0003_00B2;
/// The SRK template's objectAttributes.
pub const SRK_ATTRIBUTES: u32 = 0x0003_0472;

/// A software TPM's two keys.
pub struct SoftwareTpm {
    ek: OaepPrivateDecryptingKey,
    srk: OaepPrivateDecryptingKey,
    ek_public: TpmPublic,
    srk_public: TpmPublic,
}

impl std::fmt::Debug for SoftwareTpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SoftwareTpm(<private keys>)")
    }
}

/// The public area the SDK templates give an RSA-2048 key.
pub(super) fn template(key: &RsaPrivateKey, attributes: u32, policy: &[u8]) -> TpmPublic {
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

/// The private key in the form the OAEP implementation takes.
fn decrypting(key: &RsaPrivateKey, which: &'static str) -> Result<OaepPrivateDecryptingKey, TpmError> {
    let der = key.to_pkcs8_der().map_err(|_| TpmError::Oaep(which))?;
    PrivateDecryptingKey::from_pkcs8(der.as_bytes())
        .ok()
        .and_then(|k| OaepPrivateDecryptingKey::new(k).ok())
        .ok_or(TpmError::Oaep(which))
}

/// RSA-OAEP decryption (SHA-256, MGF1-SHA-256) under `label`.
fn oaep_decrypt(
    key: &OaepPrivateDecryptingKey,
    label: &[u8],
    ciphertext: &[u8],
    failure: &'static str,
) -> Result<Vec<u8>, TpmError> {
    let mut out = vec![0u8; key.min_output_size()];
    let len = key
        .decrypt(&OAEP_SHA256_MGF1SHA256, ciphertext, &mut out, Some(label))
        .map_err(|_| open_failed(failure))?
        .len();
    out.truncate(len);
    Ok(out)
}

fn open_failed(what: &'static str) -> TpmError {
    TpmError::Open(what)
}

/// Splits a `u16`-sized structure off the front of `bytes`.
fn split2b<'a>(bytes: &'a [u8], what: &'static str) -> Result<(&'a [u8], &'a [u8]), TpmError> {
    let (size, rest) = bytes.split_first_chunk::<2>().ok_or(open_failed(what))?;
    let len = usize::from(u16::from_be_bytes(*size));
    if rest.len() < len {
        return Err(open_failed(what));
    }
    Ok(rest.split_at(len))
}

fn cfb_decrypt(key: &[u8], buf: &mut [u8]) -> Result<(), TpmError> {
    cfb_mode::Decryptor::<Aes128>::new_from_slices(key, &[0u8; 16])
        .map_err(|_| open_failed("a wrap key of the wrong length"))?
        .decrypt(buf);
    Ok(())
}

impl SoftwareTpm {
    /// Two fresh RSA-2048 keys with the SDKs' EK and SRK templates.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Result<Self, TpmError> {
        let ek = RsaPrivateKey::new(rng, 2048).map_err(|source| TpmError::Rsa { which: "endorsement key", source })?;
        let srk =
            RsaPrivateKey::new(rng, 2048).map_err(|source| TpmError::Rsa { which: "storage root key", source })?;
        Self::from_keys(&ek, &srk)
    }

    /// A software TPM with these keys (each RSA-2048) as EK and SRK.
    pub fn from_keys(ek: &RsaPrivateKey, srk: &RsaPrivateKey) -> Result<Self, TpmError> {
        let ek_public = template(ek, EK_ATTRIBUTES, &EK_AUTH_POLICY);
        let srk_public = template(srk, SRK_ATTRIBUTES, &[]);
        Ok(Self {
            ek: decrypting(ek, "endorsement key")?,
            srk: decrypting(srk, "storage root key")?,
            ek_public,
            srk_public,
        })
    }

    /// The endorsement key's public area.
    pub fn endorsement_key(&self) -> &TpmPublic {
        &self.ek_public
    }

    /// The storage root key's public area.
    pub fn storage_root_key(&self) -> &TpmPublic {
        &self.srk_public
    }

    /// What the device's TPM does with an authentication-key blob: activates the credential
    /// with the EK (bound to the SRK's Name), unwraps the duplicated HMAC key under the SRK
    /// with it, and returns that key's secret — the key the device signs its SAS tokens with.
    pub fn import(&self, blob: &[u8]) -> Result<Vec<u8>, TpmError> {
        let blob = AuthenticationKeyBlob::parse(blob)?;
        let srk_name = self.srk_public.name()?;
        // TPM2_ActivateCredential.
        let seed1 = oaep_decrypt(
            &self.ek,
            b"IDENTITY\0",
            &blob.encrypted_secret,
            "the credential's secret is not encrypted to this EK",
        )?;
        let (integrity, enc_identity) = split2b(&blob.id_object, "the credential")?;
        let hmac_key1 = kdfa(&seed1, b"INTEGRITY", &[], &[], 256);
        if integrity != hmac_sha256(&hmac_key1, &[enc_identity, &srk_name]) {
            return Err(open_failed("the credential's integrity HMAC does not match (TPM_RC_INTEGRITY)"));
        }
        let mut credential = enc_identity.to_vec();
        cfb_decrypt(&kdfa(&seed1, b"STORAGE", &srk_name, &[], 128), &mut credential)?;
        let (inner_key, rest) = split2b(&credential, "the credential")?;
        if !rest.is_empty() || inner_key.len() != INNER_KEY_LEN {
            return Err(open_failed("the credential is not a 16-byte inner wrap key"));
        }
        // TPM2_Import: the outer wrapper, then the inner one.
        let public = TpmPublic::parse(&blob.public)?;
        let key_name = public.name()?;
        let seed2 =
            oaep_decrypt(&self.srk, b"DUPLICATE\0", &blob.import_seed, "the import seed is not encrypted to this SRK")?;
        let (outer_hmac, dup_sensitive) = split2b(&blob.duplicate, "the duplicate")?;
        let hmac_key2 = kdfa(&seed2, b"INTEGRITY", &[], &[], 256);
        if outer_hmac != hmac_sha256(&hmac_key2, &[dup_sensitive, &key_name]) {
            return Err(open_failed("the duplicate's outer HMAC does not match (TPM_RC_INTEGRITY)"));
        }
        let mut sensitive = dup_sensitive.to_vec();
        cfb_decrypt(&kdfa(&seed2, b"STORAGE", &key_name, &[], 128), &mut sensitive)?;
        cfb_decrypt(inner_key, &mut sensitive)?;
        let (inner_integrity, sens2b) = split2b(&sensitive, "the sensitive area")?;
        if inner_integrity != &Sha256::new().chain_update(sens2b).chain_update(&key_name).finalize()[..] {
            return Err(open_failed("the inner integrity does not match (TPM_RC_INTEGRITY)"));
        }
        let (area, _) = split2b(sens2b, "the sensitive area")?;
        let (kind, rest) = area.split_first_chunk::<2>().ok_or(open_failed("the sensitive area"))?;
        if u16::from_be_bytes(*kind) != TPM_ALG_KEYEDHASH {
            return Err(open_failed("the imported object is not a KEYEDHASH key"));
        }
        let (_auth, rest) = split2b(rest, "the sensitive area")?;
        let (seed_value, rest) = split2b(rest, "the sensitive area")?;
        let (key, _) = split2b(rest, "the sensitive area")?;
        // TPM2_Load checks that the public area is bound to this secret.
        let PublicParams::KeyedHash(kh) = &public.params else {
            return Err(open_failed("the imported object is not a KEYEDHASH key"));
        };
        if kh.unique != Sha256::new().chain_update(seed_value).chain_update(key).finalize().to_vec() {
            return Err(open_failed("the public area is not bound to the secret (TPM_RC_BINDING)"));
        }
        Ok(key.to_vec())
    }
}
