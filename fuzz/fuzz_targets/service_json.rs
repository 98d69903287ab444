//! Service API bodies: enrollments, groups, bulk operations and query specifications through the
//! strict parser; errors name fields and never panic.
#![no_main]

use dps_proto::json;
use dps_proto::service::{
    BulkEnrollmentGroupOperation, BulkEnrollmentOperation, EnrollmentGroup, IndividualEnrollment, QuerySpecification,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = json::parse::<IndividualEnrollment>(data) {
        let _ = serde_json::to_vec(&e).expect("serialises");
    }
    let _ = json::parse::<EnrollmentGroup>(data);
    let _ = json::parse::<BulkEnrollmentOperation>(data);
    let _ = json::parse::<BulkEnrollmentGroupOperation>(data);
    let _ = json::parse::<QuerySpecification>(data);
});
