//! Built-in allocation rule sets: custom allocation without an external service.
//!
//! An enrollment whose `customAllocationDefinition.webhookUrl` is `rules://<name>` is
//! allocated in-process by the rule set `<name>` from the config. A rule set can validate the
//! device payload against a JSON Schema, then tries its cases in order: the first case whose
//! `when` CEL expression is true chooses the hub, the initial twin and the payload returned to
//! the device, each a CEL expression too. Everything is compiled when the config loads.

use std::collections::HashMap;
use std::sync::Arc;

use cel::{Context, Program, Value as CelValue};
use dps_core::allocation::{hashed, LinkedHub};
use dps_core::custom::{CallError, Declined, HookError};
use dps_proto::webhook::{AllocationRequest, AllocationResponse};
use serde_json::Value;

use crate::config::{ConfigError, RuleSetConfig};

/// Reads one variable for a device: from the allocation request and the device payload.
type Variable = fn(&AllocationRequest, &Value) -> Value;

/// The variables a rule's expressions can read (docs/allocation.md).
const VARIABLES: [(&str, Variable); 7] = [
    ("registrationId", |r, _| Value::String(r.device_runtime_context.registration_id.clone())),
    ("payload", |_, payload| payload.clone()),
    ("enrollment", |r, _| r.individual_enrollment.clone().or_else(|| r.enrollment_group.clone()).unwrap_or_default()),
    ("enrollmentGroupId", |r, _| {
        let group = r.enrollment_group.as_ref().and_then(|g| g.get("enrollmentGroupId"));
        Value::String(group.and_then(Value::as_str).unwrap_or_default().to_string())
    }),
    ("linkedHubs", |r, _| Value::from(r.linked_hubs.clone())),
    ("currentHub", |r, _| {
        Value::String(r.device_runtime_context.current_iot_hub_host_name.clone().unwrap_or_default())
    }),
    ("certificate", |r, _| r.device_runtime_context.x509.clone().unwrap_or_else(|| serde_json::json!({}))),
];

/// The URL scheme that names a rule set.
pub const SCHEME: &str = "rules://";

struct Expr {
    source: String,
    program: Program,
}

struct Case {
    when: Expr,
    hub: Option<Expr>,
    payload: Option<Expr>,
    initial_twin: Option<Expr>,
}

struct RuleSet {
    schema: Option<jsonschema::Validator>,
    cases: Vec<Case>,
    /// The variables its expressions read: only these are converted to CEL per device.
    variables: std::collections::HashSet<String>,
}

/// The compiled rule sets of a configuration.
#[derive(Clone)]
pub struct RuleSets {
    sets: Arc<HashMap<String, RuleSet>>,
    hubs: Arc<Vec<LinkedHub>>,
    /// CEL's standard functions, built once (building them per evaluation cost more than the
    /// evaluation itself).
    env: Arc<cel::Env>,
}

impl std::fmt::Debug for RuleSets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSets").field("names", &self.sets.keys().collect::<Vec<_>>()).finish()
    }
}

fn compile(setting: &str, source: &str) -> Result<Expr, ConfigError> {
    let program = Program::compile(source).map_err(|e| ConfigError::Invalid {
        setting: setting.to_string(),
        message: format!("not a valid CEL expression: {e}"),
    })?;
    Ok(Expr { source: source.to_string(), program })
}

