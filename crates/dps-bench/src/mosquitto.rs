//! A Mosquitto broker of its own (Debian `mosquitto` with its dynamic-security plugin,
//! `mosquitto-clients` for `mosquitto_ctrl`) on a free loopback port, with one
//! dynamic-security admin: the hub of the Mosquitto registrar's tests and of
//! `dps bench --registrar mosquitto`. Stopped when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::BenchError;

/// The admin's user name.
pub const ADMIN: &str = "dps-admin";
/// The admin's password.
pub const ADMIN_PASSWORD: &str = "admin-password-0123456789";

/// A TLS listener for devices with certificates: the broker's certificate and key (PEM), and
/// the CA whose certificates it accepts, whose CN becomes the user name
/// (`require_certificate`, `use_identity_as_username`).
pub struct DeviceTls {
    /// Server certificate chain (PEM).
    pub cert_pem: String,
    /// Its key (PEM).
    pub key_pem: String,
    /// The device CA (PEM).
    pub ca_pem: String,
}

/// A running broker.
pub struct Broker {
    child: Child,
    /// Its loopback port (plain MQTT: the admin, and devices with passwords).
    pub port: u16,
    /// The port of the certificate listener, when started with one.
    pub tls_port: Option<u16>,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where Debian puts the plugin.
fn plugin() -> Result<PathBuf, BenchError> {
    ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib"]
        .iter()
        .map(|d| PathBuf::from(d).join("mosquitto_dynamic_security.so"))
        .find(|p| p.exists())
        .ok_or_else(|| {
            BenchError::Setup("mosquitto_dynamic_security.so not found: install the Debian package mosquitto".into())
        })
}

impl Broker {
    /// Initialises the plugin's file with the admin and starts `mosquitto` on a free port.
    pub async fn start() -> Result<Broker, BenchError> {
        Self::start_with(None).await
    }

    /// The same, with a certificate listener for devices on a second port.
    pub async fn start_with(device_tls: Option<&DeviceTls>) -> Result<Broker, BenchError> {
        let dir = tempfile::tempdir().map_err(BenchError::io("cannot create a temporary directory"))?;
        let dynsec = dir.path().join("dynsec.json");
        let status = Command::new("mosquitto_ctrl")
            .args(["dynsec", "init"])
            .arg(&dynsec)
            .args([ADMIN, ADMIN_PASSWORD])
            .stdout(Stdio::null())
            .status()
            .map_err(BenchError::io("cannot run mosquitto_ctrl (Debian package mosquitto-clients)"))?;
        if !status.success() {
            return Err(BenchError::Setup(format!("mosquitto_ctrl dynsec init failed ({status})")));
        }
        let free_port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(BenchError::io("cannot find a free port"))
        };
        let port = free_port()?;
        let mut tls_port = None;
        let mut tls_listener = String::new();
        if let Some(t) = device_tls {
            let p = free_port()?;
            let write = |name: &str, text: &str| {
                let path = dir.path().join(name);
                std::fs::write(&path, text).map(|_| path).map_err(BenchError::io(format!("cannot write {name}")))
            };
            let (ca, cert, key) = (
                write("device-ca.pem", &t.ca_pem)?,
                write("server.pem", &t.cert_pem)?,
                write("server-key.pem", &t.key_pem)?,
            );
            tls_listener = format!(
                "listener {p} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\n",
                ca.display(),
                cert.display(),
                key.display()
            );
            tls_port = Some(p);
        }
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\nlistener {port} 127.0.0.1\nallow_anonymous false\npersistence false\nlog_dest stderr\n\
                 max_connections -1\nplugin {}\nplugin_opt_config_file {}\n{tls_listener}",
                plugin()?.display(),
                dynsec.display()
            ),
        )
        .map_err(BenchError::io("cannot write mosquitto.conf"))?;
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(BenchError::io("cannot start mosquitto (Debian package mosquitto)"))?;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(Broker { child, port, tls_port, _dir: dir });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(BenchError::Setup(format!("mosquitto did not start on port {port}")))
    }

    /// The `[[hubs]]` entry linking `hub` to this broker through the `mosquitto` registrar.
    pub fn config(&self, hub: &str, on_failure: &str) -> String {
        format!(
            "[[hubs]]\nhost_name = \"{hub}\"\n[hubs.registrar]\nkind = \"mosquitto\"\naddress = \"127.0.0.1:{}\"\ntls = false\n\
             username = \"{ADMIN}\"\npassword = \"{ADMIN_PASSWORD}\"\non_failure = \"{on_failure}\"\ntimeout_secs = 10\nattempts = 3\n",
            self.port
        )
    }
}
