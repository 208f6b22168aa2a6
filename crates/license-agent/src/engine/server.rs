//! What a round needs from the license server, as a trait: the real client
//! ([`ServerClient`], mTLS to the agent API) in the daemon, a scripted server in tests.

use std::future::Future;

use license_protocol::agent_api::{MachineLicenses, SecretStatus};
use license_protocol::rotation::{RotateSecretRequest, RotateSecretResponse};

use crate::net::client::{ClientError, ServerClient};

/// The agent API calls of a round (DESIGN.md §3.1).
pub trait AgentServer: Send + Sync {
    /// `GET /api/v1/secret-status`.
    fn secret_status(&self) -> impl Future<Output = Result<SecretStatus, ClientError>> + Send;
    /// `POST /api/v1/rotate-secret`.
    fn rotate_secret(
        &self,
        request: &RotateSecretRequest,
    ) -> impl Future<Output = Result<RotateSecretResponse, ClientError>> + Send;
    /// `POST /api/v1/rotate-secret/ack`.
    fn ack_secret(&self, version: u64) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// `GET /api/v1/licenses`.
    fn licenses(&self) -> impl Future<Output = Result<MachineLicenses, ClientError>> + Send;
}

impl AgentServer for ServerClient {
    async fn secret_status(&self) -> Result<SecretStatus, ClientError> {
        ServerClient::secret_status(self).await
    }

    async fn rotate_secret(
        &self,
        request: &RotateSecretRequest,
    ) -> Result<RotateSecretResponse, ClientError> {
        ServerClient::rotate_secret(self, request).await
    }

    async fn ack_secret(&self, version: u64) -> Result<(), ClientError> {
        ServerClient::ack_secret(self, version).await
    }

    async fn licenses(&self) -> Result<MachineLicenses, ClientError> {
        ServerClient::licenses(self).await
    }
}
