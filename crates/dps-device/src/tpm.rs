//! The device's TPM 2.0 (feature `tpm`): the endorsement and storage root keys a device sends
//! when it registers with TPM attestation, the import of the authentication key DPS answers
//! with (protocol.md §6.4), and HMAC signing with the imported key.
//!
//! Every call opens the TPM through a TCTI (`device:/dev/tpmrm0`, `swtpm:host=…,port=…`,
//! `mssim:host=…,port=…`, `tabrmd`), does its work and closes it again. Transient objects and
//! sessions are flushed before a call returns, also when it fails: the swtpm and mssim TCTIs
//! talk to the TPM without a resource manager, and a TPM holds only a few transient objects
//! (`TPM_RC_OBJECT_MEMORY`, 0x902, once they pile up).
//!
//! The keys live at the persistent handles the Azure device SDKs use: the EK at
//! [`EK_HANDLE`] (`0x81010001`), the SRK at [`SRK_HANDLE`] (`0x81000001`), both made from the
//! standard templates and persisted when absent, and the imported DPS key at a configurable
//! handle ([`crate::DEFAULT_AUTH_KEY_HANDLE`], `0x81000100`), replaced on every import.

use std::convert::TryFrom;
use std::str::FromStr;

use dps_proto::tpm::{AuthenticationKeyBlob, TpmPublic};
use tss_esapi::abstraction::ek::create_ek_public_from_default_template;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::{CapabilityType, SessionType};
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, SessionHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{AsymmetricAlgorithm, HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Auth, CapabilityData, Data, Digest, EncryptedSecret, IdObject, MaxBuffer, Nonce, Private, Public, PublicBuilder,
    PublicKeyRsa, PublicRsaParametersBuilder, RsaExponent, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::{Context, TctiNameConf};

use crate::{DeviceError, TpmConfig};

/// Persistent handle of the endorsement key (TCG and Azure SDK convention).
pub const EK_HANDLE: u32 = 0x8101_0001;
/// Persistent handle of the storage root key (TCG and Azure SDK convention).
pub const SRK_HANDLE: u32 = 0x8100_0001;
/// Largest message one `TPM2_HMAC` signs (`MAX_DIGEST_BUFFER`). Registration and IoT Hub SAS
/// strings are far shorter; longer data would need an HMAC sequence, which tss-esapi 7 (the
/// last line that builds against tpm2-tss 3.x) does not offer.
pub const MAX_HMAC_DATA: usize = 1024;

/// Object attributes of the SRK template: fixedTPM | fixedParent | sensitiveDataOrigin |
/// userWithAuth | noDA | restricted | decrypt.
pub const SRK_ATTRIBUTES: u32 = 0x0003_0472;
/// Object attributes of the standard RSA-2048 EK template: fixedTPM | fixedParent |
/// sensitiveDataOrigin | adminWithPolicy | restricted | decrypt.
pub const EK_ATTRIBUTES: u32 = 0x0003_00B2;

fn tpm_err(step: &str, e: tss_esapi::Error) -> DeviceError {
    DeviceError::Tpm(format!("{step}: {e}"))
}

/// An open TPM.
pub struct Tpm {
    ctx: Context,
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tpm")
    }
}

/// The public parts of a device's EK and SRK, as marshalled `TPM2B_PUBLIC`s (what the register
/// body carries, base64-encoded, as `tpm.endorsementKey` and `tpm.storageRootKey`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmKeys {
    /// The endorsement key's `TPM2B_PUBLIC`.
    pub endorsement_key: Vec<u8>,
    /// The storage root key's `TPM2B_PUBLIC`.
    pub storage_root_key: Vec<u8>,
}

/// The TCTI a configured one means: a bare `device` (or nothing) is the kernel's resource
/// manager `/dev/tpmrm0` (tpm2-tss itself would pick `/dev/tpm0`).
fn tcti_name(tcti: &str) -> &str {
    let tcti = tcti.trim();
    if tcti.is_empty() || tcti == "device" {
        "device:/dev/tpmrm0"
    } else {
        tcti
    }
}

/// The TCTI configuration tss-esapi understands for a configured TCTI string.
fn tcti_conf(tcti: &str) -> Result<TctiNameConf, DeviceError> {
    let tcti = tcti_name(tcti);
    TctiNameConf::from_str(tcti).map_err(|_| {
        DeviceError::Config(format!(
            "TPM TCTI '{tcti}' is not understood (device:/dev/tpmrm0, swtpm:host=H,port=P, mssim:host=H,port=P or tabrmd)"
        ))
    })
}

