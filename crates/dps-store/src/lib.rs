//! Store implementations for dps-rs and the conformance suite every implementation passes.
//!
//! [`SqliteStore`] is the embedded default: one file in the data directory, WAL journal,
//! `synchronous = FULL` by default so a write is on disk before any client hears of it.
//! [`PostgresStore`] keeps everything in a PostgreSQL database that several `dps` nodes share.
//! [`MemoryStore`] keeps everything in memory, for tests of the engine (with a switch that
//! simulates an outage).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod conformance;
mod continuation;
mod memory;
mod postgres;
mod scratch;
mod sqlite;
mod version_cache;

pub use memory::MemoryStore;
pub use postgres::{PostgresOptions, PostgresStore};
pub use scratch::{ScratchDatabase, DEFAULT_TEST_SERVER, TEST_SERVER_ENV};
pub use sqlite::{SqliteStore, Synchronous, OTHER_WRITERS_SEEN_WITHIN, SQLITE_MIGRATIONS};

/// Records one group commit for the Prometheus metrics (docs/operations.md): its latency and how
/// many write requests it carried. A no-op unless the server installed a recorder.
fn record_commit(backend: &'static str, requests: usize, started: std::time::Instant) {
    metrics::histogram!("dps_store_commit_duration_seconds", "store" => backend)
        .record(started.elapsed().as_secs_f64());
    metrics::histogram!("dps_store_commit_batch_size", "store" => backend).record(requests as f64);
}
