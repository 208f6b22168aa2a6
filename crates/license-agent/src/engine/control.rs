//! The engine's control channel: what the management socket asks of the engine, carried out
//! between two rounds so that every state change happens in one place. The engine owns the
//! channel; management holds a [`ControlHandle`].

use license_protocol::mgmt::{DegradedSwitch, MgmtErrorCode, StatusView};
use tokio::sync::{mpsc, oneshot};

use super::decide::Override;
use super::round::RotationError;
use super::server::AgentServer;
use super::Engine;

/// Requests queued at most.
const QUEUE: usize = 8;

/// A request to the engine, with where its answer goes.
#[derive(Debug)]
pub enum Control {
    Status(oneshot::Sender<StatusView>),
    Rotate(oneshot::Sender<Result<u64, ControlError>>),
    Invalidate(u64, oneshot::Sender<Result<(), ControlError>>),
    Degraded(
        DegradedSwitch,
        oneshot::Sender<Result<&'static str, ControlError>>,
    ),
    /// Hold (`true`) or release updates; answers whether they are held.
    HoldUpdates(bool, oneshot::Sender<Result<bool, ControlError>>),
}

/// Why a request was not carried out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    #[error("the agent is stopping")]
    Stopping,
    /// Not allowed in this configuration (e.g. degraded mode forbidden by config).
    #[error("{0}")]
    Refused(&'static str),
    #[error(transparent)]
    Rotation(#[from] RotationError),
}

impl ControlError {
    /// The management error code.
    pub fn code(&self) -> MgmtErrorCode {
        match self {
            ControlError::Refused(_) => MgmtErrorCode::Refused,
            ControlError::Stopping | ControlError::Rotation(_) => MgmtErrorCode::Failed,
        }
    }
}

/// Where management sends its requests; cheap to clone.
#[derive(Debug, Clone)]
pub struct ControlHandle(mpsc::Sender<Control>);

/// The engine's end of the channel.
pub type ControlReceiver = mpsc::Receiver<Control>;

/// A new channel: the handle for management, the receiver for the engine's loop.
pub fn channel() -> (ControlHandle, ControlReceiver) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (ControlHandle(tx), rx)
}

impl ControlHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Control,
    ) -> Result<T, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.0
            .send(make(tx))
            .await
            .map_err(|_| ControlError::Stopping)?;
        rx.await.map_err(|_| ControlError::Stopping)
    }

    pub async fn status(&self) -> Result<StatusView, ControlError> {
        self.ask(Control::Status).await
    }

    /// Rotates now; answers once the round is over.
    pub async fn rotate(&self) -> Result<u64, ControlError> {
        self.ask(Control::Rotate).await?
    }

    pub async fn invalidate(&self, version: u64) -> Result<(), ControlError> {
        self.ask(|tx| Control::Invalidate(version, tx)).await?
    }

    /// Holds (`true`) or releases updates; answers whether they are now held.
    pub async fn hold_updates(&self, held: bool) -> Result<bool, ControlError> {
        self.ask(|tx| Control::HoldUpdates(held, tx)).await?
    }

    /// Answers the sentence describing the new mode.
    pub async fn degraded(&self, switch: DegradedSwitch) -> Result<&'static str, ControlError> {
        self.ask(|tx| Control::Degraded(switch, tx)).await?
    }
}

impl<S: AgentServer> Engine<S> {
    /// Carries out a management request.
    pub async fn control(&mut self, request: Control) {
        match request {
            Control::Status(reply) => {
                let _ = reply.send(self.status_view());
            }
            Control::Rotate(reply) => {
                let result = match self.rotate().await {
                    Ok(version) => {
                        if let Err(e) = self.refresh_licenses().await {
                            tracing::warn!(error = %e, "tokens not refreshed after a requested rotation");
                        }
                        Ok(version)
                    }
                    Err(e) => Err(e.into()),
                };
                self.persist().await;
                let _ = reply.send(result);
            }
            Control::Invalidate(version, reply) => {
                self.invalidate(version).await;
                self.persist().await;
                let _ = reply.send(Ok(()));
            }
            Control::Degraded(switch, reply) => {
                let result = match Override::switch(switch, self.settings.degraded_policy) {
                    Ok(chosen) => {
                        self.set_override(chosen);
                        self.write_metrics().await;
                        Ok(chosen.describe())
                    }
                    Err(refusal) => Err(ControlError::Refused(refusal)),
                };
                let _ = reply.send(result);
            }
            Control::HoldUpdates(held, reply) => {
                self.hold_updates(held).await;
                self.persist().await;
                let _ = reply.send(Ok(held));
            }
        }
    }
}
