//! TPM 2.0 marshalling for TPM attestation (docs: protocol.md §6): the public areas devices send
//! (`endorsementKey` / `storageRootKey` are base64 of a marshalled `TPM2B_PUBLIC`, §6.2), the
//! KEYEDHASH public and sensitive areas of the HMAC key DPS hands to the device, object `Name`s,
//! and the six-part authentication-key blob of §6.4.
//!
//! Hand-written and strict: every length is checked against what follows and against the TPM's
//! own limits, trailing bytes are refused, and only the shapes DPS needs are understood (RSA and
//! KEYEDHASH objects). Everything is big-endian, as TPM marshalling is. Parsing is canonical:
//! marshalling a parsed value gives back exactly the bytes it was parsed from.

use sha2::{Digest, Sha256, Sha384, Sha512};

/// `TPM_ALG_RSA`: an RSA object.
pub const TPM_ALG_RSA: u16 = 0x0001;
/// `TPM_ALG_SHA1`.
pub const TPM_ALG_SHA1: u16 = 0x0004;
/// `TPM_ALG_HMAC`: the HMAC signing scheme of a KEYEDHASH object.
pub const TPM_ALG_HMAC: u16 = 0x0005;
/// `TPM_ALG_AES`.
pub const TPM_ALG_AES: u16 = 0x0006;
/// `TPM_ALG_MGF1`.
pub const TPM_ALG_MGF1: u16 = 0x0007;
/// `TPM_ALG_KEYEDHASH`: a keyed-hash (HMAC or XOR) object.
pub const TPM_ALG_KEYEDHASH: u16 = 0x0008;
/// `TPM_ALG_XOR`: the XOR obfuscation scheme of a KEYEDHASH object.
pub const TPM_ALG_XOR: u16 = 0x000A;
/// `TPM_ALG_SHA256`.
pub const TPM_ALG_SHA256: u16 = 0x000B;
/// `TPM_ALG_SHA384`.
pub const TPM_ALG_SHA384: u16 = 0x000C;
/// `TPM_ALG_SHA512`.
pub const TPM_ALG_SHA512: u16 = 0x000D;
/// `TPM_ALG_NULL`: no algorithm (no symmetric definition, no scheme).
pub const TPM_ALG_NULL: u16 = 0x0010;
/// `TPM_ALG_SM3_256`.
pub const TPM_ALG_SM3_256: u16 = 0x0012;
/// `TPM_ALG_SM4`.
pub const TPM_ALG_SM4: u16 = 0x0013;
/// `TPM_ALG_RSASSA`: PKCS#1 v1.5 signatures.
pub const TPM_ALG_RSASSA: u16 = 0x0014;
/// `TPM_ALG_RSAES`: PKCS#1 v1.5 encryption (no hash parameter).
pub const TPM_ALG_RSAES: u16 = 0x0015;
/// `TPM_ALG_RSAPSS`: PSS signatures.
pub const TPM_ALG_RSAPSS: u16 = 0x0016;
/// `TPM_ALG_OAEP`: OAEP encryption.
pub const TPM_ALG_OAEP: u16 = 0x0017;
/// `TPM_ALG_KDF1_SP800_56A`.
pub const TPM_ALG_KDF1_SP800_56A: u16 = 0x0020;
/// `TPM_ALG_KDF2`.
pub const TPM_ALG_KDF2: u16 = 0x0021;
/// `TPM_ALG_KDF1_SP800_108`.
pub const TPM_ALG_KDF1_SP800_108: u16 = 0x0022;
/// `TPM_ALG_CAMELLIA`.
pub const TPM_ALG_CAMELLIA: u16 = 0x0026;
/// `TPM_ALG_SHA3_256`.
pub const TPM_ALG_SHA3_256: u16 = 0x0027;
/// `TPM_ALG_SHA3_384`.
pub const TPM_ALG_SHA3_384: u16 = 0x0028;
/// `TPM_ALG_SHA3_512`.
pub const TPM_ALG_SHA3_512: u16 = 0x0029;
/// `TPM_ALG_CFB`: cipher feedback mode (the only mode of a storage key's symmetric definition).
pub const TPM_ALG_CFB: u16 = 0x0043;

/// `TPMA_OBJECT` bits (TPM 2.0 Part 2 §8.3).
pub mod attrs {
    /// `fixedTPM`: the object cannot be duplicated.
    pub const FIXED_TPM: u32 = 0x0000_0002;
    /// `stClear`.
    pub const ST_CLEAR: u32 = 0x0000_0004;
    /// `fixedParent`: the object cannot be re-parented.
    pub const FIXED_PARENT: u32 = 0x0000_0010;
    /// `sensitiveDataOrigin`: the TPM generated the secret.
    pub const SENSITIVE_DATA_ORIGIN: u32 = 0x0000_0020;
    /// `userWithAuth`: the authValue (or a policy) authorises USER role use.
    pub const USER_WITH_AUTH: u32 = 0x0000_0040;
    /// `adminWithPolicy`: ADMIN role use needs the policy.
    pub const ADMIN_WITH_POLICY: u32 = 0x0000_0080;
    /// `noDA`: not subject to dictionary-attack protection.
    pub const NO_DA: u32 = 0x0000_0400;
    /// `encryptedDuplication`.
    pub const ENCRYPTED_DUPLICATION: u32 = 0x0000_0800;
    /// `restricted`.
    pub const RESTRICTED: u32 = 0x0001_0000;
    /// `decrypt`.
    pub const DECRYPT: u32 = 0x0002_0000;
    /// `sign` / `encrypt`.
    pub const SIGN_ENCRYPT: u32 = 0x0004_0000;
}

/// Largest `TPM2B_DIGEST` (the TPM's `sizeof(TPMU_HA)`, SHA-512).
pub const MAX_DIGEST: usize = 64;
/// Largest RSA modulus in bytes (4096-bit keys).
pub const MAX_RSA_KEY_BYTES: usize = 512;
/// Largest KEYEDHASH secret (`MAX_SYM_DATA`).
pub const MAX_SYM_DATA: usize = 128;

