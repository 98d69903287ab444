//! What can go wrong in an admin command, and the exit code of each.

use std::process::ExitCode;

use serde_json::Value;

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The command line, a file it names, or the login cannot be used (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The service could not be reached: connection, TLS or timeout (exit 3).
    #[error("{0}")]
    Unreachable(String),
    /// The service answered something this client does not understand (exit 3).
    #[error("{0}")]
    Protocol(String),
    /// The service refused the request with a DPS error (exit 1).
    #[error("{what}: {status} {code}: {message}{hint}{tracking}")]
    Refused {
        /// Method and path.
        what: String,
        /// HTTP status.
        status: u16,
        /// DPS error code (`status × 1000 + detail`), 0 when the body had none.
        code: u64,
        /// The service's message.
        message: String,
        /// What to do about it, when this client knows.
        hint: String,
        /// `(tracking ID …)` to quote to the operator.
        tracking: String,
    },
}

impl AdminError {
    /// A transport failure of a request to `base`.
    pub fn unreachable(base: &str, e: &reqwest::Error) -> AdminError {
        let mut cause = String::new();
        let mut source: Option<&dyn std::error::Error> = Some(e);
        while let Some(s) = source {
            cause = s.to_string();
            source = s.source();
        }
        let what = if e.is_timeout() {
            "did not answer in time"
        } else if e.is_connect() {
            "cannot be reached"
        } else {
            "failed"
        };
        AdminError::Unreachable(format!(
            "the service at {base} {what}: {cause} (check the connection string's HostName, --connect-to and --ca-file)"
        ))
    }

    /// A DPS error body answered to `what`.
    pub fn refused(what: &str, status: u16, body: &Value) -> AdminError {
        let code = body["errorCode"].as_u64().unwrap_or(0);
        let message = body["message"].as_str().unwrap_or("(no message)").to_string();
        let hint = match status {
            401 => "; check the connection string's SharedAccessKeyName and SharedAccessKey",
            403 => "; the policy lacks the right this needs (EnrollmentRead, EnrollmentWrite, RegistrationStatusRead, RegistrationStatusWrite or ServiceConfig)",
            412 => "; it changed since that ETag was read: show it again and retry with the new ETag",
            _ => "",
        };
        let tracking = body["trackingId"].as_str().map(|t| format!(" (tracking ID {t})")).unwrap_or_default();
        AdminError::Refused { what: what.to_string(), status, code, message, hint: hint.to_string(), tracking }
    }

    /// The process exit code.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            AdminError::Refused { .. } => ExitCode::from(1),
            AdminError::Usage(_) => ExitCode::from(2),
            AdminError::Unreachable(_) | AdminError::Protocol(_) => ExitCode::from(3),
        }
    }
}
