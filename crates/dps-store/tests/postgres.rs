//! The PostgreSQL store against the conformance suite on a real PostgreSQL server, plus the
//! multi-node cases (two handles on one database), migrations and connection failures.
//!
//! The server is `DPS_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`, the
//! CI machine's); every test creates a database of its own and drops it at the end.

use std::time::{Duration, Instant};

use dps_core::store::{Collection, Condition, Document, Store, Write};
use dps_store::{conformance, PostgresOptions, PostgresStore, ScratchDatabase};

async fn scratch(prefix: &str) -> ScratchDatabase {
    ScratchDatabase::for_test(prefix).await.unwrap()
}

async fn open(url: &str, refresh: Duration) -> PostgresStore {
    let mut options = PostgresOptions::new(url);
    options.refresh = refresh;
    options.pool_size = 6;
    PostgresStore::connect(options).await.unwrap()
}

fn group(id: &str, etag: &str) -> Write {
    Write::Put {
        collection: Collection::EnrollmentGroups,
        document: Document { id: id.into(), etag: etag.into(), partition: None, body: "{}".into(), expires_at: None },
        condition: Condition::Always,
    }
}

#[tokio::test]
async fn postgres_passes_conformance() {
    let db = scratch("conformance").await;
    let store = open(&db.url, Duration::from_millis(100)).await;
    conformance::run_all(&store).await;
    drop(store);
    db.drop_database().await.unwrap();
}

#[tokio::test]
async fn two_handles_share_versions_and_race_safely() {
    let db = scratch("shared").await;
    let a = open(&db.url, Duration::ZERO).await;
    let b = open(&db.url, Duration::ZERO).await;
    conformance::shared_versions(&a, &b).await;
    conformance::shared_races(&a, &b).await;
    conformance::shared_leases(&a, &b).await;
    drop((a, b));
    db.drop_database().await.unwrap();
}

/// With the default refresh a handle sees its own writes at once and another node's within
/// `OTHER_WRITERS_SEEN_WITHIN` (what bounds how soon a group change reaches the other nodes).
#[tokio::test]
async fn another_nodes_writes_are_seen_within_the_refresh_time() {
    let db = scratch("refresh").await;
    let a = open(&db.url, dps_store::OTHER_WRITERS_SEEN_WITHIN).await;
    let b = open(&db.url, dps_store::OTHER_WRITERS_SEEN_WITHIN).await;
    let g = Collection::EnrollmentGroups;
    let b0 = b.version(g).await.unwrap();
    a.write(vec![group("g", "1")]).await.unwrap();
    tokio::time::sleep(dps_store::OTHER_WRITERS_SEEN_WITHIN + Duration::from_millis(20)).await;
    assert!(b.version(g).await.unwrap() > b0);
    drop((a, b));
    db.drop_database().await.unwrap();
}

/// Several nodes starting at once on an empty database: each migration runs once, all start.
#[tokio::test]
async fn concurrent_first_starts_migrate_once() {
    let db = scratch("firststart").await;
    let starts = (0..4).map(|_| {
        let mut o = PostgresOptions::new(db.url.clone());
        o.pool_size = 3;
        PostgresStore::connect(o)
    });
    let stores = futures_util::future::join_all(starts).await;
    let stores: Vec<PostgresStore> = stores.into_iter().map(|s| s.expect("every node starts")).collect();
    for s in &stores {
        assert_eq!(s.schema_version().await.unwrap(), PostgresStore::known_schema_version());
        s.ready().await.unwrap();
    }
    stores[0].write(vec![group("after-start", "1")]).await.unwrap();
    assert!(stores[3].get(Collection::EnrollmentGroups, "AFTER-START").await.unwrap().is_some());
    drop(stores);
    db.drop_database().await.unwrap();
}

#[tokio::test]
async fn data_survives_a_reconnect() {
    let db = scratch("reopen").await;
    {
        let store = open(&db.url, Duration::ZERO).await;
        store.write(vec![group("kept", "1")]).await.unwrap();
    }
    let store = open(&db.url, Duration::ZERO).await;
    assert_eq!(store.get(Collection::EnrollmentGroups, "KEPT").await.unwrap().unwrap().etag, "1");
    assert!(store.version(Collection::EnrollmentGroups).await.unwrap() >= 1);
    drop(store);
    db.drop_database().await.unwrap();
}

#[tokio::test]
async fn refuses_a_newer_schema() {
    let db = scratch("newer").await;
    drop(open(&db.url, Duration::ZERO).await);
    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.batch_execute("UPDATE dps_schema SET version = 99").await.unwrap();
    drop(client);
    let err = PostgresStore::connect(PostgresOptions::new(db.url.clone())).await.unwrap_err().to_string();
    assert!(err.contains("99") && err.contains("upgrade dps"), "{err}");
    db.drop_database().await.unwrap();
}

