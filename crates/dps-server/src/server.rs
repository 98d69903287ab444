//! The server process: bootstrap, store, engine, listeners, background tasks.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dps_core::allocation::LinkedHub;
use dps_core::{Engine, EngineSettings};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::amqp::AmqpContext;
use crate::bootstrap::{self, DevCredentials, DEV_CREDENTIALS_FILE};
use crate::config::Config;
use crate::error::ServerError;
use crate::gate::{Gate, GateLimits};
use crate::http::AppState;
use crate::mqtt::MqttContext;
use crate::ws::WsRoutes;

/// A configured server. `Server::new(config).run(shutdown)` is the whole program.
#[derive(Debug)]
pub struct Server {
    config: Config,
}

impl Server {
    /// A server for a validated configuration.
    pub fn new(config: Config) -> Self {
        Self { config }
    }

    /// Bootstraps, binds, serves until `shutdown` completes, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let mut config = self.config;
        config.validate()?;
        // Every connection is a file descriptor: fit the connection caps to what this process
        // may open (or refuse caps that cannot fit) before anything is bound.
        let limit = crate::descriptors::raise_limit(&config);
        let plan = crate::descriptors::fit(&config, limit)?;
        config.limits.max_connections = Some(plan.https);
        config.mqtt.max_connections = Some(plan.mqtt.max(1));
        config.amqp.max_connections = Some(plan.amqp.max(1));
        tracing::info!(
            https = plan.https,
            mqtt = plan.mqtt,
            amqp = plan.amqp,
            descriptor_limit = limit,
            "connection caps"
        );
        // Before anything records: with no [metrics] listen, nothing is installed and every
        // record is a no-op.
        let metrics_handle = config.metrics.listen.map(|_| crate::metrics::install()).transpose()?;
        let data_dir = bootstrap::prepare_data_dir(&config.data_dir)?;
        let store = crate::store::open_store(&config.store, &data_dir).await?;
        if config.store.is_shared() {
            bootstrap::share_test_ca(&config, &data_dir, store.as_ref()).await?;
        }
        let tls_files = bootstrap::ensure_tls(&config, &data_dir)?;
        let tls = crate::tls::server_config(&tls_files.cert, &tls_files.key)?;
        let id_scope = bootstrap::ensure_id_scope(&config, store.as_ref()).await?;
        let (policies, owner_created) = bootstrap::ensure_policies(&config, store.as_ref()).await?;

        let settings = EngineSettings {
            id_scope: id_scope.clone(),
            linked_hubs: config
                .linked_hubs()
                .into_iter()
                .map(|h| LinkedHub {
                    host_name: h.host_name,
                    allocation_weight: h.allocation_weight,
                    apply_allocation_policy: h.apply_allocation_policy,
                    region: h.region,
                })
                .collect(),
            region: config.region.clone(),
            default_allocation_policy: config.allocation.default_policy,
            max_payload_bytes: config.device.max_payload_bytes,
            sas_clock_skew_secs: config.device.sas_clock_skew_secs,
            operation_retention_secs: config.device.operation_retention_secs,
            assigning_first: config.device.assigning_first,
            retry_after_secs: config.device.retry_after_secs,
            webhook_inline_wait_ms: config.allocation.webhook_inline_wait_ms,
            webhook_timeout_secs: config.allocation.webhook_timeout_secs,
            require_verified_ca: config.x509.require_verified_ca,
            expose_webhook_errors: config.allocation.expose_webhook_errors,
            auth_failure_delay_ms: config.device.auth_failure_delay_ms,
            tpm_challenge_secs: config.device.tpm_challenge_secs,
            device_requests: config.throttling.device_requests(),
            registrations: config.throttling.registrations(),
            lifecycle_events: config.events.any(),
        };
        let webhooks = crate::webhook::WebhookClient::new(&config.allocation, &config.webhooks)?;
        let rules = crate::rules::RuleSets::compile(&config.rules, settings.linked_hubs.clone())?;
        let custom = crate::webhook::CustomAllocator { webhooks, rules };
        let registrars = crate::registrar::Registrars::new(&config.hubs)?;
        let event_sinks = crate::events::sinks(&config.events)?;
        let calls_hubs = registrars.any();
        let mut engine = Engine::new(store.clone(), settings).with_hook(Arc::new(custom));
        if calls_hubs {
            engine = engine.with_registrar(Arc::new(registrars));
        }

