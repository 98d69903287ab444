//! What `dps enrollment` and `dps group` do alike, given which of the two they manage: the
//! service API collection, the ID field and the X.509 slot differ, the steps do not.

use serde_json::{json, Value};

use super::client::ServiceApi;
use super::output::{self, Column, Format};
use super::record::{Attestation, Kind, RecordFlags, TpmFlags};
use super::AdminError;

/// Which records a command manages.
pub struct Spec {
    /// Collection segment of the service API.
    pub collection: &'static str,
    /// The record's ID field.
    pub id_field: &'static str,
    /// Individual enrollment or group.
    pub kind: Kind,
    /// The command, for messages (`dps enrollment`).
    pub command: &'static str,
    /// Table columns of a list.
    pub columns: &'static [Column],
}

/// What the flags of a create or an update set (groups have no device ID and no TPM keys).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Fields {
    /// Device ID in the hub (default: the registration ID).
    #[arg(long, visible_alias = "did")]
    pub device_id: Option<String>,
    #[command(flatten)]
    pub tpm: TpmFlags,
    #[command(flatten)]
    pub flags: RecordFlags,
}

impl Fields {
    /// A group's: the shared flags only.
    pub fn of_group(flags: RecordFlags) -> Fields {
        Fields { flags, ..Fields::default() }
    }
}

/// `--show-keys`.
#[derive(Debug, clap::Args)]
pub struct ShowKeys {
    /// Include the symmetric keys (needs a policy with EnrollmentWrite).
    #[arg(long)]
    pub show_keys: bool,
}

/// `--top`.
#[derive(Debug, clap::Args)]
pub struct Top {
    /// At most this many.
    #[arg(long)]
    pub top: Option<usize>,
}

/// `--etag` of a delete.
#[derive(Debug, clap::Args)]
pub struct IfEtag {
    /// Delete only if it still has this ETag.
    #[arg(long, short = 'e')]
    pub etag: Option<String>,
}