/// What is wrong with TPM-marshalled bytes (or with a value that cannot be marshalled).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpmError {
    /// The input ends inside a field.
    #[error("{what} is truncated: it needs {need} bytes but only {have} remain")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Bytes the field needs.
        need: usize,
        /// Bytes left in the input.
        have: usize,
    },
    /// Bytes follow a structure that should end the input (or its size field).
    #[error("{count} unexpected bytes follow {what}")]
    TrailingBytes {
        /// The structure that should have ended there.
        what: &'static str,
        /// How many bytes are left over.
        count: usize,
    },
    /// A sized field is larger than the TPM allows.
    #[error("{what} is {len} bytes, more than the {max} a TPM allows")]
    TooLong {
        /// The field.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A sized structure has size zero where content is required.
    #[error("{0} is empty")]
    Empty(&'static str),
    /// The public area is neither RSA nor KEYEDHASH.
    #[error("unsupported TPM object type 0x{0:04x} (only RSA 0x0001 and KEYEDHASH 0x0008 are understood)")]
    UnsupportedType(u16),
    /// An algorithm identifier that is not valid in its field.
    #[error("unsupported {what} algorithm 0x{alg:04x}")]
    UnsupportedAlgorithm {
        /// The field (`nameAlg`, `symmetric`, `scheme`, …).
        what: &'static str,
        /// The identifier found.
        alg: u16,
    },
    /// A symmetric key size that the algorithm does not have.
    #[error("symmetric algorithm 0x{alg:04x} has no {bits}-bit keys")]
    SymmetricKeyBits {
        /// The symmetric algorithm.
        alg: u16,
        /// The key size found.
        bits: u16,
    },
    /// `keyBits` of an RSA key is not a TPM RSA size.
    #[error("RSA keyBits {0} is not 1024, 2048, 3072 or 4096")]
    RsaKeyBits(u16),
    /// The modulus length does not match `keyBits`.
    #[error("the RSA modulus is {len} bytes but keyBits {key_bits} needs {} bytes", .key_bits / 8)]
    ModulusLength {
        /// The declared key size.
        key_bits: u16,
        /// The modulus length found.
        len: usize,
    },
    /// An RSA public exponent that is even or below 3.
    #[error("RSA exponent {0} is not valid (must be 0 for 65537, or odd and at least 3)")]
    RsaExponent(u32),
    /// The authPolicy is neither empty nor a digest of the object's nameAlg.
    #[error("authPolicy is {len} bytes; it must be empty or a {expected}-byte nameAlg digest")]
    PolicyLength {
        /// The length found.
        len: usize,
        /// The nameAlg's digest size.
        expected: usize,
    },
    /// `Name` is only computed for SHA-256, SHA-384 and SHA-512 name algorithms.
    #[error("cannot compute the Name of an object with nameAlg 0x{0:04x} (only SHA-256/384/512)")]
    UnsupportedNameAlg(u16),
}

/// A TPM object's public area (`TPMT_PUBLIC`), RSA or KEYEDHASH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmPublic {
    /// `nameAlg`: the hash of the object's Name (and of its KDFs when it is a parent).
    pub name_alg: u16,
    /// `objectAttributes` (see [`attrs`]).
    pub object_attributes: u32,
    /// `authPolicy`: empty, or a digest of `name_alg`.
    pub auth_policy: Vec<u8>,
    /// The type-specific `parameters` and `unique` fields.
    pub params: PublicParams,
}

/// The type-dependent part of a [`TpmPublic`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicParams {
    /// `TPM_ALG_RSA`.
    Rsa(RsaPublic),
    /// `TPM_ALG_KEYEDHASH`.
    KeyedHash(KeyedHashPublic),
}

/// `TPMS_RSA_PARMS` plus the modulus (`unique.rsa`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaPublic {
    /// `symmetric`: `None` is `TPM_ALG_NULL` (not a storage key).
    pub symmetric: Option<SymDefObject>,
    /// `scheme`.
    pub scheme: RsaScheme,
    /// `keyBits`.
    pub key_bits: u16,
    /// `exponent` as marshalled: 0 means the default 65537 ([`RsaPublic::exponent_value`]).
    pub exponent: u32,
    /// The big-endian modulus, exactly `key_bits / 8` bytes.
    pub modulus: Vec<u8>,
}

/// A non-null `TPMT_SYM_DEF_OBJECT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymDefObject {
    /// `algorithm` (AES, SM4 or CAMELLIA).
    pub algorithm: u16,
    /// `keyBits`.
    pub key_bits: u16,
    /// `mode` (CFB for storage keys).
    pub mode: u16,
}

/// `TPMT_RSA_SCHEME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RsaScheme {
    /// `TPM_ALG_NULL` (EK and SRK templates).
    Null,
    /// `TPM_ALG_RSAES` (no parameters).
    Rsaes,
    /// `TPM_ALG_RSASSA` with its hash.
    Rsassa(u16),
    /// `TPM_ALG_RSAPSS` with its hash.
    Rsapss(u16),
    /// `TPM_ALG_OAEP` with its hash.
    Oaep(u16),
}

/// `TPMS_KEYEDHASH_PARMS` plus `unique.keyedHash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedHashPublic {
    /// `scheme`.
    pub scheme: KeyedHashScheme,
    /// `unique`: for a key, `H_nameAlg(seedValue ‖ key)`.
    pub unique: Vec<u8>,
}

/// `TPMT_KEYEDHASH_SCHEME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyedHashScheme {
    /// `TPM_ALG_NULL` (sealed data).
    Null,
    /// `TPM_ALG_HMAC` with its hash: an HMAC key.
    Hmac(u16),
    /// `TPM_ALG_XOR` with its hash and KDF.
    Xor {
        /// `hashAlg`.
        hash_alg: u16,
        /// `kdf`.
        kdf: u16,
    },
}

