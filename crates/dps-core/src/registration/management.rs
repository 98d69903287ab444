//! The service API's registration-state operations: read, delete, query by group.

use dps_proto::error::ErrorCode;
use dps_proto::ids::{id_key, validate_enrollment_group_id, validate_registration_id};
use dps_proto::service::DeviceRegistrationState;

use super::records::RegistrationRecord;
use crate::engine::{parse_stored, Core, Management};
use crate::enrollment::QueryPage;
use crate::error::Error;
use crate::etag::IfMatch;
use crate::store::{Collection, Condition, StoreError, Write};

/// A registration state as stored, for either plane.
impl Core {
    pub(super) async fn load_registration(&self, registration_id: &str) -> Result<RegistrationRecord, Error> {
        let doc = self.store.get(Collection::Registrations, registration_id).await?.ok_or_else(|| {
            Error::not_found(
                ErrorCode::REGISTRATION_NOT_FOUND,
                format!("no registration state for registration ID '{registration_id}'"),
            )
        })?;
        parse_stored(&doc.body, "registration", registration_id)
    }
}

impl Management {
    /// Service API: reads a registration state.
    pub async fn get_registration_state(&self, registration_id: &str) -> Result<DeviceRegistrationState, Error> {
        validate_registration_id(registration_id)
            .map_err(|e| Error::bad_request(ErrorCode::INVALID_IDENTIFIER, e.to_string()))?;
        Ok(self.load_registration(registration_id).await?.to_service_state())
    }

    /// Service API: deletes a registration state; the device's next registration is an
    /// initial assignment.
    pub async fn delete_registration_state(&self, registration_id: &str, if_match: &IfMatch) -> Result<(), Error> {
        validate_registration_id(registration_id)
            .map_err(|e| Error::bad_request(ErrorCode::INVALID_IDENTIFIER, e.to_string()))?;
        let doc = self.store.get(Collection::Registrations, registration_id).await?.ok_or_else(|| {
            Error::not_found(
                ErrorCode::REGISTRATION_NOT_FOUND,
                format!("no registration state for registration ID '{registration_id}'"),
            )
        })?;
        if !if_match.allows(Some(&doc.etag)) {
            return Err(Error::PreconditionFailed(format!(
                "the If-Match ETag does not match the registration state of '{registration_id}'; read it again to get its current etag"
            )));
        }
        let write = Write::Delete {
            collection: Collection::Registrations,
            id: registration_id.into(),
            condition: Condition::IfMatch(doc.etag),
        };
        match self.store.write(vec![write]).await {
            Ok(()) => Ok(()),
            Err(StoreError::NotFound(_)) => Err(Error::not_found(
                ErrorCode::REGISTRATION_NOT_FOUND,
                format!("no registration state for registration ID '{registration_id}'"),
            )),
            Err(StoreError::PreconditionFailed(_)) => Err(Error::PreconditionFailed(format!(
                "the registration state of '{registration_id}' changed while deleting it; retry"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Service API: one page of the registration states of an enrollment group.
    pub async fn query_group_registrations(
        &self,
        enrollment_group_id: &str,
        page_size: usize,
        continuation: Option<&str>,
    ) -> Result<QueryPage<DeviceRegistrationState>, Error> {
        validate_enrollment_group_id(enrollment_group_id)
            .map_err(|e| Error::bad_request(ErrorCode::INVALID_IDENTIFIER, e.to_string()))?;
        let key = id_key(enrollment_group_id);
        let page = self.list_page(Collection::Registrations, Some(&key), page_size, continuation).await?;
        let items = page
            .documents
            .iter()
            .map(|d| parse_stored::<RegistrationRecord>(&d.body, "registration", &d.id).map(|r| r.to_service_state()))
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(QueryPage { items, continuation: page.continuation })
    }
}
