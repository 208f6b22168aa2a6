//! The management socket's client side: one request, one answer, over a Unix socket.
//!
//! Framing is the validation socket's ([`license_ipc::ipc`]): a 4-byte big-endian length
//! then UTF-8 JSON. The caller chooses how long to wait for the answer, because `rotate` only
//! answers once a whole rotation round is over.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use license_ipc::ipc::{encode_frame, frame_len, FrameError};
use license_ipc::mgmt::{MgmtRequest, MgmtResponse};

/// Why no answer could be had from the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket at the path, or nobody listening on it (exit code 4).
    #[error("the agent is not reachable at {path}: {source} (is license-agent running?)")]
    Unreachable { path: PathBuf, source: io::Error },
    #[error("cannot connect to {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("no answer from the agent within {0} s")]
    Timeout(u64),
    #[error("the agent closed the connection without answering")]
    Closed,
    #[error("talking to the agent: {0}")]
    Io(#[source] io::Error),
    #[error("the agent's answer is not a valid frame: {0}")]
    Frame(#[from] FrameError),
    #[error("the agent's answer is not a management response: {0}")]
    BadAnswer(String),
}

impl ClientError {
    /// Whether the agent is simply not there (as opposed to a conversation gone wrong).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }
}

/// Sends `request` to the agent at `socket` and reads its answer, waiting at most `timeout`
/// for each read and write.
pub fn call(
    socket: &Path,
    request: &MgmtRequest,
    timeout: Duration,
) -> Result<MgmtResponse, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| {
        let path = socket.to_path_buf();
        match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ClientError::Unreachable { path, source }
            }
            _ => ClientError::Connect { path, source },
        }
    })?;
    let secs = timeout.as_secs();
    let io_err = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout(secs),
        io::ErrorKind::UnexpectedEof => ClientError::Closed,
        _ => ClientError::Io(e),
    };
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;

    let payload = serde_json::to_vec(request).map_err(|e| ClientError::Io(io::Error::other(e)))?;
    stream.write_all(&encode_frame(&payload)).map_err(io_err)?;
    stream.flush().map_err(io_err)?;

    let mut header = [0u8; 4];
    stream.read_exact(&mut header).map_err(io_err)?;
    let mut answer = vec![0u8; frame_len(header)?];
    stream.read_exact(&mut answer).map_err(io_err)?;
    serde_json::from_slice(&answer).map_err(|e| ClientError::BadAnswer(e.to_string()))
}
