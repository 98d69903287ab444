//! The store chosen by `[store] backend`: [`open_store`] is the one place the server (and
//! `dps cert`) opens one. A new backend is a [`StoreConfig`] variant and one arm here.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dps_core::store::Store;
use dps_store::{PostgresOptions, PostgresStore, SqliteStore, Synchronous};

use crate::config::{StoreConfig, STORE_URL_ENV};
use crate::error::ServerError;

/// Opens the configured store; `data_dir` is where file-based backends keep their files.
pub async fn open_store(config: &StoreConfig, data_dir: &Path) -> Result<Arc<dyn Store>, ServerError> {
    match config {
        StoreConfig::Sqlite(sqlite) => {
            let synchronous = if sqlite.synchronous == "normal" { Synchronous::Normal } else { Synchronous::Full };
            let path = data_dir.join(&sqlite.sqlite_file);
            Ok(Arc::new(SqliteStore::open(&path, synchronous)?))
        }
        StoreConfig::Postgres(pg) => {
            let url = pg.url().ok_or_else(|| {
                ServerError::Bootstrap(format!("[store] backend \"postgres\" needs [store] url or {STORE_URL_ENV}"))
            })?;
            let mut options = PostgresOptions::new(url);
            options.pool_size = pg.pool_size;
            options.writers = pg.writers;
            options.readers = pg.readers;
            options.synchronous_commit = pg.synchronous_commit.clone();
            options.ca_file = pg.ca_file.clone();
            options.start_timeout = Duration::from_secs(pg.start_timeout_secs);
            Ok(Arc::new(PostgresStore::connect(options).await?))
        }
    }
}