/// Digest size of a TPM hash algorithm, `None` when `alg` is not one.
pub fn digest_size(alg: u16) -> Option<usize> {
    match alg {
        TPM_ALG_SHA1 => Some(20),
        TPM_ALG_SHA256 | TPM_ALG_SM3_256 | TPM_ALG_SHA3_256 => Some(32),
        TPM_ALG_SHA384 | TPM_ALG_SHA3_384 => Some(48),
        TPM_ALG_SHA512 | TPM_ALG_SHA3_512 => Some(64),
        _ => None,
    }
}

/// Hashes `data` with a TPM hash algorithm this crate implements (SHA-256/384/512).
pub fn hash(alg: u16, data: &[u8]) -> Result<Vec<u8>, TpmError> {
    match alg {
        TPM_ALG_SHA256 => Ok(Sha256::digest(data).to_vec()),
        TPM_ALG_SHA384 => Ok(Sha384::digest(data).to_vec()),
        TPM_ALG_SHA512 => Ok(Sha512::digest(data).to_vec()),
        other => Err(TpmError::UnsupportedNameAlg(other)),
    }
}

/// Marshals `bytes` as a TPM2B (`u16` size ‖ bytes); `what` names the field in the error.
pub fn tpm2b(what: &'static str, bytes: &[u8]) -> Result<Vec<u8>, TpmError> {
    let mut out = Vec::with_capacity(bytes.len() + 2);
    put_tpm2b(&mut out, what, bytes, usize::from(u16::MAX))?;
    Ok(out)
}

