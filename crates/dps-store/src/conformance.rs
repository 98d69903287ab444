//! The conformance suite: behaviour every [`Store`] implementation must have. Each backend's
//! tests call [`run_all`] on a fresh, empty store, and [`shared_versions`] on two handles of
//! one fresh, empty backend (two opens of one database: what two processes would have).

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
    versions(store).await;
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
/// version moves with every committed write.
pub async fn concurrent_batches(store: &dyn Store) {
    let r = Collection::Registrations;
    let o = Collection::Operations;
    let before = store.version(o).await.unwrap();
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
    let after = store.version(o).await.unwrap();
    assert!(after >= before + 65, "the version must move with each committed write ({before} -> {after})");
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

/// A collection's version moves with every committed put, delete and purge in it, and with
/// nothing done to other collections (registrations must not invalidate what is cached of
/// groups and certificates).
pub async fn versions(store: &dyn Store) {
    let g = Collection::EnrollmentGroups;
    let v0 = store.version(g).await.unwrap();
    assert_eq!(store.version(g).await.unwrap(), v0, "reading the version does not move it");
    store.write(vec![put(g, doc("ver-group", "1", None), Condition::IfAbsent)]).await.unwrap();
    let v1 = store.version(g).await.unwrap();
    assert!(v1 > v0, "a put moves the version ({v0} -> {v1})");
    store.write(vec![put(g, doc("ver-group", "2", None), Condition::IfMatch("1".into()))]).await.unwrap();
    let v2 = store.version(g).await.unwrap();
    assert!(v2 > v1, "a replacement moves the version ({v1} -> {v2})");
    let others = [Collection::Enrollments, Collection::Registrations, Collection::Operations, Collection::Certificates];
    let before: Vec<u64> = futures_util::future::try_join_all(others.map(|c| store.version(c))).await.unwrap();
    let mut traffic = Vec::new();
    for c in others {
        traffic.push(put(c, doc("ver-other", "1", None), Condition::Always));
    }
    store.write(traffic).await.unwrap();
    assert_eq!(store.version(g).await.unwrap(), v2, "writes to other collections leave the version alone");
    for (c, b) in others.iter().zip(before) {
        let a = store.version(*c).await.unwrap();
        assert!(a > b, "a write in the same batch moves {c:?}'s version ({b} -> {a})");
    }
    store
        .write(vec![Write::Delete { collection: g, id: "VER-GROUP".into(), condition: Condition::Always }])
        .await
        .unwrap();
    let v3 = store.version(g).await.unwrap();
    assert!(v3 > v2, "a delete moves the version ({v2} -> {v3})");
    let o = Collection::Operations;
    let mut expiring = doc("ver-op", "e", None);
    expiring.expires_at = Some(10);
    store.write(vec![put(o, expiring, Condition::Always)]).await.unwrap();
    let before_purge = store.version(o).await.unwrap();
    assert!(store.purge_expired(20).await.unwrap() >= 1);
    let after_purge = store.version(o).await.unwrap();
    assert!(after_purge > before_purge, "a purge moves the version ({before_purge} -> {after_purge})");
    assert_eq!(store.version(g).await.unwrap(), v3, "a purge of operations leaves groups alone");
}

/// Two handles on one backend (two opens of one database, as two processes or two `dps`
/// nodes have): what is written through one is seen through the other, and so is the move of
/// the collection's version, so a cache kept beside either handle is invalidated by the other's
/// writes. Call it with two handles of one fresh, empty backend.
pub async fn shared_versions(a: &dyn Store, b: &dyn Store) {
    let g = Collection::EnrollmentGroups;
    let c = Collection::Certificates;
    let (ga, gb) = (a.version(g).await.unwrap(), b.version(g).await.unwrap());
    a.write(vec![put(g, doc("Shared-Group", "1", None), Condition::IfAbsent)]).await.unwrap();
    let gb1 = b.version(g).await.unwrap();
    assert!(gb1 > gb, "the other handle sees the group write in the version ({gb} -> {gb1})");
    assert_eq!(b.get(g, "shared-group").await.unwrap().map(|d| d.etag).as_deref(), Some("1"));
    let ga1 = a.version(g).await.unwrap();
    assert!(ga1 > ga, "the writing handle sees it too ({ga} -> {ga1})");
    // And the other way round, for a replacement, a certificate and a delete.
    let ca = a.version(c).await.unwrap();
    b.write(vec![
        put(g, doc("shared-group", "2", None), Condition::IfMatch("1".into())),
        put(c, doc("shared-ca", "1", None), Condition::IfAbsent),
    ])
    .await
    .unwrap();
    let ga2 = a.version(g).await.unwrap();
    assert!(ga2 > ga1, "the replacement through the other handle moves the version ({ga1} -> {ga2})");
    let ca1 = a.version(c).await.unwrap();
    assert!(ca1 > ca, "the certificate write through the other handle moves the version ({ca} -> {ca1})");
    assert_eq!(a.get(g, "SHARED-GROUP").await.unwrap().map(|d| d.etag).as_deref(), Some("2"));
    b.write(vec![Write::Delete {
        collection: g,
        id: "shared-group".into(),
        condition: Condition::IfMatch("2".into()),
    }])
    .await
    .unwrap();
    let ga3 = a.version(g).await.unwrap();
    assert!(ga3 > ga2, "the delete through the other handle moves the version ({ga2} -> {ga3})");
    assert_eq!(a.get(g, "shared-group").await.unwrap(), None);
    // Registrations through one handle leave the other's view of the groups' version alone.
    b.write(vec![put(Collection::Registrations, doc("shared-dev", "1", Some("g")), Condition::Always)]).await.unwrap();
    assert_eq!(a.version(g).await.unwrap(), ga3);
}

/// Two handles on one backend racing, as two nodes do: creations of one registration ID
/// through both end with exactly one record, and of two `If-Match` replacements of one ETag
/// exactly one wins. Call it with two handles of one fresh, empty backend.
pub async fn shared_races(a: &dyn Store, b: &dyn Store) {
    let r = Collection::Registrations;
    let o = Collection::Operations;
    let attempt = |store: &'static str, i: usize| {
        let handle = if store == "a" { a } else { b };
        handle.write(vec![
            put(o, doc(&format!("node-race-{store}-{i}"), "x", Some("node-race")), Condition::IfAbsent),
            put(r, doc("Node-Race", &format!("{store}{i}"), None), Condition::IfAbsent),
        ])
    };
    let racers = (0..16).flat_map(|i| [attempt("a", i), attempt("b", i)]);
    let results = futures_util::future::join_all(racers).await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "exactly one creation through either handle wins: {results:?}");
    assert!(results.iter().all(|r| matches!(r, Ok(()) | Err(StoreError::AlreadyExists(_)))), "{results:?}");
    let stored = a.get(r, "node-race").await.unwrap().expect("the winner's record");
    assert_eq!(b.get(r, "NODE-RACE").await.unwrap().as_ref(), Some(&stored), "both handles read the same record");
    let ops = a.list(o, Some("node-race"), None, 100).await.unwrap();
    assert_eq!(ops.documents.len(), 1, "only the winner's operation is stored");
    // If-Match races: both handles replace the ETag they read; one wins each round.
    let mut etag = stored.etag.clone();
    for round in 0..8 {
        let (ea, eb) = (format!("ra{round}"), format!("rb{round}"));
        let (ra, rb) = futures_util::future::join(
            a.write(vec![put(r, doc("node-race", &ea, None), Condition::IfMatch(etag.clone()))]),
            b.write(vec![put(r, doc("node-race", &eb, None), Condition::IfMatch(etag.clone()))]),
        )
        .await;
        let now = b.get(r, "node-race").await.unwrap().expect("the record").etag;
        match (&ra, &rb) {
            (Ok(()), Err(StoreError::PreconditionFailed(_))) => assert_eq!(now, ea),
            (Err(StoreError::PreconditionFailed(_)), Ok(())) => assert_eq!(now, eb),
            other => panic!("round {round}: exactly one If-Match replacement must win: {other:?}"),
        }
        etag = now;
    }
}