/// A database that does not exist, or a role that does not: one clear line at once, naming
/// what to check, without the password.
#[tokio::test]
async fn a_wrong_url_fails_at_once_with_one_clear_line() {
    let started = Instant::now();
    let url = "postgres://postgres:s3cret-password@127.0.0.1:5432/dps_no_such_database";
    let err = PostgresStore::connect(PostgresOptions::new(url)).await.unwrap_err().to_string();
    assert!(err.contains("dps_no_such_database") && err.contains("check [store] url"), "{err}");
    assert!(!err.contains("s3cret"), "the password must not be shown: {err}");
    assert!(!err.contains('\n'), "one line: {err}");
    let url = "postgres://dps_no_such_role:s3cret-password@127.0.0.1:5432/test";
    let err = PostgresStore::connect(PostgresOptions::new(url)).await.unwrap_err().to_string();
    assert!(err.contains("dps_no_such_role") && err.contains("check [store] url"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "no retries for a permanent failure");
}

/// An unreachable database: retried with backoff, then a clear error after the patience.
#[tokio::test]
async fn an_unreachable_database_is_retried_then_reported() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut options = PostgresOptions::new(format!("postgres://postgres:pw@127.0.0.1:{port}/test"));
    options.start_timeout = Duration::from_secs(2);
    let started = Instant::now();
    let err = PostgresStore::connect(options).await.unwrap_err().to_string();
    let took = started.elapsed();
    assert!(err.contains("cannot be reached") && err.contains(&port.to_string()), "{err}");
    assert!(!err.contains("pw@"), "{err}");
    assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(8), "retried for about 2 s: {took:?}");
}

/// Under `SERIALIZABLE` isolation (what CockroachDB and YugabyteDB run by default), racing
/// nodes make PostgreSQL abort transactions with serialisation failures (SQLSTATE 40001): the
/// store runs them again, and every outcome is still exactly what the conformance suite asks.
#[tokio::test]
async fn serializable_isolation_is_retried_and_stays_correct() {
    let db = scratch("serializable").await;
    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("ALTER DATABASE {} SET default_transaction_isolation TO 'serializable'", db.name))
        .await
        .unwrap();
    drop(client);
    let a = open(&db.url, Duration::ZERO).await;
    let b = open(&db.url, Duration::ZERO).await;
    conformance::run_all(&a).await;
    conformance::shared_races(&a, &b).await;
    conformance::shared_leases(&a, &b).await;
    drop((a, b));
    db.drop_database().await.unwrap();
}

/// A `ca_file` that is missing or holds no certificate stops the start, naming the file.
#[tokio::test]
async fn a_ca_file_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    for (file, needle) in [(empty.clone(), "holds no certificate"), (dir.path().join("missing.pem"), "missing.pem")] {
        let mut options = PostgresOptions::new("postgres://postgres@127.0.0.1:5432/test?sslmode=require");
        options.ca_file = Some(file.clone());
        let err = PostgresStore::connect(options).await.unwrap_err().to_string();
        assert!(err.contains("ca_file") && err.contains(needle), "{}: {err}", file.display());
    }
}

/// A write the database refuses for a reason of its own (here a body with a NUL character,
/// which PostgreSQL text cannot hold) fails alone: the requests committed with it in the same
/// batch still succeed.
#[tokio::test]
async fn a_refused_write_fails_alone_in_its_batch() {
    let db = scratch("refused").await;
    let store = open(&db.url, Duration::ZERO).await;
    let bad = Write::Put {
        collection: Collection::EnrollmentGroups,
        document: Document {
            id: "bad".into(),
            etag: "1".into(),
            partition: None,
            body: "{\"a\":\"\0\"}".into(),
            expires_at: None,
        },
        condition: Condition::Always,
    };
    let mut writes: Vec<Vec<Write>> = (0..16).map(|i| vec![group(&format!("good-{i}"), "1")]).collect();
    writes.insert(8, vec![bad]);
    let results = futures_util::future::join_all(writes.into_iter().map(|w| store.write(w))).await;
    for (i, r) in results.iter().enumerate() {
        if i == 8 {
            assert!(matches!(r, Err(dps_core::store::StoreError::Other(_))), "the bad write fails: {r:?}");
        } else {
            assert!(r.is_ok(), "write {i} is not held back by the bad one: {r:?}");
        }
    }
    for i in 0..16 {
        assert!(store.get(Collection::EnrollmentGroups, &format!("good-{i}")).await.unwrap().is_some());
    }
    assert_eq!(store.get(Collection::EnrollmentGroups, "bad").await.unwrap(), None);
    drop(store);
    db.drop_database().await.unwrap();
}