fn put_tpm2b(out: &mut Vec<u8>, what: &'static str, bytes: &[u8], max: usize) -> Result<(), TpmError> {
    let len = u16::try_from(bytes.len()).ok().filter(|_| bytes.len() <= max).ok_or(TpmError::TooLong {
        what,
        len: bytes.len(),
        max,
    })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// A cursor over input bytes that reports what it was reading when the input runs out.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], TpmError> {
        if self.rest.len() < n {
            return Err(TpmError::Truncated { what, need: n, have: self.rest.len() });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, TpmError> {
        let b = self.take(what, 2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, TpmError> {
        let b = self.take(what, 4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A TPM2B: size, then that many bytes (at most `max`).
    fn tpm2b(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], TpmError> {
        let len = usize::from(self.u16(what)?);
        if len > max {
            return Err(TpmError::TooLong { what, len, max });
        }
        self.take(what, len)
    }

    fn finish(&self, what: &'static str) -> Result<(), TpmError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(TpmError::TrailingBytes { what, count: self.rest.len() })
        }
    }
}

fn hash_alg(what: &'static str, alg: u16) -> Result<u16, TpmError> {
    digest_size(alg).map(|_| alg).ok_or(TpmError::UnsupportedAlgorithm { what, alg })
}

fn check_symmetric(sym: &SymDefObject) -> Result<(), TpmError> {
    let bits_ok = match sym.algorithm {
        TPM_ALG_AES | TPM_ALG_CAMELLIA => matches!(sym.key_bits, 128 | 192 | 256),
        TPM_ALG_SM4 => sym.key_bits == 128,
        alg => return Err(TpmError::UnsupportedAlgorithm { what: "symmetric", alg }),
    };
    if !bits_ok {
        return Err(TpmError::SymmetricKeyBits { alg: sym.algorithm, bits: sym.key_bits });
    }
    // TPMI_ALG_SYM_MODE: CTR, OFB, CBC, CFB, ECB.
    if !matches!(sym.mode, 0x0040..=0x0044) {
        return Err(TpmError::UnsupportedAlgorithm { what: "symmetric mode", alg: sym.mode });
    }
    Ok(())
}

fn check_rsa(rsa: &RsaPublic) -> Result<(), TpmError> {
    if let Some(sym) = &rsa.symmetric {
        check_symmetric(sym)?;
    }
    match rsa.scheme {
        RsaScheme::Null | RsaScheme::Rsaes => {}
        RsaScheme::Rsassa(h) | RsaScheme::Rsapss(h) | RsaScheme::Oaep(h) => {
            hash_alg("RSA scheme hash", h)?;
        }
    }
    if !matches!(rsa.key_bits, 1024 | 2048 | 3072 | 4096) {
        return Err(TpmError::RsaKeyBits(rsa.key_bits));
    }
    if rsa.exponent != 0 && (rsa.exponent < 3 || rsa.exponent % 2 == 0) {
        return Err(TpmError::RsaExponent(rsa.exponent));
    }
    if rsa.modulus.len() != usize::from(rsa.key_bits) / 8 {
        return Err(TpmError::ModulusLength { key_bits: rsa.key_bits, len: rsa.modulus.len() });
    }
    Ok(())
}

fn check_keyed_hash(kh: &KeyedHashPublic) -> Result<(), TpmError> {
    match kh.scheme {
        KeyedHashScheme::Null => {}
        KeyedHashScheme::Hmac(h) => {
            hash_alg("HMAC scheme hash", h)?;
        }
        KeyedHashScheme::Xor { hash_alg: h, kdf } => {
            hash_alg("XOR scheme hash", h)?;
            if !matches!(kdf, TPM_ALG_MGF1 | TPM_ALG_KDF1_SP800_56A | TPM_ALG_KDF2 | TPM_ALG_KDF1_SP800_108) {
                return Err(TpmError::UnsupportedAlgorithm { what: "XOR scheme KDF", alg: kdf });
            }
        }
    }
    if kh.unique.len() > MAX_DIGEST {
        return Err(TpmError::TooLong { what: "KEYEDHASH unique", len: kh.unique.len(), max: MAX_DIGEST });
    }
    Ok(())
}

impl TpmPublic {
    /// Parses a marshalled `TPM2B_PUBLIC` (`u16` size ‖ `TPMT_PUBLIC`) that is the whole input,
    /// as devices send `endorsementKey` and `storageRootKey` (after base64 decoding).
    pub fn parse_tpm2b(bytes: &[u8]) -> Result<Self, TpmError> {
        let mut r = Reader::new(bytes);
        let inner = r.tpm2b("TPM2B_PUBLIC", usize::from(u16::MAX))?;
        r.finish("the TPM2B_PUBLIC")?;
        if inner.is_empty() {
            return Err(TpmError::Empty("TPM2B_PUBLIC"));
        }
        Self::parse(inner)
    }

    /// Parses an unsized `TPMT_PUBLIC` that is the whole input.
    pub fn parse(bytes: &[u8]) -> Result<Self, TpmError> {
        let mut r = Reader::new(bytes);
        let kind = r.u16("TPMT_PUBLIC type")?;
        if kind != TPM_ALG_RSA && kind != TPM_ALG_KEYEDHASH {
            return Err(TpmError::UnsupportedType(kind));
        }
        let name_alg = hash_alg("nameAlg", r.u16("TPMT_PUBLIC nameAlg")?)?;
        let object_attributes = r.u32("TPMT_PUBLIC objectAttributes")?;
        let auth_policy = r.tpm2b("TPMT_PUBLIC authPolicy", MAX_DIGEST)?.to_vec();
        let params = if kind == TPM_ALG_RSA {
            let sym_alg = r.u16("RSA parameters symmetric.algorithm")?;
            let symmetric = if sym_alg == TPM_ALG_NULL {
                None
            } else {
                let key_bits = r.u16("RSA parameters symmetric.keyBits")?;
                let mode = r.u16("RSA parameters symmetric.mode")?;
                Some(SymDefObject { algorithm: sym_alg, key_bits, mode })
            };
            let scheme = match r.u16("RSA parameters scheme")? {
                TPM_ALG_NULL => RsaScheme::Null,
                TPM_ALG_RSAES => RsaScheme::Rsaes,
                TPM_ALG_RSASSA => RsaScheme::Rsassa(r.u16("RSA scheme hashAlg")?),
                TPM_ALG_RSAPSS => RsaScheme::Rsapss(r.u16("RSA scheme hashAlg")?),
                TPM_ALG_OAEP => RsaScheme::Oaep(r.u16("RSA scheme hashAlg")?),
                alg => return Err(TpmError::UnsupportedAlgorithm { what: "RSA scheme", alg }),
            };
            let key_bits = r.u16("RSA parameters keyBits")?;
            let exponent = r.u32("RSA parameters exponent")?;
            let modulus = r.tpm2b("RSA unique (modulus)", MAX_RSA_KEY_BYTES)?.to_vec();
            PublicParams::Rsa(RsaPublic { symmetric, scheme, key_bits, exponent, modulus })
        } else {
            let scheme = match r.u16("KEYEDHASH parameters scheme")? {
                TPM_ALG_NULL => KeyedHashScheme::Null,
                TPM_ALG_HMAC => KeyedHashScheme::Hmac(r.u16("HMAC scheme hashAlg")?),
                TPM_ALG_XOR => {
                    let hash_alg = r.u16("XOR scheme hashAlg")?;
                    KeyedHashScheme::Xor { hash_alg, kdf: r.u16("XOR scheme kdf")? }
                }
                alg => return Err(TpmError::UnsupportedAlgorithm { what: "KEYEDHASH scheme", alg }),
            };
            let unique = r.tpm2b("KEYEDHASH unique", MAX_DIGEST)?.to_vec();
            PublicParams::KeyedHash(KeyedHashPublic { scheme, unique })
        };
        r.finish("the TPMT_PUBLIC")?;
        let public = Self { name_alg, object_attributes, auth_policy, params };
        public.check()?;
        Ok(public)
    }

    /// The public area of an HMAC-SHA-256 KEYEDHASH key with `unique` = `H(seedValue ‖ key)`
    /// and an empty authPolicy (protocol.md §6.5 step 4).
    pub fn hmac_sha256_key(object_attributes: u32, unique: Vec<u8>) -> Self {
        Self {
            name_alg: TPM_ALG_SHA256,
            object_attributes,
            auth_policy: Vec::new(),
            params: PublicParams::KeyedHash(KeyedHashPublic { scheme: KeyedHashScheme::Hmac(TPM_ALG_SHA256), unique }),
        }
    }

    /// Checks the invariants [`TpmPublic::parse`] enforces; `marshal` refuses values that fail it.
    pub fn check(&self) -> Result<(), TpmError> {
        let Some(size) = digest_size(self.name_alg) else {
            return Err(TpmError::UnsupportedAlgorithm { what: "nameAlg", alg: self.name_alg });
        };
        if !self.auth_policy.is_empty() && self.auth_policy.len() != size {
            return Err(TpmError::PolicyLength { len: self.auth_policy.len(), expected: size });
        }
        match &self.params {
            PublicParams::Rsa(rsa) => check_rsa(rsa),
            PublicParams::KeyedHash(kh) => check_keyed_hash(kh),
        }
    }

    /// The RSA parameters, if this is an RSA key.
    pub fn rsa(&self) -> Option<&RsaPublic> {
        match &self.params {
            PublicParams::Rsa(rsa) => Some(rsa),
            PublicParams::KeyedHash(_) => None,
        }
    }

    /// Marshals the unsized `TPMT_PUBLIC`.
    pub fn marshal(&self) -> Result<Vec<u8>, TpmError> {
        self.check()?;
        let mut out = Vec::with_capacity(64 + MAX_RSA_KEY_BYTES);
        let kind = match self.params {
            PublicParams::Rsa(_) => TPM_ALG_RSA,
            PublicParams::KeyedHash(_) => TPM_ALG_KEYEDHASH,
        };
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&self.name_alg.to_be_bytes());
        out.extend_from_slice(&self.object_attributes.to_be_bytes());
        put_tpm2b(&mut out, "TPMT_PUBLIC authPolicy", &self.auth_policy, MAX_DIGEST)?;
        match &self.params {
            PublicParams::Rsa(rsa) => {
                match &rsa.symmetric {
                    None => out.extend_from_slice(&TPM_ALG_NULL.to_be_bytes()),
                    Some(sym) => {
                        for v in [sym.algorithm, sym.key_bits, sym.mode] {
                            out.extend_from_slice(&v.to_be_bytes());
                        }
                    }
                }
                let scheme: &[u16] = match &rsa.scheme {
                    RsaScheme::Null => &[TPM_ALG_NULL],
                    RsaScheme::Rsaes => &[TPM_ALG_RSAES],
                    RsaScheme::Rsassa(h) => &[TPM_ALG_RSASSA, *h],
                    RsaScheme::Rsapss(h) => &[TPM_ALG_RSAPSS, *h],
                    RsaScheme::Oaep(h) => &[TPM_ALG_OAEP, *h],
                };
                for v in scheme {
                    out.extend_from_slice(&v.to_be_bytes());
                }
                out.extend_from_slice(&rsa.key_bits.to_be_bytes());
                out.extend_from_slice(&rsa.exponent.to_be_bytes());
                put_tpm2b(&mut out, "RSA unique (modulus)", &rsa.modulus, MAX_RSA_KEY_BYTES)?;
            }
            PublicParams::KeyedHash(kh) => {
                let scheme: &[u16] = match &kh.scheme {
                    KeyedHashScheme::Null => &[TPM_ALG_NULL],
                    KeyedHashScheme::Hmac(h) => &[TPM_ALG_HMAC, *h],
                    KeyedHashScheme::Xor { hash_alg, kdf } => &[TPM_ALG_XOR, *hash_alg, *kdf],
                };
                for v in scheme {
                    out.extend_from_slice(&v.to_be_bytes());
                }
                put_tpm2b(&mut out, "KEYEDHASH unique", &kh.unique, MAX_DIGEST)?;
            }
        }
        Ok(out)
    }

    /// Marshals the `TPM2B_PUBLIC` (`u16` size ‖ `TPMT_PUBLIC`).
    pub fn marshal_tpm2b(&self) -> Result<Vec<u8>, TpmError> {
        tpm2b("TPM2B_PUBLIC", &self.marshal()?)
    }

    /// The object's `Name`: `nameAlg` (2 bytes) ‖ `H_nameAlg(TPMT_PUBLIC)`, the digest over the
    /// unsized public area. Only SHA-256/384/512 name algorithms are supported.
    pub fn name(&self) -> Result<Vec<u8>, TpmError> {
        let digest = hash(self.name_alg, &self.marshal()?)?;
        let mut name = Vec::with_capacity(2 + digest.len());
        name.extend_from_slice(&self.name_alg.to_be_bytes());
        name.extend_from_slice(&digest);
        Ok(name)
    }

    /// Whether two public areas hold the same RSA key: same modulus (leading zero bytes
    /// ignored) and same effective exponent. Attributes, policy and parameters are not compared
    /// (protocol.md §6.2: the enrollment's EK is operator-supplied). `false` unless both are RSA.
    pub fn same_rsa_key(&self, other: &TpmPublic) -> bool {
        match (self.rsa(), other.rsa()) {
            (Some(a), Some(b)) => {
                a.exponent_value() == b.exponent_value() && strip_zeros(&a.modulus) == strip_zeros(&b.modulus)
            }
            _ => false,
        }
    }
}

fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

impl RsaPublic {
    /// The public exponent, with the marshalled 0 read as the default 65537.
    pub fn exponent_value(&self) -> u32 {
        if self.exponent == 0 {
            65537
        } else {
            self.exponent
        }
    }
}

/// The sensitive area (`TPMT_SENSITIVE`) of a KEYEDHASH key, as duplicated to a device.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyedHashSensitive {
    /// `authValue` (at most the nameAlg's digest size; empty for DPS keys).
    pub auth_value: Vec<u8>,
    /// `seedValue`: the obfuscation value bound into `unique` (nameAlg digest size).
    pub seed_value: Vec<u8>,
    /// `sensitive.bits`: the HMAC key itself (at most [`MAX_SYM_DATA`] bytes).
    pub key: Vec<u8>,
}

impl std::fmt::Debug for KeyedHashSensitive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedHashSensitive").field("key_len", &self.key.len()).finish_non_exhaustive()
    }
}

