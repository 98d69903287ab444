//! `GET /openapi.json`: the OpenAPI 3.1 document of the service API and the device API
//! (`docs/openapi.json`, built in), without authentication. CI checks that the server does
//! what it says (tests/openapi).

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use super::response::json_bytes;
use super::Call;

/// The document, as kept in the repository.
pub const DOCUMENT: &str = include_str!("../../../../docs/openapi.json");

/// `GET /openapi.json`.
pub(crate) fn document(call: &Call) -> Response<Full<Bytes>> {
    json_bytes(StatusCode::OK, Bytes::from_static(DOCUMENT.as_bytes()), &call.request_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_json_naming_every_route() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).expect("docs/openapi.json is JSON");
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1")), "{}", doc["openapi"]);
        let paths = doc["paths"].as_object().expect("paths");
        for p in [
            "/enrollments/{registrationId}",
            "/enrollmentGroups/{enrollmentGroupId}",
            "/healthz",
            "/readyz",
            "/openapi.json",
        ] {
            assert!(paths.keys().any(|k| k.eq_ignore_ascii_case(p)), "{p} is not in the document");
        }
    }
}
