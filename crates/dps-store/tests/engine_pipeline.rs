//! The registration pipeline of the engine without sockets or files: the in-memory store and a
//! clock that stands still. What the order of the enrollments decides, the one slow-step
//! mechanism (inline, late, a server that stopped), a device authenticated once per
//! connection, and a store outage on every device path.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use dps_core::allocation::LinkedHub;
use dps_core::clock::ManualClock;
use dps_core::custom::{AllocationHook, HookError};
use dps_core::etag::IfMatch;
use dps_core::registration::{
    AuthenticatedDevice, Authentication, Credential, DeviceReply, RegisterRequest, Registered,
};
use dps_core::{Engine, EngineSettings, Error};
use dps_proto::device::RegistrationStatus;
use dps_proto::sas::{build_token, derive_device_key, device_resource};
use dps_proto::service::{EnrollmentGroup, IndividualEnrollment};
use dps_proto::webhook::{AllocationRequest, AllocationResponse};
use dps_store::MemoryStore;
use serde_json::{json, Value};

const NOW_SECS: i64 = 1_800_000_000;
const HUB: &str = "hub-1.example.net";

fn key(seed: u8) -> Vec<u8> {
    (0..32).map(|i| seed.wrapping_mul(31).wrapping_add(i)).collect()
}

struct Fixture {
    engine: Engine,
    store: Arc<MemoryStore>,
    clock: Arc<ManualClock>,
}

fn fixture(settings: EngineSettings) -> Fixture {
    let store = Arc::new(MemoryStore::new());
    let clock = Arc::new(ManualClock::at_secs(NOW_SECS));
    let settings = EngineSettings {
        linked_hubs: vec![LinkedHub {
            host_name: HUB.into(),
            allocation_weight: 1,
            apply_allocation_policy: true,
            region: None,
        }],
        auth_failure_delay_ms: 0,
        ..settings
    };
    let engine = Engine::with_clock(store.clone(), settings, clock.clone());
    Fixture { engine, store, clock }
}

impl Fixture {
    fn scope(&self) -> String {
        self.engine.settings().id_scope.clone()
    }

    fn token(&self, registration_id: &str, device_key: &[u8], valid_secs: u64) -> String {
        let resource = device_resource(&self.scope(), registration_id);
        build_token(&resource, device_key, NOW_SECS as u64 + valid_secs, Some("registration"))
    }