impl KeyedHashSensitive {
    /// Marshals the unsized `TPMT_SENSITIVE`: `sensitiveType` KEYEDHASH ‖ `authValue` ‖
    /// `seedValue` ‖ `sensitive` (each a TPM2B).
    pub fn marshal(&self) -> Result<Vec<u8>, TpmError> {
        let mut out = Vec::with_capacity(8 + MAX_DIGEST * 2 + MAX_SYM_DATA);
        out.extend_from_slice(&TPM_ALG_KEYEDHASH.to_be_bytes());
        put_tpm2b(&mut out, "TPMT_SENSITIVE authValue", &self.auth_value, MAX_DIGEST)?;
        put_tpm2b(&mut out, "TPMT_SENSITIVE seedValue", &self.seed_value, MAX_DIGEST)?;
        put_tpm2b(&mut out, "TPMT_SENSITIVE sensitive (KEYEDHASH key)", &self.key, MAX_SYM_DATA)?;
        Ok(out)
    }

    /// Marshals the `TPM2B_SENSITIVE` (`u16` size ‖ `TPMT_SENSITIVE`).
    pub fn marshal_tpm2b(&self) -> Result<Vec<u8>, TpmError> {
        tpm2b("TPM2B_SENSITIVE", &self.marshal()?)
    }
}

