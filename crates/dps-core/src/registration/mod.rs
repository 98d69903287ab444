//! Device registration: the spine every transport calls (register, operation status,
//! registration status), and the service API's registration-state operations.
//!
//! One registration goes through stages, one file each: [`authenticate`] (the credential
//! against the enrollments), allocation ([`allocate`]: a built-in policy or the custom
//! allocation hook), the reprovisioning plan ([`crate::reprovision`], a pure function), and
//! persistence of the registration state and the operation in one atomic write
//! ([`register`]). The answer already carries the final state unless allocation is slow or
//! `assigning_first` is set (docs/compatibility.md).

mod allocate;
mod authenticate;
mod management;
mod operation;
mod records;
mod register;

pub(crate) use authenticate::x509_not_accepted;
pub use authenticate::Credential;
pub use records::{OperationRecord, RegistrationRecord, ResolvedEnrollment};
pub use register::{DeviceReply, RegisterRequest};