        let (listener, bound) = bind(config.listen.https, "--https-listen").await?;
        let mqtt_listener = match config.mqtt.enabled {
            true => Some(bind(config.listen.mqtt, "--mqtt-listen").await?),
            false => None,
        };
        let mqtt_bound = mqtt_listener.as_ref().map(|(_, a)| *a);
        let amqp_listener = match config.amqp.enabled {
            true => Some(bind(config.listen.amqp, "--amqp-listen").await?),
            false => None,
        };
        let amqp_bound = amqp_listener.as_ref().map(|(_, a)| *a);
        let metrics_listener = match config.metrics.listen {
            Some(addr) => Some(crate::metrics::bind(addr).await?),
            None => None,
        };
        let metrics_bound = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());

        let mut creds =
            bootstrap::dev_credentials(&config, &id_scope, &policies, &tls_files, bound, mqtt_bound, amqp_bound);
        creds.metrics_address = metrics_bound.map(|a| a.to_string());
        let creds_path = data_dir.join(DEV_CREDENTIALS_FILE);
        let creds_json = serde_json::to_vec_pretty(&creds).map_err(|e| ServerError::Bootstrap(e.to_string()))?;
        bootstrap::write_atomic(&creds_path, &creds_json, true)?;
        // The connection string carries the owner key: only on the first start or to a
        // terminal, never again into journald or a container log.
        let show_secret = owner_created || std::io::IsTerminal::is_terminal(&std::io::stdout());
        print_banner(&creds, &creds_path, show_secret);
        if config.hubs.is_empty() {
            tracing::warn!(
                hub = crate::config::PLACEHOLDER_HUB,
                "no [[hubs]] configured: devices are assigned to the placeholder hub"
            );
        }

        let (stop_tx, stop_rx) = watch::channel(false);
        let auth_failures = Arc::new(crate::auth_failures::AuthFailures::new(config.throttling.failed_auth()));
        let mqtt = config
            .mqtt
            .enabled
            .then(|| Arc::new(MqttContext::new(engine.clone(), config.mqtt.clone(), auth_failures.clone())));
        let amqp = config
            .amqp
            .enabled
            .then(|| Arc::new(AmqpContext::new(engine.clone(), config.amqp.clone(), auth_failures.clone())));
        let state = Arc::new(AppState {
            engine: engine.clone(),
            policies,
            host_names: config.tls.host_names.clone(),
            max_body_bytes: config.limits.max_body_bytes,
            body_read_timeout: Duration::from_secs(config.limits.body_read_timeout_secs),
            default_page_size: config.service.default_page_size,
            websocket: WsRoutes {
                mqtt: mqtt.as_ref().filter(|ctx| ctx.config.websocket).map(|ctx| {
                    Arc::new(crate::connection::OverWs::new(ctx.clone())) as Arc<dyn crate::ws::WsTransport>
                }),
                amqp: amqp.as_ref().filter(|ctx| ctx.config.websocket).map(|ctx| {
                    Arc::new(crate::connection::OverWs::new(ctx.clone())) as Arc<dyn crate::ws::WsTransport>
                }),
            },
            auth_failures,
            stop: stop_rx.clone(),
        });
        let outbox = calls_hubs.then(|| tokio::spawn(hub_outbox_loop(engine.clone(), stop_rx.clone())));
        let events = (!event_sinks.is_empty())
            .then(|| tokio::spawn(crate::events::outbox_loop(engine.clone(), event_sinks, stop_rx.clone())));
        let purge = tokio::spawn(purge_loop(engine, stop_rx.clone()));
        let busy = Duration::from_millis(config.limits.busy_handshake_timeout_ms);
        let mut gates = Vec::new();
        let mqtt_task = match (mqtt_listener, mqtt) {
            (Some((listener, _)), Some(ctx)) => {
                let gate = Gate::new(GateLimits {
                    max_connections: plan.mqtt,
                    max_per_address: config.mqtt.max_connections_per_address,
                    handshake_timeout: Duration::from_secs(config.mqtt.connect_timeout_secs),
                    busy_handshake_timeout: busy,
                });
                gates.push(("mqtt", gate.clone()));
                Some(tokio::spawn(crate::connection::serve_tls(listener, tls.clone(), ctx, gate, stop_rx.clone())))
            }
            _ => None,
        };
        let amqp_task = match (amqp_listener, amqp) {
            (Some((listener, _)), Some(ctx)) => {
                let gate = Gate::new(GateLimits {
                    max_connections: plan.amqp,
                    max_per_address: config.amqp.max_connections_per_address,
                    handshake_timeout: Duration::from_secs(config.amqp.connect_timeout_secs),
                    busy_handshake_timeout: busy,
                });
                gates.push(("amqp", gate.clone()));
                Some(tokio::spawn(crate::connection::serve_tls(listener, tls.clone(), ctx, gate, stop_rx.clone())))
            }
            _ => None,
        };
        let https_gate = Gate::new(GateLimits {
            max_connections: plan.https,
            max_per_address: config.limits.max_connections_per_address,
            handshake_timeout: Duration::from_secs(config.limits.tls_handshake_timeout_secs),
            busy_handshake_timeout: busy,
        });
        gates.push(("https", https_gate.clone()));
        let metrics_task = match (metrics_listener, metrics_handle) {
            (Some(listener), Some(handle)) => {
                let exporter = Arc::new(crate::metrics::Exporter::new(handle, gates));
                Some(tokio::spawn(exporter.serve(listener, stop_rx.clone())))
            }
            _ => None,
        };
        let https = tokio::spawn(crate::listener::serve_https(
            listener,
            tls,
            state,
            config.limits.clone(),
            https_gate,
            stop_rx,
        ));
        tracing::info!(https = %bound, mqtt = ?mqtt_bound, amqp = ?amqp_bound, metrics = ?metrics_bound, id_scope, "dps serving");
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        let _ = https.await;
        for task in [mqtt_task, amqp_task, metrics_task].into_iter().flatten() {
            let _ = task.await;
        }
        let _ = purge.await;
        // Events not yet delivered stay in the outbox for the next start (or another node).
        if let Some(events) = events {
            let _ = tokio::time::timeout(Duration::from_secs(5), events).await;
        }
        // A hub call cut short stays owed in the outbox (the calls are idempotent).
        if let Some(outbox) = outbox {
            outbox.abort();
        }
        Ok(())
    }
}

