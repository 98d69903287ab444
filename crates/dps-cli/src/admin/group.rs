//! `dps group create|show|list|update|delete|compute-device-key`: enrollment groups.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use dps_proto::sas::{decode_key, derive_device_key};
use serde_json::Value;

use super::output::Format;
use super::record::{Attestation, Kind, RecordFlags};
use super::records::{Fields, IfEtag, ShowKeys, Spec, Top};
use super::{AdminError, Common};

/// `dps group …`.
#[derive(Debug, clap::Args)]
pub struct GroupArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: GroupCommand,
}

#[derive(Debug, clap::Subcommand)]
enum GroupCommand {
    /// Create an enrollment group (refused if one with this ID exists; see update).
    Create(Box<Create>),
    /// Show a group (keys hidden unless --show-keys).
    Show {
        #[command(flatten)]
        id: Id,
        #[command(flatten)]
        keys: ShowKeys,
    },
    /// List enrollment groups.
    List(Top),
    /// Change a group: only the flags given change; with --etag, only if it still has that
    /// ETag.
    Update(Box<Update>),
    /// Delete a group (its devices' registration states stay).
    Delete {
        #[command(flatten)]
        id: Id,
        #[command(flatten)]
        etag: IfEtag,
    },
    /// The key a member device signs its registration with: HMAC-SHA256 of its registration
    /// ID under the group's key (read from the service, or given with --key, offline).
    ComputeDeviceKey {
        /// The group whose primary key to use.
        #[arg(
            long = "group-id",
            visible_alias = "gid",
            visible_alias = "enrollment-id",
            visible_alias = "eid",
            required_unless_present = "key"
        )]
        group_id: Option<String>,
        /// The group key (base64) instead of reading it from the service.
        #[arg(long, conflicts_with = "group_id")]
        key: Option<String>,
        /// Use the group's secondary key.
        #[arg(long, conflicts_with = "key")]
        secondary: bool,
        /// The member's registration ID.
        #[arg(long, visible_alias = "rid")]
        registration_id: String,
    },
}

#[derive(Debug, clap::Args)]
struct Id {
    /// Enrollment group ID.
    #[arg(long = "group-id", visible_alias = "gid", visible_alias = "enrollment-id", visible_alias = "eid")]
    group_id: String,
}

#[derive(Debug, clap::Args)]
struct Create {
    #[command(flatten)]
    id: Id,
    /// Attestation mechanism (symmetric-key or x509; DPS has no TPM groups).
    #[arg(long, visible_alias = "attestation-type", visible_alias = "at", value_enum)]
    attestation: Attestation,
    #[command(flatten)]
    flags: RecordFlags,
}

#[derive(Debug, clap::Args)]
struct Update {
    #[command(flatten)]
    id: Id,
    /// Update only if the group still has this ETag (default: the ETag just read).
    #[arg(long, short = 'e')]
    etag: Option<String>,
    /// Replace the attestation with one of this type (with its flags).
    #[arg(long, visible_alias = "attestation-type", visible_alias = "at", value_enum)]
    attestation: Option<Attestation>,
    #[command(flatten)]
    flags: RecordFlags,
}

const SPEC: Spec = Spec {
    collection: "enrollmentGroups",
    id_field: "enrollmentGroupId",
    kind: Kind::Group,
    command: "dps group",
    columns: &[
        ("GROUP ID", "/enrollmentGroupId"),
        ("ATTESTATION", "/attestation/type"),
        ("STATUS", "/provisioningStatus"),
        ("ALLOCATION", "/allocationPolicy"),
        ("HUBS", "/iotHubs"),
        ("ETAG", "/etag"),
    ],
};

impl GroupArgs {
    /// Runs the command.
    pub async fn run(self) -> Result<(), AdminError> {
        if let GroupCommand::ComputeDeviceKey { key: Some(key), registration_id, .. } = &self.command {
            // Offline: no service needed.
            return print_device_key(self.common.output, key, registration_id);
        }
        let (api, out) = self.common.connect()?;
        match self.command {
            GroupCommand::Create(c) => {
                SPEC.create(&api, out, &c.id.group_id, c.attestation, &Fields::of_group(c.flags)).await
            }
            GroupCommand::Show { id, keys } => SPEC.show(&api, out, &id.group_id, keys.show_keys).await,
            GroupCommand::List(t) => SPEC.list(&api, out, t.top).await,
            GroupCommand::Update(u) => {
                SPEC.update(&api, out, &u.id.group_id, u.etag, u.attestation, &Fields::of_group(u.flags)).await
            }
            GroupCommand::Delete { id, etag } => SPEC.delete(&api, &id.group_id, etag.etag.as_deref()).await,
            GroupCommand::ComputeDeviceKey { group_id, secondary, registration_id, .. } => {
                let Some(group_id) = group_id else {
                    return Err(AdminError::Usage("give --group-id or --key".into()));
                };
                let attestation = SPEC.mechanism(&api, &group_id).await?;
                let field = if secondary { "secondaryKey" } else { "primaryKey" };
                let Some(key) = attestation["symmetricKey"][field].as_str() else {
                    return Err(AdminError::Usage(format!(
                        "group {group_id} has no symmetric {field} (its attestation is {})",
                        attestation["type"].as_str().unwrap_or("unknown")
                    )));
                };
                print_device_key(out, key, &registration_id)
            }
        }
    }
}

fn print_device_key(out: Format, group_key: &str, registration_id: &str) -> Result<(), AdminError> {
    let key = decode_key(group_key).map_err(|e| AdminError::Usage(format!("the group key cannot be used: {e}")))?;
    let derived = BASE64.encode(derive_device_key(&key, registration_id));
    match out {
        Format::Json => println!("{}", Value::String(derived)),
        Format::Table => println!("{derived}"),
    }
    Ok(())
}
