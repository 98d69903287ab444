//! The admin commands (`dps enrollment|group|registration`, and `dps cert` with a
//! connection string): clients of the service API only, so they work against any node, shaped
//! after `az iot dps enrollment …` where the two overlap.
//!
//! Exit codes: 0 done; 1 the service refused (its error code and message on stderr); 2 the
//! command line, a file or the login cannot be used; 3 the service cannot be reached or
//! answered something unexpected.

mod cert;
mod client;
mod enrollment;
mod error;
mod group;
mod login;
mod output;
mod record;
mod records;
mod registration;

use std::future::Future;
use std::process::ExitCode;

pub use cert::via_service as cert_via_service;
pub use enrollment::EnrollmentArgs;
pub use error::AdminError;
pub use group::GroupArgs;
pub use login::LoginArgs;
pub use registration::RegistrationArgs;

/// What every admin command takes: where the service is, and how to print its answers.
#[derive(Debug, clap::Args)]
pub struct Common {
    #[command(flatten)]
    login: LoginArgs,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = output::Format::Json, global = true)]
    output: output::Format,
}

impl Common {
    /// The service API client and the output format.
    fn connect(&self) -> Result<(client::ServiceApi, output::Format), AdminError> {
        Ok((client::ServiceApi::new(self.login.resolve()?)?, self.output))
    }
}

/// Runs one admin command to its end and prints its error, if any.
pub fn run<F: Future<Output = Result<(), AdminError>>>(command: F) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}
