//! Device-side lookups: an operation's status (polls) and the registration status.

use dps_proto::device::{DeviceRegistrationResult, RegistrationOperationStatus, RegistrationStatus};
use dps_proto::error::ErrorCode;
use dps_proto::ids::validate_operation_id;

use super::authenticate::{AuthenticatedDevice, Credential};
use super::records::{OperationRecord, TpmHubKey};
use super::register::DeviceReply;
use crate::engine::{parse_stored, DeviceRuntime};
use crate::error::Error;
use crate::store::Collection;

impl DeviceRuntime {
    /// Answers an operation-status poll.
    pub async fn operation_status(
        &self,
        id_scope: &str,
        registration_id: &str,
        operation_id: &str,
        credential: &Credential,
    ) -> Result<DeviceReply, Error> {
        self.check_scope_and_id(id_scope, registration_id)?;
        validate_operation_id(operation_id)
            .map_err(|e| Error::bad_request(ErrorCode::INVALID_IDENTIFIER, e.to_string()))?;
        let proven = self.authenticate(id_scope, registration_id, credential).await?;
        self.lookup_operation(registration_id, operation_id, proven.tpm_key).await
    }

    /// Answers an operation-status poll of a device that authenticated when it connected
    /// (MQTT, AMQP); its credential is re-checked as far as something changed, a TPM device's
    /// key always ([`DeviceRuntime::recheck`]): once a newer challenge has replaced it, the poll
    /// is refused as it would be over HTTPS.
    pub async fn operation_status_of(
        &self,
        device: &mut AuthenticatedDevice,
        operation_id: &str,
    ) -> Result<DeviceReply, Error> {
        validate_operation_id(operation_id)
            .map_err(|e| Error::bad_request(ErrorCode::INVALID_IDENTIFIER, e.to_string()))?;
        let proven = self.recheck(device).await?;
        self.lookup_operation(device.registration_id(), operation_id, proven.tpm_key).await
    }

    /// `proven`: a TPM device's key as its authentication or re-check read it, if it did.
    async fn lookup_operation(
        &self,
        registration_id: &str,
        operation_id: &str,
        proven: Option<TpmHubKey>,
    ) -> Result<DeviceReply, Error> {
        self.admit(registration_id, false)?;
        let not_found = || {
            Error::not_found(
                ErrorCode::OPERATION_NOT_FOUND,
                format!("operation '{operation_id}' does not exist for registration ID '{registration_id}' (unknown or expired)"),
            )
        };
        let doc = self.store.get(Collection::Operations, operation_id).await?.ok_or_else(not_found)?;
        // Past its retention an operation is gone, whether or not the purge has removed it yet.
        if doc.expires_at.is_some_and(|t| t <= self.clock.now_millis()) {
            return Err(not_found());
        }
        let op: OperationRecord = parse_stored(&doc.body, "operation", operation_id)?;
        if !op.registration_id.eq_ignore_ascii_case(registration_id) {
            return Err(not_found());
        }
        let mut op = op;
        if op.result.status == RegistrationStatus::Assigning
            && op.deadline_millis.is_some_and(|d| d < self.clock.now_millis())
        {
            let mut state = DeviceRegistrationResult::bare(&op.registration_id, RegistrationStatus::Failed);
            state.error_code = Some(ErrorCode::ALLOCATION_FAILED.0);
            state.error_message = Some(
                "the registration did not finish (the server stopped while calling the webhook or the IoT hub); register again"
                    .into(),
            );
            op.result = RegistrationOperationStatus {
                operation_id: op.result.operation_id,
                status: RegistrationStatus::Failed,
                registration_state: Some(state),
            };
        }
        if let (Some(digest), Some(state)) = (&op.tpm_key_digest, op.result.registration_state.as_mut()) {
            self.restore_tpm_blob(&op.registration_id, state, digest, proven).await?;
        }
        let retry_after = (op.result.status == RegistrationStatus::Assigning).then_some(self.settings.retry_after_secs);
        tracing::debug!(registration_id, operation_id, status = ?op.result.status, "operation polled");
        Ok(DeviceReply { operation: op.result, retry_after, attestation: None })
    }

    /// Answers a device registration status lookup (`POST /{scope}/registrations/{id}`).
    pub async fn registration_status(
        &self,
        id_scope: &str,
        registration_id: &str,
        credential: &Credential,
        body: &[u8],
    ) -> Result<DeviceRegistrationResult, Error> {
        self.check_scope_and_id(id_scope, registration_id)?;
        self.parse_registration_body(registration_id, body)?;
        let proven = self.authenticate(id_scope, registration_id, credential).await?;
        self.admit(registration_id, false)?;
        let record = self.load_registration(registration_id).await?;
        let mut state = record.to_device_result();
        if let Some(key) = &record.tpm {
            self.restore_tpm_blob(&record.registration_id, &mut state, &key.digest(), proven.tpm_key).await?;
        }
        Ok(state)
    }
}