/// The authentication-key blob DPS sends in the TPM challenge and in the final TPM assignment
/// (protocol.md §6.4): six TPM2B structures back to back. Each field holds the structure's
/// content *without* its `u16` size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticationKeyBlob {
    /// 1. `TPM2B_ID_OBJECT` (integrityHMAC ‖ encIdentity) for `TPM2_ActivateCredential`.
    pub id_object: Vec<u8>,
    /// 2. `TPM2B_ENCRYPTED_SECRET`: the credential seed, encrypted to the EK.
    pub encrypted_secret: Vec<u8>,
    /// 3. `TPM2B_PRIVATE`: the duplicated HMAC key for `TPM2_Import`.
    pub duplicate: Vec<u8>,
    /// 4. `TPM2B_ENCRYPTED_SECRET`: the import seed, encrypted to the SRK.
    pub import_seed: Vec<u8>,
    /// 5. `TPM2B_PUBLIC`: the HMAC key's `TPMT_PUBLIC`.
    pub public: Vec<u8>,
    /// 6. Opaque data the devices read but do not use (empty: `00 00`).
    pub enc_uri_data: Vec<u8>,
}

impl AuthenticationKeyBlob {
    const ITEMS: [&'static str; 6] = [
        "authentication key TPM2B_ID_OBJECT",
        "authentication key TPM2B_ENCRYPTED_SECRET (credential)",
        "authentication key TPM2B_PRIVATE",
        "authentication key TPM2B_ENCRYPTED_SECRET (import seed)",
        "authentication key TPM2B_PUBLIC",
        "authentication key encUriData",
    ];

    /// Parses a blob that is the whole input: all six items, nothing after them.
    pub fn parse(bytes: &[u8]) -> Result<Self, TpmError> {
        let mut r = Reader::new(bytes);
        let mut items: [Vec<u8>; 6] = Default::default();
        for (item, what) in items.iter_mut().zip(Self::ITEMS) {
            *item = r.tpm2b(what, usize::from(u16::MAX))?.to_vec();
        }
        r.finish("the authentication key")?;
        let [id_object, encrypted_secret, duplicate, import_seed, public, enc_uri_data] = items;
        Ok(Self { id_object, encrypted_secret, duplicate, import_seed, public, enc_uri_data })
    }

