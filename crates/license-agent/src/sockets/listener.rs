//! One listener for both local sockets: bind (replacing a stale socket file), accept with a
//! connection limit, the peer's credentials from the kernel (SO_PEERCRED), length-prefixed
//! frames read within an idle timeout, and a drain at shutdown. What a connection *means* is
//! the [`Handler`]'s business ([`super::validation`], [`super::management`]).
//!
//! Misbehaving peers never disturb other connections: connections beyond the limit, or beyond
//! one uid's share of it ([`Limits::max_per_uid`]), are closed at accept, the last
//! [`Limits::reserved`] slots go only to peers the handler calls privileged (root on the
//! management socket, whoever else holds the rest), a peer silent (or
//! trickling) past the idle timeout is closed, so is one that does not read its answers within
//! it, a frame announced over 64 KiB is reported to the handler as [`Frame::TooLarge`] (the
//! stream cannot be resynchronised after it), an empty one as [`Frame::Empty`].

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use license_protocol::ipc::{encode_frame, frame_len, FrameError};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{watch, Semaphore};

use crate::access::{Peer, Principal};
use crate::platform::local_socket::{BindOptions, LocalListener, LocalStream};

/// Time in-flight requests get to finish at shutdown.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed accept (e.g. out of descriptors) before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// How many connections a socket serves at once and how long a peer may stay silent.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// Connections one uid may hold at once: whoever floods the socket takes its own share,
    /// not every slot.
    pub max_per_uid: usize,
    /// Slots, out of `max_connections`, that only [`Handler::privileged`] peers may take.
    pub reserved: usize,
    /// How long a peer may stay silent, or leave an answer unread.
    pub idle_timeout: Duration,
}

/// Open connections by uid.
#[derive(Debug, Default)]
struct PerUid(Mutex<HashMap<Principal, usize>>);

/// One connection counted against its uid; uncounted on drop.
struct UidSlot {
    counts: Arc<PerUid>,
    uid: Principal,
}

impl PerUid {
    fn acquire(self: &Arc<Self>, uid: &Principal, limit: usize) -> Option<UidSlot> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(uid.clone()).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(UidSlot {
            counts: self.clone(),
            uid: uid.clone(),
        })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut open = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.uid) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// One frame read from a connection, or why there is none.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Payload(Vec<u8>),
    /// End of stream, the peer idle (or too slow) past the timeout, or the agent stopping.
    Closed,
    /// The header announced more than the limit; the stream cannot be resynchronised.
    TooLarge,
    /// A zero-length frame.
    Empty,
}

/// An accepted connection: framed reads within the idle timeout, framed JSON writes.
#[derive(Debug)]
pub struct Connection {
    stream: LocalStream,
    idle: Duration,
    stop: watch::Receiver<bool>,
}

impl Connection {
    /// Reads the next frame; [`Frame::Closed`] as soon as the agent is stopping (between
    /// requests: a request in hand is answered first).
    pub async fn read_frame(&mut self) -> std::io::Result<Frame> {
        let stop = self.stop.clone();
        tokio::select! {
            frame = read_frame(&mut self.stream, self.idle) => frame,
            () = stopped(stop) => Ok(Frame::Closed),
        }
    }

    /// Writes one JSON frame; a peer that does not read it within the idle timeout is
    /// dropped (an error ends the connection).
    pub async fn send(&mut self, value: &impl serde::Serialize) -> std::io::Result<()> {
        let json = serde_json::to_vec(value).map_err(std::io::Error::other)?;
        match tokio::time::timeout(self.idle, self.stream.write_all(&encode_frame(&json))).await {
            Ok(written) => written,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer does not read its answers",
            )),
        }
    }
}

/// Completes once the agent is stopping.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