    async fn enroll(&self, registration_id: &str, k: &[u8], extra: Value) {
        let k = BASE64.encode(k);
        let mut body = json!({"registrationId": registration_id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}});
        body.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
        self.engine
            .management()
            .put_enrollment_record::<IndividualEnrollment>(registration_id, body.to_string().as_bytes(), &IfMatch::Any)
            .await
            .unwrap();
    }

    async fn group(&self, group_id: &str, k: &[u8]) {
        let k = BASE64.encode(k);
        let body = json!({"enrollmentGroupId": group_id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": k, "secondaryKey": k}}});
        self.engine
            .management()
            .put_enrollment_record::<EnrollmentGroup>(group_id, body.to_string().as_bytes(), &IfMatch::Any)
            .await
            .unwrap();
    }

    async fn register(&self, registration_id: &str, token: &str) -> Result<DeviceReply, Error> {
        match self.register_with(registration_id, Credential::Sas(token.into()), b"").await? {
            Registered::Reply(reply) => Ok(reply),
            Registered::Challenge(c) => panic!("a SAS device got a challenge: {c:?}"),
        }
    }

    async fn register_with(
        &self,
        registration_id: &str,
        credential: Credential,
        body: &[u8],
    ) -> Result<Registered, Error> {
        self.engine
            .devices()
            .register(RegisterRequest {
                id_scope: self.scope(),
                registration_id: registration_id.into(),
                credential,
                body: body.to_vec(),
                force: false,
            })
            .await
    }

    /// Authentication as a connection-oriented transport does it, for a device that needs no
    /// challenge.
    async fn connect(&self, registration_id: &str, credential: &Credential) -> Result<AuthenticatedDevice, Error> {
        match self.engine.devices().authenticate_device(&self.scope(), registration_id, credential).await? {
            Authentication::Authenticated(device) => Ok(device),
            Authentication::Challenge(c) => panic!("a SAS device got a challenge: {c:?}"),
        }
    }

    async fn poll(&self, registration_id: &str, token: &str, operation_id: &str) -> Result<DeviceReply, Error> {
        let credential = Credential::Sas(token.into());
        self.engine.devices().operation_status(&self.scope(), registration_id, operation_id, &credential).await
    }
}

/// The state a register answered, as JSON (status, substatus, enrollment group).
fn state(reply: &DeviceReply) -> Value {
    serde_json::to_value(&reply.operation).unwrap()
}

#[tokio::test]
async fn an_individual_enrollment_decides_before_a_group() {
    let f = fixture(EngineSettings::default());
    f.group("g", &key(1)).await;
    let member = derive_device_key(&key(1), "dev-1");
    // Only the group: the group member's derived key.
    let via_group = f.register("dev-1", &f.token("dev-1", &member, 3600)).await.unwrap();
    assert_eq!(state(&via_group)["registrationState"]["symmetricKey"], json!({"enrollmentGroupId": "g"}));
    // An individual enrollment with its own key: that key, and no longer the group's.
    f.enroll("dev-1", &key(2), json!({})).await;
    let own = f.register("dev-1", &f.token("dev-1", &key(2), 3600)).await.unwrap();
    assert_eq!(own.operation.status, RegistrationStatus::Assigned);
    assert!(state(&own)["registrationState"].get("symmetricKey").is_none(), "{}", state(&own));
    let refused = f.register("dev-1", &f.token("dev-1", &member, 3600)).await;
    assert!(matches!(refused, Err(Error::Unauthorized(_))), "{refused:?}");
    // Disabled, it answers for the group's key too: the member is revoked.
    f.enroll("dev-1", &key(2), json!({"provisioningStatus": "disabled"})).await;
    let revoked = f.register("dev-1", &f.token("dev-1", &member, 3600)).await.unwrap();
    assert_eq!(revoked.operation.status, RegistrationStatus::Disabled);
}

/// A hook that answers after `delay` (never, when `None`) and counts its calls.
struct SlowHook {
    delay: Option<Duration>,
    calls: AtomicUsize,
}

#[async_trait]
impl AllocationHook for SlowHook {
    async fn call(&self, _url: &str, _request: &AllocationRequest) -> Result<AllocationResponse, HookError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match self.delay {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending::<()>().await,
        }
        Ok(AllocationResponse {
            iot_hub_host_name: Some(HUB.into()),
            initial_twin: None,
            payload: Some(json!({"late": true})),
        })
    }
}

fn custom_fixture(delay: Option<Duration>) -> (Fixture, Arc<SlowHook>) {
    let settings =
        EngineSettings { webhook_inline_wait_ms: 200, webhook_timeout_secs: 10, ..EngineSettings::default() };
    let mut f = fixture(settings);
    let hook = Arc::new(SlowHook { delay, calls: AtomicUsize::new(0) });
    f.engine = f.engine.clone().with_hook(hook.clone());
    (f, hook)
}

const CUSTOM: &str = r#"{"allocationPolicy": "custom",
    "customAllocationDefinition": {"webhookUrl": "https://alloc.example.net/", "apiVersion": "2021-10-01"}}"#;

