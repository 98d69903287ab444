//! Timestamps in the form DPS uses on the wire: ISO 8601 UTC with seven fractional digits
//! (`2026-11-24T21:57:31.5850000Z`).

use time::{format_description::well_known::Rfc3339, OffsetDateTime};

/// Formats a time as DPS does.
pub fn format(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond() / 100
    )
}

/// Formats Unix milliseconds as DPS does; out-of-range values clamp to the epoch.
pub fn format_millis(ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format(t)
}

/// Parses an RFC 3339 timestamp.
pub fn parse(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seven_fractional_digits() {
        assert_eq!(format_millis(0), "1970-01-01T00:00:00.0000000Z");
        assert_eq!(format_millis(1_795_561_052_123), "2026-11-24T22:57:32.1230000Z");
        let s = format_millis(1_795_561_052_123);
        assert_eq!(parse(&s).map(|t| t.unix_timestamp()), Some(1_795_561_052));
    }
}
