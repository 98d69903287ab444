//! The engine: its settings, the state both planes share ([`Core`]: ports, caches, throttles,
//! shared helpers), and the two planes over it: [`DeviceRuntime`] (register, poll, status
//! lookup; in [`crate::registration`]) and [`Management`] (enrollments, groups, registration
//! states, certificates; in [`crate::enrollment`], [`crate::certificates`] and
//! `registration/management.rs`). [`Engine`] builds them and hands them out.

use std::sync::Arc;

use dps_proto::error::ErrorCode;
use dps_proto::service::AllocationPolicy;
use rand::RngCore;
use serde::de::DeserializeOwned;

use crate::allocation::LinkedHub;
use crate::clock::{Clock, SystemClock};
use crate::custom::AllocationHook;
use crate::error::Error;
use crate::registrar::HubRegistrar;
use crate::store::{Collection, Store};
use crate::throttle::{Buckets, RateLimit};
use crate::x509::CertificateFacts;
use dps_proto::service::EnrollmentGroup;

/// Engine settings, from the server configuration.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// The ID scope this instance serves (compared case-insensitively).
    pub id_scope: String,
    /// Linked IoT hubs.
    pub linked_hubs: Vec<LinkedHub>,
    /// Region of this node, for `geoLatency`.
    pub region: Option<String>,
    /// Policy for enrollments that set none (`hashed`, `static` or `geoLatency`).
    pub default_allocation_policy: AllocationPolicy,
    /// Largest device `payload`, in bytes of compact JSON.
    pub max_payload_bytes: usize,
    /// Accepted clock skew when checking SAS expiry.
    pub sas_clock_skew_secs: u64,
    /// How long operations stay queryable.
    pub operation_retention_secs: u64,
    /// Answer every register with `assigning` first, even when allocation is done.
    pub assigning_first: bool,
    /// `retry-after` seconds sent with `assigning` answers.
    pub retry_after_secs: u32,
    /// How long a register waits for a custom allocation webhook before it answers
    /// `assigning` and lets the device poll.
    pub webhook_inline_wait_ms: u64,
    /// The webhook call timeout (the hook enforces it); an operation still `assigning` this
    /// long (plus a margin) after it started is reported `failed`.
    pub webhook_timeout_secs: u64,
    /// X.509 group members must present a chain that reaches a certificate verified in the
    /// certificate store (as DPS requires); off, a group's signing certificate is trusted as is.
    pub require_verified_ca: bool,
    /// Tell devices what a failing webhook said (its body, the connection error) instead of
    /// only the cause class; for development instances.
    pub expose_webhook_errors: bool,
    /// A failed device authentication is answered no sooner than this after it began.
    pub auth_failure_delay_ms: u64,
    /// How long the key a TPM challenge delivers is accepted after its issue, in seconds.
    pub tpm_challenge_secs: u64,
    /// Register, poll and status requests per registration ID (after authentication).
    pub device_requests: Option<RateLimit>,
    /// Registrations of the whole instance.
    pub registrations: Option<RateLimit>,
    /// Write lifecycle events ([`crate::events`]) with every registration and enrollment
    /// change (on when an event sink is configured).
    pub lifecycle_events: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            id_scope: "0ne00000000".into(),
            linked_hubs: Vec::new(),
            region: None,
            default_allocation_policy: AllocationPolicy::Hashed,
            max_payload_bytes: 64 * 1024,
            sas_clock_skew_secs: 300,
            operation_retention_secs: 24 * 3600,
            assigning_first: false,
            retry_after_secs: 3,
            webhook_inline_wait_ms: 2000,
            webhook_timeout_secs: 10,
            require_verified_ca: true,
            expose_webhook_errors: false,
            auth_failure_delay_ms: 50,
            tpm_challenge_secs: 3600,
            device_requests: None,
            registrations: None,
            lifecycle_events: false,
        }
    }
}

/// What both planes share: the store, settings, clock, allocation hook, caches and throttles.
/// A bundle of shared pointers: every clone sees the same caches.
#[derive(Clone)]
pub struct Core {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) settings: Arc<EngineSettings>,
    pub(crate) clock: Arc<dyn Clock>,
    /// `{n}.{16 hex}` prefix of operation IDs issued by this process.
    pub(crate) operation_prefix: Arc<str>,
    /// Custom allocation webhook client.
    pub(crate) hook: Option<Arc<dyn AllocationHook>>,
    /// The hub registrar; none: every hub only records.
    pub(crate) registrar: Option<Arc<dyn HubRegistrar>>,
    /// Parsed enrollment groups, read once per store version of the collection.
    pub(crate) groups: Arc<VersionCache<Vec<EnrollmentGroup>>>,
    /// The certificate store's verified CA certificates, parsed, read once per store version
    /// of the collection.
    pub(crate) verified_cas: Arc<VersionCache<VerifiedCas>>,
    /// Requests per registration ID (lower-cased).
    pub(crate) device_throttle: Option<Arc<Buckets<String>>>,
    /// Registrations of the instance.
    pub(crate) registration_throttle: Option<Arc<Buckets<()>>>,
}