async fn read_frame(stream: &mut LocalStream, idle: Duration) -> std::io::Result<Frame> {
    let mut header = [0u8; 4];
    if !read_within(stream, &mut header, idle).await? {
        return Ok(Frame::Closed);
    }
    let len = match frame_len(header) {
        Ok(len) => len,
        Err(FrameError::TooLarge(_)) => return Ok(Frame::TooLarge),
        Err(_) => return Ok(Frame::Empty),
    };
    let mut payload = vec![0u8; len];
    Ok(if read_within(stream, &mut payload, idle).await? {
        Frame::Payload(payload)
    } else {
        Frame::Closed
    })
}

/// Fills `buf` within `idle`; false on end of stream or timeout.
async fn read_within(
    stream: &mut LocalStream,
    buf: &mut [u8],
    idle: Duration,
) -> std::io::Result<bool> {
    match tokio::time::timeout(idle, stream.read_exact(buf)).await {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(false),
    }
}

/// What one socket does with its connections.
pub trait Handler: Send + Sync + 'static {
    /// The socket's name in logs.
    const NAME: &'static str;
    /// Serves one connection until it ends.
    fn connection(
        self: Arc<Self>,
        conn: Connection,
        peer: Peer,
    ) -> impl Future<Output = std::io::Result<()>> + Send;

    /// Whether `peer` may take the [`Limits::reserved`] slots when the others are taken.
    fn privileged(&self, _peer: &Peer) -> bool {
        false
    }
}

/// A bound local socket.
#[derive(Debug)]
pub struct Listener {
    inner: LocalListener,
}

impl Listener {
    /// Binds `path` (a socket file, replacing a stale one; a pipe name on Windows) with who
    /// may connect at all (`options`). Who is served is decided per connection from the
    /// peer's credentials.
    pub fn bind(path: &Path, options: &BindOptions) -> std::io::Result<Self> {
        Ok(Self {
            inner: LocalListener::bind(path, options)?,
        })
    }

    /// Serves connections with `handler` until `stop` turns true, then drains: every
    /// connection finishes the request in hand (within [`DRAIN_TIMEOUT`]) and the socket file
    /// is removed.
    pub async fn serve<H: Handler>(
        mut self,
        handler: Arc<H>,
        limits: Limits,
        stop: watch::Receiver<bool>,
    ) {
        let reserved = limits.reserved.min(limits.max_connections);
        let slots = Arc::new(Semaphore::new(limits.max_connections - reserved));
        let reserved_slots = Arc::new(Semaphore::new(reserved));
        let per_uid = Arc::new(PerUid::default());
        loop {
            let (stream, peer) = tokio::select! {
                () = stopped(stop.clone()) => break,
                accepted = self.inner.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, socket = H::NAME, "accept failed");
                        tokio::time::sleep(ACCEPT_RETRY).await;
                        continue;
                    }
                },
            };
            let Some(uid_slot) = per_uid.acquire(&peer.user, limits.max_per_uid) else {
                tracing::warn!(
                    socket = H::NAME,
                    user = %peer.user,
                    "this uid holds its share of the connections; closing a new one"
                );
                continue;
            };
            let slot = slots.clone().try_acquire_owned().or_else(|e| {
                if handler.privileged(&peer) {
                    reserved_slots.clone().try_acquire_owned()
                } else {
                    Err(e)
                }
            });
            let Ok(slot) = slot else {
                tracing::warn!(
                    socket = H::NAME,
                    "connection limit reached; closing a new connection"
                );
                continue;
            };
            let conn = Connection {
                stream,
                idle: limits.idle_timeout,
                stop: stop.clone(),
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let _slots = (slot, uid_slot);
                if let Err(e) = handler.connection(conn, peer).await {
                    tracing::debug!(error = %e, socket = H::NAME, "connection ended");
                }
            });
        }
        self.inner.close();
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let drained = async {
            let all = slots.acquire_many(count(limits.max_connections - reserved));
            let all_reserved = reserved_slots.acquire_many(count(reserved));
            let _ = tokio::join!(all, all_reserved);
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
            tracing::warn!(
                socket = H::NAME,
                "drain timeout: closing the remaining connections"
            );
        }
    }
}
