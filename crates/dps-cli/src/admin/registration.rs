//! `dps registration show|list|delete`: device registration states.

use super::output::{self, Column};
use super::records::{IfEtag, Top};
use super::{AdminError, Common};

/// `dps registration …`.
#[derive(Debug, clap::Args)]
pub struct RegistrationArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: RegistrationCommand,
}

#[derive(Debug, clap::Subcommand)]
enum RegistrationCommand {
    /// Show a device's registration state.
    Show {
        /// The device's registration ID.
        #[arg(long, visible_alias = "rid")]
        registration_id: String,
    },
    /// List the registration states of an enrollment group's devices.
    List {
        /// The enrollment group.
        #[arg(long = "group-id", visible_alias = "gid", visible_alias = "enrollment-id", visible_alias = "eid")]
        group_id: String,
        #[command(flatten)]
        top: Top,
    },
    /// Delete a registration state: the device's next registration is a first one.
    Delete {
        /// The device's registration ID.
        #[arg(long, visible_alias = "rid")]
        registration_id: String,
        #[command(flatten)]
        etag: IfEtag,
    },
}

const COLUMNS: &[Column] = &[
    ("REGISTRATION ID", "/registrationId"),
    ("STATUS", "/status"),
    ("SUBSTATUS", "/substatus"),
    ("DEVICE ID", "/deviceId"),
    ("HUB", "/assignedHub"),
    ("UPDATED", "/lastUpdatedDateTimeUtc"),
];

impl RegistrationArgs {
    /// Runs the command.
    pub async fn run(self) -> Result<(), AdminError> {
        let (api, out) = self.common.connect()?;
        match self.command {
            RegistrationCommand::Show { registration_id } => {
                output::item(out, &api.get(&["registrations", &registration_id]).await?);
            }
            RegistrationCommand::List { group_id, top } => {
                let items = api.query(&["registrations", &group_id, "query"], top.top).await?;
                output::list(out, &items, COLUMNS);
            }
            RegistrationCommand::Delete { registration_id, etag } => {
                api.delete(&["registrations", &registration_id], etag.etag.as_deref()).await?;
            }
        }
        Ok(())
    }
}
