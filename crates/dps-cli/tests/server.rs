//! Whole-server tests: a spawned `dps` on real TLS sockets.

mod common;

use std::time::Duration;

use common::{derive, file_mode, key, now, Dps};
use reqwest::Method;
use serde_json::{json, Value};

const HUBS: &str = "[[hubs]]\nhost_name = \"hub-1.test\"\n[[hubs]]\nhost_name = \"hub-2.test\"\nallocation_weight = 2\n[[hubs]]\nhost_name = \"hub-3.test\"\napply_allocation_policy = false\n";

#[tokio::test]
async fn first_start_creates_credentials_and_restart_reuses_them() {
    let mut dps = Dps::start("").await;
    let first = dps.creds.clone();
    let scope = first["idScope"].as_str().unwrap();
    assert!(scope.starts_with("0ne") && scope.len() == 11, "{scope}");
    let cs = first["serviceConnectionString"].as_str().unwrap();
    assert!(
        cs.starts_with("HostName=localhost:")
            && cs.contains(";SharedAccessKeyName=provisioningserviceowner;SharedAccessKey="),
        "{cs}"
    );
    let data = dps.data_dir();
    assert_eq!(file_mode(&data.join("tls/ca-key.pem")), 0o600);
    assert_eq!(file_mode(&data.join("tls/server-key.pem")), 0o600);
    assert_eq!(file_mode(&data.join("dev-credentials.json")), 0o600);
    // The data directory and the store hold every key: owner-only.
    assert_eq!(file_mode(&data), 0o700, "data directory");
    assert_eq!(file_mode(&data.join("tls")), 0o700, "tls directory");
    for f in ["dps.sqlite", "dps.sqlite-wal", "dps.sqlite-shm"] {
        assert_eq!(file_mode(&data.join(f)), 0o600, "{f}");
    }
    let ca_before = std::fs::read(data.join("tls/ca.pem")).unwrap();
    let server_cert_before = std::fs::read(data.join("tls/server.pem")).unwrap();
    assert_eq!(first["linkedHubs"], json!(["hub.localhost"]), "placeholder hub without [[hubs]]");
    dps.restart().await;
    assert_eq!(
        std::fs::read(data.join("tls/server.pem")).unwrap(),
        server_cert_before,
        "the server certificate is reused"
    );
    assert_eq!(dps.creds["idScope"], first["idScope"]);
    let policy =
        |v: &serde_json::Value| v["serviceConnectionString"].as_str().unwrap().split_once(';').unwrap().1.to_string();
    assert_eq!(policy(&dps.creds), policy(&first), "same policy and key (the ephemeral port differs)");
    assert_eq!(std::fs::read(data.join("tls/ca.pem")).unwrap(), ca_before, "the CA is reused");
    // The restarted server still serves, with the same credentials.
    let resp =
        dps.service(Method::POST, "/enrollments/query").json(&json!({"query": "SELECT *"})).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    // Changing tls.host_names re-issues the server certificate from the same CA.
    let cert_before = std::fs::read(data.join("tls/server.pem")).unwrap();
    dps.set_config_extra("[tls]\nhost_names = [\"localhost\", \"dps.example.test\"]\n");
    dps.restart().await;
    assert_ne!(std::fs::read(data.join("tls/server.pem")).unwrap(), cert_before, "server certificate re-issued");
    assert_eq!(std::fs::read(data.join("tls/ca.pem")).unwrap(), ca_before, "by the same CA");
    let resp =
        dps.service(Method::POST, "/enrollments/query").json(&json!({"query": "SELECT *"})).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the re-issued certificate chains to the stored CA");

    // So does changing tls.generated_key; the ECDSA certificate is then kept across restarts.
    let rsa_cert = std::fs::read(data.join("tls/server.pem")).unwrap();
    dps.set_config_extra("[tls]\nhost_names = [\"localhost\", \"dps.example.test\"]\ngenerated_key = \"ecdsa-p256\"\n");
    dps.restart().await;
    let ecdsa_cert = std::fs::read(data.join("tls/server.pem")).unwrap();
    assert_ne!(ecdsa_cert, rsa_cert, "re-issued with the new key type");
    dps.restart().await;
    assert_eq!(std::fs::read(data.join("tls/server.pem")).unwrap(), ecdsa_cert, "and reused");
    let resp =
        dps.service(Method::POST, "/enrollments/query").json(&json!({"query": "SELECT *"})).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the ECDSA certificate chains to the stored CA");
}

