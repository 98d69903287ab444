//! The conformance suite: behaviour every [`Store`] implementation must have. Each backend's
//! tests call [`run_all`] on a fresh, empty store.

use dps_core::store::{Collection, Condition, Document, Store, StoreError, Write};

fn doc(id: &str, etag: &str, partition: Option<&str>) -> Document {
    Document {
        id: id.into(),
        etag: etag.into(),
        partition: partition.map(str::to_string),
        body: format!("{{\"id\":\"{id}\",\"etag\":\"{etag}\"}}"),
        expires_at: None,
    }
}

fn put(c: Collection, d: Document, condition: Condition) -> Write {
    Write::Put { collection: c, document: d, condition }
}

/// Runs every check; panics with a description on the first failure.
pub async fn run_all(store: &dyn Store) {
    conditional_writes(store).await;
    atomic_batches(store).await;
    concurrent_batches(store).await;
    paging_and_partitions(store).await;
    expiry(store).await;
    settings(store).await;
}

/// Conditions, case-insensitive keys, deletes.
pub async fn conditional_writes(store: &dyn Store) {
    let c = Collection::Enrollments;
    assert_eq!(store.get(c, "Dev-1").await.unwrap(), None);
    store.write(vec![put(c, doc("Dev-1", "e1", None), Condition::IfAbsent)]).await.unwrap();
    let got = store.get(c, "dev-1").await.unwrap().expect("case-insensitive get");
    assert_eq!(got, doc("Dev-1", "e1", None), "the stored document comes back unchanged");
    // Collections are separate namespaces.
    assert_eq!(store.get(Collection::EnrollmentGroups, "dev-1").await.unwrap(), None);
    assert!(matches!(
        store.write(vec![put(c, doc("DEV-1", "e2", None), Condition::IfAbsent)]).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(matches!(
        store.write(vec![put(c, doc("dev-1", "e2", None), Condition::IfMatch("nope".into()))]).await,
        Err(StoreError::PreconditionFailed(_))
    ));
    assert!(matches!(
        store.write(vec![put(c, doc("ghost", "e", None), Condition::IfMatch("e".into()))]).await,
        Err(StoreError::PreconditionFailed(_))
    ));
    assert!(matches!(
        store.write(vec![put(c, doc("ghost", "e", None), Condition::IfExists)]).await,
        Err(StoreError::PreconditionFailed(_))
    ));
    store.write(vec![put(c, doc("dev-1", "e2", None), Condition::IfMatch("e1".into()))]).await.unwrap();
    assert_eq!(store.get(c, "DEV-1").await.unwrap().unwrap().etag, "e2");
    store.write(vec![put(c, doc("dev-1", "e3", None), Condition::Always)]).await.unwrap();
    assert!(matches!(
        store
            .write(vec![Write::Delete {
                collection: c,
                id: "dev-1".into(),
                condition: Condition::IfMatch("e2".into())
            }])
            .await,
        Err(StoreError::PreconditionFailed(_))
    ));
    store
        .write(vec![Write::Delete { collection: c, id: "Dev-1".into(), condition: Condition::IfMatch("e3".into()) }])
        .await
        .unwrap();
    assert_eq!(store.get(c, "dev-1").await.unwrap(), None);
    assert!(matches!(
        store.write(vec![Write::Delete { collection: c, id: "dev-1".into(), condition: Condition::Always }]).await,
        Err(StoreError::NotFound(_))
    ));
}

/// A batch applies whole or not at all.
pub async fn atomic_batches(store: &dyn Store) {
    let r = Collection::Registrations;
    let o = Collection::Operations;
    store.write(vec![put(r, doc("batch-a", "1", None), Condition::IfAbsent)]).await.unwrap();
    let failing = vec![
        put(o, doc("op-1", "x", Some("batch-a")), Condition::IfAbsent),
        put(r, doc("batch-a", "2", None), Condition::IfMatch("wrong".into())),
    ];
    assert!(store.write(failing).await.is_err());
    assert_eq!(store.get(o, "op-1").await.unwrap(), None, "first write of a failed batch must not be applied");
    assert_eq!(store.get(r, "batch-a").await.unwrap().unwrap().etag, "1");
    let ok = vec![
        put(o, doc("op-1", "x", Some("batch-a")), Condition::IfAbsent),
        put(r, doc("batch-a", "2", None), Condition::IfMatch("1".into())),
    ];
    store.write(ok).await.unwrap();
    assert!(store.get(o, "op-1").await.unwrap().is_some());
    assert_eq!(store.get(r, "batch-a").await.unwrap().unwrap().etag, "2");
}

/// Many batches at once, as registrations arrive (a backend may commit them together): each
/// succeeds or fails on its own, a failed one leaves nothing behind, and the collection
/// version (when the backend keeps one) moves with every committed write.
pub async fn concurrent_batches(store: &dyn Store) {
    let r = Collection::Registrations;
    let o = Collection::Operations;
    let before = store.version(o);
    // 64 batches race for one registration ID: exactly one wins, the others leave no operation.
    let attempts = (0..64).map(|i| {
        store.write(vec![
            put(o, doc(&format!("race-op-{i}"), "x", Some("race")), Condition::IfAbsent),
            put(r, doc("race", &format!("{i}"), None), Condition::IfAbsent),
        ])
    });
    let results = futures_util::future::join_all(attempts).await;
    let winners: Vec<usize> = results.iter().enumerate().filter(|(_, r)| r.is_ok()).map(|(i, _)| i).collect();
    assert_eq!(winners.len(), 1, "exactly one of the racing batches must win: {results:?}");
    for (i, result) in results.iter().enumerate() {
        let op = store.get(o, &format!("race-op-{i}")).await.unwrap();
        match result {
            Ok(()) => assert!(op.is_some(), "the winner's operation must be stored"),
            Err(StoreError::AlreadyExists(_)) => assert_eq!(op, None, "a losing batch must leave nothing"),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(store.get(r, "race").await.unwrap().unwrap().etag, winners[0].to_string());
    // Independent batches all commit.
    let puts = (0..64).map(|i| store.write(vec![put(o, doc(&format!("many-{i}"), "1", None), Condition::IfAbsent)]));
    assert!(futures_util::future::join_all(puts).await.iter().all(Result::is_ok));
    for i in 0..64 {
        assert!(store.get(o, &format!("many-{i}")).await.unwrap().is_some());
    }
    if let (Some(b), Some(a)) = (before, store.version(o)) {
        assert!(a >= b + 65, "the version must move with each committed write ({b} -> {a})");
    }
}

/// Key-ordered pages with continuation tokens, partition filters, bad tokens.
pub async fn paging_and_partitions(store: &dyn Store) {
    let c = Collection::EnrollmentGroups;
    let mut writes = Vec::new();
    for i in 0..25 {
        let partition = if i % 2 == 0 { Some("even") } else { Some("odd") };
        writes.push(put(c, doc(&format!("G-{i:02}"), "e", partition), Condition::IfAbsent));
    }
    store.write(writes).await.unwrap();
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = store.list(c, None, token.as_deref(), 10).await.unwrap();
        pages += 1;
        assert!(page.documents.len() <= 10);
        seen.extend(page.documents.iter().map(|d| d.id.clone()));
        match page.continuation {
            Some(t) => token = Some(t),
            None => break,
        }
        assert!(pages < 10, "paging does not terminate");
    }
    let want: Vec<String> = (0..25).map(|i| format!("G-{i:02}")).collect();
    assert_eq!(seen, want, "every record once, in key order");
    assert_eq!(pages, 3);
    // An exact multiple of the page size ends without an empty extra page.
    let page = store.list(c, Some("odd"), None, 12).await.unwrap();
    assert_eq!(page.documents.len(), 12);
    assert_eq!(page.continuation, None);
    assert!(page.documents.iter().all(|d| d.partition.as_deref() == Some("odd")));
    let page = store.list(c, Some("even"), None, 100).await.unwrap();
    assert_eq!(page.documents.len(), 13);
    assert!(matches!(store.list(c, None, Some("%%%not-a-token"), 10).await, Err(StoreError::Corrupt(_))));
}

/// Records past their expiry are purged; others stay.
pub async fn expiry(store: &dyn Store) {
    let o = Collection::Operations;
    let mut old = doc("op-old", "e", None);
    old.expires_at = Some(1_000);
    let mut fresh = doc("op-fresh", "e", None);
    fresh.expires_at = Some(5_000);
    store.write(vec![put(o, old, Condition::Always), put(o, fresh, Condition::Always)]).await.unwrap();
    assert_eq!(store.purge_expired(2_000).await.unwrap(), 1);
    assert_eq!(store.get(o, "op-old").await.unwrap(), None);
    assert!(store.get(o, "op-fresh").await.unwrap().is_some());
}

/// Settings are written once and then read back.
pub async fn settings(store: &dyn Store) {
    assert_eq!(store.get_setting("id_scope").await.unwrap(), None);
    assert_eq!(store.init_setting("id_scope", "0ne1").await.unwrap(), "0ne1");
    assert_eq!(store.init_setting("id_scope", "0ne2").await.unwrap(), "0ne1", "first value wins");
    assert_eq!(store.get_setting("id_scope").await.unwrap().as_deref(), Some("0ne1"));
}
