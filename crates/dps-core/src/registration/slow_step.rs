//! The one mechanism for a slow step of a registration — the custom allocation webhook and the
//! hub registrar: the step runs in a task of its own that outlives the request; when it
//! finishes within `webhook_inline_wait_ms` the device gets its final state at once (one
//! write), else the operation is recorded as `assigning` with a deadline and the device polls
//! until the task records the result. A server that stops during the step leaves that
//! `assigning` record behind; a poll after its deadline reports the registration failed
//! (`operation.rs`), so devices never poll forever. Nothing is answered before it is written.

use std::future::Future;

use dps_proto::device::{DeviceRegistrationResult, RegistrationOperationStatus, RegistrationStatus};

use super::register::Pending;
use crate::engine::DeviceRuntime;
use crate::error::Error;
use crate::store::{Condition, StoreError};

impl DeviceRuntime {
    /// Runs `step` for `pending` (registered at `started`, Unix ms). The step must end by
    /// writing the operation's final state unconditionally (it may overwrite `assigning`), and
    /// returns that state. The answer is the final state when the step finished within the
    /// inline budget, else the `assigning` state that was recorded.
    pub(super) async fn finish_slow_step<F, Fut>(
        &self,
        pending: Pending,
        started: i64,
        step: F,
    ) -> Result<RegistrationOperationStatus, Error>
    where
        F: FnOnce(DeviceRuntime, Pending) -> Fut,
        Fut: Future<Output = Result<RegistrationOperationStatus, Error>> + Send + 'static,
    {
        let assigning = RegistrationOperationStatus {
            operation_id: pending.operation_id.clone(),
            status: RegistrationStatus::Assigning,
            registration_state: Some(DeviceRegistrationResult::bare(
                &pending.registration_id,
                RegistrationStatus::Assigning,
            )),
        };
        // The webhook's timeout, the hub registrar's budget, and a margin.
        let registrar_secs = self.registrar.as_ref().map_or(0, |r| r.budget().as_secs());
        let grace = i64::try_from(self.settings.webhook_timeout_secs.saturating_add(registrar_secs))
            .unwrap_or(3600)
            .saturating_add(30)
            * 1000;
        let assigning_op = pending.operation(assigning.clone(), Some(started.saturating_add(grace)));
        let assigning_write = self.put_operation(&pending.operation_id, &assigning_op, Condition::IfAbsent)?;
        let registration_id = pending.registration_id.clone();
        let work = step(self.clone(), pending);
        let mut task = tokio::spawn(async move {
            let result = work.await;
            if let Err(e) = &result {
                crate::warn_limited!("allocation-record", registration_id = %registration_id, error = %e,
                    "the registration's slow step (webhook, hub) could not be recorded");
            }
            result
        });
        let wait = std::time::Duration::from_millis(self.settings.webhook_inline_wait_ms);
        let joined = match tokio::time::timeout(wait, &mut task).await {
            Ok(joined) => joined,
            Err(_) => match self.store.write(vec![assigning_write]).await {
                Ok(()) => return Ok(assigning),
                // The task recorded the final state in the meantime: answer with it.
                Err(StoreError::AlreadyExists(_)) => task.await,
                Err(e) => return Err(e.into()),
            },
        };
        match joined {
            Ok(result) => result,
            Err(join) => Err(Error::Internal(format!("the registration's slow step failed: {join}"))),
        }
    }
}