#[tokio::test]
async fn register_poll_and_status_lookup() {
    let dps = Dps::start(HUBS).await;
    let created = dps
        .put_enrollment(json!({"registrationId": "dev-1", "deviceId": "device-one",
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}},
            "initialTwin": {"tags": {"a": 1}}}))
        .await;
    assert_eq!(created["attestation"]["symmetricKey"]["primaryKey"], key(1));

    let token = dps.device_token("dev-1", &key(1));
    let (status, headers, body) =
        dps.register("dev-1", Some(&token), json!({"registrationId": "dev-1", "payload": {"m": 1}})).await;
    assert_eq!(status, 202, "{body}");
    assert!(headers["location"].to_str().unwrap().ends_with(&format!("/{}/registrations/dev-1/register", dps.scope())));
    assert_eq!(body["status"], "assigned", "fast path answers with the final state: {body}");
    let state = &body["registrationState"];
    assert_eq!(state["registrationId"], "dev-1");
    assert_eq!(state["deviceId"], "device-one");
    assert_eq!(state["substatus"], "initialAssignment");
    let hub = state["assignedHub"].as_str().unwrap().to_string();
    assert!(hub == "hub-1.test" || hub == "hub-2.test", "hub-3 does not take part: {hub}");
    assert!(state["etag"].is_string() && state["createdDateTimeUtc"].is_string());

    // The operation stays queryable (IoT Edge polls after the 202).
    let op = body["operationId"].as_str().unwrap();
    let url = dps.url(&format!("/{}/registrations/dev-1/operations/{op}?api-version=2019-03-31", dps.scope()));
    let resp = dps.client.get(&url).header("Authorization", &token).json(&json!({})).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let polled: Value = resp.json().await.unwrap();
    assert_eq!(polled["registrationState"]["assignedHub"], hub.as_str());
    // Polling needs a valid token too.
    let resp = dps.client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    // Unknown operation: 404203.
    let other = dps.url(&format!("/{}/registrations/dev-1/operations/5.0.nope?api-version=2019-03-31", dps.scope()));
    let resp = dps.client.get(other).header("Authorization", &token).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-ms-error-code"], "404203");

    // Device registration status lookup.
    let url = dps.url(&format!("/{}/registrations/dev-1?api-version=2019-03-31", dps.scope()));
    let resp = dps
        .client
        .post(&url)
        .header("Authorization", &token)
        .json(&json!({"registrationId": "dev-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let looked: Value = resp.json().await.unwrap();
    assert_eq!(looked["assignedHub"], hub.as_str());
    assert_eq!(looked["status"], "assigned");

    // The secondary key works; the same device lands on the same hub every time.
    for _ in 0..3 {
        let (status, _, again) = dps.register("dev-1", Some(&dps.device_token("dev-1", &key(2))), json!({})).await;
        assert_eq!(status, 202);
        assert_eq!(again["registrationState"]["assignedHub"], hub.as_str());
        assert_eq!(again["registrationState"]["createdDateTimeUtc"], state["createdDateTimeUtc"], "created date kept");
    }

    // The service API shows the registration state.
    let resp = dps.service(Method::GET, "/registrations/DEV-1").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let rs: Value = resp.json().await.unwrap();
    assert_eq!(rs["assignedHub"], hub.as_str());
}

#[tokio::test]
async fn group_members_and_disabled_enrollments() {
    let dps = Dps::start(HUBS).await;
    let group_key = key(7);
    dps.put_group(json!({"enrollmentGroupId": "grp", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": group_key, "secondaryKey": key(8)}}, "iotHubs": ["hub-3.test"]}))
        .await;
    let token = dps.device_token("member-1", &derive(&group_key, "member-1"));
    let (status, _, body) = dps.register("member-1", Some(&token), json!({"registrationId": "member-1"})).await;
    assert_eq!(status, 202);
    assert_eq!(body["status"], "assigned", "{body}");
    assert_eq!(body["registrationState"]["assignedHub"], "hub-3.test", "iotHubs narrows the candidates");
    assert_eq!(body["registrationState"]["deviceId"], "member-1");
    assert_eq!(body["registrationState"]["symmetricKey"]["enrollmentGroupId"], "grp");

    // A derived key is bound to its registration ID.
    let (status, _, err) =
        dps.register("member-2", Some(&dps.device_token("member-2", &derive(&group_key, "member-1"))), json!({})).await;
    assert_eq!(status, 401);
    assert_eq!(err["errorCode"], 401002);

    // A disabled individual enrollment blocks a group member.
    dps.put_enrollment(json!({"registrationId": "member-1", "provisioningStatus": "disabled",
        "attestation": {"type": "symmetricKey"}}))
        .await;
    let (status, _, body) = dps.register("member-1", Some(&token), json!({})).await;
    assert_eq!(status, 202);
    assert_eq!(body["status"], "disabled", "{body}");
    assert_eq!(body["registrationState"]["status"], "disabled");

    // A disabled group gives disabled to its members.
    dps.put_group(
        json!({"enrollmentGroupId": "grp", "provisioningStatus": "disabled", "attestation": {"type": "symmetricKey"}}),
    )
    .await;
    let t3 = dps.device_token("member-3", &derive(&group_key, "member-3"));
    let (_, _, body) = dps.register("member-3", Some(&t3), json!({})).await;
    assert_eq!(body["status"], "disabled", "group keys were kept on update: {body}");
}

#[tokio::test]
async fn allocation_failures_are_reported_as_failed_registrations() {
    let dps = Dps::start(HUBS).await;
    dps.put_enrollment(json!({"registrationId": "static-1", "allocationPolicy": "static", "iotHubs": ["hub-3.test"],
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key(3), "secondaryKey": key(4)}}}))
        .await;
    let (_, _, body) = dps.register("static-1", Some(&dps.device_token("static-1", &key(3))), json!({})).await;
    assert_eq!(body["registrationState"]["assignedHub"], "hub-3.test");

    dps.put_enrollment(json!({"registrationId": "custom-1", "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": "http://127.0.0.1:1/alloc", "apiVersion": "2021-10-01"},
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key(5), "secondaryKey": key(6)}}}))
        .await;
    let (status, _, body) = dps.register("custom-1", Some(&dps.device_token("custom-1", &key(5))), json!({})).await;
    assert_eq!(status, 202);
    assert_eq!(body["status"], "failed", "{body}");
    assert_eq!(body["registrationState"]["errorCode"], 400209);
    let msg = body["registrationState"]["errorMessage"].as_str().unwrap();
    assert!(msg.contains("custom allocation failed") && msg.contains("the webhook could not be reached"), "{msg}");
    // A URL that cannot be called is refused when it is written (more in tests/security.rs).
    let resp = dps
        .service(Method::PUT, "/enrollments/custom-2")
        .json(&json!({"registrationId": "custom-2", "allocationPolicy": "custom",
            "customAllocationDefinition": {"webhookUrl": "ftp://example.invalid/alloc", "apiVersion": "2021-10-01"},
            "attestation": {"type": "symmetricKey"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // An enrollment may not name a hub that is not linked.
    let resp = dps
        .service(Method::PUT, "/enrollments/bad-hub")
        .json(
            &json!({"registrationId": "bad-hub", "iotHubs": ["nowhere.test"], "attestation": {"type": "symmetricKey"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert!(err["message"].as_str().unwrap().contains("nowhere.test"), "{err}");
}

#[tokio::test]
async fn assigning_first_makes_devices_poll() {
    let dps = Dps::start("[device]\nassigning_first = true\nretry_after_secs = 2\n").await;
    dps.put_enrollment(json!({"registrationId": "slow", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key(9), "secondaryKey": key(9)}}})).await;
    let token = dps.device_token("slow", &key(9));
    let (status, headers, body) = dps.register("slow", Some(&token), json!({})).await;
    assert_eq!(status, 202);
    assert_eq!(body, json!({"operationId": body["operationId"], "status": "assigning"}));
    assert_eq!(headers["retry-after"], "2");
    let url = dps.url(&format!(
        "/{}/registrations/slow/operations/{}?api-version=2019-03-31",
        dps.scope(),
        body["operationId"].as_str().unwrap()
    ));
    let resp = dps.client.get(url).header("Authorization", &token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let polled: Value = resp.json().await.unwrap();
    assert_eq!(polled["status"], "assigned");
    assert_eq!(polled["registrationState"]["assignedHub"], "hub.localhost");
}

/// Bad input gets the documented DPS error, never a hang or a 5xx.
#[tokio::test]
async fn bad_device_input_gets_documented_errors() {
    let dps = Dps::start("[device]\nmax_payload_bytes = 1024\n[limits]\nmax_body_bytes = 4096\n").await;
    dps.put_enrollment(json!({"registrationId": "d", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}}})).await;
    let scope = dps.scope();
    let good = dps.device_token("d", &key(1));
    let register_url = |id: &str, q: &str| dps.url(&format!("/{scope}/registrations/{id}/register{q}"));
    let api = "?api-version=2019-03-31";
    let expired = {
        let resource = format!("{scope}/registrations/d");
        dps_proto::sas::build_token(&resource, &dps_proto::sas::decode_key(&key(1)).unwrap(), now() - 3600, None)
    };
    let other_scope = dps_proto::sas::build_token(
        "0neFFFFFFFF/registrations/d",
        &dps_proto::sas::decode_key(&key(1)).unwrap(),
        now() + 60,
        None,
    );
    // (name, url, token, body, status, DPS error code)
    type Case<'a> = (&'a str, String, Option<String>, Vec<u8>, u16, u32);
    let cases: Vec<Case> = vec![
        ("invalid JSON", register_url("d", api), Some(good.clone()), b"{not json".to_vec(), 400, 400001),
        (
            "payload too large",
            register_url("d", api),
            Some(good.clone()),
            format!(r#"{{"payload":{{"k":"{}"}}}}"#, "x".repeat(2000)).into_bytes(),
            400,
            400003,
        ),
        ("body too large", register_url("d", api), Some(good.clone()), vec![b' '; 5000], 413, 413001),
        ("registration ID grammar", register_url("bad%20id", api), Some(good.clone()), b"{}".to_vec(), 400, 400002),
        (
            "body ID differs from path",
            register_url("d", api),
            Some(good.clone()),
            br#"{"registrationId":"e"}"#.to_vec(),
            400,
            400004,
        ),
        ("no token", register_url("d", api), None, b"{}".to_vec(), 401, 401002),
        (
            "garbage token",
            register_url("d", api),
            Some("SharedAccessSignature nope".into()),
            b"{}".to_vec(),
            401,
            401002,
        ),
        ("expired token", register_url("d", api), Some(expired), b"{}".to_vec(), 401, 401002),
        ("wrong key", register_url("d", api), Some(dps.device_token("d", &key(3))), b"{}".to_vec(), 401, 401002),
        (
            "token for another device",
            register_url("d", api),
            Some(dps.device_token("e", &key(1))),
            b"{}".to_vec(),
            401,
            401002,
        ),
        ("token for another scope", register_url("d", api), Some(other_scope), b"{}".to_vec(), 401, 401002),
        (
            "unknown device",
            register_url("nobody", api),
            Some(dps.device_token("nobody", &key(1))),
            b"{}".to_vec(),
            401,
            401002,
        ),
        ("missing api-version", register_url("d", ""), Some(good.clone()), b"{}".to_vec(), 400, 400005),
        ("bad api-version", register_url("d", "?api-version=latest"), Some(good.clone()), b"{}".to_vec(), 400, 400005),
        ("csr not supported", register_url("d", api), Some(good.clone()), br#"{"csr":"MII"}"#.to_vec(), 400, 400004),
    ];
    for (name, url, token, body, status, code) in cases {
        let mut req = dps.client.put(&url).body(body);
        if let Some(t) = token {
            req = req.header("Authorization", t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{name}");
        assert_eq!(resp.headers()["x-ms-error-code"].to_str().unwrap(), code.to_string(), "{name}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["errorCode"], code, "{name}: {err}");
        assert!(err["trackingId"].is_string() && err["timestampUtc"].is_string(), "{name}");
        assert!(!err["message"].as_str().unwrap().is_empty(), "{name}");
    }
    // Unknown path and wrong method.
    let resp = dps.client.get(dps.url("/nothing/here?api-version=2019-03-31")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-ms-error-code"], "404001");
    let resp = dps.client.delete(register_url("d", api)).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "PUT");
    // Oversized headers are refused without taking the server down.
    let resp = dps.client.put(register_url("d", api)).header("x-big", "a".repeat(40_000)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 431, "headers over the limit");
    let resp = dps.client.put(register_url("d", api)).header("x-ok", "a".repeat(4_000)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401, "headers under the limit reach the handler");
    // Plain-text garbage on the TLS port does not take the server down.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(dps.addr).await.unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01garbage").await;
    }
    let (status, _, body) = dps.register("d", Some(&good), json!({"payload": null})).await;
    assert_eq!(status, 202, "still serving after bad input: {body}");
    assert_eq!(body["status"], "assigned");
    assert!(!dps.log().contains("panicked"), "{}", dps.log());
}

#[tokio::test]
async fn service_api_etags_paging_and_policies() {
    let extra = "[[service.policies]]\nname = \"reader\"\nprimary_key = \"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\"\nrights = [\"EnrollmentRead\"]\n";
    let dps = Dps::start(extra).await;
    let e = dps.put_enrollment(json!({"registrationId": "e-0", "attestation": {"type": "symmetricKey"}})).await;
    let etag = e["etag"].as_str().unwrap().to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    assert_eq!(e["attestation"]["symmetricKey"]["primaryKey"].as_str().unwrap().len(), 88, "generated 64-byte key");

    // If-Match: stale → 412, current (quoted or not) → 200, * → 200.
    let put = |if_match: &str| {
        dps.service(Method::PUT, "/enrollments/e-0")
            .header("If-Match", if_match)
            .json(&json!({"registrationId": "e-0", "attestation": {"type": "symmetricKey"}}))
    };
    let resp = put("\"stale\"").send().await.unwrap();
    assert_eq!(resp.status(), 412);
    assert_eq!(resp.headers()["x-ms-error-code"], "412001");
    let resp = put(etag.trim_matches('"')).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = put("*").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = dps.service(Method::DELETE, "/enrollments/e-0").header("If-Match", "\"stale\"").send().await.unwrap();
    assert_eq!(resp.status(), 412);

    // Paging with x-ms-max-item-count and x-ms-continuation.
    for i in 1..7 {
        dps.put_enrollment(json!({"registrationId": format!("e-{i}"), "attestation": {"type": "symmetricKey"}})).await;
    }
    let mut seen = Vec::new();
    let mut continuation: Option<String> = None;
    loop {
        let mut req = dps
            .service(Method::POST, "/enrollments/query")
            .header("x-ms-max-item-count", "3")
            .json(&json!({"query": "SELECT * FROM enrollments"}));
        if let Some(c) = &continuation {
            req = req.header("x-ms-continuation", c);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-ms-item-type"], "enrollment");
        continuation = resp.headers().get("x-ms-continuation").map(|v| v.to_str().unwrap().to_string());
        let page: Vec<Value> = resp.json().await.unwrap();
        assert!(page.len() <= 3);
        for e in &page {
            assert_eq!(e["attestation"], json!({"type": "symmetricKey", "symmetricKey": {}}), "query hides keys");
            seen.push(e["registrationId"].as_str().unwrap().to_string());
        }
        if continuation.is_none() {
            break;
        }
    }
    assert_eq!(seen, (0..7).map(|i| format!("e-{i}")).collect::<Vec<_>>());
    let resp = dps
        .service(Method::POST, "/enrollments/query")
        .header("x-ms-continuation", "not-ours!")
        .json(&json!({"query": "SELECT *"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    for i in 0..4 {
        dps.put_group(json!({"enrollmentGroupId": format!("g-{i}"), "attestation": {"type": "symmetricKey"}})).await;
    }
    // Azure ignores the query text of enrollment and group queries: `az iot dps enrollment
    // list` double-wraps it, and filters return everything too; paging still applies.
    for query in ["{'additional_properties': {}, 'query': 'SELECT *'}", "SELECT * FROM enrollments WHERE x = 1", ""] {
        for (path, id_field) in
            [("/enrollments/query", "registrationId"), ("/enrollmentGroups/query", "enrollmentGroupId")]
        {
            let mut ids = Vec::new();
            let mut continuation: Option<String> = None;
            loop {
                let mut req =
                    dps.service(Method::POST, path).header("x-ms-max-item-count", "3").json(&json!({"query": query}));
                if let Some(c) = &continuation {
                    req = req.header("x-ms-continuation", c);
                }
                let resp = req.send().await.unwrap();
                assert_eq!(resp.status(), 200, "{query}: {path}");
                continuation = resp.headers().get("x-ms-continuation").map(|v| v.to_str().unwrap().to_string());
                let page: Vec<Value> = resp.json().await.unwrap();
                assert!(page.len() <= 3, "{query}: paged");
                ids.extend(page.iter().map(|e| e[id_field].as_str().unwrap().to_string()));
                if continuation.is_none() {
                    break;
                }
            }
            let want: Vec<String> = if id_field == "registrationId" {
                (0..7).map(|i| format!("e-{i}")).collect()
            } else {
                (0..4).map(|i| format!("g-{i}")).collect()
            };
            assert_eq!(ids, want, "{query}: {path} returns everything");
        }
    }

    // Bulk: more than 10 items is refused; create of an existing one fails per item.
    let items: Vec<Value> =
        (0..11).map(|i| json!({"registrationId": format!("b-{i}"), "attestation": {"type": "symmetricKey"}})).collect();
    let resp = dps
        .service(Method::POST, "/enrollments")
        .json(&json!({"mode": "create", "enrollments": items}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = dps
        .service(Method::POST, "/enrollments")
        .json(&json!({"mode": "create", "enrollments": [{"registrationId": "e-1", "attestation": {"type": "symmetricKey"}}, {"registrationId": "b-new", "attestation": {"type": "symmetricKey"}}]}))
        .send()
        .await
        .unwrap();
    let result: Value = resp.json().await.unwrap();
    assert_eq!(result["isSuccessful"], false);
    assert_eq!(result["errors"].as_array().unwrap().len(), 1);
    assert_eq!(result["errors"][0]["registrationId"], "e-1");
    assert_eq!(result["errors"][0]["errorCode"], 409001);

    // Rights: the reader policy can read, not write; a bad signature or audience is refused.
    let reader_key = dps_proto::sas::decode_key("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=").unwrap();
    let reader = dps_proto::sas::build_token("localhost", &reader_key, now() + 60, Some("reader"));
    let get = dps
        .client
        .get(dps.url("/enrollments/e-1?api-version=2021-10-01"))
        .header("Authorization", &reader)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200);
    let del = dps
        .client
        .delete(dps.url("/enrollments/e-1?api-version=2021-10-01"))
        .header("Authorization", &reader)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 401);
    let err: Value = del.json().await.unwrap();
    assert!(err["message"].as_str().unwrap().contains("EnrollmentWrite"), "{err}");
    let att = dps
        .client
        .post(dps.url("/enrollments/e-1/attestationmechanism?api-version=2021-10-01"))
        .header("Authorization", &reader)
        .send()
        .await
        .unwrap();
    assert_eq!(att.status(), 401, "revealing keys needs write rights");
    let wrong_aud = dps_proto::sas::build_token("other.example", &reader_key, now() + 60, Some("reader"));
    let resp = dps
        .client
        .get(dps.url("/enrollments/e-1?api-version=2021-10-01"))
        .header("Authorization", &wrong_aud)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let forged =
        dps_proto::sas::build_token("localhost", b"not the key at all", now() + 60, Some("provisioningserviceowner"));
    let resp = dps
        .client
        .get(dps.url("/enrollments/e-1?api-version=2021-10-01"))
        .header("Authorization", &forged)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // Validation errors name the field.
    for (body, needle) in [
        (json!({"registrationId": "v", "attestation": {"type": "none"}}), "none"),
        (
            json!({"registrationId": "v", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "c2hvcnQ="}}}),
            "primaryKey",
        ),
        (json!({"registrationId": "w", "attestation": {"type": "symmetricKey"}}), "does not match"),
        (json!({"registrationId": "v", "attestation": {"type": "symmetricKey"}, "deviceId": "has space"}), "deviceId"),
        (
            json!({"registrationId": "v", "attestation": {"type": "symmetricKey"}, "allocationPolicy": "random"}),
            "allocationPolicy",
        ),
        (
            json!({"registrationId": "v", "attestation": {"type": "symmetricKey"}, "allocationPolicy": "static"}),
            "static",
        ),
    ] {
        let resp = dps.service(Method::PUT, "/enrollments/v").json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert!(err["message"].as_str().unwrap().contains(needle), "{needle}: {err}");
    }
    let resp = dps.service(Method::GET, "/enrollments/ghost").send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-ms-error-code"], "404201");
    let resp = dps.service(Method::GET, "/enrollmentGroups/ghost").send().await.unwrap();
    assert_eq!(resp.headers()["x-ms-error-code"], "404204");
    let resp = dps.service(Method::GET, "/registrations/ghost").send().await.unwrap();
    assert_eq!(resp.headers()["x-ms-error-code"], "404202");
}

/// `kill -9` right after acknowledged writes loses none of them. The registrations are sent
/// concurrently, so that the store's group commit holds many writes at once when the server
/// dies (one at a time, every commit would hold a single write).
#[tokio::test]
async fn kill9_loses_no_acknowledged_write() {
    use futures_util::stream::{self, StreamExt};
    const DEVICES: usize = 300;
    let mut dps = Dps::start(HUBS).await;
    let group_key = key(11);
    dps.put_group(json!({"enrollmentGroupId": "g", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key, "secondaryKey": key(12)}}})).await;
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("k-{i}")).collect();
    let acknowledged: Vec<(String, String)> = stream::iter(ids.iter())
        .map(|id| {
            let token = dps.device_token(id, &derive(&group_key, id));
            let dps = &dps;
            async move {
                let (status, _, body) = dps.register(id, Some(&token), json!({})).await;
                assert_eq!(status, 202, "{id}: {body}");
                assert_eq!(body["status"], "assigned", "{id}: {body}");
                (id.clone(), body["registrationState"]["assignedHub"].as_str().unwrap().to_string())
            }
        })
        .buffer_unordered(100)
        .collect()
        .await;
    dps.kill9();
    assert_eq!(acknowledged.len(), DEVICES);
    dps.restart().await;
    let resp =
        dps.service(Method::POST, "/registrations/g/query").header("x-ms-max-item-count", "1000").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-ms-item-type"], "deviceRegistration");
    let states: Vec<Value> = resp.json().await.unwrap();
    assert_eq!(states.len(), DEVICES, "every acknowledged registration survived kill -9");
    let hubs: Vec<String> = acknowledged.iter().map(|(_, hub)| hub.clone()).collect();
    for (id, hub) in &acknowledged {
        let s = states.iter().find(|s| s["registrationId"] == id.as_str()).unwrap();
        assert_eq!(s["assignedHub"], hub.as_str(), "{id}");
        assert_eq!(s["status"], "assigned", "{id}");
    }
    // And devices land on the same hub after the restart.
    for (id, hub) in acknowledged.iter().take(20) {
        let (_, _, body) = dps.register(id, Some(&dps.device_token(id, &derive(&group_key, id))), json!({})).await;
        assert_eq!(body["registrationState"]["assignedHub"], hub.as_str());
    }
    let spread: std::collections::HashSet<&String> = hubs.iter().collect();
    assert!(spread.len() >= 2, "hashed allocation spreads devices: {hubs:?}");
}

/// SIGTERM drains: the listener stops taking connections, a registration already in flight
/// (waiting for its webhook) is still answered with its result, and the process exits 0.
#[tokio::test]
async fn sigterm_finishes_registrations_in_flight_then_exits() {
    let hook = common::webhook::start().await;
    let mut dps = Dps::start(&format!(
        "[allocation]\nwebhook_inline_wait_ms = 5000\n\
         [[webhooks]]\nurl_prefix = \"http://{}/\"\nsecret = \"a-secret-of-16-chars\"\n",
        hook.addr
    ))
    .await;
    let k = key(41);
    dps.put_enrollment(json!({"registrationId": "slow", "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": hook.url("/slow"), "apiVersion": "2021-10-01"},
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    let token = dps.device_token("slow", &k);
    let client = dps.client.clone();
    let url = dps.url(&format!("/{}/registrations/slow/register?{}", dps.scope(), common::API));
    let in_flight = tokio::spawn(async move {
        let resp = client.put(url).header("Authorization", token).json(&json!({})).send().await.unwrap();
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
    });
    // The webhook takes 1.2 s; stop the server while the registration waits for it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let addr = dps.addr;
    let status = tokio::task::spawn_blocking(move || {
        let status = dps.terminate(Duration::from_secs(15));
        (status, dps)
    });
    let (status_code, body) = in_flight.await.unwrap();
    assert_eq!(status_code, 202, "{body}");
    assert_eq!(body["status"], "assigned", "the registration in flight got its result: {body}");
    let (status, dps) = status.await.unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "nothing listens after the stop");
    let log = dps.log();
    assert!(log.contains("shutting down") && log.contains("all connections closed"), "{log}");
}

/// Another process holding the SQLite write lock (a backup, an operator's `sqlite3` shell):
/// registrations that must write wait `busy_timeout` (5 s), then get `503` `503001` with
/// Retry-After over HTTPS and the `503` response topic over MQTT; the connection stays usable,
/// and once the lock is gone the same device registers.
#[tokio::test]
async fn a_store_locked_by_another_process_answers_503001_then_recovers() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use common::mqtt::{connect_packet, RawMqtt, REGISTER};

    let dps = Dps::start("[device]\nauth_failure_delay_ms = 0\n").await;
    let k = key(3);
    dps.put_enrollment(json!({"registrationId": "d-busy", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    let token = dps.device_token("d-busy", &k);
    let mut mqtt = RawMqtt::tls(&dps).await;
    assert_eq!(mqtt.connect(connect_packet(&dps, "d-busy", Some(&token))).await, 0);
    mqtt.subscribe().await;

    // Holds the write lock until its stdin closes.
    let mut holder = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)\n\
             c.execute('BEGIN IMMEDIATE')\n\
             print('locked', flush=True)\n\
             sys.stdin.read()\n\
             c.execute('ROLLBACK')\n",
        ])
        .arg(dps.data_dir().join("dps.sqlite"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "locked");

    let started = std::time::Instant::now();
    let (status, headers, body) = dps.register("d-busy", Some(&token), json!({})).await;
    assert_eq!((status, &body["errorCode"]), (503, &json!(503001)), "{body}");
    assert_eq!(headers["retry-after"], "5");
    assert!(started.elapsed() >= Duration::from_secs(4), "waited for the lock: {:?}", started.elapsed());
    let (topic, answer) = mqtt.request(&format!("{REGISTER}1"), br#"{"registrationId":"d-busy"}"#, Some(1)).await;
    assert_eq!(topic, "$dps/registrations/res/503/?$rid=1&retry-after=5", "{answer}");
    assert_eq!(answer["errorCode"], 503001, "{answer}");
    let resp = dps
        .service(Method::PUT, "/enrollments/d-other")
        .json(&json!({"registrationId": "d-other", "attestation": {"type": "symmetricKey"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503, "service API writes too");
    assert!(dps.log().contains("database busy"), "the cause is logged: {}", dps.log());

    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    let (status, _, body) = dps.register("d-busy", Some(&token), json!({})).await;
    assert_eq!((status, &body["status"]), (202, &json!("assigned")), "{body}");
    let (topic, answer) = mqtt.request(&format!("{REGISTER}2"), br#"{"registrationId":"d-busy"}"#, Some(2)).await;
    assert_eq!(topic, "$dps/registrations/res/202/?$rid=2", "{answer}");
    assert_eq!(answer["status"], "assigned", "{answer}");
}

/// A stored enrollment that cannot be read (changed behind dps's back): the device gets `500`
/// `500001` over HTTPS with no internal detail (the log has it under the tracking ID), and
/// CONNACK 3 (server unavailable) over MQTT; other devices are unaffected, and deleting and
/// writing the enrollment again through the service API repairs it.
#[tokio::test]
async fn an_unreadable_enrollment_is_a_server_error_not_a_refusal() {
    use common::mqtt::{connect_packet, RawMqtt};

    let dps = Dps::start("[device]\nauth_failure_delay_ms = 0\n").await;
    let k = key(4);
    let enrollment = json!({"registrationId": "d-broken", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": k, "secondaryKey": k}}});
    dps.put_enrollment(enrollment.clone()).await;
    dps.put_enrollment(json!({"registrationId": "d-fine", "attestation": {"type": "symmetricKey",
        "symmetricKey": {"primaryKey": k, "secondaryKey": k}}}))
        .await;
    let out = common::output_within(
        std::process::Command::new("python3")
            .args([
                "-c",
                "import sqlite3, sys\n\
                 c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)\n\
                 n = c.execute(\"UPDATE documents SET body = '{\\\"registrationId\\\": 7' WHERE id = 'd-broken'\").rowcount\n\
                 print(n)\n",
            ])
            .arg(dps.data_dir().join("dps.sqlite")),
        Duration::from_secs(30),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "{out:?}");

    let token = dps.device_token("d-broken", &k);
    let (status, headers, body) = dps.register("d-broken", Some(&token), json!({})).await;
    assert_eq!((status, &body["errorCode"]), (500, &json!(500001)), "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(!message.contains("d-broken") && !message.contains("cannot be read"), "no detail: {message}");
    let tracking = headers["x-ms-request-id"].to_str().unwrap().to_string();
    assert!(
        dps.log().lines().any(|l| l.contains(&tracking) && l.contains("stored enrollment 'd-broken' cannot be read")),
        "the log has the detail under {tracking}: {}",
        dps.log()
    );
    let mut mqtt = RawMqtt::tls(&dps).await;
    assert_eq!(mqtt.connect(connect_packet(&dps, "d-broken", Some(&token))).await, 3);
    let fine = dps.device_token("d-fine", &k);
    assert_eq!(dps.register("d-fine", Some(&fine), json!({})).await.0, 202);

    // The service API will not overwrite what it cannot read (it keeps createdDateTimeUtc);
    // a delete clears it.
    let resp = dps.service(Method::PUT, "/enrollments/d-broken").json(&enrollment).send().await.unwrap();
    assert_eq!(resp.status(), 500);
    let resp = dps.service(Method::DELETE, "/enrollments/d-broken").send().await.unwrap();
    assert_eq!(resp.status(), 204);
    dps.put_enrollment(enrollment).await;
    let (status, _, body) = dps.register("d-broken", Some(&token), json!({})).await;
    assert_eq!((status, &body["status"]), (202, &json!("assigned")), "{body}");
    let mut mqtt = RawMqtt::tls(&dps).await;
    assert_eq!(mqtt.connect(connect_packet(&dps, "d-broken", Some(&token))).await, 0);
}

#[tokio::test]
async fn the_store_backend_is_chosen_by_config() {
    // `backend = "sqlite"` (also what a [store] without a backend means) starts and keeps
    // what it is given in the configured file.
    let dps = Dps::start("[store]\nbackend = \"sqlite\"\nsqlite_file = \"chosen.sqlite\"\n").await;
    let enrollment = dps
        .put_enrollment(json!({"registrationId": "store-1",
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": key(1), "secondaryKey": key(2)}}}))
        .await;
    assert_eq!(enrollment["registrationId"], "store-1", "{enrollment}");
    assert!(dps.data_dir().join("chosen.sqlite").exists());
    assert!(!dps.data_dir().join("dps.sqlite").exists());

    // An unknown backend is refused before anything starts, naming the allowed ones.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dps.toml");
    std::fs::write(&path, "[store]\nbackend = \"nope\"\n").unwrap();
    for err in common::refused_config(&path, &dir.path().join("data")) {
        assert!(err.contains("store") && err.contains("nope") && err.contains("`sqlite`"), "{err}");
    }
    assert!(!dir.path().join("data").exists(), "nothing is created for a refused config");
}
