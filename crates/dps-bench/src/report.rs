//! What a run measured, as JSON (`--json`) and as text.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
}

impl Latency {
    /// Percentiles of `micros` (sorted in place).
    pub fn of(micros: &mut [u32]) -> Latency {
        micros.sort_unstable();
        let at = |p: f64| {
            if micros.is_empty() {
                return 0.0;
            }
            let i = ((micros.len() as f64 - 1.0) * p).round() as usize;
            f64::from(micros[i.min(micros.len() - 1)]) / 1000.0
        };
        Latency { p50: at(0.5), p90: at(0.9), p99: at(0.99), max: at(1.0) }
    }
}

/// One measured phase: the devices against dps, or the same against the ceiling server.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseReport {
    /// Devices attempted.
    pub devices: usize,
    /// Devices that ended `assigned` (and, with custom allocation, got the payload back).
    pub assigned: usize,
    /// Failures by kind: DPS error code, HTTP status, I/O error kind.
    pub errors: BTreeMap<String, u64>,
    /// The first message of each failure kind.
    pub error_examples: BTreeMap<String, String>,
    /// Wall-clock time of the phase, seconds.
    pub seconds: f64,
    /// Assigned devices per second.
    pub per_second: f64,
    /// Per-device latency (from the device's scheduled start to its final answer; in a split
    /// TPM run, the sum of its two requests' times, the work between them left out).
    pub latency_ms: Latency,
    /// A split TPM run (`--tpm-split`): its steps, and the device-side work done between
    /// its two timed phases, which `seconds` and `per_second` leave out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm_split: Option<TpmSplit>,
}

/// The steps of a split TPM run. Between its two timed phases, every software TPM opens the
/// blob its challenge delivered (two RSA-2048 private-key operations) and signs its token,
/// off the clock.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TpmSplit {
    /// Wall-clock seconds of the first timed phase (every device's challenge request).
    pub challenge_seconds: f64,
    /// CPU seconds dps used in it (the rest of `cpu.dps_seconds` is the proofs').
    pub challenge_dps_cpu_seconds: Option<f64>,
    /// Wall-clock seconds of the untimed step (on every core of this machine).
    pub off_clock_seconds: f64,
    /// CPU seconds the load generator used in it (left out of `cpu.bench_seconds`).
    pub off_clock_bench_cpu_seconds: f64,
    /// CPU seconds dps used meanwhile (left out of `cpu.dps_seconds`; it only sees the
    /// first phase's connections close then).
    pub off_clock_dps_cpu_seconds: Option<f64>,
    /// CPU seconds the `postgres` processes used meanwhile (left out of
    /// `cpu.database_seconds`).
    pub off_clock_database_cpu_seconds: Option<f64>,
}

/// CPU time used during the dps phase (user + system).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cpu {
    /// Seconds of CPU the dps process used.
    pub dps_seconds: f64,
    /// dps CPU per assigned device, microseconds.
    pub dps_us_per_device: f64,
    /// Seconds of CPU the load generator (this process) used.
    pub bench_seconds: f64,
    /// Seconds of CPU every `postgres` process on this machine used (the database, when it
    /// runs here; anything else it serves counts too).
    pub database_seconds: Option<f64>,
    /// That per assigned device, microseconds.
    pub database_us_per_device: Option<f64>,
    /// dps nodes the load was spread over (their CPU is summed in `dps_seconds`).
    pub nodes: usize,
}

/// Server memory figures, MiB.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    /// Resident before the measured phase.
    pub rss_before_mib: f64,
    /// Highest resident size sampled during the phase.
    pub rss_peak_during_mib: f64,
    /// Resident after it.
    pub rss_after_mib: f64,
    /// The process's high-water mark (VmHWM) at the end.
    pub hwm_mib: f64,
}

/// The whole report of one `dps bench` run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchReport {
    /// `https`, `https-new-conn` or `mqtt`.
    pub transport: String,
    /// `individual`, `group`, `x509` or `tpm`.
    pub attestation: String,
    /// `hashed`, `webhook` or `rules://<name>`.
    pub allocation: String,
    /// Registration payload size, bytes (0: none).
    pub payload_bytes: usize,
    /// Devices registered.
    pub devices: usize,
    /// Devices in flight at once.
    pub concurrency: usize,
    /// Target rate, devices per second (open loop), when set.
    pub rate: Option<f64>,
    /// Time spent creating enrollments and certificates before the run, seconds.
    pub setup_seconds: f64,
    /// Individual enrollments created for the run.
    pub enrollments_created: usize,
    /// The run against dps.
    pub dps: PhaseReport,
    /// The same run against the ceiling server, when measured.
    pub ceiling: Option<PhaseReport>,
    /// dps's throughput as a share of the ceiling's.
    pub ratio_to_ceiling: Option<f64>,
    /// dps memory, when its process is on this machine.
    pub server_memory: Option<Memory>,
    /// CPU time used during the dps phase, when dps runs on this machine.
    pub cpu: Option<Cpu>,
    /// CPU cores of this machine.
    pub cores: usize,
    /// Key algorithm of the server certificate, when known.
    pub server_key: Option<String>,
    /// The linked hubs' registrar (`record`, `mosquitto`, `azure-iot-hub`), when the bench
    /// started the dps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub_registrar: Option<String>,
    /// With `--metrics`: the registrations the started dps counted in
    /// `dps_registrations_total`, scraped after the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_registrations: Option<u64>,
    /// With `--events-nats`: lifecycle events in the run's JetStream stream once delivery
    /// settled, and how long after the run's end the last one arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<EventsReport>,
}

