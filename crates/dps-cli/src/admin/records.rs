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

/// What the flags of a create or an update say.
pub struct Draft<'a> {
    /// The flags shared by enrollments and groups.
    pub flags: &'a RecordFlags,
    /// TPM keys (enrollments).
    pub tpm: &'a TpmFlags,
    /// Device ID (enrollments).
    pub device_id: Option<String>,
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
        draft: Draft<'_>,
    ) -> Result<(), AdminError> {
        let attestation = draft.flags.new_attestation(self.kind, attestation, draft.tpm)?;
        let mut record = json!({ self.id_field: id, "attestation": attestation });
        if let Some(d) = draft.device_id {
            record["deviceId"] = json!(d);
        }
        draft.flags.apply(&mut record)?;
        if self.exists(api, id).await? {
            return Err(AdminError::Usage(format!("{id} exists; change it with `{} update`", self.command)));
        }
        output::item(out, &api.put(&[self.collection, id], &record, None).await?);
        Ok(())
    }

    /// Prints a record, with its keys when asked.
    pub async fn show(&self, api: &ServiceApi, out: Format, id: &str, show_keys: bool) -> Result<(), AdminError> {
        let mut record = api.get(&[self.collection, id]).await?;
        if show_keys {
            record["attestation"] = api.post(&[self.collection, id, "attestationmechanism"], &json!({}), None).await?;
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
        draft: Draft<'_>,
    ) -> Result<(), AdminError> {
        let mut record = api.get(&[self.collection, id]).await?;
        let etag = etag.or_else(|| record["etag"].as_str().map(str::to_string));
        match attestation {
            Some(a) => record["attestation"] = draft.flags.new_attestation(self.kind, a, draft.tpm)?,
            None => draft.flags.patch_attestation(self.kind, &mut record["attestation"], draft.tpm)?,
        }
        if let Some(d) = draft.device_id {
            record["deviceId"] = json!(d);
        }
        draft.flags.apply(&mut record)?;
        // What the service sets itself is not sent back.
        if let Value::Object(map) = &mut record {
            for key in ["registrationState", "createdDateTimeUtc", "lastUpdatedDateTimeUtc", "etag"] {
                map.remove(key);
            }
        }
        output::item(out, &api.put(&[self.collection, id], &record, etag.as_deref()).await?);
        Ok(())
    }

    /// Deletes a record, only if it still has `etag` when one is given.
    pub async fn delete(&self, api: &ServiceApi, id: &str, etag: Option<&str>) -> Result<(), AdminError> {
        api.delete(&[self.collection, id], etag).await
    }
}
