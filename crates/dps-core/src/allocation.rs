//! Allocation: choosing the IoT hub a device is assigned to (docs/protocol-notes.md §10.2).
//!
//! Candidates are the enrollment's `iotHubs` (or its legacy `iotHubHostName`) when it names
//! any, else every linked hub whose `applyAllocationPolicy` is true. `hashed` picks among the
//! candidates with weighted rendezvous hashing of the registration ID: the same device lands
//! on the same hub every time, hubs receive devices in proportion to `allocationWeight`, and
//! adding or removing a hub only moves the devices that must move.

use dps_proto::service::AllocationPolicy;
use sha2::{Digest, Sha256};

/// A hub devices can be assigned to, from the server configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedHub {
    /// Host name, e.g. `hub-1.example.net`.
    pub host_name: String,
    /// Relative share of devices under `hashed` (1–1000).
    pub allocation_weight: u32,
    /// Whether the hub takes part when an enrollment names no hubs.
    pub apply_allocation_policy: bool,
    /// Region the hub is in, for `geoLatency`.
    pub region: Option<String>,
}

/// Why no hub could be chosen. Maps to DPS error 400208.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    /// The enrollment names a hub that is not linked.
    #[error("the enrollment names IoT hub '{hub}', which is not a linked hub (linked: {linked})")]
    UnknownHub {
        /// The hub named.
        hub: String,
        /// The linked hubs.
        linked: String,
    },
    /// No candidate hub.
    #[error("no linked IoT hub takes part in allocation; link a hub in the [[hubs]] section of the config or name one in the enrollment's iotHubs")]
    NoCandidates,
    /// `static` without exactly one hub.
    #[error(
        "static allocation needs the enrollment to name exactly one IoT hub (iotHubs or iotHubHostName); it names {0}"
    )]
    StaticNeedsOneHub(usize),
    /// A policy this engine cannot run here.
    #[error("{0}")]
    Unsupported(String),
}

/// The hubs an enrollment may be assigned to.
pub fn candidates<'a>(
    linked: &'a [LinkedHub],
    enrollment_hubs: Option<&[String]>,
    legacy_hub: Option<&str>,
) -> Result<(Vec<&'a LinkedHub>, bool), AllocationError> {
    let named: Vec<&str> = match (enrollment_hubs, legacy_hub) {
        (Some(hubs), _) if !hubs.is_empty() => hubs.iter().map(String::as_str).collect(),
        (_, Some(h)) if !h.is_empty() => vec![h],
        _ => Vec::new(),
    };
    if named.is_empty() {
        let all: Vec<&LinkedHub> = linked.iter().filter(|h| h.apply_allocation_policy).collect();
        if all.is_empty() {
            return Err(AllocationError::NoCandidates);
        }
        return Ok((all, false));
    }
    let mut out = Vec::with_capacity(named.len());
    for name in named {
        let hub = find_linked(linked, name)
            .ok_or_else(|| AllocationError::UnknownHub { hub: name.to_string(), linked: linked_names(linked) })?;
        if !out.iter().any(|h: &&LinkedHub| std::ptr::eq(*h, hub)) {
            out.push(hub);
        }
    }
    Ok((out, true))
}

/// Finds a linked hub by host name, case-insensitively.
pub fn find_linked<'a>(linked: &'a [LinkedHub], name: &str) -> Option<&'a LinkedHub> {
    linked.iter().find(|h| h.host_name.eq_ignore_ascii_case(name))
}

/// Comma-separated linked hub names, for messages.
pub fn linked_names(linked: &[LinkedHub]) -> String {
    if linked.is_empty() {
        return "none".into();
    }
    linked.iter().map(|h| h.host_name.as_str()).collect::<Vec<_>>().join(", ")
}

