//! The SQLite store against the conformance suite, plus durability and migration checks.

use dps_core::store::{Collection, Condition, Document, Store, Write};
use dps_store::{conformance, SqliteStore, Synchronous};

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
    assert_eq!(store.schema_version().unwrap(), 1);
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
