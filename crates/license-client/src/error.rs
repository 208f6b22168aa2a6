//! `ClientError`: everything that can stop a validation from completing.
//!
//! A *completed* exchange is never an error, whatever the verdict: an agent answering
//! `{"valid": false, "reason": "revoked"}` gives `Ok(Validation { valid: false, .. })`. These
//! errors mean there is no trustworthy verdict at all, and a caller must treat the license as
//! not validated.

use std::path::PathBuf;

/// Why a validation did not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The agent's socket could not be reached (missing, refused, permission denied…).
    #[error("cannot connect to the license agent at {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Reading from or writing to the socket failed.
    #[error("I/O error talking to the license agent: {0}")]
    Io(#[source] std::io::Error),
    /// The agent did not answer within the read/write timeout.
    #[error("the license agent did not answer in time")]
    Timeout,
    /// The agent closed the connection before a whole answer arrived (or this client closed it
    /// after an earlier error left it unusable). Connect again.
    #[error("the license agent closed the connection before answering")]
    Closed,
    /// The answer's frame announces more than [`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN) bytes; it
    /// was not read.
    #[error("the agent's answer frame announces {0} bytes, over the {max}-byte limit", max = crate::MAX_FRAME_LEN)]
    FrameTooLarge(usize),
    /// The request would not fit in one frame (the token is far too long to be a token).
    #[error("the request is {0} bytes, over the {max}-byte frame limit", max = crate::MAX_FRAME_LEN)]
    RequestTooLarge(usize),
    /// The answer is not a well-formed protocol answer (bad JSON, missing or unknown field,
    /// inconsistent `valid` flag, empty frame).
    #[error("malformed answer from the license agent: {0}")]
    Malformed(String),
    /// The answer does not echo this request's nonce: it is not the answer to this request.
    #[error("the agent's answer does not echo the request's nonce")]
    NonceMismatch,
}

impl ClientError {
    /// Maps a socket read/write error, keeping timeouts apart.
    pub(crate) fn from_io(e: std::io::Error) -> Self {
        use std::io::ErrorKind;
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => ClientError::Timeout,
            ErrorKind::UnexpectedEof
            | ErrorKind::BrokenPipe
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted => ClientError::Closed,
            _ => ClientError::Io(e),
        }
    }
}