impl Spec {
    /// Whether the record exists (a 404 says no; any other refusal is an error).
    async fn exists(&self, api: &ServiceApi, id: &str) -> Result<bool, AdminError> {
        match api.get(&[self.collection, id]).await {
            Ok(_) => Ok(true),
            Err(AdminError::Refused { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates a record; refused when one with this ID exists.
    pub async fn create(
        &self,
        api: &ServiceApi,
        out: Format,
        id: &str,
        attestation: Attestation,
        fields: &Fields,
    ) -> Result<(), AdminError> {
        let attestation = fields.flags.new_attestation(self.kind, attestation, &fields.tpm)?;
        let mut record = json!({ self.id_field: id, "attestation": attestation });
        if let Some(d) = &fields.device_id {
            record["deviceId"] = json!(d);
        }
        fields.flags.apply(&mut record)?;
        let exists = || AdminError::Usage(format!("{id} exists; change it with `{} update`", self.command));
        // A quick check for a clear message, then a create-only write (a bulk `create`), so
        // that a record made in between is not replaced.
        if self.exists(api, id).await? {
            return Err(exists());
        }
        // The bulk body lists the records under the collection's own name.
        let bulk = json!({ "mode": "create", self.collection: [record] });
        let result = api.post(&[self.collection], &bulk, None).await?;
        if result["isSuccessful"] != json!(true) {
            let error = &result["errors"][0];
            let code = error["errorCode"].as_u64().unwrap_or(0);
            if code / 1000 == 409 {
                return Err(exists());
            }
            let body = json!({"errorCode": code, "message": error["errorStatus"]});
            return Err(AdminError::refused(
                &format!("POST /{} (create)", self.collection),
                (code / 1000) as u16,
                &body,
            ));
        }
        // What was created, with the keys the service generated.
        let mut record = api.get(&[self.collection, id]).await?;
        record["attestation"] = self.mechanism(api, id).await?;
        output::item(out, &record);
        Ok(())
    }

    /// The attestation mechanism with its keys and certificates (reads hide them).
    pub async fn mechanism(&self, api: &ServiceApi, id: &str) -> Result<Value, AdminError> {
        api.post(&[self.collection, id, "attestationmechanism"], &json!({}), None).await
    }

    /// Prints a record, with its keys when asked.
    pub async fn show(&self, api: &ServiceApi, out: Format, id: &str, show_keys: bool) -> Result<(), AdminError> {
        let mut record = api.get(&[self.collection, id]).await?;
        if show_keys {
            record["attestation"] = self.mechanism(api, id).await?;
        }
        output::item(out, &record);
        Ok(())
    }

    /// Prints the records (the first `top`).
    pub async fn list(&self, api: &ServiceApi, out: Format, top: Option<usize>) -> Result<(), AdminError> {
        output::list(out, &api.query(&[self.collection, "query"], top).await?, self.columns);
        Ok(())
    }

    /// Reads a record, changes what the flags say (`attestation`: a new one of this type) and
    /// writes it back under `If-Match`: `etag`, or else the one just read.
    pub async fn update(
        &self,
        api: &ServiceApi,
        out: Format,
        id: &str,
        etag: Option<String>,
        attestation: Option<Attestation>,
        fields: &Fields,
    ) -> Result<(), AdminError> {
        let mut record = api.get(&[self.collection, id]).await?;
        let etag = etag.or_else(|| record["etag"].as_str().map(str::to_string));
        match attestation {
            Some(a) => {
                record["attestation"] = fields.flags.new_attestation(self.kind, a, &fields.tpm)?;
                // A new symmetric-key mechanism without keys gets new keys: the old ones stop
                // working (a service keeps omitted keys).
                if a == Attestation::SymmetricKey {
                    let keys = &mut record["attestation"]["symmetricKey"];
                    for field in ["primaryKey", "secondaryKey"] {
                        if keys.get(field).is_none() {
                            keys[field] = json!(dps_core::enrollment::generate_key());
                        }
                    }
                }
            }
            None => {
                // The mechanism as stored (reads hide keys and certificates): written back
                // unchanged where no flag changes it, on any DPS.
                let mut full = self.mechanism(api, id).await?;
                strip_certificate_info(&mut full);
                record["attestation"] = full;
                fields.flags.patch_attestation(self.kind, &mut record["attestation"], &fields.tpm)?;
            }
        }
        if let Some(d) = &fields.device_id {
            record["deviceId"] = json!(d);
        }
        fields.flags.apply(&mut record)?;
        // What the service sets itself is not sent back.
        if let Value::Object(map) = &mut record {
            for key in ["registrationState", "createdDateTimeUtc", "lastUpdatedDateTimeUtc", "etag"] {
                map.remove(key);
            }
        }
        let mut saved = api.put(&[self.collection, id], &record, etag.as_deref()).await?;
        // Keys are shown by `show --show-keys` only (the answer carries them).
        if let Some(keys) = saved["attestation"]["symmetricKey"].as_object_mut() {
            keys.remove("primaryKey");
            keys.remove("secondaryKey");
        }
        output::item(out, &saved);
        Ok(())
    }

    /// Deletes a record, only if it still has `etag` when one is given.
    pub async fn delete(&self, api: &ServiceApi, id: &str, etag: Option<&str>) -> Result<(), AdminError> {
        api.delete(&[self.collection, id], etag).await
    }
}

/// Drops the read-only `info` of X.509 certificates (the service derives it).
fn strip_certificate_info(attestation: &mut Value) {
    let Some(x509) = attestation.get_mut("x509").and_then(Value::as_object_mut) else { return };
    for slot in ["clientCertificates", "signingCertificates"] {
        if let Some(certs) = x509.get_mut(slot).and_then(Value::as_object_mut) {
            for which in ["primary", "secondary"] {
                if let Some(c) = certs.get_mut(which).and_then(Value::as_object_mut) {
                    if c.contains_key("certificate") {
                        c.remove("info");
                    }
                }
            }
        }
    }
}
