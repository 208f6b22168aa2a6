//! The accept loop shared by the three listeners: TLS handshake, peer certificate parsing,
//! then HTTP/1.1 or HTTP/2 (the agent listener offers `h2` in ALPN) on the router, with
//! bounded connections and timeouts.
//!
//! What one peer can hold is bounded: [`Limits::per_address`] connections per IPv4 address or
//! IPv6 /64 and listener (further ones are closed at accept, so idle sockets from one address
//! cannot take the slots every agent needs), and a peer that stops reading is cut off once a
//! write has made no progress for [`Limits::write_stall`] ([`StallGuard`], under TLS, so the
//! handshake is covered too). Connections still in their TLS handshake are bounded apart
//! ([`MAX_HANDSHAKES`]): when they are all taken, the oldest is cut off for the newcomer, so
//! idle TCP connections from many addresses cannot hold the slots a machine needs to get its
//! certificate checked — a real handshake takes milliseconds, an idle one is always the oldest.
//! Every handshake's outcome is counted for `/metrics` ([`HandshakeCounts`]).
//!
//! axum's own `serve` does not expose the TLS session, and the agent listener needs the peer
//! certificate on every request; so this loop puts a [`ConnInfo`] in each request's extensions.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use license_protocol::identity::{IdentityError, MachineIdentity};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use super::metrics::{HandshakeCounts, HandshakeOutcome};

/// Connections served at once on the public and admin listeners, once past their TLS
/// handshake; further ones are closed when their handshake ends. The agent listener's bound
/// is `agent_max_connections`.
pub const MAX_CONNECTIONS: usize = 1024;
/// HTTP/2 streams one connection may have open at once (an agent holds its watch stream and
/// makes a round's requests beside it).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// An HTTP/2 connection is pinged after this long without a frame from its peer, and closed
/// when the ping is not answered within [`PING_TIMEOUT`]: peers that stopped answering do not
/// hold their slots. A connected agent sends nothing between its rounds, so its connection is
/// pinged at this interval: each ping wakes the process for the connection, hence half an
/// hour. Peers that vanished (a till switched off, a cable pulled) are found far sooner by the
/// kernel ([`TCP_USER_TIMEOUT`], [`KEEPALIVE_IDLE`]).
pub const PING_INTERVAL: Duration = Duration::from_secs(1800);
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Data a peer has not acknowledged for this long closes its connection (`TCP_USER_TIMEOUT`):
/// with a watch stream's pings going out, a vanished agent's connection is closed within a
/// ping interval and this.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(60);
/// A connection with nothing in flight for this long is probed by the kernel (TCP keepalive,
/// every [`KEEPALIVE_INTERVAL`], closed after [`KEEPALIVE_PROBES`] unanswered probes).
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(120);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const KEEPALIVE_PROBES: u32 = 3;
/// Connections in their TLS handshake at once per listener; a newcomer beyond it cuts off the
/// oldest.
pub const MAX_HANDSHAKES: usize = 256;
/// Time allowed for a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to send request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time in-flight requests get to finish at shutdown.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What one peer may hold on a listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once, past their handshake.
    pub max_connections: usize,
    /// Connections per IPv4 address or IPv6 /64 (0: no cap).
    pub per_address: usize,
    /// A write making no progress for this long closes the connection.
    pub write_stall: Duration,
}

/// Open connections by address (IPv4, or IPv6 /64).
#[derive(Debug, Default)]
struct PerAddress {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted against its address; uncounted on drop.
struct AddressSlot {
    counts: Arc<PerAddress>,
    key: IpAddr,
}

impl PerAddress {
    fn acquire(self: &Arc<Self>, remote: IpAddr, limit: usize) -> Option<AddressSlot> {
        let key = crate::http::public::rate_key(remote);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(key).or_insert(0);
        if limit > 0 && *count >= limit {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            counts: self.clone(),
            key,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Connections in their TLS handshake, oldest first, each with the way to cut it off.
#[derive(Debug)]
struct Handshakes {
    limit: usize,
    state: Mutex<HandshakeState>,
}

#[derive(Debug, Default)]
struct HandshakeState {
    next: u64,
    waiting: BTreeMap<u64, oneshot::Sender<()>>,
}

/// One connection's place among the handshakes; given up on drop.
struct HandshakeTicket {
    handshakes: Arc<Handshakes>,
    id: u64,
}

impl Handshakes {
    fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            state: Mutex::default(),
        })
    }

    /// Takes a place for a new connection, cutting off the oldest ones beyond the limit; the
    /// receiver completes when this connection is cut off in turn.
    fn enter(self: &Arc<Self>) -> (HandshakeTicket, oneshot::Receiver<()>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while state.waiting.len() >= self.limit {
            if let Some((_, cut_off)) = state.waiting.pop_first() {
                let _ = cut_off.send(());
            }
        }
        let id = state.next;
        state.next += 1;
        let (cut_off, cut) = oneshot::channel();
        state.waiting.insert(id, cut_off);
        let ticket = HandshakeTicket {
            handshakes: self.clone(),
            id,
        };
        (ticket, cut)
    }
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        let mut state = self
            .handshakes
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        state.waiting.remove(&self.id);
    }
}

