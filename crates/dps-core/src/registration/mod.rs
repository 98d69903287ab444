//! Device registration: the spine every transport calls (register, operation status,
//! registration status), and the service API's registration-state operations.
//!
//! One registration goes through stages, one file each: [`authenticate`] (the credential
//! against the enrollments), allocation ([`allocate`]: a built-in policy or the custom
//! allocation hook), the reprovisioning plan ([`crate::reprovision`], a pure function), and
//! persistence of the registration state and the operation in one atomic write
//! ([`register`]). A slow step (the custom allocation webhook) goes through the one
//! mechanism in [`slow_step`]. The answer already carries the final state unless that step is
//! slow or `assigning_first` is set (docs/compatibility.md). Connection-oriented transports
//! authenticate once ([`AuthenticatedDevice`]) and pass the device to every request.

mod allocate;
mod authenticate;
mod management;
mod operation;
mod records;
mod register;
mod slow_step;

pub(crate) use authenticate::x509_not_accepted;
pub use authenticate::{AuthenticatedDevice, Credential};
pub use records::{OperationRecord, RegistrationRecord, ResolvedEnrollment};
pub use register::{DeviceReply, RegisterRequest};
