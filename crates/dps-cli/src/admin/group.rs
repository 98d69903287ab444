//! `dps group create|show|list|update|delete|compute-device-key`: enrollment groups.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use dps_proto::sas::{decode_key, derive_device_key};
use serde_json::{json, Value};

use super::client::ServiceApi;
use super::login::LoginArgs;
use super::output::Format;
use super::record::{Attestation, Kind, RecordFlags, TpmFlags};
use super::records::{Draft, Spec};
use super::AdminError;

/// `dps group …`.
#[derive(Debug, clap::Args)]
pub struct GroupArgs {
    #[command(flatten)]
    login: LoginArgs,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Format::Json, global = true)]
    output: Format,
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
        /// Include the symmetric keys (needs a policy with EnrollmentWrite).
        #[arg(long)]
        show_keys: bool,
    },
    /// List enrollment groups.
    List {
        /// At most this many.
        #[arg(long)]
        top: Option<usize>,
    },
    /// Change a group: only the flags given change; with --etag, only if it still has that
    /// ETag.
    Update(Box<Update>),
    /// Delete a group (its devices' registration states stay).
    Delete {
        #[command(flatten)]
        id: Id,
        /// Delete only if the group still has this ETag.
        #[arg(long, short = 'e')]
        etag: Option<String>,
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
    bulk_field: "enrollmentGroups",
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
        let out = self.output;
        if let GroupCommand::ComputeDeviceKey { key: Some(key), registration_id, .. } = &self.command {
            // Offline: no service needed.
            return print_device_key(out, key, registration_id);
        }
        let api = ServiceApi::new(self.login.resolve()?)?;
        let none = TpmFlags::none();
        match self.command {
            GroupCommand::Create(c) => {
                SPEC.create(
                    &api,
                    out,
                    &c.id.group_id,
                    c.attestation,
                    Draft { flags: &c.flags, tpm: &none, device_id: None },
                )
                .await
            }
            GroupCommand::Show { id, show_keys } => SPEC.show(&api, out, &id.group_id, show_keys).await,
            GroupCommand::List { top } => SPEC.list(&api, out, top).await,
            GroupCommand::Update(u) => {
                let change = Draft { flags: &u.flags, tpm: &none, device_id: None };
                SPEC.update(&api, out, &u.id.group_id, u.etag, u.attestation, change).await
            }
            GroupCommand::Delete { id, etag } => SPEC.delete(&api, &id.group_id, etag.as_deref()).await,
            GroupCommand::ComputeDeviceKey { group_id, secondary, registration_id, .. } => {
                let Some(group_id) = group_id else {
                    return Err(AdminError::Usage("give --group-id or --key".into()));
                };
                let attestation =
                    api.post(&["enrollmentGroups", &group_id, "attestationmechanism"], &json!({}), None).await?;
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