fn persistent(handle: u32) -> Result<PersistentTpmHandle, DeviceError> {
    PersistentTpmHandle::new(handle).map_err(|_| {
        DeviceError::Config(format!("0x{handle:08x} is not a TPM persistent handle (0x81000000..0x81ffffff)"))
    })
}

fn ek_template() -> Result<Public, DeviceError> {
    create_ek_public_from_default_template(AsymmetricAlgorithm::Rsa, None).map_err(|e| tpm_err("EK template", e))
}

fn srk_template() -> Result<Public, DeviceError> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(|e| tpm_err("SRK template", e))?;
    let params = PublicRsaParametersBuilder::new_restricted_decryption_key(
        SymmetricDefinitionObject::AES_128_CFB,
        RsaKeyBits::Rsa2048,
        RsaExponent::default(),
    )
    .build()
    .map_err(|e| tpm_err("SRK template", e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_rsa_parameters(params)
        .with_rsa_unique_identifier(PublicKeyRsa::default())
        .build()
        .map_err(|e| tpm_err("SRK template", e))
}

/// The `TPM2B_PUBLIC` of a public area, checked to be an RSA key DPS understands.
fn marshal_public(which: &str, handle: u32, public: &Public) -> Result<Vec<u8>, DeviceError> {
    let tpmt = public.marshall().map_err(|e| tpm_err(&format!("marshalling the {which}"), e))?;
    let parsed = TpmPublic::parse(&tpmt)
        .map_err(|e| DeviceError::Tpm(format!("the {which} at 0x{handle:08x} is not a key DPS can use: {e}")))?;
    if parsed.rsa().is_none() {
        return Err(DeviceError::Tpm(format!(
            "the {which} at 0x{handle:08x} is not an RSA key; DPS TPM attestation needs the RSA-2048 template"
        )));
    }
    parsed.marshal_tpm2b().map_err(|e| DeviceError::Tpm(format!("the {which}: {e}")))
}

impl Tpm {
    /// Opens the TPM behind `config.tcti` and sets the hierarchy authorizations configured.
    pub fn open(config: &TpmConfig) -> Result<Self, DeviceError> {
        let conf = tcti_conf(&config.tcti)?;
        let mut ctx = Context::new(conf).map_err(|e| {
            // tpm2-tss reports a TCTI that cannot connect with a code tss-esapi does not name.
            let why = match e.to_string() {
                t if t == "response code not recognized" => {
                    "no TPM answers there (is it present, and may this user open it?)".to_string()
                }
                t => t,
            };
            DeviceError::Tpm(format!("cannot open the TPM at '{}': {why}", tcti_name(&config.tcti)))
        })?;
        for (hierarchy, auth, name) in [
            (ObjectHandle::Endorsement, &config.endorsement_auth, "endorsement"),
            (ObjectHandle::Owner, &config.owner_auth, "owner"),
        ] {
            if let Some(auth) = auth.as_deref().filter(|a| !a.is_empty()) {
                let auth = Auth::try_from(auth.as_bytes().to_vec())
                    .map_err(|_| DeviceError::Config(format!("the {name} hierarchy authorization is too long")))?;
                ctx.tr_set_auth(hierarchy, auth).map_err(|e| tpm_err(&format!("{name} authorization"), e))?;
            }
        }
        Ok(Self { ctx })
    }

    /// Whether a persistent handle holds an object.
    fn is_persistent(&mut self, handle: u32) -> Result<bool, DeviceError> {
        let mut next = handle;
        loop {
            let (data, more) = self
                .ctx
                .get_capability(CapabilityType::Handles, next, 64)
                .map_err(|e| tpm_err("listing persistent handles", e))?;
            let CapabilityData::Handles(list) = data else {
                return Err(DeviceError::Tpm("the TPM answered a handle query with other data".into()));
            };
            let handles: Vec<u32> = list.into_inner().into_iter().map(u32::from).collect();
            if handles.contains(&handle) {
                return Ok(true);
            }
            match handles.last() {
                Some(&last) if more && last >= next && last < handle => next = last + 1,
                _ => return Ok(false),
            }
        }
    }

    /// An ESYS object for a persistent handle (closed again with [`Tpm::close`]).
    fn open_persistent(&mut self, handle: u32) -> Result<ObjectHandle, DeviceError> {
        let tpm_handle = TpmHandle::Persistent(persistent(handle)?);
        self.ctx
            .execute_without_session(|ctx| ctx.tr_from_tpm_public(tpm_handle))
            .map_err(|e| tpm_err(&format!("opening 0x{handle:08x}"), e))
    }

    fn close(&mut self, mut object: ObjectHandle) {
        if let Err(e) = self.ctx.tr_close(&mut object) {
            tracing::debug!("closing an ESYS handle: {e}");
        }
    }

    fn flush(&mut self, object: ObjectHandle) {
        if let Err(e) = self.ctx.flush_context(object) {
            tracing::warn!("flushing a transient TPM object: {e}");
        }
    }

    fn read_persistent_public(&mut self, handle: u32) -> Result<Public, DeviceError> {
        let object = self.open_persistent(handle)?;
        let read = self.ctx.execute_without_session(|ctx| ctx.read_public(KeyHandle::from(object)));
        self.close(object);
        read.map(|(public, _, _)| public).map_err(|e| tpm_err(&format!("reading 0x{handle:08x}"), e))
    }

    /// The public area at `handle`, or a primary key created in `hierarchy` from `template` and
    /// persisted there first.
    fn primary(
        &mut self,
        handle: u32,
        hierarchy: Hierarchy,
        template: Public,
        which: &str,
    ) -> Result<Public, DeviceError> {
        if self.is_persistent(handle)? {
            return self.read_persistent_public(handle);
        }
        tracing::info!("creating the {which} and persisting it at 0x{handle:08x}");
        let target = Persistent::Persistent(persistent(handle)?);
        let created = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(hierarchy, template, None, None, None, None)
            })
            .map_err(|e| tpm_err(&format!("creating the {which}"), e))?;
        let key = ObjectHandle::from(created.key_handle);
        let evicted = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| ctx.evict_control(Provision::Owner, key, target));
        self.flush(key);
        let mut persisted = evicted.map_err(|e| tpm_err(&format!("persisting the {which} at 0x{handle:08x}"), e))?;
        if let Err(e) = self.ctx.tr_close(&mut persisted) {
            tracing::debug!("closing an ESYS handle: {e}");
        }
        Ok(created.out_public)
    }

    /// The EK and SRK (`TPM2B_PUBLIC`), created from the standard templates and persisted at
    /// [`EK_HANDLE`] and [`SRK_HANDLE`] when absent.
    pub fn keys(&mut self) -> Result<TpmKeys, DeviceError> {
        let ek = self.primary(EK_HANDLE, Hierarchy::Endorsement, ek_template()?, "endorsement key")?;
        let srk = self.primary(SRK_HANDLE, Hierarchy::Owner, srk_template()?, "storage root key")?;
        Ok(TpmKeys {
            endorsement_key: marshal_public("endorsement key", EK_HANDLE, &ek)?,
            storage_root_key: marshal_public("storage root key", SRK_HANDLE, &srk)?,
        })
    }

    /// `TPM2_ActivateCredential` of blob items 1 and 2 with the EK (under a
    /// PolicySecret(TPM_RH_ENDORSEMENT) session) bound to the SRK: the 16-byte inner wrap key.
    fn activate(
        &mut self,
        ek: ObjectHandle,
        srk: ObjectHandle,
        blob: &AuthenticationKeyBlob,
    ) -> Result<Digest, DeviceError> {
        let id_object = IdObject::try_from(blob.id_object.clone())
            .map_err(|_| refused("its credential (item 1) is larger than a TPM2B_ID_OBJECT"))?;
        let secret = EncryptedSecret::try_from(blob.encrypted_secret.clone())
            .map_err(|_| refused("its credential secret (item 2) is larger than a TPM2B_ENCRYPTED_SECRET"))?;
        let session = self
            .ctx
            .execute_without_session(|ctx| {
                ctx.start_auth_session(
                    None,
                    None,
                    None,
                    SessionType::Policy,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
            })
            .map_err(|e| tpm_err("starting the EK policy session", e))?
            .ok_or_else(|| DeviceError::Tpm("the TPM returned no policy session".into()))?;
        let result = (|| {
            let policy = PolicySession::try_from(session).map_err(|e| tpm_err("EK policy session", e))?;
            self.ctx
                .execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.policy_secret(
                        policy,
                        tss_esapi::handles::AuthHandle::Endorsement,
                        Nonce::default(),
                        Digest::default(),
                        Nonce::default(),
                        None,
                    )
                })
                .map_err(|e| tpm_err("TPM2_PolicySecret(TPM_RH_ENDORSEMENT)", e))?;
            self.ctx
                .execute_with_sessions((Some(AuthSession::Password), Some(session), None), |ctx| {
                    ctx.activate_credential(KeyHandle::from(srk), KeyHandle::from(ek), id_object, secret)
                })
                .map_err(|e| import_err("TPM2_ActivateCredential", e))
        })();
        self.flush(ObjectHandle::from(SessionHandle::from(session)));
        result
    }

    /// Imports an authentication-key blob (protocol.md §6.4) as an HMAC key under the SRK and
    /// persists it at `handle`, replacing whatever was there. A blob that was not made for this
    /// TPM's EK and SRK, or was changed on the way, is refused by the TPM and leaves the key
    /// at `handle` as it was.
    pub fn import_authentication_key(&mut self, blob: &[u8], handle: u32) -> Result<(), DeviceError> {
        let target = Persistent::Persistent(persistent(handle)?);
        if handle == EK_HANDLE || handle == SRK_HANDLE {
            return Err(DeviceError::Config(format!(
                "0x{handle:08x} holds the EK or SRK; the authentication key needs another persistent handle"
            )));
        }
        let items = AuthenticationKeyBlob::parse(blob).map_err(|e| refused(&format!("it is malformed: {e}")))?;
        let public = Public::unmarshall(&items.public)
            .map_err(|e| refused(&format!("its public area (item 5) does not unmarshal: {e}")))?;
        let duplicate = Private::try_from(items.duplicate.clone())
            .map_err(|_| refused("its duplicate (item 3) is larger than a TPM2B_PRIVATE"))?;
        let seed = EncryptedSecret::try_from(items.import_seed.clone())
            .map_err(|_| refused("its import seed (item 4) is larger than a TPM2B_ENCRYPTED_SECRET"))?;
        for (h, which) in [(EK_HANDLE, "endorsement key"), (SRK_HANDLE, "storage root key")] {
            if !self.is_persistent(h)? {
                return Err(DeviceError::Tpm(format!(
                    "there is no {which} at 0x{h:08x}; read the TPM's keys (register) before importing"
                )));
            }
        }
        let ek = self.open_persistent(EK_HANDLE)?;
        let srk = match self.open_persistent(SRK_HANDLE) {
            Ok(srk) => srk,
            Err(e) => {
                self.close(ek);
                return Err(e);
            }
        };
        let result = self.import_under(ek, srk, &items, public, duplicate, seed, handle, target);
        self.close(srk);
        self.close(ek);
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn import_under(
        &mut self,
        ek: ObjectHandle,
        srk: ObjectHandle,
        items: &AuthenticationKeyBlob,
        public: Public,
        duplicate: Private,
        seed: EncryptedSecret,
        handle: u32,
        target: Persistent,
    ) -> Result<(), DeviceError> {
        let inner = self.activate(ek, srk, items)?;
        let inner = Data::try_from(inner.value().to_vec())
            .map_err(|_| refused("its credential is longer than a TPM2B_DATA"))?;
        let private = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.import(srk, Some(inner), public.clone(), duplicate, seed, SymmetricDefinitionObject::AES_128_CFB)
            })
            .map_err(|e| import_err("TPM2_Import", e))?;
        let loaded = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| ctx.load(KeyHandle::from(srk), private, public))
            .map_err(|e| import_err("TPM2_Load", e))?;
        let loaded = ObjectHandle::from(loaded);
        let persisted = self.replace_persistent(loaded, handle, target);
        self.flush(loaded);
        persisted
    }

    /// Evicts the object at `handle` (if any), then persists `object` there.
    fn replace_persistent(&mut self, object: ObjectHandle, handle: u32, target: Persistent) -> Result<(), DeviceError> {
        if self.is_persistent(handle)? {
            let old = self.open_persistent(handle)?;
            let evicted = self.ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.evict_control(Provision::Owner, old, target)
            });
            match evicted {
                // Evicting a persistent object closes its ESYS handle.
                Ok(_) => {}
                Err(e) => {
                    self.close(old);
                    return Err(tpm_err(&format!("removing the old key at 0x{handle:08x}"), e));
                }
            }
        }
        let mut persisted = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.evict_control(Provision::Owner, object, target)
            })
            .map_err(|e| tpm_err(&format!("persisting the key at 0x{handle:08x}"), e))?;
        if let Err(e) = self.ctx.tr_close(&mut persisted) {
            tracing::debug!("closing an ESYS handle: {e}");
        }
        Ok(())
    }

    /// `TPM2_HMAC` (SHA-256) of `data` with the key persisted at `handle`.
    pub fn hmac_sha256(&mut self, handle: u32, data: &[u8]) -> Result<Vec<u8>, DeviceError> {
        if data.len() > MAX_HMAC_DATA {
            return Err(DeviceError::Tpm(format!(
                "cannot sign {} bytes: one TPM2_HMAC takes at most {MAX_HMAC_DATA}",
                data.len()
            )));
        }
        persistent(handle)?;
        if !self.is_persistent(handle)? {
            return Err(DeviceError::Tpm(format!(
                "there is no key at 0x{handle:08x}: the authentication key was not imported yet"
            )));
        }
        let buffer = MaxBuffer::try_from(data.to_vec())
            .map_err(|_| DeviceError::Tpm(format!("cannot sign {} bytes in one TPM2_HMAC", data.len())))?;
        let key = self.open_persistent(handle)?;
        let mac = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| ctx.hmac(key, buffer, HashingAlgorithm::Sha256));
        self.close(key);
        mac.map(|d| d.value().to_vec()).map_err(|e| tpm_err(&format!("TPM2_HMAC with the key at 0x{handle:08x}"), e))
    }
}

