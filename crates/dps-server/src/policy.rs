//! The shared access policies of the service API: what a service SAS token's `skn` names and
//! what it may do. Made at start by [`crate::bootstrap::ensure_policies`] (the configured ones
//! and the generated owner policy), checked per request by the service API handlers.

/// A shared access policy of the service API.
#[derive(Clone)]
pub struct Policy {
    /// Name (`skn`).
    pub name: String,
    /// Base64 primary key.
    pub primary_key: String,
    /// Base64 secondary key.
    pub secondary_key: Option<String>,
    /// Granted rights.
    pub rights: Vec<String>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy").field("name", &self.name).field("rights", &self.rights).finish_non_exhaustive()
    }
}
