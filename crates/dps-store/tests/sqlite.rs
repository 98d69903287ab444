//! The SQLite store against the conformance suite, plus durability and migration checks.

use dps_core::store::{Collection, Condition, Document, Store, Write};
use std::time::Duration;

use dps_store::{conformance, SqliteStore, Synchronous, OTHER_WRITERS_SEEN_WITHIN, SQLITE_MIGRATIONS};

#[tokio::test]
async fn sqlite_passes_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("dps.sqlite"), Synchronous::Full).unwrap();
    conformance::run_all(&store).await;
}

#[tokio::test]
async fn data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dps.sqlite");
    {
        let store = SqliteStore::open(&path, Synchronous::Normal).unwrap();
        let d = Document { id: "x".into(), etag: "1".into(), partition: None, body: "{}".into(), expires_at: None };
        store
            .write(vec![Write::Put {
                collection: Collection::Enrollments,
                document: d,
                condition: Condition::IfAbsent,
            }])
            .await
            .unwrap();
    }
    let store = SqliteStore::open(&path, Synchronous::Full).unwrap();
    assert_eq!(store.schema_version().unwrap(), 2);
    assert_eq!(store.get(Collection::Enrollments, "X").await.unwrap().unwrap().etag, "1");
}

#[test]
fn refuses_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dps.sqlite");
    drop(SqliteStore::open(&path, Synchronous::Full).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(conn);
    let err = SqliteStore::open(&path, Synchronous::Full).unwrap_err().to_string();
    assert!(err.contains("99") && err.contains("upgrade dps"), "{err}");
}

#[test]
fn refuses_a_file_that_is_not_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dps.sqlite");
    std::fs::write(&path, b"this is not sqlite, just some text that is long enough to be a header").unwrap();
    assert!(SqliteStore::open(&path, Synchronous::Full).is_err());
}

#[tokio::test]
async fn two_opens_of_one_file_share_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dps.sqlite");
    let a = SqliteStore::open_with_refresh(&path, Synchronous::Full, Duration::ZERO).unwrap();
    let b = SqliteStore::open_with_refresh(&path, Synchronous::Full, Duration::ZERO).unwrap();
    conformance::shared_versions(&a, &b).await;
    conformance::shared_races(&a, &b).await;
    conformance::shared_leases(&a, &b).await;
}

/// With the default refresh, a handle sees its own writes in the version at once, and another
/// handle's within `OTHER_WRITERS_SEEN_WITHIN`.
#[tokio::test]
async fn another_handles_writes_are_seen_within_the_refresh_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dps.sqlite");
    let a = SqliteStore::open(&path, Synchronous::Normal).unwrap();
    let b = SqliteStore::open(&path, Synchronous::Normal).unwrap();
    let g = Collection::EnrollmentGroups;
    let group = |etag: &str| Write::Put {
        collection: g,
        document: Document { id: "g".into(), etag: etag.into(), partition: None, body: "{}".into(), expires_at: None },
        condition: Condition::Always,
    };
    let (a0, b0) = (a.version(g).await.unwrap(), b.version(g).await.unwrap());
    a.write(vec![group("1")]).await.unwrap();
    assert!(a.version(g).await.unwrap() > a0, "the writing handle sees its write at once");
    tokio::time::sleep(OTHER_WRITERS_SEEN_WITHIN + Duration::from_millis(20)).await;
    let b1 = b.version(g).await.unwrap();
    assert!(b1 > b0, "the other handle sees it within the refresh time ({b0} -> {b1})");
    // Several writes in a row by the other handle: each is seen once the time has passed.
    for etag in ["2", "3"] {
        a.write(vec![group(etag)]).await.unwrap();
    }
    tokio::time::sleep(OTHER_WRITERS_SEEN_WITHIN + Duration::from_millis(20)).await;
    assert_eq!(b.version(g).await.unwrap(), a.version(g).await.unwrap());
}

#[tokio::test]
async fn versions_are_kept_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dps.sqlite");
    let version = {
        let store = SqliteStore::open(&path, Synchronous::Full).unwrap();
        let d = Document { id: "g".into(), etag: "1".into(), partition: None, body: "{}".into(), expires_at: None };
        store
            .write(vec![Write::Put {
                collection: Collection::EnrollmentGroups,
                document: d,
                condition: Condition::IfAbsent,
            }])
            .await
            .unwrap();
        store.version(Collection::EnrollmentGroups).await.unwrap()
    };
    assert!(version > 0);
    let store = SqliteStore::open(&path, Synchronous::Full).unwrap();
    assert_eq!(store.version(Collection::EnrollmentGroups).await.unwrap(), version, "a reopen keeps the version");
}

