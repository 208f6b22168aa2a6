//! The management socket's client side: one request, one answer, over the agent's Unix socket
//! or, on Windows, its named pipe.
//!
//! Framing is the validation socket's ([`license_ipc::ipc`]): a 4-byte big-endian length
//! then UTF-8 JSON, and so is the transport ([`license_client::transport`]). The caller chooses
//! how long to wait for the answer, because `rotate` only answers once a whole rotation round is
//! over.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use license_client::transport::Stream;
use license_ipc::ipc::{encode_frame, frame_len, FrameError};
use license_ipc::mgmt::{MgmtRequest, MgmtResponse};

/// Why no answer could be had from the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket (or pipe) at the path, or nobody listening on it (exit code 4).
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
/// for each read and write (and, on Windows, for a busy pipe).
pub fn call(
    socket: &Path,
    request: &MgmtRequest,
    timeout: Duration,
) -> Result<MgmtResponse, ClientError> {
    let secs = timeout.as_secs();
    let mut stream = Stream::connect(socket, timeout, timeout).map_err(|source| {
        let path = socket.to_path_buf();
        match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ClientError::Unreachable { path, source }
            }
            // Windows: every instance of the pipe stayed busy.
            io::ErrorKind::TimedOut => ClientError::Timeout(secs),
            _ => ClientError::Connect { path, source },
        }
    })?;
    let io_err = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout(secs),
        io::ErrorKind::UnexpectedEof => ClientError::Closed,
        _ => ClientError::Io(e),
    };

    let payload = serde_json::to_vec(request).map_err(|e| ClientError::Io(io::Error::other(e)))?;
    stream.write_all(&encode_frame(&payload)).map_err(io_err)?;
    stream.flush().map_err(io_err)?;

    let mut header = [0u8; 4];
    stream.read_exact(&mut header).map_err(io_err)?;
    let mut answer = vec![0u8; frame_len(header)?];
    stream.read_exact(&mut answer).map_err(io_err)?;
    serde_json::from_slice(&answer).map_err(|e| ClientError::BadAnswer(e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::thread;

    use license_client::transport::Listener;
    use serde_json::json;

    use super::*;

    /// A socket in `dir` (Unix) or a pipe name (Windows) of its own for `test`.
    fn endpoint(dir: &Path, test: &str) -> PathBuf {
        if cfg!(windows) {
            PathBuf::from(format!(
                r"\\.\pipe\license-agent-cli-test-{}-{test}",
                std::process::id()
            ))
        } else {
            dir.join(format!("{test}.sock"))
        }
    }

    fn read_request(stream: &mut Stream) -> MgmtRequest {
        let mut header = [0u8; 4];
        stream.read_exact(&mut header).unwrap();
        let mut payload = vec![0u8; frame_len(header).unwrap()];
        stream.read_exact(&mut payload).unwrap();
        serde_json::from_slice(&payload).unwrap()
    }

    #[test]
    fn a_request_and_its_answer_cross_the_transport() {
        let dir = tempfile::tempdir().unwrap();
        let path = endpoint(dir.path(), "answer");
        let mut listener = Listener::bind(&path).unwrap();
        let agent = thread::spawn(move || {
            let mut stream = listener.accept().unwrap();
            let request = read_request(&mut stream);
            let answer = MgmtResponse::ok(json!({ "op": request.name() }));
            let frame = encode_frame(&serde_json::to_vec(&answer).unwrap());
            stream.write_all(&frame).unwrap();
        });
        let answer = call(
            &path,
            &MgmtRequest::Status { token: None },
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(answer.ok);
        assert_eq!(answer.result, Some(json!({ "op": "status" })));
        agent.join().unwrap();
    }

    #[test]
    fn nobody_listening_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let err = call(
            &endpoint(dir.path(), "missing"),
            &MgmtRequest::Status { token: None },
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(err.is_unreachable(), "{err}");
    }

    #[test]
    fn a_silent_agent_is_a_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = endpoint(dir.path(), "silent");
        let mut listener = Listener::bind(&path).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let agent = thread::spawn(move || {
            let mut stream = listener.accept().unwrap();
            let _request = read_request(&mut stream);
            let _ = done_rx.recv();
        });
        let started = std::time::Instant::now();
        let err = call(
            &path,
            &MgmtRequest::Status { token: None },
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(err, ClientError::Timeout(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        done_tx.send(()).unwrap();
        agent.join().unwrap();
    }
}
