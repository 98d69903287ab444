//! Hardening: what an outside security review found, each case against a spawned `dps`.

mod common;

use common::{key, now, Dps};
use reqwest::Method;
use serde_json::{json, Value};

const RIGHTS: [&str; 5] =
    ["EnrollmentRead", "EnrollmentWrite", "RegistrationStatusRead", "RegistrationStatusWrite", "ServiceConfig"];

/// A policy per single right, one with read + write, one with none of the enrollment rights.
fn policies() -> Vec<(String, Vec<&'static str>)> {
    let mut p: Vec<(String, Vec<&'static str>)> = RIGHTS.iter().map(|r| (format!("only-{r}"), vec![*r])).collect();
    p.push(("read-write".into(), vec!["EnrollmentRead", "EnrollmentWrite"]));
    p.push(("write-and-status".into(), vec!["EnrollmentWrite", "RegistrationStatusRead", "RegistrationStatusWrite"]));
    p
}

fn policy_key(name: &str) -> Vec<u8> {
    let mut k = [0u8; 32];
    for (i, b) in name.bytes().enumerate() {
        k[i % 32] ^= b;
    }
    k.to_vec()
}

fn policies_toml() -> String {
    use base64::Engine as _;
    policies()
        .iter()
        .map(|(name, rights)| {
            format!(
                "[[service.policies]]\nname = \"{name}\"\nprimary_key = \"{}\"\nrights = {:?}\n",
                base64::engine::general_purpose::STANDARD.encode(policy_key(name)),
                rights
            )
        })
        .collect()
}

fn as_policy(dps: &Dps, name: &str, method: Method, path: &str) -> reqwest::RequestBuilder {
    let token = dps_proto::sas::build_token("localhost", &policy_key(name), now() + 600, Some(name));
    let sep = if path.contains('?') { '&' } else { '?' };
    dps.client.request(method, dps.url(&format!("{path}{sep}{}", common::API))).header("Authorization", token)
}

/// Keys (given by the caller, kept from the stored record or generated) reach a response only
/// when the caller's policy has EnrollmentRead: single PUT, bulk and groups, every right.
#[tokio::test]
async fn keys_reach_only_callers_that_may_read_enrollments() {
    let dps = Dps::start(&policies_toml()).await;
    for (name, rights) in policies() {
        let may_read = rights.contains(&"EnrollmentRead");
        let may_write = rights.contains(&"EnrollmentWrite");
        let tag = name.to_ascii_lowercase();
        // Records created by the owner, with known keys; then written by this policy without keys.
        let (ind, grp) = (format!("{tag}-e"), format!("{tag}-g"));
        dps.put_enrollment(json!({"registrationId": ind, "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": key(11), "secondaryKey": key(12)}}}))
            .await;
        dps.put_group(json!({"enrollmentGroupId": grp, "attestation": {"type": "symmetricKey",
            "symmetricKey": {"primaryKey": key(13), "secondaryKey": key(14)}}}))
            .await;
        let (new_ind, new_grp, bulk_ind, bulk_grp) =
            (format!("{tag}-new-e"), format!("{tag}-new-g"), format!("{tag}-bulk-e"), format!("{tag}-bulk-g"));
        let sk = json!({"type": "symmetricKey"});
        let calls: Vec<(&str, Method, String, Value)> = vec![
            ("PUT existing enrollment", Method::PUT, format!("/enrollments/{ind}"), json!({"attestation": sk})),
            ("PUT existing group", Method::PUT, format!("/enrollmentGroups/{grp}"), json!({"attestation": sk})),
            ("PUT new enrollment", Method::PUT, format!("/enrollments/{new_ind}"), json!({"attestation": sk})),
            ("PUT new group", Method::PUT, format!("/enrollmentGroups/{new_grp}"), json!({"attestation": sk})),
            (
                "bulk enrollments",
                Method::POST,
                "/enrollments".into(),
                json!({"mode": "update", "enrollments": [{"registrationId": ind, "attestation": sk},
                    {"registrationId": bulk_ind, "attestation": sk}]}),
            ),
            (
                "bulk groups",
                Method::POST,
                "/enrollmentGroups".into(),
                json!({"mode": "update", "enrollmentGroups": [{"enrollmentGroupId": grp, "attestation": sk},
                    {"enrollmentGroupId": bulk_grp, "attestation": sk}]}),
            ),
            ("GET enrollment", Method::GET, format!("/enrollments/{ind}"), Value::Null),
            ("GET group", Method::GET, format!("/enrollmentGroups/{grp}"), Value::Null),
            ("query enrollments", Method::POST, "/enrollments/query".into(), json!({"query": "SELECT *"})),
            ("query groups", Method::POST, "/enrollmentGroups/query".into(), json!({"query": "SELECT *"})),
        ];
        let mut texts = Vec::new();
        for (what, method, path, body) in calls {
            let mut req = as_policy(&dps, &name, method.clone(), &path);
            if !body.is_null() {
                req = req.json(&body);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let needs = if method == Method::GET || path.ends_with("/query") { may_read } else { may_write };
            assert_eq!(status == 200, needs, "{name}: {what} answered {status}");
            texts.push((what, resp.text().await.unwrap()));
        }
        // Every key the records now hold, read back by the owner.
        let mut keys = vec![key(11), key(12), key(13), key(14)];
        for path in [
            format!("/enrollments/{ind}"),
            format!("/enrollmentGroups/{grp}"),
            format!("/enrollments/{new_ind}"),
            format!("/enrollmentGroups/{new_grp}"),
            format!("/enrollments/{bulk_ind}"),
            format!("/enrollmentGroups/{bulk_grp}"),
        ] {
            let resp = dps.service(Method::POST, &format!("{path}/attestationmechanism")).send().await.unwrap();
            if resp.status() == 200 {
                let a: Value = resp.json().await.unwrap();
                for slot in ["primaryKey", "secondaryKey"] {
                    keys.push(a["symmetricKey"][slot].as_str().unwrap().to_string());
                }
            }
        }
        for (what, text) in &texts {
            let leaked = keys.iter().any(|k| text.contains(k.as_str()));
            let put = what.starts_with("PUT");
            // Only a PUT by a policy that may also read answers with the keys (as Azure does).
            assert_eq!(leaked, put && may_read && may_write, "{name}: {what}: {text}");
        }
        // The attestation mechanism (keys) needs both rights.
        let resp = as_policy(&dps, &name, Method::POST, &format!("/enrollments/{ind}/attestationmechanism"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status() == 200, may_read && may_write, "{name}: attestation mechanism");
        // Keys were kept, not rotated, by the keyless writes.
        let a: Value = dps
            .service(Method::POST, &format!("/enrollments/{ind}/attestationmechanism"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(a["symmetricKey"]["primaryKey"], key(11), "{name}");
    }
}
