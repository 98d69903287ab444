//! `dps registration show|list|delete`: device registration states.

use super::client::ServiceApi;
use super::login::LoginArgs;
use super::output::{self, Column, Format};
use super::AdminError;

/// `dps registration …`.
#[derive(Debug, clap::Args)]
pub struct RegistrationArgs {
    #[command(flatten)]
    login: LoginArgs,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Format::Json, global = true)]
    output: Format,
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
        /// At most this many.
        #[arg(long)]
        top: Option<usize>,
    },
    /// Delete a registration state: the device's next registration is a first one.
    Delete {
        /// The device's registration ID.
        #[arg(long, visible_alias = "rid")]
        registration_id: String,
        /// Delete only if the state still has this ETag.
        #[arg(long, short = 'e')]
        etag: Option<String>,
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
        let api = ServiceApi::new(self.login.resolve()?)?;
        match self.command {
            RegistrationCommand::Show { registration_id } => {
                output::item(self.output, &api.get(&["registrations", &registration_id]).await?);
            }
            RegistrationCommand::List { group_id, top } => {
                let items = api.query(&["registrations", &group_id, "query"], top).await?;
                output::list(self.output, &items, COLUMNS);
            }
            RegistrationCommand::Delete { registration_id, etag } => {
                api.delete(&["registrations", &registration_id], etag.as_deref()).await?;
            }
        }
        Ok(())
    }
}
