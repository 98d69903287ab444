//! The reprovisioning plan: what a registration does with the device's current assignment,
//! as a pure function of the facts (the table in docs/allocation.md, "Re-registration and
//! reprovisioning"). The register path asks [`stays`] before allocating and [`plan`] after.

use dps_proto::device::RegistrationSubstatus;
use dps_proto::service::ReprovisionPolicy;

/// The device's current assignment, as its registration state records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Current<'a> {
    /// The hub the device is assigned to.
    pub hub: &'a str,
    /// The first hub it was ever assigned to (older records may not have it: then `hub`).
    pub first_hub: Option<&'a str>,
    /// The substatus of the current assignment.
    pub substatus: Option<RegistrationSubstatus>,
}

/// What happens to the device's data (initial twin, device ID) on the hub it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceData {
    /// The current assignment's twin and device ID are kept.
    Keep,
    /// Fresh ones: the allocation's twin (webhook, else enrollment) and the enrollment's
    /// device ID.
    Fresh,
}

/// The outcome of a registration that got a hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The substatus the device is told.
    pub substatus: RegistrationSubstatus,
    /// What happens to its data.
    pub device_data: DeviceData,
    /// The first hub it was ever assigned to, from now on.
    pub first_hub: String,
}

/// The assignment a registration starts from: none for a device never assigned, or when the
/// registration forces an initial assignment (`forceRegistration`).
pub fn starting_point(current: Option<Current<'_>>, force: bool) -> Option<Current<'_>> {
    current.filter(|_| !force)
}

/// Whether the device stays on its current hub without allocation ("never reprovision":
/// `updateHubAssignment: false`). A custom webhook is then offered only that hub.
pub fn stays(current: Option<Current<'_>>, policy: &ReprovisionPolicy) -> bool {
    current.is_some() && !policy.update_hub_assignment
}

/// The plan for a registration that was allocated `new_hub`, starting from `current` (see
/// [`starting_point`]):
///
/// | current hub | new hub | migrateDeviceData | substatus | device data |
/// |---|---|---|---|---|
/// | none | any | – | initialAssignment | fresh |
/// | A | A | true, or never reprovision | unchanged | kept |
/// | A | A | false | deviceDataReset | fresh |
/// | A | the first hub ever | – | reprovisionedToInitialAssignment | kept if migrating, else fresh |
/// | A | B | true | deviceDataMigrated | kept |
/// | A | B | false | deviceDataReset | fresh |
///
/// Hub names compare case-insensitively.
pub fn plan(current: Option<Current<'_>>, new_hub: &str, policy: &ReprovisionPolicy) -> Plan {
    let Some(current) = current else {
        return Plan {
            substatus: RegistrationSubstatus::InitialAssignment,
            device_data: DeviceData::Fresh,
            first_hub: new_hub.to_string(),
        };
    };
    let first_hub = current.first_hub.unwrap_or(current.hub).to_string();
    let migrate = if policy.migrate_device_data { DeviceData::Keep } else { DeviceData::Fresh };
    if new_hub.eq_ignore_ascii_case(current.hub) {
        if policy.update_hub_assignment && !policy.migrate_device_data {
            return Plan {
                substatus: RegistrationSubstatus::DeviceDataReset,
                device_data: DeviceData::Fresh,
                first_hub,
            };
        }
        return Plan {
            substatus: current.substatus.unwrap_or(RegistrationSubstatus::InitialAssignment),
            device_data: DeviceData::Keep,
            first_hub,
        };
    }
    let substatus = if first_hub.eq_ignore_ascii_case(new_hub) {
        RegistrationSubstatus::ReprovisionedToInitialAssignment
    } else if policy.migrate_device_data {
        RegistrationSubstatus::DeviceDataMigrated
    } else {
        RegistrationSubstatus::DeviceDataReset
    };
    Plan { substatus, device_data: migrate, first_hub }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RegistrationSubstatus::*;

    fn policy(update: bool, migrate: bool) -> ReprovisionPolicy {
        ReprovisionPolicy { update_hub_assignment: update, migrate_device_data: migrate }
    }

    /// The device is on hub `a` (first assigned to `first`, currently `substatus`).
    fn on<'a>(first: &'a str, substatus: RegistrationSubstatus) -> Current<'a> {
        Current { hub: "a", first_hub: Some(first), substatus: Some(substatus) }
    }

    /// Every combination of policy × (none, same hub, other hub, first hub) × force.
    #[test]
    fn the_whole_table() {
        use DeviceData::{Fresh, Keep};
        // (update, migrate, current, force, new hub) -> (substatus, device data, first hub)
        let first = on("z", DeviceDataMigrated);
        type Row<'a> = ((bool, bool, Option<Current<'a>>, bool, &'a str), (RegistrationSubstatus, DeviceData, &'a str));
        let mut rows: Vec<Row<'_>> = Vec::new();
        for (update, migrate) in [(true, true), (true, false), (false, true), (false, false)] {
            let kept = if migrate { Keep } else { Fresh };
            // Never assigned, or forced: an initial assignment wherever it lands.
            for force in [false, true] {
                rows.push(((update, migrate, None, force, "b"), (InitialAssignment, Fresh, "b")));
            }
            rows.push(((update, migrate, Some(first), true, "a"), (InitialAssignment, Fresh, "a")));
            rows.push(((update, migrate, Some(first), true, "z"), (InitialAssignment, Fresh, "z")));
            // The same hub: unchanged and kept, unless this is a reset.
            let same = if update && !migrate { (DeviceDataReset, Fresh, "z") } else { (DeviceDataMigrated, Keep, "z") };
            rows.push(((update, migrate, Some(first), false, "a"), same));
            rows.push(((update, migrate, Some(first), false, "A"), same));
            // Another hub: migrated or reset; back on the first hub ever: reprovisioned there.
            let other = if migrate { DeviceDataMigrated } else { DeviceDataReset };
            rows.push(((update, migrate, Some(first), false, "b"), (other, kept, "z")));
            rows.push(((update, migrate, Some(first), false, "Z"), (ReprovisionedToInitialAssignment, kept, "z")));
        }
        for ((update, migrate, current, force, new_hub), (substatus, device_data, first_hub)) in rows {
            let p = policy(update, migrate);
            let start = starting_point(current, force);
            let got = plan(start, new_hub, &p);
            assert_eq!(
                got,
                Plan { substatus, device_data, first_hub: first_hub.to_string() },
                "update={update} migrate={migrate} current={current:?} force={force} new={new_hub}"
            );
        }
    }

    #[test]
    fn an_unchanged_assignment_keeps_its_substatus() {
        for s in [InitialAssignment, DeviceDataMigrated, DeviceDataReset, ReprovisionedToInitialAssignment] {
            assert_eq!(plan(Some(on("z", s)), "a", &policy(true, true)).substatus, s);
        }
        let none = Current { hub: "a", first_hub: None, substatus: None };
        assert_eq!(plan(Some(none), "a", &policy(true, true)).substatus, InitialAssignment);
    }

    #[test]
    fn a_record_without_its_first_hub_counts_the_current_one() {
        let old = Current { hub: "a", first_hub: None, substatus: Some(InitialAssignment) };
        let back = plan(Some(old), "b", &policy(true, true));
        assert_eq!((back.substatus, back.first_hub.as_str()), (DeviceDataMigrated, "a"));
    }

    #[test]
    fn only_never_reprovision_stays() {
        let c = Some(on("z", InitialAssignment));
        assert!(stays(c, &policy(false, true)) && stays(c, &policy(false, false)));
        assert!(!stays(c, &policy(true, true)) && !stays(c, &policy(true, false)));
        assert!(!stays(None, &policy(false, true)), "nothing to stay on");
        assert!(!stays(starting_point(c, true), &policy(false, true)), "forced");
    }
}
