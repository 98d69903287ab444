//! `dps`: a self-hosted Device Provisioning Service, wire-compatible with Azure IoT Hub DPS.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

mod admin;
mod bench;
mod device;

use clap::{Parser, Subcommand};
use dps_server::{Config, Server, DEFAULT_CONFIG};

/// Self-hosted Device Provisioning Service, wire-compatible with Azure IoT Hub DPS.
#[derive(Debug, Parser)]
#[command(
    name = "dps",
    version,
    about = "Self-hosted Device Provisioning Service, wire-compatible with Azure IoT Hub DPS."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server. With no arguments: data in ./dps-data, HTTPS on 0.0.0.0:443, a test CA,
    /// an ID scope and a service policy generated on first start (see dev-credentials.json).
    Serve(ServeArgs),
    /// Configuration helpers.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Individual enrollments through the service API (like `az iot dps enrollment`).
    Enrollment(admin::EnrollmentArgs),
    /// Enrollment groups through the service API (like `az iot dps enrollment-group`).
    #[command(visible_alias = "enrollment-group")]
    Group(admin::GroupArgs),
    /// Device registration states through the service API.
    Registration(admin::RegistrationArgs),
    /// The certificate store: CA certificates that X.509 enrollment groups chain to, verified
    /// by proof of possession. With a connection string (--login or DPS_CONNECTION_STRING):
    /// through the service API of a running server; without: on the configured store — the
    /// data directory's SQLite file or the [store] PostgreSQL database — server or not.
    Cert(CertArgs),
    /// Provision this machine as a device (a DPS client; IoT Edge style config supported).
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Benchmark: N simulated devices register against a dps (started here, or --target) with
    /// C in flight, then against a fixed-answer ceiling server; throughput, latency, errors by
    /// code, server memory. See BENCHMARKS.md.
    Bench(Box<bench::BenchArgs>),
    /// The ceiling server of dps bench (started by it).
    #[command(hide = true)]
    BenchCeiling(bench::CeilingArgs),
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Register, or print the cached assignment from an earlier registration.
    Register(Box<device::DeviceArgs>),
    /// Register again (re-reads the payload file), replacing the cached assignment.
    Reprovision(Box<device::DeviceArgs>),
}

#[derive(Debug, clap::Args)]
struct CertArgs {
    /// TOML configuration file (for data_dir and the store file).
    #[arg(long, short, env = "DPS_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Data directory; overrides `data_dir` in the config.
    #[arg(long, env = "DPS_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Service connection string: work through the service API of a running server instead
    /// of on the store. Prefer the environment variable (a command line is visible to others).
    #[arg(long, env = "DPS_CONNECTION_STRING", hide_env_values = true, global = true)]
    login: Option<String>,
    /// With --login: PEM file of the CA that signed the server's certificate (default: the
    /// system's trusted roots).
    #[arg(long, env = "DPS_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// With --login: address to connect to when the host name does not resolve to the server.
    #[arg(long, global = true)]
    connect_to: Option<SocketAddr>,
    #[command(subcommand)]
    action: CertCommand,
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Upload a CA certificate (PEM or base64 DER file).
    Add {
        /// Name to store it under (letters, digits, '-', '_', '.').
        name: String,
        /// The certificate file.
        file: PathBuf,
        /// Mark it verified now, without proof of possession (you vouch for it).
        #[arg(long)]
        verified: bool,
    },
    /// List the certificates (JSON).
    List,
    /// Show one certificate (JSON).
    Show {
        /// Name.
        name: String,
    },
    /// Issue a verification code: sign a certificate with this subject CN using the CA's key,
    /// then run `dps cert verify`.
    VerificationCode {
        /// Name.
        name: String,
    },
    /// Prove possession of the CA's key with a certificate whose subject CN is the code.
    Verify {
        /// Name.
        name: String,
        /// The verification certificate file.
        file: PathBuf,
    },
    /// Remove a certificate.
    Remove {
        /// Name.
        name: String,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML configuration file (see `dps config default`).
    #[arg(long, short, env = "DPS_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory; overrides `data_dir` in the config.
    #[arg(long, env = "DPS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HTTPS listen address, e.g. 127.0.0.1:8443; overrides `listen.https`.
    #[arg(long)]
    https_listen: Option<SocketAddr>,
    /// MQTT-over-TLS listen address, e.g. 127.0.0.1:8883; overrides `listen.mqtt`.
    #[arg(long)]
    mqtt_listen: Option<SocketAddr>,
    /// AMQP-over-TLS listen address, e.g. 127.0.0.1:5671; overrides `listen.amqp`.
    #[arg(long)]
    amqp_listen: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the default configuration, with every setting documented.
    Default,
    /// Check a configuration file and report the first problem.
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

/// Logs to stderr with the configured filter (`RUST_LOG` wins), as text or one JSON object per
/// line (with the current span's fields, so lines of a request carry its `request_id`).
fn init_logging(log: &dps_server::config::LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match log.format {
        dps_server::config::LogFormat::Json => {
            builder.json().with_current_span(true).with_span_list(false).flatten_event(true).init()
        }
        dps_server::config::LogFormat::Text => {
            builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init()
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config(ConfigCommand::Default) => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::Config(ConfigCommand::Check { file }) => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve(args) => serve(args),
        Command::Enrollment(args) => admin::run(args.run()),
        Command::Group(args) => admin::run(args.run()),
        Command::Registration(args) => admin::run(args.run()),
        Command::Cert(args) => cert(args),
        Command::Device(DeviceCommand::Register(args)) => device::run(*args, false),
        Command::Device(DeviceCommand::Reprovision(args)) => device::run(*args, true),
        Command::Bench(args) => bench::run(*args),
        Command::BenchCeiling(args) => bench::ceiling(args),
    }
}

fn load_config(path: Option<&PathBuf>) -> Result<Config, String> {
    match path {
        Some(p) => Config::load(p).map_err(|e| e.to_string()),
        None => Ok(Config::default()),
    }
}

fn cert(args: CertArgs) -> ExitCode {
    use dps_server::admin::CertAction;
    let read =
        |file: &PathBuf| std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()));
    let action = match args.action {
        CertCommand::Add { name, file, verified } => {
            read(&file).map(|certificate| CertAction::Add { name, certificate, verified })
        }
        CertCommand::List => Ok(CertAction::List),
        CertCommand::Show { name } => Ok(CertAction::Show { name }),
        CertCommand::VerificationCode { name } => Ok(CertAction::VerificationCode { name }),
        CertCommand::Verify { name, file } => read(&file).map(|certificate| CertAction::Verify { name, certificate }),
        CertCommand::Remove { name } => Ok(CertAction::Remove { name }),
    };
    let action = match action {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if args.login.is_some() {
        let login = admin::LoginArgs {
            login: args.login,
            data_dir: None,
            ca_file: args.ca_file,
            connect_to: args.connect_to,
            timeout: 30,
        };
        return admin::run(async move {
            let v = admin::cert_via_service(login, action).await?;
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            Ok(())
        });
    }
    let mut config = match load_config(args.config.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dps_server::admin::cert(&config, action)) {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let mut config = match &args.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(addr) = args.https_listen {
        config.listen.https = addr;
    }
    if let Some(addr) = args.mqtt_listen {
        config.listen.mqtt = addr;
    }
    if let Some(addr) = args.amqp_listen {
        config.listen.amqp = addr;
    }
    init_logging(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(Server::new(config).run(shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