/// An IO whose writes fail once they have made no progress for `limit`: a peer that stops
/// reading (a download it never consumes, a handshake it never answers) holds its connection
/// and the response's buffers only that long.
#[derive(Debug)]
pub struct StallGuard<T> {
    inner: T,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> StallGuard<T> {
    pub fn new(inner: T, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// `Pending` from the inner write: arms the timer, or fails once it has run out.
    fn pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<R>> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(done) => {
                self.stalled = None;
                Poll::Ready(done)
            }
            Poll::Pending => self.pending(cx),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(done) => {
                self.stalled = None;
                Poll::Ready(done)
            }
            Poll::Pending => self.pending(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

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

/// Serves `router` over TLS on `listener` until `shutdown` completes, then drains. Every
/// handshake's outcome is counted in `handshakes_done`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: Limits,
    handshakes_done: Arc<HandshakeCounts>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let handshakes = Handshakes::new(MAX_HANDSHAKES);
    let per_address = Arc::new(PerAddress::default());
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
        let Some(address_slot) = per_address.acquire(remote.ip(), limits.per_address) else {
            tracing::debug!(%remote, "connection limit of this address reached; closing");
            continue;
        };
        // Responses are written whole; Nagle's algorithm would only hold their last segment
        // back until the peer's delayed acknowledgement (tens of milliseconds per request).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%remote, error = %e, "cannot set TCP_NODELAY");
        }
        if let Err(e) = dead_peer_detection(&tcp) {
            tracing::debug!(%remote, error = %e, "cannot set TCP keepalive and user timeout");
        }
        let (ticket, cut_off) = handshakes.enter();
        let slots = slots.clone();
        let acceptor = acceptor.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        let handshakes_done = handshakes_done.clone();
        tokio::spawn(async move {
            let tcp = StallGuard::new(tcp, limits.write_stall);
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            let tls = tokio::select! {
                done = handshake => match done {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        // tokio-rustls reports what rustls refused as InvalidData; anything
                        // else is the transport (reset, closed, stalled).
                        handshakes_done.count(if e.kind() == std::io::ErrorKind::InvalidData {
                            HandshakeOutcome::Refused
                        } else {
                            HandshakeOutcome::Aborted
                        });
                        tracing::debug!(%remote, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        handshakes_done.count(HandshakeOutcome::TimedOut);
                        return;
                    }
                },
                _ = cut_off => {
                    handshakes_done.count(HandshakeOutcome::CutOff);
                    tracing::debug!(%remote, "handshake cut off for a newer connection");
                    return;
                }
            };
            drop(ticket);
            handshakes_done.count(match tls.get_ref().1.handshake_kind() {
                Some(rustls::HandshakeKind::Resumed) => HandshakeOutcome::Resumed,
                _ => HandshakeOutcome::Full,
            });
            let Ok(slot) = slots.try_acquire_owned() else {
                tracing::warn!(%remote, "connection limit reached; closing");
                return;
            };
            let _slots = (slot, address_slot);
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
            // HTTP/1.1, or HTTP/2 when the client says so (ALPN, or its preface).
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
                .keep_alive_interval(PING_INTERVAL)
                .keep_alive_timeout(PING_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(tls), service);
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

/// Lets the kernel close connections whose peer vanished ([`TCP_USER_TIMEOUT`],
/// [`KEEPALIVE_IDLE`]): it costs the process nothing until one does.
fn dead_peer_detection(tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handshake_beyond_the_limit_cuts_off_the_oldest() {
        let handshakes = Handshakes::new(2);
        let (first, mut first_cut) = handshakes.enter();
        let (_second, mut second_cut) = handshakes.enter();
        assert!(first_cut.try_recv().is_err(), "cut off within the limit");
        let (_third, mut third_cut) = handshakes.enter();
        assert_eq!(first_cut.try_recv(), Ok(()), "the oldest is cut off");
        assert!(second_cut.try_recv().is_err());
        assert!(third_cut.try_recv().is_err());
        // A finished handshake gives its place back without cutting anyone off.
        drop(first);
        let state = handshakes.state.lock().unwrap();
        assert_eq!(state.waiting.len(), 2);
    }

    #[test]
    fn a_finished_handshake_frees_its_place() {
        let handshakes = Handshakes::new(1);
        let (done, _) = handshakes.enter();
        drop(done);
        let (_next, mut next_cut) = handshakes.enter();
        let (_last, _) = handshakes.enter();
        assert_eq!(next_cut.try_recv(), Ok(()));
        assert_eq!(handshakes.state.lock().unwrap().waiting.len(), 1);
    }
}
