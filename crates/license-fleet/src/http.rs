//! The simulated agents' HTTPS: TLS 1.3 with the machine's certificate, the server checked
//! against the CA, and either one kept HTTP/2 connection ([`H2`]) or one HTTP/1.1 connection per
//! round ([`h1_round`]), as agents before the watch stream had.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Time allowed to connect and complete the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Time allowed for one request (not the watch stream).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("timed out")]
    Timeout,
    #[error("TLS material: {0}")]
    Material(String),
}

/// Where the agents connect, and how they check the server.
#[derive(Debug, Clone)]
pub struct Target {
    /// The agent listener (or the load balancer in front of it).
    pub addr: SocketAddr,
    /// The name the server's certificate is checked against (`localhost`).
    pub server_name: ServerName<'static>,
    /// `https://host:port`, for the requests' URIs.
    pub base: String,
    pub roots: Arc<rustls::RootCertStore>,
}

impl Target {
    /// `addr` checked as `server_name`, against the CA certificates in `ca_pem`.
    pub fn new(addr: SocketAddr, server_name: &str, ca_pem: &str) -> Result<Self, HttpError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| HttpError::Material(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| HttpError::Material(e.to_string()))?;
        }
        Ok(Self {
            addr,
            server_name: ServerName::try_from(server_name.to_string())
                .map_err(|e| HttpError::Material(e.to_string()))?,
            base: format!("https://{server_name}:{}", addr.port()),
            roots: Arc::new(roots),
        })
    }

    /// The TLS client configuration of one machine: its certificate and key, ALPN `alpn`,
    /// session resumption on or off.
    pub fn client_config(
        &self,
        cert_pem: &str,
        key_pem: &str,
        alpn: &[u8],
        resume: bool,
    ) -> Result<Arc<rustls::ClientConfig>, HttpError> {
        let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| HttpError::Material(e.to_string()))?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .map_err(|e| HttpError::Material(e.to_string()))?
            .ok_or_else(|| HttpError::Material("no private key".into()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| HttpError::Material(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(certs, key)
            .map_err(|e| HttpError::Material(e.to_string()))?;
        config.alpn_protocols = vec![alpn.to_vec()];
        if !resume {
            config.resumption = rustls::client::Resumption::disabled();
        }
        Ok(Arc::new(config))
    }

    async fn tls(
        &self,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, HttpError> {
        let connect = async {
            let tcp = TcpStream::connect(self.addr)
                .await
                .map_err(|e| HttpError::Connect(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            TlsConnector::from(config)
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| HttpError::Tls(e.to_string()))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| HttpError::Timeout)?
    }

    pub fn uri(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.base)
    }
}

/// A request with a JSON body, or none; `Host` from `uri` (HTTP/1.1 needs it).
pub fn request(method: &str, uri: &str, body: Option<Vec<u8>>) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(host) = uri
        .split_once("://")
        .and_then(|(_, rest)| rest.split('/').next())
    {
        builder = builder.header("host", host);
    }
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap_or_default()
}

/// A finished answer: status, `Retry-After`, body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub body: Bytes,
}

async fn read(response: Response<Incoming>) -> Result<Answer, HttpError> {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| HttpError::Http(e.to_string()))?
        .to_bytes();
    Ok(Answer {
        status,
        retry_after,
        body,
    })
}

/// One kept HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct H2 {
    send: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
}

impl H2 {
    pub async fn connect(
        target: &Target,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<Self, HttpError> {
        let tls = target.tls(config).await?;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| HttpError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self { send })
    }

    /// Whether the connection can still carry requests.
    pub fn is_open(&self) -> bool {
        !self.send.is_closed()
    }

    /// Sends a request and reads the whole answer.
    pub async fn call(&mut self, req: Request<Full<Bytes>>) -> Result<Answer, HttpError> {
        let call = async {
            let response = self
                .send
                .send_request(req)
                .await
                .map_err(|e| HttpError::Http(e.to_string()))?;
            read(response).await
        };
        tokio::time::timeout(REQUEST_TIMEOUT, call)
            .await
            .map_err(|_| HttpError::Timeout)?
    }

    /// Sends a request and answers the response with its body unread (a stream).
    pub async fn open(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, HttpError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.send.send_request(req))
            .await
            .map_err(|_| HttpError::Timeout)?
            .map_err(|e| HttpError::Http(e.to_string()))
    }
}

/// A round as agents made it before the watch stream: a new connection (a full handshake
/// when `config` does not resume), then `requests` one after the other on it (HTTP/1.1), then
/// the connection closed. Answers each request's result and latency in order; stops at the
/// first failure.
pub async fn h1_round(
    target: &Target,
    config: Arc<rustls::ClientConfig>,
    requests: Vec<Request<Full<Bytes>>>,
) -> Result<Vec<(Answer, Duration)>, HttpError> {
    let started = std::time::Instant::now();
    let tls = target.tls(config).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| HttpError::Http(e.to_string()))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut answers = Vec::new();
    // The handshake's time counts toward the first request, as an agent sees it.
    let mut since = started;
    for req in requests {
        let call = async {
            send.ready()
                .await
                .map_err(|e| HttpError::Http(e.to_string()))?;
            let response = send
                .send_request(req)
                .await
                .map_err(|e| HttpError::Http(e.to_string()))?;
            read(response).await
        };
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, call)
            .await
            .map_err(|_| HttpError::Timeout)??;
        answers.push((answer, since.elapsed()));
        since = std::time::Instant::now();
    }
    driver.abort();
    Ok(answers)
}
