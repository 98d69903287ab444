//! Store implementations for dps-rs and the conformance suite every implementation passes.
//!
//! [`SqliteStore`] is the embedded default: one file in the data directory, WAL journal,
//! `synchronous = FULL` by default so a write is on disk before any client hears of it.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod conformance;
mod sqlite;

pub use sqlite::{SqliteStore, Synchronous};