/// Runs a built-in policy. `custom` is handled by the engine's allocation hook.
/// `node_region` is the region of the node serving the request, for `geoLatency`.
pub fn allocate<'a>(
    policy: AllocationPolicy,
    candidates: &[&'a LinkedHub],
    named_by_enrollment: bool,
    registration_id: &str,
    node_region: Option<&str>,
) -> Result<&'a LinkedHub, AllocationError> {
    match policy {
        AllocationPolicy::Static => match (named_by_enrollment, candidates) {
            (true, [only]) => Ok(only),
            (true, many) => Err(AllocationError::StaticNeedsOneHub(many.len())),
            (false, _) => Err(AllocationError::StaticNeedsOneHub(0)),
        },
        AllocationPolicy::Hashed => hashed(candidates, registration_id).ok_or(AllocationError::NoCandidates),
        // A self-hosted server has no latency map: hubs in the serving node's region are the
        // nearest; among them (or among all, when none is) weighted hashing decides.
        AllocationPolicy::GeoLatency => {
            let local: Vec<&LinkedHub> = match node_region {
                Some(region) => candidates
                    .iter()
                    .copied()
                    .filter(|h| h.region.as_deref().is_some_and(|r| r.eq_ignore_ascii_case(region)))
                    .collect(),
                None => Vec::new(),
            };
            let pool = if local.is_empty() { candidates } else { &local[..] };
            hashed(pool, registration_id).ok_or(AllocationError::NoCandidates)
        }
        AllocationPolicy::Custom => {
            Err(AllocationError::Unsupported("custom allocation is not available in this version of dps-rs".into()))
        }
    }
}

/// Weighted rendezvous hashing: each hub scores `weight / -ln(u)` with `u` a uniform
/// number derived from SHA-256(hub ‖ registration ID); the highest score wins. Both names
/// are compared case-insensitively.
pub fn hashed<'a>(candidates: &[&'a LinkedHub], registration_id: &str) -> Option<&'a LinkedHub> {
    let id = registration_id.to_ascii_lowercase();
    candidates
        .iter()
        .map(|hub| (score(hub, &id), *hub))
        .max_by(|a, b| a.0.total_cmp(&b.0).then_with(|| b.1.host_name.cmp(&a.1.host_name)))
        .map(|(_, hub)| hub)
}

