//! `dps enrollment create|show|list|update|delete`: individual enrollments.

use super::client::ServiceApi;
use super::login::LoginArgs;
use super::output::Format;
use super::record::{Attestation, Kind, RecordFlags, TpmFlags};
use super::records::{Draft, Spec};
use super::AdminError;

/// `dps enrollment …`.
#[derive(Debug, clap::Args)]
pub struct EnrollmentArgs {
    #[command(flatten)]
    login: LoginArgs,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Format::Json, global = true)]
    output: Format,
    #[command(subcommand)]
    command: EnrollmentCommand,
}

#[derive(Debug, clap::Subcommand)]
enum EnrollmentCommand {
    /// Create an individual enrollment (refused if one with this ID exists; see update).
    Create(Box<Create>),
    /// Show an enrollment (keys hidden unless --show-keys).
    Show {
        #[command(flatten)]
        id: Id,
        /// Include the symmetric keys (needs a policy with EnrollmentWrite).
        #[arg(long)]
        show_keys: bool,
    },
    /// List enrollments.
    List {
        /// At most this many.
        #[arg(long)]
        top: Option<usize>,
    },
    /// Change an enrollment: only the flags given change; with --etag, only if it still has
    /// that ETag.
    Update(Box<Update>),
    /// Delete an enrollment (its registration state stays; see `dps registration delete`).
    Delete {
        #[command(flatten)]
        id: Id,
        /// Delete only if the enrollment still has this ETag.
        #[arg(long, short = 'e')]
        etag: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
struct Id {
    /// Registration ID of the enrollment.
    #[arg(long = "registration-id", visible_alias = "enrollment-id", visible_alias = "eid", visible_alias = "rid")]
    registration_id: String,
}

#[derive(Debug, clap::Args)]
struct Create {
    #[command(flatten)]
    id: Id,
    /// Attestation mechanism.
    #[arg(long, visible_alias = "attestation-type", visible_alias = "at", value_enum)]
    attestation: Attestation,
    /// Device ID in the hub (default: the registration ID).
    #[arg(long, visible_alias = "did")]
    device_id: Option<String>,
    #[command(flatten)]
    tpm: TpmFlags,
    #[command(flatten)]
    flags: RecordFlags,
}

#[derive(Debug, clap::Args)]
struct Update {
    #[command(flatten)]
    id: Id,
    /// Update only if the enrollment still has this ETag (default: the ETag just read).
    #[arg(long, short = 'e')]
    etag: Option<String>,
    /// Replace the attestation with one of this type (with its flags).
    #[arg(long, visible_alias = "attestation-type", visible_alias = "at", value_enum)]
    attestation: Option<Attestation>,
    /// Device ID in the hub.
    #[arg(long, visible_alias = "did")]
    device_id: Option<String>,
    #[command(flatten)]
    tpm: TpmFlags,
    #[command(flatten)]
    flags: RecordFlags,
}

const SPEC: Spec = Spec {
    bulk_field: "enrollments",
    collection: "enrollments",
    id_field: "registrationId",
    kind: Kind::Enrollment,
    command: "dps enrollment",
    columns: &[
        ("REGISTRATION ID", "/registrationId"),
        ("ATTESTATION", "/attestation/type"),
        ("STATUS", "/provisioningStatus"),
        ("ALLOCATION", "/allocationPolicy"),
        ("HUBS", "/iotHubs"),
        ("ETAG", "/etag"),
    ],
};

impl EnrollmentArgs {
    /// Runs the command.
    pub async fn run(self) -> Result<(), AdminError> {
        let api = ServiceApi::new(self.login.resolve()?)?;
        let out = self.output;
        match self.command {
            EnrollmentCommand::Create(c) => {
                let draft = Draft { flags: &c.flags, tpm: &c.tpm, device_id: c.device_id };
                SPEC.create(&api, out, &c.id.registration_id, c.attestation, draft).await
            }
            EnrollmentCommand::Show { id, show_keys } => SPEC.show(&api, out, &id.registration_id, show_keys).await,
            EnrollmentCommand::List { top } => SPEC.list(&api, out, top).await,
            EnrollmentCommand::Update(u) => {
                let draft = Draft { flags: &u.flags, tpm: &u.tpm, device_id: u.device_id };
                SPEC.update(&api, out, &u.id.registration_id, u.etag, u.attestation, draft).await
            }
            EnrollmentCommand::Delete { id, etag } => SPEC.delete(&api, &id.registration_id, etag.as_deref()).await,
        }
    }
}
