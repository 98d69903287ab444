//! The continuation token of a listing page, shared by every store here: the base64url of
//! the last key of the page (opaque to clients).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use dps_core::store::{Document, Page, StoreError};

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

/// The page of `rows` (documents with their keys, in key order, fetched with one more than
/// `limit` so that a further page shows): at most `limit` documents, and a token after the
/// last one when more follow.
pub(crate) fn page(mut rows: Vec<(Document, String)>, limit: usize) -> Page {
    let continuation = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|(_, key)| encode(key))
    } else {
        None
    };
    Page { documents: rows.into_iter().map(|(d, _)| d).collect(), continuation }
}
