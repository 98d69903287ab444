//! Where the admin commands find the service: a connection string (`--login`, or
//! `DPS_CONNECTION_STRING`) or a data directory's `dev-credentials.json`, the CA to trust and
//! the address to connect to.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use dps_proto::connection_string::ServiceConnectionString;
use serde::Deserialize;

use super::AdminError;

/// The connection options every admin command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct LoginArgs {
    /// Service connection string (`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`), as
    /// dev-credentials.json or the Azure portal give it. Prefer the environment variable: a
    /// command line is visible to other users of the machine.
    #[arg(long, env = "DPS_CONNECTION_STRING", hide_env_values = true, global = true)]
    pub login: Option<String>,
    /// Data directory of a local dps; its dev-credentials.json gives the connection string,
    /// the CA and the address when --login is not given.
    #[arg(long, env = "DPS_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// PEM file of the CA that signed the server's certificate (default: the CA named in
    /// dev-credentials.json, else the system's trusted roots).
    #[arg(long, env = "DPS_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Address to connect to (e.g. 127.0.0.1:8443) when the connection string's host name
    /// does not resolve to the server; TLS still checks the certificate against the host name.
    #[arg(long, global = true)]
    pub connect_to: Option<SocketAddr>,
    /// Seconds to wait for each request.
    #[arg(long, default_value_t = 30, global = true)]
    pub timeout: u64,
}

/// What a command needs to reach the service API.
pub struct Login {
    /// The parsed connection string.
    pub connection: ServiceConnectionString,
    /// Trusted CA (PEM), or `None` for the system roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Where to connect instead of resolving the host name.
    pub connect_to: Option<SocketAddr>,
    /// Per-request timeout in seconds.
    pub timeout: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DevCredentials {
    service_connection_string: Option<String>,
    ca_certificate_path: Option<PathBuf>,
    https_address: Option<String>,
}

/// Default data directory, as `dps serve` uses it.
const DEFAULT_DATA_DIR: &str = "dps-data";

impl LoginArgs {
    /// Resolves the connection: `--login` first, then the data directory's credentials.
    pub fn resolve(&self) -> Result<Login, AdminError> {
        let mut ca_path = self.ca_file.clone();
        let mut connect_to = self.connect_to;
        let text = match &self.login {
            Some(text) => text.clone(),
            None => {
                let dir = self.data_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
                let creds = read_credentials(&dir)?;
                if ca_path.is_none() {
                    ca_path = creds.ca_certificate_path.map(|p| if p.is_relative() { dir.join(p) } else { p });
                }
                // A server bound to one address is reached there; a wildcard bind by name.
                if connect_to.is_none() {
                    connect_to = creds
                        .https_address
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                        .filter(|a| !a.ip().is_unspecified());
                }
                creds.service_connection_string.ok_or_else(|| {
                    AdminError::Usage(format!(
                        "{} has no service connection string (the server has no owner policy); pass --login",
                        dir.join(dps_server::bootstrap::DEV_CREDENTIALS_FILE).display()
                    ))
                })?
            }
        };
        let connection = ServiceConnectionString::parse(&text)
            .map_err(|e| AdminError::Usage(format!("the connection string cannot be used: {e}")))?;
        let ca_pem = match ca_path {
            Some(p) => Some(
                std::fs::read(&p)
                    .map_err(|e| AdminError::Usage(format!("cannot read the CA file {}: {e}", p.display())))?,
            ),
            None => None,
        };
        Ok(Login { connection, ca_pem, connect_to, timeout: self.timeout.max(1) })
    }
}

fn read_credentials(dir: &Path) -> Result<DevCredentials, AdminError> {
    let path = dir.join(dps_server::bootstrap::DEV_CREDENTIALS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        AdminError::Usage(format!(
            "no connection string: pass --login or set DPS_CONNECTION_STRING, or point --data-dir at the \
             data directory of a dps that has run (cannot read {}: {e})",
            path.display()
        ))
    })?;
    serde_json::from_str(&text).map_err(|e| AdminError::Usage(format!("{} is not valid: {e}", path.display())))
}
