//! HTTP calls from the agent to the license server, with the server's JSON errors surfaced
//! as typed refusals (stable code + sentence) rather than bare status codes.

use std::time::Duration;

use license_protocol::agent_api::{
    MachineLicenses, RenewCertificateRequest, RenewCertificateResponse, SecretStatus,
};
use license_protocol::enroll::{BootstrapRequest, BootstrapResponse};
use license_protocol::error::{ApiError, ErrorCode};
use license_protocol::rotation::{AckRequest, RotateSecretRequest, RotateSecretResponse};
use serde::de::DeserializeOwned;

/// Whole-request timeout.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot reach the server: {0}")]
    Transport(String),
    /// An HTTP error status; `code` is the server's stable code, `None` when the body was not
    /// the server's JSON error (a proxy's page, say).
    #[error("server refused ({status} {}): {message}", code.map_or("http_error", ErrorCode::as_str))]
    Refused {
        status: u16,
        code: Option<ErrorCode>,
        message: String,
    },
    #[error("unexpected answer from the server: {0}")]
    BadResponse(String),
}

/// The error and its causes on one line: the useful part of a TLS failure (e.g. the pin
/// mismatch) is several levels down.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// A client for one server base URL.
#[derive(Debug, Clone)]
pub struct ServerClient {
    http: reqwest::Client,
    base: String,
}

impl ServerClient {
    pub fn new(base_url: &str, tls: rustls::ClientConfig) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .https_only(true)
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("license-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Transport(chain(&e)))?;
        Ok(Self {
            http,
            base: base_url.trim_end_matches('/').to_string(),
        })
    }

    async fn answer<T: DeserializeOwned>(
        response: reqwest::Result<reqwest::Response>,
    ) -> Result<T, ClientError> {
        let response = response.map_err(|e| ClientError::Transport(chain(&e)))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| ClientError::Transport(chain(&e)))?;
        if status.is_success() {
            // An empty 2xx body (e.g. 204) reads as JSON null.
            let body: &[u8] = if body.is_empty() { b"null" } else { &body };
            return serde_json::from_slice(body)
                .map_err(|e| ClientError::BadResponse(e.to_string()));
        }
        match serde_json::from_slice::<ApiError>(&body) {
            Ok(err) => Err(ClientError::Refused {
                status: status.as_u16(),
                code: Some(err.error),
                message: err.message,
            }),
            Err(_) => Err(ClientError::Refused {
                status: status.as_u16(),
                code: None,
                message: status.canonical_reason().unwrap_or("error").into(),
            }),
        }
    }

    pub async fn recover(
        &self,
        req: &license_protocol::enroll::RecoverRequest,
    ) -> Result<license_protocol::enroll::RecoverResponse, ClientError> {
        Self::answer(
            self.http
                .post(format!("{}/api/public/recover", self.base))
                .json(req)
                .send()
                .await,
        )
        .await
    }

    pub async fn bootstrap(
        &self,
        req: &BootstrapRequest,
    ) -> Result<BootstrapResponse, ClientError> {
        Self::answer(
            self.http
                .post(format!("{}/api/public/bootstrap", self.base))
                .json(req)
                .send()
                .await,
        )
        .await
    }

    pub async fn secret_status(&self) -> Result<SecretStatus, ClientError> {
        Self::answer(
            self.http
                .get(format!("{}/api/v1/secret-status", self.base))
                .send()
                .await,
        )
        .await
    }

    pub async fn renew_certificate(
        &self,
        csr: String,
    ) -> Result<RenewCertificateResponse, ClientError> {
        let req = RenewCertificateRequest { csr };
        Self::answer(
            self.http
                .post(format!("{}/api/v1/renew-certificate", self.base))
                .json(&req)
                .send()
                .await,
        )
        .await
    }

    pub async fn rotate_secret(
        &self,
        req: &RotateSecretRequest,
    ) -> Result<RotateSecretResponse, ClientError> {
        Self::answer(
            self.http
                .post(format!("{}/api/v1/rotate-secret", self.base))
                .json(req)
                .send()
                .await,
        )
        .await
    }

    pub async fn ack_secret(&self, secret_version: u64) -> Result<(), ClientError> {
        let req = AckRequest { secret_version };
        let _: serde_json::Value = Self::answer(
            self.http
                .post(format!("{}/api/v1/rotate-secret/ack", self.base))
                .json(&req)
                .send()
                .await,
        )
        .await?;
        Ok(())
    }

    pub async fn licenses(&self) -> Result<MachineLicenses, ClientError> {
        Self::answer(
            self.http
                .get(format!("{}/api/v1/licenses", self.base))
                .send()
                .await,
        )
        .await
    }
}