/// Binds a listener; errors say how to fix the usual causes.
async fn bind(addr: SocketAddr, flag: &'static str) -> Result<(TcpListener, SocketAddr), ServerError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| {
        let hint = match source.kind() {
            std::io::ErrorKind::PermissionDenied => {
                " (ports below 1024 need root or CAP_NET_BIND_SERVICE; or choose another port)"
            }
            std::io::ErrorKind::AddrInUse => " (another process is using this port; stop it or choose another)",
            _ => "",
        };
        ServerError::Bind { addr, source, hint, flag }
    })?;
    let bound = listener.local_addr().map_err(|source| ServerError::Bind { addr, source, hint: "", flag })?;
    Ok((listener, bound))
}

fn print_banner(creds: &DevCredentials, path: &std::path::Path, show_secret: bool) {
    println!("dps {} ready", env!("CARGO_PKG_VERSION"));
    println!("  HTTPS listener:     {}", creds.https_address);
    if let Some(mqtt) = &creds.mqtt_address {
        println!("  MQTT listener:      {mqtt} (and MQTT over WebSocket on the HTTPS port)");
    }
    if let Some(amqp) = &creds.amqp_address {
        println!("  AMQP listener:      {amqp} (and AMQP over WebSocket on the HTTPS port)");
    }
    println!("  ID scope:           {}", creds.id_scope);
    match &creds.service_connection_string {
        Some(cs) if show_secret => println!("  Service connection: {cs}"),
        Some(_) => {
            println!("  Service connection: in {} (printed only on the first start, or to a terminal)", path.display())
        }
        None => {}
    }
    if let Some(ca) = &creds.ca_certificate_path {
        println!("  Trust this CA:      {}", ca.display());
    }
    println!("  Linked hubs:        {}", creds.linked_hubs.join(", "));
    println!("  Credentials file:   {}", path.display());
}