#[tokio::test]
async fn a_slow_step_that_finishes_inline_answers_the_final_state() {
    let (f, hook) = custom_fixture(Some(Duration::from_millis(10)));
    f.enroll("dev-fast", &key(3), serde_json::from_str(CUSTOM).unwrap()).await;
    let token = f.token("dev-fast", &key(3), 3600);
    let reply = f.register("dev-fast", &token).await.unwrap();
    assert_eq!(reply.operation.status, RegistrationStatus::Assigned);
    assert_eq!(reply.retry_after, None);
    assert_eq!(state(&reply)["registrationState"]["payload"], json!({"late": true}));
    assert_eq!(hook.calls.load(Ordering::SeqCst), 1);
    // The operation was written once, final: a poll sees the same.
    let polled = f.poll("dev-fast", &token, &reply.operation.operation_id).await.unwrap();
    assert_eq!(polled.operation, reply.operation);
}

#[tokio::test]
async fn a_slow_step_that_finishes_late_is_seen_by_polls() {
    let (f, _hook) = custom_fixture(Some(Duration::from_millis(600)));
    f.enroll("dev-late", &key(4), serde_json::from_str(CUSTOM).unwrap()).await;
    let token = f.token("dev-late", &key(4), 3600);
    let reply = f.register("dev-late", &token).await.unwrap();
    assert_eq!(reply.operation.status, RegistrationStatus::Assigning);
    assert_eq!(reply.retry_after, Some(f.engine.settings().retry_after_secs));
    let op = reply.operation.operation_id.clone();
    assert_eq!(f.poll("dev-late", &token, &op).await.unwrap().operation.status, RegistrationStatus::Assigning);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let polled = f.poll("dev-late", &token, &op).await.unwrap();
        if polled.operation.status == RegistrationStatus::Assigned {
            assert_eq!(state(&polled)["registrationState"]["payload"], json!({"late": true}));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {polled:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_slow_step_cut_short_by_a_stop_is_reported_failed_after_its_deadline() {
    // The hook never answers: as if the server stopped during the call.
    let (f, _hook) = custom_fixture(None);
    f.enroll("dev-cut", &key(5), serde_json::from_str(CUSTOM).unwrap()).await;
    let token = f.token("dev-cut", &key(5), 3600);
    let reply = f.register("dev-cut", &token).await.unwrap();
    assert_eq!(reply.operation.status, RegistrationStatus::Assigning);
    let op = reply.operation.operation_id.clone();
    // Within the webhook timeout plus the margin: still assigning.
    f.clock.advance_secs(10 + 29);
    assert_eq!(f.poll("dev-cut", &token, &op).await.unwrap().operation.status, RegistrationStatus::Assigning);
    f.clock.advance_secs(2);
    let polled = f.poll("dev-cut", &token, &op).await.unwrap();
    assert_eq!(polled.operation.status, RegistrationStatus::Failed);
    assert_eq!(state(&polled)["registrationState"]["errorCode"], 400209);
    assert_eq!(polled.retry_after, None);
}

#[tokio::test]
async fn a_device_authenticated_at_connect_is_rechecked_as_far_as_something_changed() {
    let f = fixture(EngineSettings::default());
    f.enroll("dev-conn", &key(6), json!({})).await;
    let token = f.token("dev-conn", &key(6), 600);
    let credential = Credential::Sas(token.clone());
    let mut device = f.connect("dev-conn", &credential).await.unwrap();
    let reply = f.engine.devices().register_device(&mut device, b"").await.unwrap();
    assert_eq!(reply.operation.status, RegistrationStatus::Assigned);
    let op = reply.operation.operation_id.clone();
    assert_eq!(f.engine.devices().operation_status_of(&mut device, &op).await.unwrap().operation, reply.operation);
    // Rotated keys: the next request is checked in full, and refused.
    f.enroll("dev-conn", &key(7), json!({})).await;
    assert!(matches!(f.engine.devices().register_device(&mut device, b"").await, Err(Error::Unauthorized(_))));
    assert!(matches!(f.engine.devices().operation_status_of(&mut device, &op).await, Err(Error::Unauthorized(_))));
    // Back to the key it signed with: accepted again; then the token expires (600 s + 300 s skew).
    f.enroll("dev-conn", &key(6), json!({})).await;
    assert!(f.engine.devices().register_device(&mut device, b"").await.is_ok());
    f.clock.advance_secs(900);
    assert!(f.engine.devices().register_device(&mut device, b"").await.is_ok(), "within the skew");
    f.clock.advance_secs(1);
    assert!(matches!(f.engine.devices().register_device(&mut device, b"").await, Err(Error::Unauthorized(_))));
    // A disabled enrollment is seen by the next register.
    let fresh = f.token("dev-conn", &key(6), 3600);
    let mut device = f.connect("dev-conn", &Credential::Sas(fresh)).await.unwrap();
    f.enroll("dev-conn", &key(6), json!({"provisioningStatus": "disabled"})).await;
    let disabled = f.engine.devices().register_device(&mut device, b"").await.unwrap();
    assert_eq!(disabled.operation.status, RegistrationStatus::Disabled);
}

/// A store outage is `Unavailable` (503) on every device path — never a refusal, which
/// would tell a device its credential is wrong.
#[tokio::test]
async fn a_store_outage_is_unavailable_on_every_device_path() {
    let f = fixture(EngineSettings::default());
    f.enroll("dev-ind", &key(8), json!({})).await;
    f.group("g-out", &key(9)).await;
    let member_key = derive_device_key(&key(9), "dev-mem");
    let cases = [("dev-ind", f.token("dev-ind", &key(8), 3600)), ("dev-mem", f.token("dev-mem", &member_key, 3600))];
    let mut ops = Vec::new();
    let mut devices = Vec::new();
    for (id, token) in &cases {
        let reply = f.register(id, token).await.unwrap();
        ops.push(reply.operation.operation_id.clone());
        devices.push(f.connect(id, &Credential::Sas(token.clone())).await.unwrap());
    }
    f.store.set_unavailable(true);
    let unavailable = |what: &str, r: Result<(), Error>| {
        assert!(matches!(r, Err(Error::Unavailable(_))), "{what}: {r:?}");
    };
    for (((id, token), op), device) in cases.iter().zip(&ops).zip(devices.iter_mut()) {
        let credential = Credential::Sas(token.clone());
        unavailable(&format!("register {id}"), f.register(id, token).await.map(drop));
        unavailable(&format!("poll {id}"), f.poll(id, token, op).await.map(drop));
        unavailable(
            &format!("status {id}"),
            f.engine.devices().registration_status(&f.scope(), id, &credential, b"").await.map(drop),
        );
        unavailable(
            &format!("connect {id}"),
            f.engine.devices().authenticate_device(&f.scope(), id, &credential).await.map(drop),
        );
        unavailable(
            &format!("register on a connection {id}"),
            f.engine.devices().register_device(device, b"").await.map(drop),
        );
        unavailable(
            &format!("poll on a connection {id}"),
            f.engine.devices().operation_status_of(device, op).await.map(drop),
        );
    }
    // An unknown device too: the store cannot say it is unknown.
    let stranger = f.token("dev-unknown", &key(10), 3600);
    unavailable("unknown", f.register("dev-unknown", &stranger).await.map(drop));
    f.store.set_unavailable(false);
    assert!(f.register("dev-ind", &cases[0].1).await.is_ok());
}

/// A TPM's keys as swtpm made them for the official Node client (shared/captures/node-http-tpm.txt).
const SWTPM_EK: &str = "AToAAQALAAMAsgAgg3GXZ0SEs/gakMyNRqXXJP1S124GUgtk8qHaGzMUaaoABgCAAEMAEAgAAAAAAAEAwvAzM1GSNLZrMA9doPi69i2afOd/WimX/Y912Upwu9g2TuLQV1upTtMtf5X2kBc0AxwT/ejJ5s2D6aqMjW56zn8byaQztFsb3oJZS3pToiWKSidu9u5Lss2VmSo68ce9LSgtD3OrR06+4i+UJR27HjuG/jxYGbWltla/8nhUSDU5IC3WYSADRBb0BFmyoN1xOReLF2nMxIMdhwq6dkKad4b1ByNGRa7Z5YNvdx/ri83yx0EK2lpSeSmWobqDndBLz0X01pFPC3sb6+D57osbLATIPy6BjIMo5RzWCAhbCW+0gBGa7f28Q7BksdpoTnPmCtxT6NPB7PXs/aw31UbB+w==";
const SWTPM_SRK: &str = "ARoAAQALAAMEcgAAAAYAgABDABAIAAAAAAABAKue0Gjle/Vl7G8Cn6fj+YSjIKymoeEeMzGH1vewJ8UpL8vnvGP+0mMVPkMDgZ/YDHPvrDLOIybjCFmzOznKs49LsQt10V+6ypfjlXFjtbSE51Zr1vhEHJbNObcd2/SGmzsYWaIYIzZmKYNdoTfmdvpy5jJwHnIaE53R9OBqDKgYNPJo16cz3VMyty4MziDKUNExSdx6ta8jy8Ce6f6rax4jsKUMNxm+lP2YQpMbQUamVzyVtuyC0LytOO9aCLiW5l1jkUqTNhuKaqkR0bMtado4f4/P6Lbo9Sc5rggwdKk0E8+2MomtjkQ94kpAnduuIuL9nGvMbZVdnhKaKw9GHNk=";

/// The authentication seam's challenge branch: a TPM device's first request (its keys in the
/// body, no token) goes to the challenge stage, not to the "no credential" refusal; an ID
/// without a TPM enrollment for that endorsement key gets the refusal an unknown ID gets,
/// whether or not the ID is enrolled otherwise. With a token, the body's `tpm` does not matter.
#[tokio::test]
async fn a_tpm_request_without_a_token_goes_to_the_challenge_stage() {
    let f = fixture(EngineSettings::default());
    f.enroll("dev-sym", &key(11), json!({})).await;
    let body = json!({"registrationId": "dev-sym", "tpm": {"endorsementKey": SWTPM_EK, "storageRootKey": SWTPM_SRK}});
    let body = body.to_string().into_bytes();
    let mut messages = Vec::new();
    for id in ["dev-sym", "dev-unknown"] {
        let body = String::from_utf8(body.clone()).unwrap().replace("dev-sym", id);
        match f.register_with(id, Credential::None, body.as_bytes()).await {
            Err(Error::Unauthorized(m)) => messages.push(m.replace(id, "<id>")),
            other => panic!("{id}: {other:?}"),
        }
    }
    assert_eq!(messages[0], messages[1], "the refusal does not tell an enrolled ID from an unknown one");
    assert!(messages[0].contains("TPM endorsement key"), "{}", messages[0]);
    let none = f.register_with("dev-sym", Credential::None, b"").await;
    assert!(matches!(&none, Err(Error::Unauthorized(m)) if m.starts_with("no credential")), "{none:?}");
    // A TPM device's later requests carry a token; for it the `tpm` object is only data.
    let token = f.token("dev-sym", &key(11), 600);
    let signed = f.register_with("dev-sym", Credential::Sas(token), &body).await.unwrap();
    assert!(matches!(signed, Registered::Reply(r) if r.operation.status == RegistrationStatus::Assigned));
    // Only a register starts a challenge: a connection cannot authenticate by an endorsement key.
    let endorsement = Credential::TpmEndorsement(dps_core::registration::TpmEndorsement {
        endorsement_key: SWTPM_EK.into(),
        storage_root_key: None,
    });
    let status = f.engine.devices().registration_status(&f.scope(), "dev-sym", &endorsement, b"").await;
    assert!(matches!(status, Err(Error::Unauthorized(_))), "{status:?}");
}
