//! HTTP calls from the agent to the license server, with the server's JSON errors surfaced
//! as typed refusals (stable code + sentence) rather than bare status codes.

use std::time::Duration;

use license_protocol::agent_api::{
    HealthReport, MachineLicenses, RenewCertificateRequest, RenewCertificateResponse, SecretStatus,
    StatusQuery,
};
use license_protocol::enroll::{
    BootstrapRequest, BootstrapResponse, RecoverRequest, RecoverResponse,
};
use license_protocol::error::{ApiError, ErrorCode};
use license_protocol::release::UpdateReport;
use license_protocol::rotation::{AckRequest, RotateSecretRequest, RotateSecretResponse};
use serde::de::DeserializeOwned;
use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;

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
    /// The server is shedding load (503 or 429): come back after `retry_after_secs` (its
    /// `Retry-After`), not sooner.
    #[error("the server is busy{}", retry_after_secs.map(|s| format!("; retry in {s} s")).unwrap_or_default())]
    Busy { retry_after_secs: Option<u64> },
    #[error("unexpected answer from the server: {0}")]
    BadResponse(String),
    /// A download brought more bytes than announced (and was stopped there).
    #[error("the download is larger than the {0} bytes announced")]
    Oversized(u64),
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

/// A shed request: its `Retry-After` (seconds; an HTTP date is not sent by the server and
/// reads as absent), at most a day.
fn busy(response: &reqwest::Response) -> ClientError {
    let retry_after_secs = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| s.min(86_400));
    ClientError::Busy { retry_after_secs }
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
        if status == reqwest::StatusCode::SERVICE_UNAVAILABLE
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        {
            return Err(busy(&response));
        }
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

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Self::answer(self.http.get(format!("{}{path}", self.base)).send().await).await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, ClientError> {
        Self::answer(
            self.http
                .post(format!("{}{path}", self.base))
                .json(body)
                .send()
                .await,
        )
        .await
    }

    /// `POST /api/public/recover` (public listener).
    pub async fn recover(&self, req: &RecoverRequest) -> Result<RecoverResponse, ClientError> {
        self.post("/api/public/recover", req).await
    }

    /// `POST /api/public/bootstrap` (public listener).
    pub async fn bootstrap(
        &self,
        req: &BootstrapRequest,
    ) -> Result<BootstrapResponse, ClientError> {
        self.post("/api/public/bootstrap", req).await
    }

    /// `GET /api/v1/secret-status`, with what the agent runs (so the server may offer it a
    /// release) when `query` says it.
    pub async fn secret_status(&self, query: &StatusQuery) -> Result<SecretStatus, ClientError> {
        let url = format!("{}/api/v1/secret-status", self.base);
        Self::answer(self.http.get(url).query(query).send().await).await
    }

    /// `GET /api/v1/releases/{release_id}/binary`, streamed into `dest` (created, 0600) while
    /// hashed; more than `max` bytes is refused as it arrives. Answers the size and hex
    /// SHA-256 of what was written. Memory stays flat whatever the size.
    pub async fn download_release(
        &self,
        release_id: uuid::Uuid,
        dest: &std::path::Path,
        max: u64,
    ) -> Result<(u64, String), ClientError> {
        let url = format!("{}/api/v1/releases/{release_id}/binary", self.base);
        let mut response = self
            .http
            .get(url)
            // The whole-request timeout would cut a large download on a slow line: each
            // chunk gets REQUEST_TIMEOUT instead.
            .timeout(Duration::from_secs(24 * 3600))
            .send()
            .await
            .map_err(|e| ClientError::Transport(chain(&e)))?;
        if !response.status().is_success() {
            return Self::answer::<serde_json::Value>(Ok(response))
                .await
                .map(|_| (0, String::new()));
        }
        let local = |e: std::io::Error| {
            ClientError::BadResponse(format!("writing {}: {e}", dest.display()))
        };
        let mut options = tokio::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        options.mode(0o600);
        let mut file = options.open(dest).await.map_err(local)?;
        let mut hasher = sha2::Sha256::new();
        let mut size = 0u64;
        loop {
            let chunk = tokio::time::timeout(REQUEST_TIMEOUT, response.chunk())
                .await
                .map_err(|_| ClientError::Transport("the download stalled".into()))?
                .map_err(|e| ClientError::Transport(chain(&e)))?;
            let Some(chunk) = chunk else { break };
            size += chunk.len() as u64;
            if size > max {
                return Err(ClientError::Oversized(max));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(local)?;
        }
        file.sync_all().await.map_err(local)?;
        Ok((size, license_protocol::release::hex(&hasher.finalize())))
    }

    /// `GET /api/v1/watch`: the change stream, from the feed position `since`.
    pub async fn watch(
        &self,
        since: Option<i64>,
    ) -> Result<super::watch::WatchStream, ClientError> {
        let url = format!("{}{}", self.base, license_protocol::watch::WATCH_PATH);
        let query = license_protocol::watch::WatchQuery { since };
        let response = self
            .http
            .get(url)
            .query(&query)
            // The stream lasts as long as the server keeps it; silence is caught per event.
            .timeout(Duration::from_secs(7 * 86_400))
            .send()
            .await
            .map_err(|e| ClientError::Transport(chain(&e)))?;
        if !response.status().is_success() {
            return Self::answer::<serde_json::Value>(Ok(response))
                .await
                .and_then(|_| Err(ClientError::BadResponse("an empty watch answer".into())));
        }
        Ok(super::watch::WatchStream::new(response))
    }

    /// `POST /api/v1/update-report` (answered 204).
    pub async fn report_update(&self, report: &UpdateReport) -> Result<(), ClientError> {
        let _: serde_json::Value = self.post("/api/v1/update-report", report).await?;
        Ok(())
    }

    pub async fn renew_certificate(
        &self,
        csr: String,
    ) -> Result<RenewCertificateResponse, ClientError> {
        self.post(
            "/api/v1/renew-certificate",
            &RenewCertificateRequest { csr },
        )
        .await
    }

    pub async fn rotate_secret(
        &self,
        req: &RotateSecretRequest,
    ) -> Result<RotateSecretResponse, ClientError> {
        self.post("/api/v1/rotate-secret", req).await
    }

    pub async fn ack_secret(&self, secret_version: u64) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .post("/api/v1/rotate-secret/ack", &AckRequest { secret_version })
            .await?;
        Ok(())
    }

    /// `POST /api/v1/health`: the machine's health report (answered 204).
    pub async fn report_health(&self, report: &HealthReport) -> Result<(), ClientError> {
        let _: serde_json::Value = self.post("/api/v1/health", report).await?;
        Ok(())
    }

    pub async fn licenses(&self) -> Result<MachineLicenses, ClientError> {
        self.get("/api/v1/licenses").await
    }

    /// `GET /api/v1/license-keys`: the server's signed license key set.
    pub async fn license_keys(
        &self,
    ) -> Result<license_protocol::license_keys::LicenseKeySet, ClientError> {
        self.get("/api/v1/license-keys").await
    }

    /// `GET /api/v1/server-trust`: the server's TLS keys and CAs, signed by its license keys.
    pub async fn server_trust(
        &self,
    ) -> Result<license_protocol::server_trust::ServerTrust, ClientError> {
        self.get("/api/v1/server-trust").await
    }
}
