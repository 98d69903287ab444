//! The continuation token of a listing page, shared by every store here: the base64url of
//! the last key of the page (opaque to clients).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use dps_core::store::StoreError;

/// The token that continues a listing after `key`.
pub(crate) fn encode(key: &str) -> String {
    B64URL.encode(key.as_bytes())
}

/// The key a token continues after; a token this server did not issue is refused.
pub(crate) fn decode(token: Option<&str>) -> Result<Option<String>, StoreError> {
    token
        .map(|c| {
            B64URL
                .decode(c)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| StoreError::Corrupt("the continuation token was not issued by this server".into()))
        })
        .transpose()
}