/// A database written before versions were kept (documents, no version rows) opens, reads and
/// writes as before; its versions start at 0 and move with the first write.
#[tokio::test]
async fn a_database_without_version_rows_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dps.sqlite");
    drop(SqliteStore::open(&path, Synchronous::Full).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "DELETE FROM documents WHERE collection = 0;
         INSERT INTO documents (collection, key, id, etag, partition, body, expires_at)
         VALUES (2, 'old-group', 'Old-Group', 'e1', NULL, '{}', NULL);",
    )
    .unwrap();
    drop(conn);
    let store = SqliteStore::open(&path, Synchronous::Full).unwrap();
    assert_eq!(store.schema_version().unwrap(), 2);
    let g = Collection::EnrollmentGroups;
    assert_eq!(store.version(g).await.unwrap(), 0);
    assert_eq!(store.get(g, "OLD-GROUP").await.unwrap().unwrap().etag, "e1");
    assert_eq!(store.list(g, None, None, 10).await.unwrap().documents.len(), 1, "version rows are not listed");
    store
        .write(vec![Write::Delete {
            collection: g,
            id: "old-group".into(),
            condition: Condition::IfMatch("e1".into()),
        }])
        .await
        .unwrap();
    assert_eq!(store.version(g).await.unwrap(), 1);
    assert!(store.list(g, None, None, 10).await.unwrap().documents.is_empty());
}

/// A database of schema 1 (documents in a WITHOUT ROWID table) is moved to schema 2 (a rowid
/// table) on open: every document, version row, partition and expiry is kept, the indexes work,
/// and a document too large for a WITHOUT ROWID leaf is read and rewritten like any other.
#[tokio::test]
async fn a_schema_1_database_moves_to_a_rowid_table_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dps.sqlite");
    let big = format!("{{\"blob\":\"{}\"}}", "A".repeat(3000));
    {
        // The file as dps left it at schema 1: that migration's own SQL.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(&format!("PRAGMA journal_mode = WAL; {} PRAGMA user_version = 1;", SQLITE_MIGRATIONS[0]))
            .unwrap();
        let (enrollments, challenges) = (Collection::Enrollments.tag(), Collection::TpmChallenges.tag());
        let doc = |id: &str, etag: &str, partition: Option<&str>, body: &str, expires_at: Option<i64>| Document {
            id: id.into(),
            etag: etag.into(),
            partition: partition.map(Into::into),
            body: body.into(),
            expires_at,
        };
        let rows = [
            (0, doc(&enrollments.to_string(), "", None, "7", None)),
            (enrollments, doc("Dev-1", "e1", None, "{}", None)),
            (Collection::Registrations.tag(), doc("Dev-1", "r1", Some("group-a"), "{}", None)),
            (challenges, doc("Dev-1", "c1", None, &big, Some(1))),
            (challenges, doc("Dev-2", "c2", None, &big, Some(i64::MAX))),
        ];
        for (collection, d) in rows {
            conn.execute(
                "INSERT INTO documents (collection, key, id, etag, partition, body, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                rusqlite::params![collection, d.id.to_ascii_lowercase(), d.id, d.etag, d.partition, d.body, d.expires_at],
            )
            .unwrap();
        }
    }
    let store = SqliteStore::open(&path, Synchronous::Full).unwrap();
    assert_eq!(store.schema_version().unwrap(), 2);
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let sql: String =
            conn.query_row("SELECT sql FROM sqlite_master WHERE name = 'documents'", [], |r| r.get(0)).unwrap();
        assert!(!sql.to_ascii_uppercase().contains("WITHOUT ROWID"), "{sql}");
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'documents' AND sql IS NOT NULL ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(indexes, ["documents_by_expiry", "documents_by_partition"]);
        assert!(conn.query_row("SELECT count(*) FROM documents_rowid", [], |r| r.get::<_, i64>(0)).is_err());
    }
    assert_eq!(store.version(Collection::Enrollments).await.unwrap(), 7, "the version row is kept");
    assert_eq!(store.get(Collection::Enrollments, "DEV-1").await.unwrap().unwrap().etag, "e1");
    let in_partition = store.list(Collection::Registrations, Some("group-a"), None, 10).await.unwrap();
    assert_eq!(in_partition.documents.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["Dev-1"]);
    let kept = store.get(Collection::TpmChallenges, "dev-2").await.unwrap().unwrap();
    assert_eq!((kept.etag.as_str(), kept.body.as_str(), kept.expires_at), ("c2", big.as_str(), Some(i64::MAX)));
    // The expiry index still finds what expired.
    let purged = store.purge_expired(2).await.unwrap();
    assert_eq!(purged, 1);
    assert!(store.get(Collection::TpmChallenges, "dev-1").await.unwrap().is_none());
    let mut rewritten = kept.clone();
    rewritten.body = format!("{{\"blob\":\"{}\"}}", "B".repeat(3000));
    store
        .write(vec![Write::Put {
            collection: Collection::TpmChallenges,
            document: rewritten.clone(),
            condition: Condition::IfMatch("c2".into()),
        }])
        .await
        .unwrap();
    assert_eq!(store.get(Collection::TpmChallenges, "Dev-2").await.unwrap().unwrap().body, rewritten.body);
    drop(store);
    let store = SqliteStore::open(&path, Synchronous::Full).unwrap();
    assert_eq!(store.schema_version().unwrap(), 2, "a second open migrates nothing");
    assert_eq!(store.version(Collection::Enrollments).await.unwrap(), 7);
}