impl RuleSets {
    /// Compiles rule sets; every error names the setting.
    pub fn compile(configs: &[RuleSetConfig], hubs: Vec<LinkedHub>) -> Result<Self, ConfigError> {
        let mut sets = HashMap::new();
        for (i, rs) in configs.iter().enumerate() {
            let at = format!("rules[{i}]");
            let invalid = |setting: String, message: String| ConfigError::Invalid { setting, message };
            if rs.name.is_empty() || !rs.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(invalid(
                    format!("{at}.name"),
                    format!("'{}' must be letters, digits, '-', '_' or '.'", rs.name),
                ));
            }
            let key = rs.name.to_ascii_lowercase();
            if sets.contains_key(&key) {
                return Err(invalid(format!("{at}.name"), format!("rule set '{}' is defined twice", rs.name)));
            }
            let schema_text = match (&rs.payload_schema, &rs.payload_schema_file) {
                (Some(_), Some(_)) => {
                    return Err(invalid(at.clone(), "set payload_schema or payload_schema_file, not both".into()))
                }
                (Some(text), None) => Some(text.clone()),
                (None, Some(path)) => Some(std::fs::read_to_string(path).map_err(|e| {
                    invalid(format!("{at}.payload_schema_file"), format!("cannot read {}: {e}", path.display()))
                })?),
                (None, None) => None,
            };
            let schema = match schema_text {
                Some(text) => {
                    let json: Value = serde_json::from_str(&text)
                        .map_err(|e| invalid(format!("{at}.payload_schema"), format!("not valid JSON: {e}")))?;
                    Some(jsonschema::validator_for(&json).map_err(|e| {
                        invalid(format!("{at}.payload_schema"), format!("not a valid JSON Schema: {e}"))
                    })?)
                }
                None => None,
            };
            if rs.cases.is_empty() {
                return Err(invalid(format!("{at}.cases"), "a rule set needs at least one [[rules.cases]]".into()));
            }
            let mut cases = Vec::new();
            for (j, c) in rs.cases.iter().enumerate() {
                let at = format!("{at}.cases[{j}]");
                let opt = |name: &str, src: &Option<String>| {
                    src.as_deref().map(|s| compile(&format!("{at}.{name}"), s)).transpose()
                };
                cases.push(Case {
                    when: compile(&format!("{at}.when"), &c.when)?,
                    hub: opt("hub", &c.hub)?,
                    payload: opt("payload", &c.payload)?,
                    initial_twin: opt("initial_twin", &c.initial_twin)?,
                });
            }
            let variables = cases
                .iter()
                .flat_map(|c| [Some(&c.when), c.hub.as_ref(), c.payload.as_ref(), c.initial_twin.as_ref()])
                .flatten()
                .flat_map(|e| e.program.references().variables().into_iter().map(str::to_string).collect::<Vec<_>>())
                .collect();
            sets.insert(key, RuleSet { schema, cases, variables });
        }
        Ok(Self { sets: Arc::new(sets), hubs: Arc::new(hubs), env: Arc::new(cel::Env::stdlib()) })
    }

    /// True when a rule set of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.sets.contains_key(&name.to_ascii_lowercase())
    }

    /// Evaluates the rule set named by a `rules://name` URL for an allocation request.
    pub fn evaluate(&self, url: &str, request: &AllocationRequest) -> Result<AllocationResponse, HookError> {
        let name = url.strip_prefix(SCHEME).unwrap_or(url).trim_end_matches('/');
        let set = self.sets.get(&name.to_ascii_lowercase()).ok_or_else(|| {
            let mut known: Vec<&String> = self.sets.keys().collect();
            known.sort();
            CallError::InvalidUrl(format!("no rule set named '{name}' in the config (configured: {known:?})"))
        })?;
        let ctx = &request.device_runtime_context;
        let payload = ctx.payload.clone().unwrap_or(Value::Null);
        if let Some(schema) = &set.schema {
            let problems: Vec<String> = schema
                .iter_errors(&payload)
                .take(5)
                .map(|e| {
                    let path = e.instance_path().to_string();
                    if path.is_empty() {
                        e.to_string()
                    } else {
                        format!("{path}: {e}")
                    }
                })
                .collect();
            if !problems.is_empty() {
                let what = if payload.is_null() { "the device sent no payload, which" } else { "the payload" };
                return Err(Declined::PayloadRejected(format!(
                    "{what} does not match the schema of rule set '{name}': {}",
                    problems.join("; ")
                ))
                .into());
            }
        }
        let mut context = Context::with_env(self.env.clone());
        // Only what the set's expressions read is converted (the enrollment can be large).
        for (name, read) in VARIABLES {
            if set.variables.contains(name) {
                context.add_variable_from_value(name, to_cel(&read(request, &payload)));
            }
        }
        for (j, case) in set.cases.iter().enumerate() {
            // A `when` that cannot be evaluated (e.g. a missing payload field) does not match.
            match case.when.program.execute(&context) {
                Ok(CelValue::Bool(true)) => {}
                Ok(CelValue::Bool(false)) | Err(_) => continue,
                Ok(other) => {
                    return Err(Declined::NoDecision(format!(
                        "rule set '{name}' case {j}: when `{}` gave {other:?}, not a boolean",
                        case.when.source
                    ))
                    .into())
                }
            }
            let eval = |what: &str, expr: &Option<Expr>| -> Result<Option<Value>, HookError> {
                let Some(expr) = expr else { return Ok(None) };
                let v = expr.program.execute(&context).map_err(|e| {
                    Declined::NoDecision(format!("rule set '{name}' case {j}: {what} `{}` failed: {e}", expr.source))
                })?;
                let json = v.json().map_err(|e| {
                    Declined::NoDecision(format!(
                        "rule set '{name}' case {j}: {what} `{}` is not JSON: {e}",
                        expr.source
                    ))
                })?;
                Ok(Some(sorted(json)))
            };
            let hub = match eval("hub", &case.hub)? {
                Some(Value::String(h)) => h,
                Some(other) => {
                    return Err(Declined::NoDecision(format!(
                        "rule set '{name}' case {j}: hub must be a string, got {other}"
                    ))
                    .into())
                }
                None => self.hash_among(&request.linked_hubs, &ctx.registration_id).ok_or_else(|| {
                    Declined::NoDecision(format!("rule set '{name}' case {j}: no linked hub to choose from"))
                })?,
            };
            return Ok(AllocationResponse {
                iot_hub_host_name: Some(hub),
                initial_twin: eval("initial_twin", &case.initial_twin)?,
                payload: eval("payload", &case.payload)?,
            });
        }
        Err(Declined::NoDecision(format!("rule set '{name}' has no case whose `when` is true for this device")).into())
    }

    /// Weighted hashing among the offered hubs, with the weights of the config.
    fn hash_among(&self, offered: &[String], registration_id: &str) -> Option<String> {
        let owned: Vec<LinkedHub> = offered
            .iter()
            .map(|name| {
                self.hubs.iter().find(|h| h.host_name.eq_ignore_ascii_case(name)).cloned().unwrap_or(LinkedHub {
                    host_name: name.clone(),
                    allocation_weight: 1,
                    apply_allocation_policy: true,
                    region: None,
                })
            })
            .collect();
        let refs: Vec<&LinkedHub> = owned.iter().collect();
        hashed(&refs, registration_id).map(|h| h.host_name.clone())
    }
}

