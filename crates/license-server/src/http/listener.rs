//! The accept loop shared by the three listeners: TLS handshake, peer certificate parsing,
//! then HTTP/1.1 on the router, with bounded connections and timeouts.
//!
//! axum's own `serve` does not expose the TLS session, and the agent listener needs the peer
//! certificate on every request; so this loop puts a [`ConnInfo`] in each request's extensions.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use license_protocol::identity::{IdentityError, MachineIdentity};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

/// Connections served at once per listener; further ones are closed at accept.
pub const MAX_CONNECTIONS: usize = 1024;
/// Time allowed for a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to send request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time in-flight requests get to finish at shutdown.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the connection tells about the peer, available to every handler as an extension.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    /// The client certificate, on the agent listener (where it is mandatory).
    pub peer: Option<Arc<PeerCertificate>>,
}

/// The parts of a client certificate the agent API needs.
#[derive(Debug)]
pub struct PeerCertificate {
    /// Lowercase hex of the DER serial.
    pub serial: String,
    /// The CN parsed as `client_id:machine_id`, or why it could not be.
    pub identity: Result<MachineIdentity, IdentityError>,
    /// DER SubjectPublicKeyInfo of the certificate's key: it verifies the machine's signed
    /// rotate requests, and secrets are sealed to it.
    pub spki_der: Vec<u8>,
    /// The whole certificate (DER), compared with the one issued under its serial.
    pub der: Vec<u8>,
}

impl PeerCertificate {
    /// Parses a certificate that rustls has already chained to the CA.
    pub fn parse(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok());
        Some(Self {
            serial: hex::encode(cert.raw_serial()),
            identity: cn.ok_or(IdentityError::NoCommonName).and_then(str::parse),
            spki_der: cert.public_key().raw.to_vec(),
            der: der.to_vec(),
        })
    }
}

/// Serves `router` over TLS on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "connection limit reached; closing");
            continue;
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|der| PeerCertificate::parse(der))
                .map(Arc::new);
            let info = ConnInfo { remote, peer };
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(info.clone());
                router.clone().oneshot(req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("drain timeout; closing remaining connections"),
    }
}
