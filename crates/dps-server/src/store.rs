//! The store chosen by `[store] backend`: [`open_store`] is the one place the server (and
//! `dps cert`) opens one. A new backend is a [`StoreConfig`] variant and one arm here.

use std::path::Path;
use std::sync::Arc;

use dps_core::store::Store;
use dps_store::{SqliteStore, Synchronous};

use crate::config::StoreConfig;
use crate::error::ServerError;

/// Opens the configured store; `data_dir` is where file-based backends keep their files.
pub fn open_store(config: &StoreConfig, data_dir: &Path) -> Result<Arc<dyn Store>, ServerError> {
    match config {
        StoreConfig::Sqlite(sqlite) => {
            let synchronous = if sqlite.synchronous == "normal" { Synchronous::Normal } else { Synchronous::Full };
            let path = data_dir.join(&sqlite.sqlite_file);
            Ok(Arc::new(SqliteStore::open(&path, synchronous)?))
        }
    }
}
