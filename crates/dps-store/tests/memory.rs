//! The in-memory store against the conformance suite, and its simulated outage.

use dps_core::store::{Collection, Condition, Document, Store, StoreError, Write};
use dps_store::{conformance, MemoryStore};

#[tokio::test]
async fn memory_passes_conformance() {
    conformance::run_all(&MemoryStore::new()).await;
}

#[tokio::test]
async fn clones_share_one_store() {
    let store = MemoryStore::new();
    conformance::shared_versions(&store, &store.clone()).await;
    conformance::shared_races(&store, &store.clone()).await;
    conformance::shared_leases(&store, &store.clone()).await;
}

fn put(id: &str, etag: &str) -> Write {
    Write::Put {
        collection: Collection::EnrollmentGroups,
        document: Document { id: id.into(), etag: etag.into(), partition: None, body: "{}".into(), expires_at: None },
        condition: Condition::Always,
    }
}

#[tokio::test]
async fn an_outage_fails_every_call_and_changes_nothing() {
    let store = MemoryStore::new();
    let other = store.clone();
    let g = Collection::EnrollmentGroups;
    store.write(vec![put("g1", "1")]).await.unwrap();
    let version = store.version(g).await.unwrap();
    other.set_unavailable(true);
    assert!(store.is_unavailable(), "the switch holds for every handle");
    let unavailable = |r: Result<(), StoreError>| assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    unavailable(store.get(g, "g1").await.map(drop));
    unavailable(store.write(vec![put("g1", "2")]).await);
    unavailable(store.list(g, None, None, 10).await.map(drop));
    unavailable(store.purge_expired(i64::MAX).await.map(drop));
    unavailable(store.get_setting("k").await.map(drop));
    unavailable(store.init_setting("k", "v").await.map(drop));
    unavailable(store.version(g).await.map(drop));
    store.set_unavailable(false);
    assert_eq!(store.get(g, "G1").await.unwrap().unwrap().etag, "1", "nothing was written during the outage");
    assert_eq!(store.version(g).await.unwrap(), version);
    assert_eq!(store.get_setting("k").await.unwrap(), None);
}
