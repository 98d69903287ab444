//! Device registration: the device plane's pipeline (register, operation status, registration
//! status), and the management plane's registration-state operations.
//!
//! One registration goes through stages with typed hand-offs, one file each:
//! `authenticate.rs` (the [`Credential`] against the enrollments:
//! [`Authentication::Authenticated`] with an [`AuthenticatedDevice`], or a [`Challenge`] the
//! device must answer first), `allocate.rs` (a built-in policy, or the custom allocation hook
//! whose parsed answer is checked into an assignment), the reprovisioning plan
//! ([`crate::reprovision`], a pure function), and persistence of the registration state and the
//! operation in one atomic write (`register.rs`). A slow step (the custom allocation webhook)
//! goes through the one mechanism in `slow_step.rs`. The answer already carries the final state
//! unless that step is slow or `assigning_first` is set (docs/compatibility.md).
//! Connection-oriented transports authenticate once ([`AuthenticatedDevice`]) and pass the
//! device to every request.

mod allocate;
mod authenticate;
mod hub;
mod lifecycle;
mod management;
mod operation;
mod records;
mod register;
mod slow_step;
mod tpm_challenge;

pub(crate) use authenticate::x509_not_accepted;
pub use authenticate::{AuthenticatedDevice, Authentication, Challenge, Credential, TpmEndorsement};
pub(crate) use hub::outbox_write;
pub use records::{OperationRecord, RegistrationRecord, ResolvedEnrollment, TpmHubKey};
pub use register::{DeviceReply, RegisterRequest, Registered};
pub use tpm_challenge::TPM_KEY_NAME;
