//! What the engine needs from the license server, as a trait: the daemon's [`AgentApi`]
//! (mTLS to the agent API) in production, a scripted server in tests.

use std::future::Future;
use std::sync::Arc;

use license_protocol::agent_api::{
    HealthReport, MachineLicenses, RenewCertificateResponse, SecretStatus, StatusQuery,
};
use license_protocol::license_keys::LicenseKeySet;
use license_protocol::release::UpdateReport;
use license_protocol::rotation::{RotateSecretRequest, RotateSecretResponse};
use license_protocol::server_trust::{AgentTrust, ServerTrust};

use crate::net::client::ClientError;
use crate::net::{AgentApi, ConnectError};
use crate::platform::keys::MachineKey;

/// The agent API calls of a round (DESIGN.md §3.1), and the switch to a renewed identity.
pub trait AgentServer: Send + Sync {
    /// `GET /api/v1/secret-status`.
    fn secret_status(
        &self,
        query: &StatusQuery,
    ) -> impl Future<Output = Result<SecretStatus, ClientError>> + Send;
    /// `GET /api/v1/releases/{release_id}/binary` streamed into `dest`: size and hex SHA-256.
    fn download_release(
        &self,
        release_id: uuid::Uuid,
        dest: &std::path::Path,
        max: u64,
    ) -> impl Future<Output = Result<(u64, String), ClientError>> + Send;
    /// `POST /api/v1/update-report`.
    fn report_update(
        &self,
        report: &UpdateReport,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// `POST /api/v1/rotate-secret`.
    fn rotate_secret(
        &self,
        request: &RotateSecretRequest,
    ) -> impl Future<Output = Result<RotateSecretResponse, ClientError>> + Send;
    /// `POST /api/v1/rotate-secret/ack`.
    fn ack_secret(&self, version: u64) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// `GET /api/v1/licenses`.
    fn licenses(&self) -> impl Future<Output = Result<MachineLicenses, ClientError>> + Send;
    /// `POST /api/v1/health`.
    fn report_health(
        &self,
        report: &HealthReport,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// `GET /api/v1/license-keys`, asked only when the secret status announces another set.
    fn license_keys(&self) -> impl Future<Output = Result<LicenseKeySet, ClientError>> + Send;
    /// `GET /api/v1/server-trust`, asked only when the secret status announces another one.
    fn server_trust(&self) -> impl Future<Output = Result<ServerTrust, ClientError>> + Send;
    /// From now on, connect with `trust` (pins and CAs just accepted).
    fn adopt_trust(&self, trust: AgentTrust, key: Arc<dyn MachineKey>) -> Result<(), ConnectError>;
    /// `POST /api/v1/renew-certificate` with a CSR for the machine's next key.
    fn renew_certificate(
        &self,
        csr: String,
    ) -> impl Future<Output = Result<RenewCertificateResponse, ClientError>> + Send;
    /// From now on, present the certificate now on disk, signed by `key`.
    fn reconnect(&self, key: Arc<dyn MachineKey>) -> Result<(), ConnectError>;
}

impl AgentServer for AgentApi {
    async fn secret_status(&self, query: &StatusQuery) -> Result<SecretStatus, ClientError> {
        self.current().secret_status(query).await
    }

    async fn download_release(
        &self,
        release_id: uuid::Uuid,
        dest: &std::path::Path,
        max: u64,
    ) -> Result<(u64, String), ClientError> {
        self.current().download_release(release_id, dest, max).await
    }

    async fn report_update(&self, report: &UpdateReport) -> Result<(), ClientError> {
        self.current().report_update(report).await
    }

    async fn rotate_secret(
        &self,
        request: &RotateSecretRequest,
    ) -> Result<RotateSecretResponse, ClientError> {
        self.current().rotate_secret(request).await
    }

    async fn ack_secret(&self, version: u64) -> Result<(), ClientError> {
        self.current().ack_secret(version).await
    }

    async fn licenses(&self) -> Result<MachineLicenses, ClientError> {
        self.current().licenses().await
    }

    async fn report_health(&self, report: &HealthReport) -> Result<(), ClientError> {
        self.current().report_health(report).await
    }

    async fn license_keys(&self) -> Result<LicenseKeySet, ClientError> {
        self.current().license_keys().await
    }

    async fn server_trust(&self) -> Result<ServerTrust, ClientError> {
        self.current().server_trust().await
    }

    fn adopt_trust(&self, trust: AgentTrust, key: Arc<dyn MachineKey>) -> Result<(), ConnectError> {
        AgentApi::adopt_trust(self, trust, key)
    }

    async fn renew_certificate(
        &self,
        csr: String,
    ) -> Result<RenewCertificateResponse, ClientError> {
        self.current().renew_certificate(csr).await
    }

    fn reconnect(&self, key: Arc<dyn MachineKey>) -> Result<(), ConnectError> {
        AgentApi::reconnect(self, key)
    }
}