fn score(hub: &LinkedHub, id_lower: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(hub.host_name.to_ascii_lowercase().as_bytes());
    h.update([0u8]);
    h.update(id_lower.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // u in (0, 1): never 0, never 1.
    let u = ((u64::from_be_bytes(first) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(hub.allocation_weight.max(1)) / -u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(name: &str, weight: u32, apply: bool) -> LinkedHub {
        LinkedHub { host_name: name.into(), allocation_weight: weight, apply_allocation_policy: apply, region: None }
    }

    #[test]
    fn same_device_same_hub_every_time() {
        let hubs = [hub("a", 1, true), hub("b", 1, true), hub("c", 1, true)];
        let c: Vec<&LinkedHub> = hubs.iter().collect();
        for i in 0..200 {
            let id = format!("device-{i}");
            let first = hashed(&c, &id).unwrap().host_name.clone();
            for _ in 0..3 {
                assert_eq!(hashed(&c, &id).unwrap().host_name, first);
            }
            // Case-insensitive registration IDs land on the same hub.
            assert_eq!(hashed(&c, &id.to_uppercase()).unwrap().host_name, first);
            // Order of candidates does not matter.
            let rev: Vec<&LinkedHub> = hubs.iter().rev().collect();
            assert_eq!(hashed(&rev, &id).unwrap().host_name, first);
        }
    }

    /// Over 10,000 registration IDs, each hub's share is within 2 percentage points of
    /// weight / total weight.
    #[test]
    fn weights_are_honoured_within_tolerance() {
        let hubs = [hub("a", 1, true), hub("b", 2, true), hub("c", 7, true)];
        let c: Vec<&LinkedHub> = hubs.iter().collect();
        let n = 10_000;
        let mut counts = [0usize; 3];
        for i in 0..n {
            let h = hashed(&c, &format!("reg-{i:05}")).unwrap();
            counts[hubs.iter().position(|x| x == h).unwrap()] += 1;
        }
        for (i, want) in [0.1, 0.2, 0.7].iter().enumerate() {
            let got = counts[i] as f64 / n as f64;
            assert!((got - want).abs() < 0.02, "hub {i}: {got} vs {want} ({counts:?})");
        }
    }

    #[test]
    fn removing_a_hub_moves_only_its_devices() {
        let hubs = [hub("a", 1, true), hub("b", 1, true), hub("c", 1, true)];
        let all: Vec<&LinkedHub> = hubs.iter().collect();
        let without_c: Vec<&LinkedHub> = hubs[..2].iter().collect();
        for i in 0..1000 {
            let id = format!("d{i}");
            let before = hashed(&all, &id).unwrap();
            if before.host_name != "c" {
                assert_eq!(hashed(&without_c, &id).unwrap(), before);
            }
        }
    }

    #[test]
    fn candidates_follow_the_enrollment() {
        let hubs = [hub("a", 1, true), hub("b", 1, false), hub("c", 1, true)];
        let (c, named) = candidates(&hubs, None, None).unwrap();
        assert!(!named);
        assert_eq!(c.iter().map(|h| h.host_name.as_str()).collect::<Vec<_>>(), ["a", "c"]);
        // A hub outside the policy can still be named explicitly.
        let (c, named) = candidates(&hubs, Some(&["B".to_string()]), None).unwrap();
        assert!(named);
        assert_eq!(c[0].host_name, "b");
        let (c, _) = candidates(&hubs, None, Some("c")).unwrap();
        assert_eq!(c[0].host_name, "c");
        let err = candidates(&hubs, Some(&["zz".to_string()]), None).unwrap_err();
        assert!(err.to_string().contains("'zz'") && err.to_string().contains("a, b, c"), "{err}");
        let none = [hub("x", 1, false)];
        assert_eq!(candidates(&none, None, None).unwrap_err(), AllocationError::NoCandidates);
    }

    #[test]
    fn geo_latency_prefers_the_node_region() {
        let mut hubs = [hub("eu-1", 1, true), hub("eu-2", 1, true), hub("us-1", 5, true)];
        hubs[0].region = Some("westeurope".into());
        hubs[1].region = Some("WestEurope".into());
        hubs[2].region = Some("eastus".into());
        let c: Vec<&LinkedHub> = hubs.iter().collect();
        let mut seen = std::collections::HashSet::new();
        for i in 0..200 {
            let id = format!("d{i}");
            let h = allocate(AllocationPolicy::GeoLatency, &c, false, &id, Some("westeurope")).unwrap();
            assert!(h.host_name.starts_with("eu-"), "{}", h.host_name);
            seen.insert(h.host_name.clone());
            // No hub in the node's region, or no region configured: weighted hashing over all.
            let any = allocate(AllocationPolicy::GeoLatency, &c, false, &id, Some("mars")).unwrap();
            assert_eq!(any, hashed(&c, &id).unwrap());
            assert_eq!(allocate(AllocationPolicy::GeoLatency, &c, false, &id, None).unwrap(), any);
        }
        assert_eq!(seen.len(), 2, "both hubs of the region are used");
    }

    #[test]
    fn static_needs_exactly_one_named_hub() {
        let hubs = [hub("a", 1, true), hub("b", 1, true)];
        let (c, named) = candidates(&hubs, Some(&["b".to_string()]), None).unwrap();
        assert_eq!(allocate(AllocationPolicy::Static, &c, named, "d", None).unwrap().host_name, "b");
        let (c, named) = candidates(&hubs, None, None).unwrap();
        assert_eq!(
            allocate(AllocationPolicy::Static, &c, named, "d", None).unwrap_err(),
            AllocationError::StaticNeedsOneHub(0)
        );
        let (c, named) = candidates(&hubs, Some(&["a".into(), "b".into()]), None).unwrap();
        assert_eq!(
            allocate(AllocationPolicy::Static, &c, named, "d", None).unwrap_err(),
            AllocationError::StaticNeedsOneHub(2)
        );
    }
}