    /// Marshals the six items, each with its `u16` size.
    pub fn marshal(&self) -> Result<Vec<u8>, TpmError> {
        let mut out = Vec::new();
        let items = [
            &self.id_object,
            &self.encrypted_secret,
            &self.duplicate,
            &self.import_seed,
            &self.public,
            &self.enc_uri_data,
        ];
        for (item, what) in items.into_iter().zip(Self::ITEMS) {
            put_tpm2b(&mut out, what, item, usize::from(u16::MAX))?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    const EK_POLICY: &str = "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa";

    /// A TPM2B_PUBLIC in the SDK EK shape (RSA-2048, AES-128-CFB, scheme NULL, exponent 0).
    fn ek_bytes(modulus: &[u8]) -> Vec<u8> {
        let mut t = hex("0001 000b 000300b2 0020");
        t.extend(hex(EK_POLICY));
        t.extend(hex("0006 0080 0043 0010 0800 00000000"));
        t.extend((modulus.len() as u16).to_be_bytes());
        t.extend(modulus);
        let mut out = (t.len() as u16).to_be_bytes().to_vec();
        out.extend(t);
        out
    }

    fn modulus(fill: u8) -> Vec<u8> {
        let mut m = vec![fill; 256];
        m[0] |= 0x80;
        m
    }

    #[test]
    fn parses_the_sdk_ek_shape_and_round_trips() {
        let bytes = ek_bytes(&modulus(0x5a));
        assert_eq!(bytes.len(), 316, "the size of an EK from swtpm's tpm2_createek");
        let ek = TpmPublic::parse_tpm2b(&bytes).unwrap();
        assert_eq!(ek.name_alg, TPM_ALG_SHA256);
        assert_eq!(ek.object_attributes, 0x000300B2);
        assert_eq!(ek.auth_policy, hex(EK_POLICY));
        let rsa = ek.rsa().unwrap();
        assert_eq!(rsa.symmetric, Some(SymDefObject { algorithm: TPM_ALG_AES, key_bits: 128, mode: TPM_ALG_CFB }));
        assert_eq!(rsa.scheme, RsaScheme::Null);
        assert_eq!((rsa.key_bits, rsa.exponent, rsa.exponent_value()), (2048, 0, 65537));
        assert_eq!(rsa.modulus, modulus(0x5a));
        assert_eq!(ek.marshal_tpm2b().unwrap(), bytes);
        assert_eq!(ek.marshal().unwrap(), bytes[2..]);
        let name = ek.name().unwrap();
        assert_eq!(name[..2], [0x00, 0x0b]);
        assert_eq!(name[2..], Sha256::digest(&bytes[2..])[..]);
    }

    #[test]
    fn name_of_a_known_key() {
        // An EK from swtpm 0.8 (tpm2_createek -G rsa); tpm2_readpublic printed this name.
        let m = hex("971424de6262f1b45c518b736f7197b625d5cc01e1fc1ff4bedfaafcabfe4539f4b11b856f7abb49f1b1a5cce5fe188c\
             12befead481ad9beba519ce524e009968434acd03b6b3f355405b417ec7abff300314c300f4e670df72f197ec8ff59d5\
             11d6eb030a6f75e8834058e4c24eeb3585dbb37cc10ce9892c79047b485b3caf09830fcffdfef43911d4505b59d0156b\
             536084cbd5e42cf8690f88d1e838043fa4a89d05e7f683666930a29800e9f7c6865c7bdcacb927dbd2964e5bcbe65fc6\
             348b241d0bedf49002be74417a8a08e3cae9a643b0697f123f45dfea0d7f0547dfdac5781675380147272f7e87d8f8f9\
             1d829d0a01cd007539c697f5aee7754b");
        let ek = TpmPublic::parse_tpm2b(&ek_bytes(&m)).unwrap();
        assert_eq!(ek.name().unwrap(), hex("000b1cbd9bc4cf287bb6df53eac628772d21f05022eb5dc2d6017fc55018314f821b"));
    }

    #[test]
    fn keyed_hash_public_and_sensitive_layout() {
        let public = TpmPublic::hmac_sha256_key(attrs::SIGN_ENCRYPT | attrs::USER_WITH_AUTH, vec![0xaa; 32]);
        let bytes = public.marshal().unwrap();
        let mut want = hex("0008 000b 00040040 0000 0005 000b 0020");
        want.extend([0xaa; 32]);
        assert_eq!(bytes, want);
        assert_eq!(TpmPublic::parse(&bytes).unwrap(), public);
        assert_eq!(public.name().unwrap()[2..], Sha256::digest(&bytes)[..]);

        let sensitive = KeyedHashSensitive { auth_value: vec![], seed_value: vec![1; 32], key: vec![2; 3] };
        let mut want = hex("0008 0000 0020");
        want.extend([1; 32]);
        want.extend(hex("0003 020202"));
        assert_eq!(sensitive.marshal().unwrap(), want);
        let sized = sensitive.marshal_tpm2b().unwrap();
        assert_eq!(sized[..2], (want.len() as u16).to_be_bytes());
        assert!(!format!("{sensitive:?}").contains("[2, 2, 2]"), "Debug hides the key");
        let too_long = KeyedHashSensitive { key: vec![0; MAX_SYM_DATA + 1], ..sensitive };
        assert!(matches!(too_long.marshal(), Err(TpmError::TooLong { max: MAX_SYM_DATA, .. })));
    }

    #[test]
    fn other_rsa_shapes_round_trip() {
        // SRK shape: no policy; a signing key with RSASSA-SHA256 and an explicit exponent.
        for params in ["0006 0080 0043 0010", "0010 0014 000b", "0010 0015", "0006 0100 0043 0017 000c"] {
            let mut t = hex("0001 000b 00030472 0000");
            t.extend(hex(params));
            t.extend(hex("0400 00010001 0080"));
            t.extend(modulus(1)[..128].iter());
            let public = TpmPublic::parse(&t).unwrap_or_else(|e| panic!("{params}: {e}"));
            assert_eq!(public.marshal().unwrap(), t, "{params}");
            assert_eq!(public.rsa().unwrap().exponent_value(), 65537);
        }
    }

    #[test]
    fn semantic_ek_comparison() {
        let a = TpmPublic::parse_tpm2b(&ek_bytes(&modulus(7))).unwrap();
        let mut b = a.clone();
        b.object_attributes = 0x00030472;
        b.auth_policy.clear();
        assert!(a.same_rsa_key(&b), "attributes and policy do not matter");
        if let PublicParams::Rsa(rsa) = &mut b.params {
            rsa.exponent = 65537;
        }
        assert!(a.same_rsa_key(&b), "0 is 65537");
        if let PublicParams::Rsa(rsa) = &mut b.params {
            rsa.exponent = 3;
        }
        assert!(!a.same_rsa_key(&b));
        let c = TpmPublic::parse_tpm2b(&ek_bytes(&modulus(8))).unwrap();
        assert!(!a.same_rsa_key(&c));
        let kh = TpmPublic::hmac_sha256_key(0, vec![]);
        assert!(!a.same_rsa_key(&kh) && !kh.same_rsa_key(&kh));
    }

    #[test]
    fn refuses_truncated_input_at_every_length() {
        let bytes = ek_bytes(&modulus(3));
        for n in 0..bytes.len() {
            let err = TpmPublic::parse_tpm2b(&bytes[..n]).unwrap_err();
            assert!(matches!(err, TpmError::Truncated { .. }), "{n}: {err}");
            // The TPMT_PUBLIC alone, cut short.
            if n >= 2 {
                assert!(TpmPublic::parse(&bytes[2..n]).is_err(), "{n}");
            }
        }
        assert_eq!(
            TpmPublic::parse_tpm2b(&bytes[..100]).unwrap_err().to_string(),
            "TPM2B_PUBLIC is truncated: it needs 314 bytes but only 98 remain"
        );
    }

    #[test]
    fn refuses_sizes_that_lie() {
        let good = ek_bytes(&modulus(3));
        // Outer size too small: the TPMT_PUBLIC is cut, then bytes trail.
        let mut small = good.clone();
        small[..2].copy_from_slice(&313u16.to_be_bytes());
        assert!(matches!(TpmPublic::parse_tpm2b(&small), Err(TpmError::TrailingBytes { count: 1, .. })));
        // Outer size too large.
        let mut large = good.clone();
        large[..2].copy_from_slice(&315u16.to_be_bytes());
        assert!(matches!(TpmPublic::parse_tpm2b(&large), Err(TpmError::Truncated { need: 315, have: 314, .. })));
        // Trailing byte after a correct TPM2B_PUBLIC.
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            TpmPublic::parse_tpm2b(&trailing).unwrap_err().to_string(),
            "1 unexpected bytes follow the TPM2B_PUBLIC"
        );
        // Modulus size says 255 with the outer size adjusted: one byte is left over.
        let mut inner = good[2..].to_vec();
        let at = inner.len() - 258;
        inner[at..at + 2].copy_from_slice(&255u16.to_be_bytes());
        assert_eq!(
            TpmPublic::parse(&inner).unwrap_err(),
            TpmError::TrailingBytes { what: "the TPMT_PUBLIC", count: 1 }
        );
        // Modulus size beyond the TPM maximum.
        inner[at..at + 2].copy_from_slice(&600u16.to_be_bytes());
        assert!(matches!(TpmPublic::parse(&inner), Err(TpmError::TooLong { len: 600, max: 512, .. })));
        // Policy size 0xffff.
        let mut policy = good[2..].to_vec();
        policy[8..10].copy_from_slice(&0xffffu16.to_be_bytes());
        assert!(matches!(TpmPublic::parse(&policy), Err(TpmError::TooLong { .. })));
        // Empty TPM2B_PUBLIC.
        assert_eq!(TpmPublic::parse_tpm2b(&[0, 0]).unwrap_err(), TpmError::Empty("TPM2B_PUBLIC"));
    }

    #[test]
    fn refuses_wrong_types_and_parameters() {
        let good = ek_bytes(&modulus(3))[2..].to_vec();
        let with = |at: usize, bytes: &[u8]| {
            let mut t = good.clone();
            t[at..at + bytes.len()].copy_from_slice(bytes);
            TpmPublic::parse(&t).unwrap_err()
        };
        // ECC (0x0023) and SYMCIPHER (0x0025) are not understood.
        assert_eq!(with(0, &[0x00, 0x23]), TpmError::UnsupportedType(0x23));
        assert_eq!(
            with(0, &[0x00, 0x25]).to_string(),
            "unsupported TPM object type 0x0025 (only RSA 0x0001 and KEYEDHASH 0x0008 are understood)"
        );
        assert_eq!(with(2, &[0x00, 0x10]), TpmError::UnsupportedAlgorithm { what: "nameAlg", alg: 0x10 });
        // symmetric at 42: algorithm, keyBits, mode; scheme 48; keyBits 50; exponent 52.
        assert_eq!(with(42, &[0x00, 0x0a]), TpmError::UnsupportedAlgorithm { what: "symmetric", alg: 0x0a });
        assert_eq!(with(44, &[0x00, 0x50]), TpmError::SymmetricKeyBits { alg: TPM_ALG_AES, bits: 0x50 });
        assert_eq!(with(46, &[0x00, 0x99]), TpmError::UnsupportedAlgorithm { what: "symmetric mode", alg: 0x99 });
        assert_eq!(with(48, &[0x00, 0x18]), TpmError::UnsupportedAlgorithm { what: "RSA scheme", alg: 0x18 });
        assert_eq!(with(50, &[0x04, 0x00]), TpmError::ModulusLength { key_bits: 1024, len: 256 });
        assert_eq!(with(50, &[0x08, 0x01]), TpmError::RsaKeyBits(0x801));
        assert_eq!(with(52, &[0, 0, 0, 2]), TpmError::RsaExponent(2));
        assert_eq!(with(52, &[0, 0, 0, 1]), TpmError::RsaExponent(1));
        // A policy of the wrong digest size.
        let mut t = hex("0001 000b 00030472 0014");
        t.extend([0; 20]);
        t.extend(&good[42..]);
        assert_eq!(TpmPublic::parse(&t).unwrap_err(), TpmError::PolicyLength { len: 20, expected: 32 });
        // KEYEDHASH with an unknown scheme, and with an XOR KDF that is not a KDF.
        assert!(matches!(
            TpmPublic::parse(&hex("0008 000b 00000000 0000 0099 0000")),
            Err(TpmError::UnsupportedAlgorithm { what: "KEYEDHASH scheme", alg: 0x99 })
        ));
        assert!(TpmPublic::parse(&hex("0008 000b 00000000 0000 000a 000b 0022 0000")).is_ok());
        assert!(TpmPublic::parse(&hex("0008 000b 00000000 0000 000a 000b 0001 0000")).is_err());
        assert!(TpmPublic::parse(&[]).is_err());
    }

    #[test]
    fn name_needs_a_supported_hash() {
        let mut public = TpmPublic::hmac_sha256_key(0, vec![0; 20]);
        public.name_alg = TPM_ALG_SHA1;
        assert_eq!(public.name().unwrap_err(), TpmError::UnsupportedNameAlg(TPM_ALG_SHA1));
        public.name_alg = TPM_ALG_SHA384;
        assert_eq!(public.name().unwrap().len(), 2 + 48);
    }

    #[test]
    fn marshal_refuses_invalid_values() {
        let mut public = TpmPublic::parse_tpm2b(&ek_bytes(&modulus(3))).unwrap();
        if let PublicParams::Rsa(rsa) = &mut public.params {
            rsa.modulus.push(0);
        }
        assert!(matches!(public.marshal(), Err(TpmError::ModulusLength { .. })));
        assert!(matches!(tpm2b("x", &[0u8; 70_000]), Err(TpmError::TooLong { what: "x", .. })));
        assert_eq!(tpm2b("x", &[9]).unwrap(), [0, 1, 9]);
    }

    #[test]
    fn authentication_key_blob_layout() {
        let blob = AuthenticationKeyBlob {
            id_object: vec![1; 3],
            encrypted_secret: vec![2; 2],
            duplicate: vec![3],
            import_seed: vec![],
            public: vec![5; 4],
            enc_uri_data: vec![],
        };
        let bytes = blob.marshal().unwrap();
        assert_eq!(bytes, hex("0003 010101 0002 0202 0001 03 0000 0004 05050505 0000"));
        assert_eq!(AuthenticationKeyBlob::parse(&bytes).unwrap(), blob);
        for n in 0..bytes.len() {
            assert!(AuthenticationKeyBlob::parse(&bytes[..n]).is_err(), "{n}");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(
            AuthenticationKeyBlob::parse(&trailing).unwrap_err(),
            TpmError::TrailingBytes { what: "the authentication key", count: 1 }
        );
        assert_eq!(
            AuthenticationKeyBlob::parse(&bytes[..bytes.len() - 2]).unwrap_err().to_string(),
            "authentication key encUriData is truncated: it needs 2 bytes but only 0 remain"
        );
    }
}