fn refused(why: &str) -> DeviceError {
    DeviceError::Tpm(format!("the authentication key from the service is refused: {why}"))
}

/// A TPM error while importing: an integrity failure means the blob was not made for this
/// TPM's keys, or was changed on the way.
fn import_err(step: &str, e: tss_esapi::Error) -> DeviceError {
    let text = e.to_string();
    let hint = if text.contains("integrity") || text.contains("value is out of range") || text.contains("size") {
        " (the blob was not made for this TPM's endorsement and storage root keys, or it was changed on the way)"
    } else {
        ""
    };
    refused(&format!("{step} failed: {text}{hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_the_sdk_ones() {
        let ek = TpmPublic::parse(&ek_template().unwrap().marshall().unwrap()).unwrap();
        assert_eq!(ek.object_attributes, EK_ATTRIBUTES);
        assert_eq!(
            ek.auth_policy,
            [
                0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24, 0xfd,
                0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa
            ]
        );
        let rsa = ek.rsa().unwrap();
        assert_eq!((rsa.key_bits, rsa.exponent), (2048, 0));
        assert_eq!(
            rsa.symmetric,
            Some(dps_proto::tpm::SymDefObject { algorithm: 0x0006, key_bits: 128, mode: 0x0043 })
        );
        // The SRK template's unique is empty (the TPM fills in the modulus), so it is compared
        // as bytes: RSA, SHA-256, 0x00030472, no policy, AES-128-CFB, scheme NULL, 2048 bits,
        // exponent 0, empty unique.
        let srk = srk_template().unwrap().marshall().unwrap();
        let expected: [u8; 26] = [
            0x00, 0x01, 0x00, 0x0b, 0x00, 0x03, 0x04, 0x72, 0x00, 0x00, 0x00, 0x06, 0x00, 0x80, 0x00, 0x43, 0x00, 0x10,
            0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        assert_eq!(srk, expected);
        assert_eq!(u32::from_be_bytes([srk[4], srk[5], srk[6], srk[7]]), SRK_ATTRIBUTES);
    }

    #[test]
    fn tcti_strings() {
        assert!(tcti_conf("device").is_ok());
        assert!(tcti_conf("device:/dev/tpm0").is_ok());
        assert!(tcti_conf("swtpm:host=127.0.0.1,port=2321").is_ok());
        assert!(tcti_conf("mssim:host=localhost,port=2321").is_ok());
        assert!(matches!(tcti_conf("usb:x"), Err(DeviceError::Config(m)) if m.contains("usb:x")));
    }
}
