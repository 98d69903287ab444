//! `dps device register|reprovision`: a device that provisions itself, from flags or from a
//! config file with IoT Edge's `[provisioning]` section (docs/device.md).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use dps_device::{ClientConfig, DeviceClient, DeviceCredential, DeviceError, TpmConfig, Transport};
use serde::Deserialize;
use serde_json::{json, Value};

/// Flags of `dps device register` and `dps device reprovision`.
#[derive(Debug, clap::Args)]
pub struct DeviceArgs {
    /// IoT Edge style config file (`[provisioning]` section, and `[tpm]` for TPM attestation);
    /// flags override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Service endpoint, e.g. https://localhost:8443 (port optional, default 443).
    #[arg(long)]
    endpoint: Option<String>,
    /// ID scope.
    #[arg(long)]
    id_scope: Option<String>,
    /// Registration ID.
    #[arg(long)]
    registration_id: Option<String>,
    /// The device's symmetric key (base64).
    #[arg(long, conflicts_with_all = ["group_key", "cert"])]
    symmetric_key: Option<String>,
    /// The enrollment group's key (base64); the device key is derived from it.
    #[arg(long, conflicts_with = "cert")]
    group_key: Option<String>,
    /// X.509 certificate chain file (PEM, leaf first); needs --key.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Private key file (PEM) for --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// JSON file whose content (any JSON value) is sent as the registration payload.
    #[arg(long)]
    payload_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust instead of the system roots.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Transport.
    #[arg(long, value_parser = ["https", "mqtt"])]
    transport: Option<String>,
    /// MQTT port (default 8883).
    #[arg(long)]
    mqtt_port: Option<u16>,
    /// Where the last result is cached (default ./dps-device-state.json).
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Seconds allowed for the whole registration (default 60).
    #[arg(long)]
    timeout: Option<u64>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// The parts of an IoT Edge `config.toml` we read, plus our `[dps_device]` table. Other
/// sections and keys are ignored, so a real IoT Edge config works.
#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    trust_bundle_cert: Option<String>,
    provisioning: Option<Provisioning>,
    /// aziot's `[tpm]` table: which TPM, and where the DPS key is kept.
    tpm: Option<TpmTable>,
    #[serde(default)]
    dps_device: DpsDevice,
}

