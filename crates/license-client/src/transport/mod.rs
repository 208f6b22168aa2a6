//! The byte stream to the agent: its Unix socket on Unix, a byte-mode named pipe on Windows.
//!
//! Both carry the same frames (docs/PROTOCOL.md, "Framing") and both honour read and write
//! timeouts, so nothing above this module knows which one it talks through. [`Stream`] is what
//! [`Client`](crate::Client) uses, and what `license-agent-cli` uses for the management socket;
//! [`Listener`] is the other end, for tests, examples and benchmarks (the agent has its own
//! listener, which checks who connects).
//!
//! On Windows the client opens the pipe allowing the agent to *identify* it (to check its SID)
//! but not to impersonate it, waits for a busy pipe at most its write timeout, and cancels an
//! overlapped read or write that outlives its timeout.

use std::io::{self, Read, Write};
use std::path::Path;
use std::time::Duration;

#[cfg(unix)]
mod unix;
#[cfg(unix)]
use unix as imp;

#[cfg(windows)]
mod windows;
#[cfg(windows)]
use windows as imp;

/// Where the agent's validation endpoint is unless configured otherwise: a socket path on
/// Unix (DESIGN.md §3.2), a pipe name on Windows.
#[cfg(unix)]
pub const DEFAULT_VALIDATION_PATH: &str = "/run/license-agent/agent.sock";
/// Where the agent's validation endpoint is unless configured otherwise: a socket path on
/// Unix (DESIGN.md §3.2), a pipe name on Windows.
#[cfg(windows)]
pub const DEFAULT_VALIDATION_PATH: &str = r"\\.\pipe\license-agent";

/// A connection to the agent (or, from [`Listener::accept`], from a client).
#[derive(Debug)]
pub struct Stream {
    inner: imp::Stream,
}

impl Stream {
    /// Connects to the socket (Unix) or pipe (Windows) at `path`. Each later read waits at most
    /// `read_timeout` and each write at most `write_timeout` before failing with
    /// [`io::ErrorKind::TimedOut`] (or `WouldBlock` on Unix); a zero duration counts as 1 ms.
    /// On Windows, a pipe whose every instance is busy is waited for at most `write_timeout`.
    pub fn connect(
        path: &Path,
        read_timeout: Duration,
        write_timeout: Duration,
    ) -> io::Result<Self> {
        let inner = imp::Stream::connect(path, non_zero(read_timeout), non_zero(write_timeout))?;
        Ok(Self { inner })
    }
}

impl Read for Stream {
    /// Reads what has arrived (at least one byte, waiting for it); `Ok(0)` once the other end
    /// has closed.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Stream {
    /// Writes some of `buf`; a closed other end gives [`io::ErrorKind::BrokenPipe`].
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    /// Nothing is buffered on this side: a no-op.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The listening end of the transport, for tests, examples and benchmarks: it checks nothing
/// about who connects, unlike the agent's own listener.
#[derive(Debug)]
pub struct Listener {
    inner: imp::Listener,
}

impl Listener {
    /// Listens at `path`: a socket file that must not exist yet (Unix), or a pipe name that no
    /// other process may already serve (Windows; local clients only, default security).
    pub fn bind(path: &Path) -> io::Result<Self> {
        Ok(Self {
            inner: imp::Listener::bind(path)?,
        })
    }

    /// Waits for the next client. The stream has no timeouts: its reads wait for the client.
    ///
    /// On Windows a pipe instance exists only while `accept` waits (and from [`Listener::bind`]
    /// to the first `accept`): a client connecting in between finds the pipe busy and waits
    /// for the next `accept`, within its timeout.
    pub fn accept(&mut self) -> io::Result<Stream> {
        Ok(Stream {
            inner: self.inner.accept()?,
        })
    }
}

fn non_zero(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}