/// Lifecycle events of a run (`--events-nats`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EventsReport {
    /// Messages in the stream.
    pub delivered: u64,
    /// Seconds from the end of the timed phase until the count stopped growing.
    pub settled_after_seconds: f64,
}

fn phase_text(out: &mut String, name: &str, p: &PhaseReport) {
    let _ = writeln!(
        out,
        "{name:<8} {}/{} assigned in {:.2} s: {:.0}/s; latency ms p50 {:.1} p90 {:.1} p99 {:.1} max {:.1}",
        p.assigned,
        p.devices,
        p.seconds,
        p.per_second,
        p.latency_ms.p50,
        p.latency_ms.p90,
        p.latency_ms.p99,
        p.latency_ms.max
    );
    if let Some(t) = &p.tpm_split {
        let _ = writeln!(
            out,
            "         of which challenges {:.2} s{}; not counted: {:.2} s between the challenges and the proofs, the load generator opening the blobs ({:.1} s CPU)",
            t.challenge_seconds,
            t.challenge_dps_cpu_seconds.map(|c| format!(" (dps CPU {c:.1} s)")).unwrap_or_default(),
            t.off_clock_seconds,
            t.off_clock_bench_cpu_seconds
        );
    }
    for (k, n) in &p.errors {
        let _ = writeln!(
            out,
            "         {n} failed: {k} (first: {})",
            p.error_examples.get(k).map(String::as_str).unwrap_or("")
        );
    }
}

impl BenchReport {
    /// The report as text lines.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} devices over {}, {} attestation, {} allocation, payload {} bytes, {} in flight{}; {} cores{}",
            self.devices,
            self.transport,
            self.attestation,
            self.allocation,
            self.payload_bytes,
            self.concurrency,
            self.rate.map(|r| format!(", at {r:.0}/s")).unwrap_or_default(),
            self.cores,
            self.server_key.as_deref().map(|k| format!("; server key {k}")).unwrap_or_default()
        );
        if let Some(r) = &self.hub_registrar {
            let _ = writeln!(out, "hubs     registrar {r}");
        }
        if let Some(n) = self.metrics_registrations {
            let _ = writeln!(out, "metrics  on; dps_registrations_total after the run: {n}");
        }
        if let Some(e) = &self.events {
            let _ = writeln!(
                out,
                "events   {} in JetStream, the last {:.2} s after the run",
                e.delivered, e.settled_after_seconds
            );
        }
        if self.enrollments_created > 0 || self.setup_seconds > 0.5 {
            let _ = writeln!(
                out,
                "setup    {} enrollments created in {:.1} s",
                self.enrollments_created, self.setup_seconds
            );
        }
        phase_text(&mut out, "dps", &self.dps);
        if let Some(c) = &self.ceiling {
            phase_text(&mut out, "ceiling", c);
        }
        if let Some(r) = self.ratio_to_ceiling {
            let _ = writeln!(out, "ratio    dps does {:.0}% of the ceiling's throughput", r * 100.0);
        }
        if let Some(c) = &self.cpu {
            let nodes = if c.nodes > 1 { format!(" over {} nodes", c.nodes) } else { String::new() };
            let _ = writeln!(
                out,
                "cpu      dps {:.1} s{nodes} ({:.0} µs per device), load generator {:.1} s",
                c.dps_seconds, c.dps_us_per_device, c.bench_seconds
            );
            if let (Some(s), Some(us)) = (c.database_seconds, c.database_us_per_device) {
                let _ = writeln!(out, "cpu      postgres processes {s:.1} s ({us:.0} µs per device)");
            }
        }
        if let Some(m) = &self.server_memory {
            let _ = writeln!(
                out,
                "memory   dps RSS {:.0} MiB before, {:.0} MiB peak during, {:.0} MiB after (high-water mark {:.0} MiB)",
                m.rss_before_mib, m.rss_peak_during_mib, m.rss_after_mib, m.hwm_mib
            );
        }
        out
    }

    /// Whether every device of every phase was assigned.
    pub fn is_clean(&self) -> bool {
        self.dps.errors.is_empty()
            && self.dps.assigned == self.dps.devices
            && self.ceiling.as_ref().is_none_or(|c| c.errors.is_empty() && c.assigned == c.devices)
    }
}