/// Leases ([`dps_core::lease`]) through two handles, as two nodes take them: one holder at a
/// time, renewals keep it, an expired lease passes to the other, and of two nodes taking an
/// expired lease at once exactly one wins.
pub async fn shared_leases(a: &dyn Store, b: &dyn Store) {
    use dps_core::lease::{acquire, holder};
    let ttl = 1_000;
    assert!(acquire(a, "sweep", "node-a", 10_000, ttl).await.unwrap(), "a free lease is taken");
    assert!(!acquire(b, "sweep", "node-b", 10_500, ttl).await.unwrap(), "a held lease is refused");
    assert!(acquire(a, "sweep", "node-a", 10_900, ttl).await.unwrap(), "the holder renews");
    assert!(!acquire(b, "sweep", "node-b", 11_500, ttl).await.unwrap(), "renewed: still held");
    assert!(acquire(b, "sweep", "node-b", 12_000, ttl).await.unwrap(), "expired: another node takes it over");
    assert!(!acquire(a, "sweep", "node-a", 12_100, ttl).await.unwrap(), "the old holder has lost it");
    assert_eq!(holder(a, "sweep").await.unwrap().map(|h| h.holder).as_deref(), Some("node-b"));
    let mut now = 20_000;
    for round in 0..8 {
        now += 2 * ttl;
        let (ra, rb) = futures_util::future::join(
            acquire(a, "sweep", "node-a", now, ttl),
            acquire(b, "sweep", "node-b", now, ttl),
        )
        .await;
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(ra != rb, "round {round}: exactly one node takes the expired lease ({ra}, {rb})");
    }
}