/// aziot's `[tpm]` table (IoT Edge `config.toml`).
#[derive(Debug, Deserialize)]
struct TpmTable {
    /// The TCTI: "device" (default: /dev/tpmrm0), "swtpm:host=…,port=…", "mssim:…", "tabrmd".
    tcti: Option<String>,
    /// Offset of the DPS key's persistent handle from 0x81000000 (default 0x00_01_00): a TOML
    /// integer, or a string as IoT Edge's docs write it ("0x00_01_00").
    auth_key_index: Option<IndexValue>,
    hierarchy_authorization: Option<HierarchyAuthorization>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum IndexValue {
    Int(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
struct HierarchyAuthorization {
    endorsement: Option<String>,
    owner: Option<String>,
}

/// Largest `auth_key_index` (TPM 2.0 Part 3 §28.5.1: persistent handles end at 0x81ffffff;
/// aziot limits the offset to 0x7F_FF_FF).
const MAX_AUTH_KEY_INDEX: u32 = 0x7F_FF_FF;

fn auth_key_index(value: &IndexValue) -> Option<u32> {
    let n = match value {
        IndexValue::Int(n) => u32::try_from(*n).ok()?,
        IndexValue::Text(t) => {
            let t = t.trim().replace('_', "");
            match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                None => t.parse().ok()?,
            }
        }
    };
    Some(n).filter(|n| *n <= MAX_AUTH_KEY_INDEX)
}

/// The TPM credential from the config's `[tpm]` table (absent: the kernel's TPM, default key
/// handle).
fn tpm_credential(table: Option<&TpmTable>, cfg_name: &str) -> Result<DeviceCredential, InputError> {
    if !dps_device::TPM_SUPPORTED {
        return Err(InputError(format!(
            "config file {cfg_name}: attestation method 'tpm': this dps was built without TPM support; build it with `cargo build --release -p dps-cli --features tpm` (needs libtss2-dev)"
        )));
    }
    let mut tpm = TpmConfig::new(table.and_then(|t| t.tcti.as_deref()).unwrap_or("device"));
    if let Some(index) = table.and_then(|t| t.auth_key_index.as_ref()) {
        let index = auth_key_index(index).ok_or_else(|| {
            InputError(format!(
                "config file {cfg_name}: tpm.auth_key_index {index:?} is not an index from 0x00_00_00 to 0x7F_FF_FF"
            ))
        })?;
        tpm.auth_key_handle = dps_device::PERSISTENT_HANDLE_BASE + index;
    }
    if let Some(auth) = table.and_then(|t| t.hierarchy_authorization.as_ref()) {
        tpm.endorsement_auth = auth.endorsement.clone();
        tpm.owner_auth = auth.owner.clone();
    }
    Ok(DeviceCredential::Tpm(tpm))
}

#[derive(Debug, Deserialize)]
struct Provisioning {
    source: Option<String>,
    global_endpoint: Option<String>,
    id_scope: Option<String>,
    payload: Option<UriRef>,
    attestation: Option<Attestation>,
}

#[derive(Debug, Deserialize)]
struct UriRef {
    uri: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum KeyRef {
    Value { value: String },
    Uri { uri: String },
}

#[derive(Debug, Deserialize)]
struct Attestation {
    method: String,
    registration_id: Option<String>,
    symmetric_key: Option<KeyRef>,
    identity_cert: Option<String>,
    identity_pk: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DpsDevice {
    transport: Option<String>,
    mqtt_port: Option<u16>,
    /// The symmetric key is the enrollment group's key.
    #[serde(default)]
    group_key: bool,
    state_file: Option<String>,
    timeout_secs: Option<u64>,
}

/// A usage or input error: one line, exit 2, nothing sent.
struct InputError(String);

fn file_path(uri: &str, base: &Path) -> PathBuf {
    let p = uri.strip_prefix("file://").unwrap_or(uri);
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn read_text(path: &Path, what: &str) -> Result<String, InputError> {
    std::fs::read_to_string(path).map_err(|e| InputError(format!("{what} {}: {e}", path.display())))
}

/// The payload file: any JSON value, sent as it is (`null`: no payload).
fn read_payload(path: &Path) -> Result<Option<Value>, InputError> {
    let text = read_text(path, "payload file")?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| InputError(format!("payload file {}: not JSON: {e}", path.display())))?;
    Ok(Some(v).filter(|v| !v.is_null()))
}

fn key_from_file(path: &Path) -> Result<String, InputError> {
    let bytes = std::fs::read(path).map_err(|e| InputError(format!("symmetric key file {}: {e}", path.display())))?;
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    // Base64 text, or the raw key bytes (as IoT Edge keeps them).
    match std::str::from_utf8(&bytes).ok().map(str::trim).filter(|t| b64.decode(t).is_ok()) {
        Some(t) => Ok(t.to_string()),
        None => Ok(b64.encode(&bytes)),
    }
}

struct Resolved {
    config: ClientConfig,
    state_file: PathBuf,
    endpoint: String,
}

fn parse_endpoint(endpoint: &str) -> Result<(String, u16), InputError> {
    let bad = |why: &str| InputError(format!("endpoint '{endpoint}': {why}"));
    let rest = endpoint.strip_prefix("https://").ok_or_else(|| bad("must start with https://"))?;
    let hostport = rest.split('/').next().unwrap_or("");
    let (host, port) = match hostport.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            (h, after.strip_prefix(':'))
        }
        None => match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        },
    };
    let port = match port {
        Some(p) => p.parse().map_err(|_| bad("bad port"))?,
        None => 443,
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok((host.to_string(), port))
}

fn resolve(args: &DeviceArgs) -> Result<Resolved, InputError> {
    let (file, base) = match &args.config {
        Some(path) => {
            let text = read_text(path, "config file")?;
            let f: FileConfig = toml::from_str(&text).map_err(|e| {
                let line = e.span().map(|r| text[..r.start.min(text.len())].lines().count().max(1));
                let at = line.map(|l| format!(" line {l}")).unwrap_or_default();
                let message = e.message().lines().map(str::trim).collect::<Vec<_>>().join(" ");
                InputError(format!("config file {}{at}: {message}", path.display()))
            })?;
            let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
            (f, base)
        }
        None => (FileConfig::default(), PathBuf::from(".")),
    };
    let cfg_name = args.config.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let prov = file.provisioning.as_ref();
    if let Some(source) = prov.and_then(|p| p.source.as_deref()) {
        if source != "dps" {
            return Err(InputError(format!(
                "config file {cfg_name}: provisioning.source is '{source}'; only \"dps\" is supported"
            )));
        }
    }
    let att = prov.and_then(|p| p.attestation.as_ref());
    let endpoint = args
        .endpoint
        .clone()
        .or_else(|| prov.and_then(|p| p.global_endpoint.clone()))
        .ok_or_else(|| InputError("no endpoint: pass --endpoint or set provisioning.global_endpoint".into()))?;
    let (host, https_port) = parse_endpoint(&endpoint)?;
    let id_scope = args
        .id_scope
        .clone()
        .or_else(|| prov.and_then(|p| p.id_scope.clone()))
        .ok_or_else(|| InputError("no ID scope: pass --id-scope or set provisioning.id_scope".into()))?;
    let registration_id =
        args.registration_id.clone().or_else(|| att.and_then(|a| a.registration_id.clone())).ok_or_else(|| {
            InputError(
                "no registration ID: pass --registration-id or set provisioning.attestation.registration_id".into(),
            )
        })?;
    let credential = if let Some(k) = &args.symmetric_key {
        DeviceCredential::SymmetricKey(k.clone())
    } else if let Some(k) = &args.group_key {
        DeviceCredential::GroupKey(k.clone())
    } else if let (Some(c), Some(k)) = (&args.cert, &args.key) {
        DeviceCredential::X509 { chain_pem: read_text(c, "certificate file")?, key_pem: read_text(k, "key file")? }
    } else {
        let att = att.ok_or_else(|| {
            InputError(
                "no credential: pass --symmetric-key, --group-key or --cert/--key, or set [provisioning.attestation]"
                    .into(),
            )
        })?;
        match att.method.as_str() {
            "symmetric_key" => {
                let key = match &att.symmetric_key {
                    Some(KeyRef::Value { value }) => value.clone(),
                    Some(KeyRef::Uri { uri }) => key_from_file(&file_path(uri, &base))?,
                    None => {
                        return Err(InputError(format!(
                            "config file {cfg_name}: provisioning.attestation.symmetric_key is missing"
                        )))
                    }
                };
                if file.dps_device.group_key {
                    DeviceCredential::GroupKey(key)
                } else {
                    DeviceCredential::SymmetricKey(key)
                }
            }
            "x509" => {
                let (Some(cert), Some(pk)) = (&att.identity_cert, &att.identity_pk) else {
                    return Err(InputError(format!(
                        "config file {cfg_name}: x509 attestation needs identity_cert and identity_pk (file:// URIs)"
                    )));
                };
                DeviceCredential::X509 {
                    chain_pem: read_text(&file_path(cert, &base), "certificate file")?,
                    key_pem: read_text(&file_path(pk, &base), "key file")?,
                }
            }
            "tpm" => tpm_credential(file.tpm.as_ref(), &cfg_name)?,
            other => {
                return Err(InputError(format!(
                    "config file {cfg_name}: attestation method '{other}' is not supported (symmetric_key, x509 or tpm)"
                )))
            }
        }
    };
    let payload_path =
        args.payload_file.clone().or_else(|| prov.and_then(|p| p.payload.as_ref()).map(|u| file_path(&u.uri, &base)));
    let payload = payload_path.as_deref().map(read_payload).transpose()?.flatten();
    let ca_path = args.ca.clone().or_else(|| file.trust_bundle_cert.as_deref().map(|u| file_path(u, &base)));
    let trusted_ca_pem = ca_path.as_deref().map(|p| read_text(p, "CA file")).transpose()?;
    let transport = match args.transport.as_deref().or(file.dps_device.transport.as_deref()).unwrap_or("https") {
        "https" => Transport::Https,
        "mqtt" => Transport::Mqtt,
        other => {
            return Err(InputError(format!(
                "config file {cfg_name}: dps_device.transport '{other}' is not https or mqtt"
            )))
        }
    };
    let state_file = args
        .state_file
        .clone()
        .or_else(|| file.dps_device.state_file.as_deref().map(|s| file_path(s, &base)))
        .unwrap_or_else(|| PathBuf::from("dps-device-state.json"));
    let config = ClientConfig {
        https_port,
        mqtt_port: args.mqtt_port.or(file.dps_device.mqtt_port).unwrap_or(8883),
        transport,
        trusted_ca_pem,
        payload,
        timeout: Duration::from_secs(args.timeout.or(file.dps_device.timeout_secs).unwrap_or(60)),
        ..ClientConfig::new(&host, &id_scope, &registration_id, credential)
    };
    Ok(Resolved { config, state_file, endpoint })
}

fn print(result: &Value, json_out: bool) {
    if json_out {
        println!("{}", serde_json::to_string_pretty(result).unwrap_or_default());
        return;
    }
    let s = &result["registrationState"];
    let cached = if result["cached"] == true { " (cached; `dps device reprovision` registers again)" } else { "" };
    println!(
        "assigned: device '{}' on hub {}{cached}",
        s["deviceId"].as_str().unwrap_or("?"),
        s["assignedHub"].as_str().unwrap_or("?")
    );
    if let Some(sub) = s["substatus"].as_str() {
        println!("substatus: {sub}");
    }
    if !s["payload"].is_null() {
        println!("payload: {}", s["payload"]);
    }
}

/// Runs `register` (`reprovision = false`: reuse a cached assignment) or `reprovision`.
pub fn run(args: DeviceArgs, reprovision: bool) -> ExitCode {
    // tpm2-tss logs its own warnings and errors to stderr; the error dps prints already names
    // the TPM's answer. `TSS2_LOG=all+warning` shows them again. (Still single-threaded here.)
    if dps_device::TPM_SUPPORTED && std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+none");
    }
    let resolved = match resolve(&args) {
        Ok(r) => r,
        Err(InputError(m)) => {
            eprintln!("error: {m}");
            return ExitCode::from(2);
        }
    };
    let identity = json!({
        "endpoint": resolved.endpoint,
        "idScope": resolved.config.id_scope,
        "registrationId": resolved.config.registration_id,
    });
    if !reprovision {
        if let Some(cached) = std::fs::read_to_string(&resolved.state_file)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .filter(|s| s["identity"] == identity && s["registrationState"]["status"] == "assigned")
        {
            let mut out = cached;
            out["cached"] = json!(true);
            print(&out, args.json);
            return ExitCode::SUCCESS;
        }
    }
    let client = match DeviceClient::new(resolved.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(client.register()) {
        Ok(r) => {
            let out = json!({
                "identity": identity,
                "operationId": r.operation_id,
                "registrationState": r.state,
                "cached": false,
            });
            let mut saved = out.clone();
            if let Some(o) = saved.as_object_mut() {
                o.remove("cached");
            }
            if let Err(e) = write_state(&resolved.state_file, &saved) {
                eprintln!("warning: cannot write the state file {}: {e}", resolved.state_file.display());
            }
            print(&out, args.json);
            ExitCode::SUCCESS
        }
        Err(e) => {
            let code = match &e {
                DeviceError::Failed { code, .. } | DeviceError::Service { code, .. } => Some(*code),
                _ => None,
            };
            if args.json {
                println!("{}", json!({"error": e.to_string(), "errorCode": code}));
            }
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes the state file atomically (temporary file, fsync, rename).
fn write_state(path: &Path, value: &Value) -> std::io::Result<()> {
    use std::io::Write as _;
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&text)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(parse_endpoint("https://localhost:8443").ok(), Some(("localhost".into(), 8443)));
        assert_eq!(parse_endpoint("https://[::1]").ok(), Some(("::1".into(), 443)));
        assert_eq!(
            parse_endpoint("https://global.azure-devices-provisioning.net").ok(),
            Some(("global.azure-devices-provisioning.net".into(), 443))
        );
        assert_eq!(parse_endpoint("https://[::1]:9443/").ok(), Some(("::1".into(), 9443)));
        assert!(parse_endpoint("http://x").is_err());
        assert!(parse_endpoint("https://h:port").is_err());
    }

    #[test]
    fn auth_key_indexes() {
        assert_eq!(auth_key_index(&IndexValue::Int(0x00_01_00)), Some(0x100));
        assert_eq!(auth_key_index(&IndexValue::Text("0x00_01_00".into())), Some(0x100));
        assert_eq!(auth_key_index(&IndexValue::Text("256".into())), Some(256));
        assert_eq!(auth_key_index(&IndexValue::Int(0x80_00_00)), None);
        assert_eq!(auth_key_index(&IndexValue::Int(-1)), None);
        assert_eq!(auth_key_index(&IndexValue::Text("0xzz".into())), None);
    }

    fn resolve_toml(toml: &str) -> Result<Resolved, InputError> {
        let dir = tempfile::tempdir().map_err(|e| InputError(e.to_string()))?;
        let path = dir.path().join("config.toml");
        std::fs::write(&path, toml).map_err(|e| InputError(e.to_string()))?;
        let args = DeviceArgs {
            config: Some(path),
            endpoint: None,
            id_scope: None,
            registration_id: None,
            symmetric_key: None,
            group_key: None,
            cert: None,
            key: None,
            payload_file: None,
            ca: None,
            transport: None,
            mqtt_port: None,
            state_file: None,
            timeout: None,
            json: false,
        };
        resolve(&args)
    }

    #[test]
    fn tpm_attestation_from_the_config() {
        let head = "[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"https://localhost:8443\"\nid_scope = \"0ne00000001\"\n\
                    [provisioning.attestation]\nmethod = \"tpm\"\nregistration_id = \"tpm-1\"\n";
        let with_table = format!(
            "{head}[tpm]\ntcti = \"swtpm:host=127.0.0.1,port=2321\"\nauth_key_index = 0x00_02_00\n\
             [tpm.hierarchy_authorization]\nendorsement = \"e\"\nowner = \"o\"\n"
        );
        for (toml, tcti, handle) in [
            (head.to_string(), "device", 0x8100_0100),
            (with_table, "swtpm:host=127.0.0.1,port=2321", 0x8100_0200),
            (format!("{head}[tpm]\nauth_key_index = \"0x00_01_01\"\n"), "device", 0x8100_0101),
        ] {
            match (dps_device::TPM_SUPPORTED, resolve_toml(&toml)) {
                (true, Ok(r)) => {
                    let DeviceCredential::Tpm(tpm) = &r.config.credential else { panic!("not TPM: {toml}") };
                    assert_eq!(tpm.tcti, tcti);
                    assert_eq!(tpm.auth_key_handle, handle);
                    assert_eq!(r.config.registration_id, "tpm-1");
                }
                (false, Err(InputError(m))) => {
                    assert!(m.contains("built without TPM support") && m.contains("--features tpm"), "{m}");
                    assert_eq!(m.lines().count(), 1, "one line: {m}");
                }
                (supported, Ok(_)) => panic!("TPM support {supported}: {toml} was accepted"),
                (supported, Err(InputError(m))) => panic!("TPM support {supported}: {m}"),
            }
        }
        let bad = format!("{head}[tpm]\nauth_key_index = 0x80_00_00\n");
        match resolve_toml(&bad) {
            Err(InputError(m)) if dps_device::TPM_SUPPORTED => assert!(m.contains("tpm.auth_key_index"), "{m}"),
            Err(InputError(m)) => assert!(m.contains("built without TPM support"), "{m}"),
            Ok(_) => panic!("an index past 0x7F_FF_FF is refused"),
        }
    }
}
