//! `dps enrollment create|show|list|update|delete`: individual enrollments.

use super::record::{Attestation, Kind};
use super::records::{Fields, IfEtag, ShowKeys, Spec, Top};
use super::{AdminError, Common};

/// `dps enrollment …`.
#[derive(Debug, clap::Args)]
pub struct EnrollmentArgs {
    #[command(flatten)]
    common: Common,
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
        #[command(flatten)]
        keys: ShowKeys,
    },
    /// List enrollments.
    List(Top),
    /// Change an enrollment: only the flags given change; with --etag, only if it still has
    /// that ETag.
    Update(Box<Update>),
    /// Delete an enrollment (its registration state stays; see `dps registration delete`).
    Delete {
        #[command(flatten)]
        id: Id,
        #[command(flatten)]
        etag: IfEtag,
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
    #[command(flatten)]
    fields: Fields,
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
    #[command(flatten)]
    fields: Fields,
}

const SPEC: Spec = Spec {
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
        let (api, out) = self.common.connect()?;
        match self.command {
            EnrollmentCommand::Create(c) => {
                SPEC.create(&api, out, &c.id.registration_id, c.attestation, &c.fields).await
            }
            EnrollmentCommand::Show { id, keys } => SPEC.show(&api, out, &id.registration_id, keys.show_keys).await,
            EnrollmentCommand::List(t) => SPEC.list(&api, out, t.top).await,
            EnrollmentCommand::Update(u) => {
                SPEC.update(&api, out, &u.id.registration_id, u.etag, u.attestation, &u.fields).await
            }
            EnrollmentCommand::Delete { id, etag } => {
                SPEC.delete(&api, &id.registration_id, etag.etag.as_deref()).await
            }
        }
    }
}