/// The certificate store's verified CA certificates: name, DER, parsed facts.
pub(crate) type VerifiedCas = Vec<(String, Vec<u8>, CertificateFacts)>;

/// What was last read and parsed from one collection, and the collection's store version
/// ([`Store::version`]) at the time. Every symmetric-key and X.509 group registration looks
/// at every group (and an X.509 one at every verified CA); this spares listing and parsing
/// them each time: a registration pays one version read instead.
pub(crate) struct VersionCache<T> {
    cached: std::sync::Mutex<Option<(u64, Arc<T>)>>,
}

impl<T> Default for VersionCache<T> {
    fn default() -> Self {
        Self { cached: std::sync::Mutex::new(None) }
    }
}

impl<T> VersionCache<T> {
    /// The value cached at exactly `version`.
    fn get(&self, version: u64) -> Option<Arc<T>> {
        let cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        cached.as_ref().filter(|(at, _)| *at == version).map(|(_, v)| v.clone())
    }

    /// Records `value` as read at `version`. (A slow reader finishing last may put older data
    /// back; it is recorded under its older version, so the next look reads again.)
    fn put(&self, version: u64, value: Arc<T>) {
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((version, value));
    }
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// The provisioning engine: builds the shared [`Core`] and hands out its two planes. Cheap to
/// clone; clones share caches and throttles.
#[derive(Clone, Debug)]
pub struct Engine {
    devices: DeviceRuntime,
    management: Management,
}

/// The device plane: what transports call for devices (register, operation status,
/// registration status), after authentication ([`crate::registration`]).
#[derive(Clone, Debug)]
pub struct DeviceRuntime(Core);

/// The management plane: what the service API calls (enrollments, enrollment groups,
/// registration states, CA certificates).
#[derive(Clone, Debug)]
pub struct Management(Core);

impl std::ops::Deref for DeviceRuntime {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.0
    }
}

impl std::ops::Deref for Management {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.0
    }
}

impl Engine {
    /// An engine over a store, with the system clock.
    pub fn new(store: Arc<dyn Store>, settings: EngineSettings) -> Self {
        Self::with_clock(store, settings, Arc::new(SystemClock))
    }

    /// An engine with an explicit clock (tests).
    pub fn with_clock(store: Arc<dyn Store>, settings: EngineSettings, clock: Arc<dyn Clock>) -> Self {
        let core = Core::new(store, settings, clock);
        Self { devices: DeviceRuntime(core.clone()), management: Management(core) }
    }

    /// Sets the client used for custom allocation webhooks (both planes: the device plane calls
    /// it, the management plane checks `webhookUrl`s with it).
    pub fn with_hook(mut self, hook: Arc<dyn AllocationHook>) -> Self {
        self.devices.0.hook = Some(hook.clone());
        self.management.0.hook = Some(hook);
        self
    }

    /// Sets the hub registrar: what creates a registered device in its hub
    /// ([`crate::registrar`]). Without one every hub only records.
    pub fn with_registrar(mut self, registrar: Arc<dyn HubRegistrar>) -> Self {
        self.devices.0.registrar = Some(registrar.clone());
        self.management.0.registrar = Some(registrar);
        self
    }

    /// The device plane.
    pub fn devices(&self) -> &DeviceRuntime {
        &self.devices
    }

    /// The management plane.
    pub fn management(&self) -> &Management {
        &self.management
    }

    /// The settings in force.
    pub fn settings(&self) -> &EngineSettings {
        &self.devices.settings
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.devices.store
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.devices.clock
    }

    /// Deletes expired operations; returns how many.
    pub async fn purge_expired(&self) -> Result<u64, Error> {
        Ok(self.devices.store.purge_expired(self.devices.clock.now_millis()).await?)
    }

    /// This engine's node identity: random per process, the holder name of its leases.
    pub fn node(&self) -> &str {
        &self.devices.operation_prefix
    }

    /// Takes or renews the lease on the background work `name` for `ttl` ([`crate::lease`]):
    /// `true` when this node may do the work now.
    pub async fn hold_lease(&self, name: &str, ttl: std::time::Duration) -> Result<bool, Error> {
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let now = self.devices.clock.now_millis();
        Ok(crate::lease::acquire(self.devices.store.as_ref(), name, self.node(), now, ttl).await?)
    }

