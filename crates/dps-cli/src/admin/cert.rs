//! `dps cert …` with a connection string: the same actions as on the store, through the
//! service API's certificate routes, so they work against a remote node.

use dps_server::admin::CertAction;
use serde_json::{json, Value};

use super::client::ServiceApi;
use super::login::LoginArgs;
use super::AdminError;

/// Runs a certificate action through the service API; returns what the service answered.
pub async fn via_service(login: LoginArgs, action: CertAction) -> Result<Value, AdminError> {
    let api = ServiceApi::new(login.resolve()?)?;
    Ok(match action {
        CertAction::Add { name, certificate, verified } => {
            api.put(&["certificates", &name], &json!({"certificate": certificate, "isVerified": verified}), None)
                .await?
        }
        CertAction::List => api.get(&["certificates"]).await?,
        CertAction::Show { name } => api.get(&["certificates", &name]).await?,
        CertAction::VerificationCode { name } => {
            api.post(&["certificates", &name, "generateVerificationCode"], &json!({}), None).await?
        }
        CertAction::Verify { name, certificate } => {
            api.post(&["certificates", &name, "verify"], &json!({"certificate": certificate}), None).await?
        }
        CertAction::Remove { name } => {
            api.delete(&["certificates", &name], None).await?;
            json!({"removed": name})
        }
    })
}
