//! The engine's cache of parsed enrollment groups against real stores: a group changed through
//! another handle of the same database (what a second `dps` node on it is) is seen by the next
//! registration, and a store outage is a 503, never a refusal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use dps_core::allocation::LinkedHub;
use dps_core::clock::ManualClock;
use dps_core::etag::IfMatch;
use dps_core::registration::{Credential, RegisterRequest};
use dps_core::store::{Collection, Document, Page, Store, StoreError, Write};
use dps_core::{Engine, EngineSettings, Error};
use dps_proto::sas::{build_token, derive_device_key, device_resource};
use dps_proto::service::EnrollmentGroup;
use dps_store::{MemoryStore, SqliteStore, Synchronous, OTHER_WRITERS_SEEN_WITHIN};

const NOW_SECS: i64 = 1_800_000_000;
const GROUP_KEY: &[u8] = b"group-key-0123456789-0123456789!";

fn engine(store: Arc<dyn Store>) -> Engine {
    let settings = EngineSettings {
        linked_hubs: vec![LinkedHub {
            host_name: "hub-1.example.net".into(),
            allocation_weight: 1,
            apply_allocation_policy: true,
            region: None,
        }],
        auth_failure_delay_ms: 0,
        ..EngineSettings::default()
    };
    Engine::with_clock(store, settings, Arc::new(ManualClock::at_secs(NOW_SECS)))
}

async fn put_group(engine: &Engine) {
    let key = BASE64.encode(GROUP_KEY);
    let body = format!(
        r#"{{"enrollmentGroupId":"cached-group","attestation":{{"type":"symmetricKey","symmetricKey":{{"primaryKey":"{key}","secondaryKey":"{key}"}}}}}}"#
    );
    engine
        .management()
        .put_enrollment_record::<EnrollmentGroup>("cached-group", body.as_bytes(), &IfMatch::Any)
        .await
        .unwrap();
}

async fn register(engine: &Engine, registration_id: &str) -> Result<(), Error> {
    let scope = engine.settings().id_scope.clone();
    let key = derive_device_key(GROUP_KEY, registration_id);
    let token =
        build_token(&device_resource(&scope, registration_id), &key, NOW_SECS as u64 + 3600, Some("registration"));
    let request = RegisterRequest {
        id_scope: scope,
        registration_id: registration_id.into(),
        credential: Credential::Sas(token),
        body: format!(r#"{{"registrationId":"{registration_id}"}}"#).into_bytes(),
        force: false,
    };
    engine.devices().register(request).await.map(drop)
}

/// Node A caches the group; node B, on its own handle of the same file, deletes it; A's next
/// registration after the store's refresh time (`OTHER_WRITERS_SEEN_WITHIN`) is refused (and accepted again once B creates it again).
#[tokio::test]
async fn a_group_changed_through_another_handle_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dps.sqlite");
    let a = engine(Arc::new(SqliteStore::open(&path, Synchronous::Normal).unwrap()));
    let b = engine(Arc::new(SqliteStore::open(&path, Synchronous::Normal).unwrap()));
    put_group(&b).await;
    register(&a, "device-1").await.unwrap();
    register(&a, "device-2").await.unwrap();
    b.management().delete_enrollment_record::<EnrollmentGroup>("cached-group", &IfMatch::Any).await.unwrap();
    // Another handle's writes are seen within the store's refresh time.
    tokio::time::sleep(OTHER_WRITERS_SEEN_WITHIN + std::time::Duration::from_millis(20)).await;
    let refused = register(&a, "device-3").await;
    assert!(matches!(refused, Err(Error::Unauthorized(_))), "{refused:?}");
    put_group(&b).await;
    tokio::time::sleep(OTHER_WRITERS_SEEN_WITHIN + std::time::Duration::from_millis(20)).await;
    register(&a, "device-3").await.unwrap();
}

/// A store whose `version` alone can be made to fail (everything else is a [`MemoryStore`]).
struct VersionOutage {
    inner: MemoryStore,
    failing: AtomicBool,
}

#[async_trait]
impl Store for VersionOutage {
    async fn get(&self, collection: Collection, id: &str) -> Result<Option<Document>, StoreError> {
        self.inner.get(collection, id).await
    }
    async fn write(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.inner.write(writes).await
    }
    async fn list(
        &self,
        collection: Collection,
        partition: Option<&str>,
        continuation: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        self.inner.list(collection, partition, continuation, limit).await
    }
    async fn purge_expired(&self, now_millis: i64) -> Result<u64, StoreError> {
        self.inner.purge_expired(now_millis).await
    }
    async fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.get_setting(key).await
    }
    async fn init_setting(&self, key: &str, value: &str) -> Result<String, StoreError> {
        self.inner.init_setting(key, value).await
    }
    async fn version(&self, collection: Collection) -> Result<u64, StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("version read failed (test)".into()));
        }
        self.inner.version(collection).await
    }
}

/// With the groups cached, a failing version read fails the registration as unavailable
/// (503), not as a refusal and not from the cache; so does a whole-store outage; the engine
/// recovers with the store.
#[tokio::test]
async fn a_store_outage_is_unavailable_not_a_refusal() {
    let memory = MemoryStore::new();
    let store = Arc::new(VersionOutage { inner: memory.clone(), failing: AtomicBool::new(false) });
    let e = engine(store.clone());
    put_group(&e).await;
    register(&e, "device-1").await.unwrap();
    store.failing.store(true, Ordering::SeqCst);
    let failed = register(&e, "device-2").await;
    assert!(matches!(failed, Err(Error::Unavailable(_))), "{failed:?}");
    store.failing.store(false, Ordering::SeqCst);
    register(&e, "device-2").await.unwrap();
    memory.set_unavailable(true);
    let failed = register(&e, "device-3").await;
    assert!(matches!(failed, Err(Error::Unavailable(_))), "{failed:?}");
    memory.set_unavailable(false);
    register(&e, "device-3").await.unwrap();
}