/// JSON to CEL, with whole numbers as CEL `int` (so `payload.count + 1` works) unless they
/// only fit a `uint`.
fn to_cel(value: &Value) -> CelValue {
    match value {
        Value::Null => CelValue::Null,
        Value::Bool(b) => CelValue::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => CelValue::Int(i),
            (None, Some(u)) => CelValue::UInt(u),
            _ => CelValue::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => CelValue::String(Arc::new(s.clone())),
        Value::Array(items) => CelValue::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(map) => {
            let map: HashMap<String, CelValue> = map.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            CelValue::from(map)
        }
    }
}

/// CEL maps have no order; sort object keys so that a rule's output is the same every time.
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuleCaseConfig;
    use dps_proto::webhook::DeviceRuntimeContext;
    use serde_json::json;

    fn case(when: &str, hub: Option<&str>, payload: Option<&str>) -> RuleCaseConfig {
        RuleCaseConfig {
            when: when.into(),
            hub: hub.map(str::to_string),
            payload: payload.map(str::to_string),
            initial_twin: None,
        }
    }

    fn request(payload: Option<Value>) -> AllocationRequest {
        AllocationRequest {
            individual_enrollment: None,
            enrollment_group: Some(json!({"enrollmentGroupId": "g1"})),
            device_runtime_context: DeviceRuntimeContext {
                registration_id: "dev-7".into(),
                current_iot_hub_host_name: None,
                current_device_id: None,
                symmetric_key: Some(json!({})),
                x509: None,
                tpm: None,
                payload,
            },
            linked_hubs: vec!["hub-a".into(), "hub-b".into()],
        }
    }

    fn by_model() -> RuleSets {
        RuleSets::compile(
            &[RuleSetConfig {
                name: "by-model".into(),
                payload_schema: Some(
                    r#"{"type":"object","required":["modelId"],"properties":{"modelId":{"type":"string"}}}"#.into(),
                ),
                payload_schema_file: None,
                cases: vec![
                    case(
                        "payload.modelId.startsWith('thermo')",
                        Some("'hub-b'"),
                        Some("{'topic': 'thermo/' + registrationId, 'group': enrollmentGroupId}"),
                    ),
                    case("true", None, None),
                ],
            }],
            vec![],
        )
        .unwrap()
    }

    #[test]
    fn first_matching_case_decides() {
        let rules = by_model();
        let r = rules.evaluate("rules://by-model", &request(Some(json!({"modelId": "thermo-1"})))).unwrap();
        assert_eq!(r.iot_hub_host_name.as_deref(), Some("hub-b"));
        assert_eq!(r.payload, Some(json!({"topic": "thermo/dev-7", "group": "g1"})));
        let keys: Vec<&String> = r.payload.as_ref().unwrap().as_object().unwrap().keys().collect();
        assert_eq!(keys, ["group", "topic"], "keys in a stable (sorted) order");
        let r = rules.evaluate("rules://BY-MODEL", &request(Some(json!({"modelId": "lamp"})))).unwrap();
        assert!(matches!(r.iot_hub_host_name.as_deref(), Some("hub-a" | "hub-b")));
        assert_eq!(r.payload, None);
    }

    #[test]
    fn every_variable_is_readable_and_only_read_ones_are_converted() {
        let all = RuleSets::compile(
            &[RuleSetConfig {
                name: "all".into(),
                payload_schema: None,
                payload_schema_file: None,
                cases: vec![case(
                    "registrationId == 'dev-7' && currentHub == '' && size(certificate) == 0",
                    Some("linkedHubs[1]"),
                    Some("{'e': enrollment.enrollmentGroupId, 'g': enrollmentGroupId, 'p': payload.n, 'l': size(linkedHubs), 'x': [1, 2].map(x, x * 2)}"),
                )],
            }],
            vec![],
        )
        .unwrap();
        let set = &all.sets["all"];
        let mut read: Vec<&str> = set.variables.iter().map(String::as_str).collect();
        read.sort();
        // `x` is the comprehension's own variable, not one of ours: it is never set.
        assert_eq!(
            read,
            [
                "certificate",
                "currentHub",
                "enrollment",
                "enrollmentGroupId",
                "linkedHubs",
                "payload",
                "registrationId",
                "x"
            ]
        );
        let r = all.evaluate("rules://all", &request(Some(json!({"n": 5})))).unwrap();
        assert_eq!(r.iot_hub_host_name.as_deref(), Some("hub-b"));
        assert_eq!(r.payload, Some(json!({"e": "g1", "g": "g1", "l": 2, "p": 5, "x": [2, 4]})));
        // by-model reads neither the enrollment nor the certificate.
        let set = &by_model().sets["by-model"];
        assert!(!set.variables.contains("enrollment") && !set.variables.contains("certificate"));
        assert!(set.variables.contains("payload") && set.variables.contains("registrationId"));
    }

    #[test]
    fn json_numbers_are_cel_ints_and_overflow_is_an_error() {
        let sets = RuleSets::compile(
            &[RuleSetConfig {
                name: "n".into(),
                payload_schema: None,
                payload_schema_file: None,
                cases: vec![
                    case(
                        "payload.count + 1 == 8 && payload.ratio > 0.5",
                        Some("'hub-a'"),
                        Some("{'next': payload.count + 1}"),
                    ),
                    case("payload.big + 1 > 0", Some("'hub-b'"), None),
                ],
            }],
            vec![],
        )
        .unwrap();
        let r = sets.evaluate("rules://n", &request(Some(json!({"count": 7, "ratio": 0.75})))).unwrap();
        assert_eq!(r.iot_hub_host_name.as_deref(), Some("hub-a"));
        assert_eq!(r.payload, Some(json!({"next": 8})));
        // Overflow is an evaluation error (no match), never a panic.
        let err = sets.evaluate("rules://n", &request(Some(json!({"count": 1, "big": i64::MAX})))).unwrap_err();
        assert!(err.to_string().contains("no case"), "{err}");
    }

    #[test]
    fn schema_violations_are_named() {
        let err = by_model().evaluate("rules://by-model", &request(Some(json!({"modelId": 7})))).unwrap_err();
        assert!(matches!(&err, HookError::Declined(Declined::PayloadRejected(m)) if m.contains("/modelId")), "{err}");
        let err = by_model().evaluate("rules://by-model", &request(None)).unwrap_err();
        assert!(matches!(&err, HookError::Declined(Declined::PayloadRejected(_))), "{err}");
    }

    #[test]
    fn unknown_rule_set_and_no_match() {
        let err = by_model().evaluate("rules://nope", &request(None)).unwrap_err();
        assert!(err.to_string().contains("'nope'") && err.to_string().contains("by-model"), "{err}");
        let only = RuleSets::compile(
            &[RuleSetConfig {
                name: "strict".into(),
                payload_schema: None,
                payload_schema_file: None,
                cases: vec![case("payload.modelId == 'x'", Some("'hub-a'"), None)],
            }],
            vec![],
        )
        .unwrap();
        let err = only.evaluate("rules://strict", &request(Some(json!({})))).unwrap_err();
        assert!(err.to_string().contains("no case"), "{err}");
    }

    #[test]
    fn bad_rules_fail_at_load() {
        let bad = |cases: Vec<RuleCaseConfig>, schema: Option<&str>| {
            RuleSets::compile(
                &[RuleSetConfig {
                    name: "r".into(),
                    payload_schema: schema.map(str::to_string),
                    payload_schema_file: None,
                    cases,
                }],
                vec![],
            )
            .unwrap_err()
            .to_string()
        };
        assert!(bad(vec![case("payload.(", None, None)], None).contains("rules[0].cases[0].when"));
        assert!(bad(vec![case("true", Some("'a' +"), None)], None).contains("rules[0].cases[0].hub"));
        assert!(bad(vec![], None).contains("at least one"));
        assert!(bad(vec![case("true", None, None)], Some("{not json")).contains("payload_schema"));
        assert!(bad(vec![case("true", None, None)], Some(r#"{"type": 12}"#)).contains("JSON Schema"));
    }
}