/// How often the hub outbox is drained.
const OUTBOX_EVERY: Duration = Duration::from_secs(1);
/// How long the outbox lease holds without renewal (renewed before every drain): after a
/// crash, another node (or the restarted one, under a new name) resumes the work within it.
const OUTBOX_LEASE: Duration = Duration::from_secs(15);
/// No hub call of a drain starts after this.
const OUTBOX_DRAIN_TIME: Duration = Duration::from_secs(5);
/// How often the lease is renewed while a drain runs.
const OUTBOX_RENEW: Duration = Duration::from_secs(5);
/// Hub calls per drain at most (the lease is renewed between drains).
const OUTBOX_CALLS: usize = 100;

/// Does the hub calls owed in the outbox ([`dps_core::hub_outbox`]), on one node at a time of
/// those sharing the store (the holder of the `hub-outbox` lease).
async fn hub_outbox_loop(engine: Engine, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(OUTBOX_EVERY) => {}
        }
        match engine.hold_lease("hub-outbox", OUTBOX_LEASE).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                dps_core::warn_limited!("hub-outbox", error = %e, "the hub outbox lease cannot be read");
                continue;
            }
        }
        // The lease is renewed while the drain runs (a hub call may outlast it); a drain whose
        // lease is lost stops at once: the call cut short stays owed, and hub calls are
        // idempotent.
        let drain = engine.drain_hub_outbox(OUTBOX_CALLS, OUTBOX_DRAIN_TIME);
        tokio::pin!(drain);
        let drained = loop {
            tokio::select! {
                d = &mut drain => break Some(d),
                _ = tokio::time::sleep(OUTBOX_RENEW) => {
                    if !matches!(engine.hold_lease("hub-outbox", OUTBOX_LEASE).await, Ok(true)) {
                        dps_core::warn_limited!("hub-outbox", "the hub outbox lease was lost during a drain; stopped");
                        break None;
                    }
                }
            }
        };
        match drained {
            Some(Ok(d)) if d.done + d.failed + d.void > 0 => {
                tracing::debug!(
                    done = d.done,
                    failed = d.failed,
                    void = d.void,
                    waiting = d.waiting,
                    "hub outbox drained"
                )
            }
            Some(Ok(_)) | None => {}
            Some(Err(e)) => dps_core::warn_limited!("hub-outbox", error = %e, "draining the hub outbox failed"),
        }
    }
}

/// How often the sweep of expired operations runs.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// How long the sweep's lease holds without renewal: the node that holds it renews it every
/// [`PURGE_EVERY`]; when it dies, another node takes the sweep over within this time.
const PURGE_LEASE: Duration = Duration::from_secs(150);

/// Sweeps expired operations, on one node at a time of those sharing the store (the holder of
/// the `purge` lease, [`dps_core::lease`]).
async fn purge_loop(engine: Engine, mut stop: watch::Receiver<bool>) {
    let mut held = false;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(PURGE_EVERY) => {}
        }
        match engine.hold_lease("purge", PURGE_LEASE).await {
            Ok(true) => {
                if !held {
                    tracing::debug!(node = engine.node(), "this node sweeps expired operations");
                }
                held = true;
            }
            Ok(false) => {
                held = false;
                continue;
            }
            Err(e) => {
                dps_core::warn_limited!("purge", error = %e, "the purge lease cannot be read");
                continue;
            }
        }
        match engine.purge_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(purged = n, "expired operations removed"),
            Err(e) => dps_core::warn_limited!("purge", error = %e, "purging expired operations failed"),
        }
    }
}