    /// Whether the store can serve now (`/readyz`).
    pub async fn ready(&self) -> Result<(), Error> {
        Ok(self.devices.store.ready().await?)
    }
}

impl Core {
    fn new(store: Arc<dyn Store>, settings: EngineSettings, clock: Arc<dyn Clock>) -> Self {
        let mut node = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut node);
        let hex: String = node.iter().map(|b| format!("{b:02x}")).collect();
        let device_throttle = settings.device_requests.map(|l| Arc::new(Buckets::new(l)));
        let registration_throttle = settings.registrations.map(|l| Arc::new(Buckets::new(l)));
        Self {
            device_throttle,
            registration_throttle,
            store,
            settings: Arc::new(settings),
            clock,
            operation_prefix: Arc::from(format!("5.{hex}")),
            hook: None,
            registrar: None,
            groups: Arc::default(),
            verified_cas: Arc::default(),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// What `load` reads from `collection`, from `cache` when the collection's store version
    /// has not moved since it was filled. A failure to read the version is a store failure
    /// (503), never a reason to use or to skip the cache.
    pub(crate) async fn cached<T, F, Fut>(
        &self,
        cache: &VersionCache<T>,
        collection: Collection,
        load: F,
    ) -> Result<Arc<T>, Error>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        // The version is read before the data: a write that lands while they are read moves
        // it past what the cache records, so the next call reads again.
        let version = self.store.version(collection).await?;
        if let Some(hit) = cache.get(version) {
            return Ok(hit);
        }
        let value = Arc::new(load().await?);
        cache.put(version, value.clone());
        Ok(value)
    }

    /// Every enrollment group, in ID order: from the cache when the store's version of the
    /// collection has not moved since it was filled.
    pub(crate) async fn enrollment_groups(&self) -> Result<Arc<Vec<EnrollmentGroup>>, Error> {
        self.cached(&self.groups, Collection::EnrollmentGroups, || async {
            let mut groups = Vec::new();
            let mut continuation: Option<String> = None;
            loop {
                let page = self.store.list(Collection::EnrollmentGroups, None, continuation.as_deref(), 500).await?;
                for doc in &page.documents {
                    groups.push(parse_stored::<EnrollmentGroup>(&doc.body, "enrollment group", &doc.id)?);
                }
                match page.continuation {
                    Some(c) => continuation = Some(c),
                    None => return Ok(groups),
                }
            }
        })
        .await
    }

    /// Counts a device request against `throttling.device_requests_*`, and a registration
    /// also against the instance's `throttling.registrations_*`.
    pub(crate) fn admit(&self, registration_id: &str, registration: bool) -> Result<(), Error> {
        if self.device_throttle.is_none() && (self.registration_throttle.is_none() || !registration) {
            return Ok(());
        }
        let now = self.clock.now_millis();
        let key = registration_id.to_ascii_lowercase();
        let throttled = |retry_after: u32, message: String| {
            crate::info_limited!("throttled", registration_id = %registration_id, retry_after, reason = %message, "request throttled");
            Error::Throttled { retry_after, message }
        };
        if let Some(t) = &self.device_throttle {
            t.check(&key, now).map_err(|s| {
                throttled(s, format!("too many requests for registration ID '{registration_id}'; retry after {s} s"))
            })?;
        }
        if let (true, Some(t)) = (registration, &self.registration_throttle) {
            t.take(&(), now).map_err(|s| {
                throttled(s, format!("this service is taking as many registrations as it is set to; retry after {s} s"))
            })?;
        }
        if let Some(t) = &self.device_throttle {
            t.take(&key, now).map_err(|s| {
                throttled(s, format!("too many requests for registration ID '{registration_id}'; retry after {s} s"))
            })?;
        }
        Ok(())
    }
}

/// Parses a JSON request body into `T` strictly (one object, no repeated keys; see
/// [`dps_proto::json`]), with a 400 that names the field and what was expected.
pub(crate) fn parse_body<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, Error> {
    dps_proto::json::parse(body).map_err(|e| body_error(what, e))
}

/// The 400 for a request body that cannot be used.
pub(crate) fn body_error(what: &str, e: dps_proto::json::JsonError) -> Error {
    Error::bad_request(ErrorCode::INVALID_REQUEST_BODY, format!("the request body is not a valid {what}: {e}"))
}

/// Parses a stored JSON document; a failure means the store holds something we did not write.
pub(crate) fn parse_stored<T: DeserializeOwned>(body: &str, what: &str, id: &str) -> Result<T, Error> {
    serde_json::from_str(body).map_err(|e| Error::Internal(format!("stored {what} '{id}' cannot be read: {e}")))
}

/// Serialises a record for the store.
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> Result<String, Error> {
    serde_json::to_string(value).map_err(|e| Error::Internal(format!("cannot serialise a record: {e}")))
}
