//! `Client`: one blocking connection to the agent's validation socket, carrying any number of
//! `validate_license` exchanges (DESIGN.md §3.2, docs/PROTOCOL.md).
//!
//! Every request gets a fresh random nonce and an answer only counts if it echoes that nonce: a
//! stale, replayed or misrouted answer is refused ([`ClientError::NonceMismatch`]) and can never
//! turn into a "valid".

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use license_ipc::ipc::{self, Reason, Response};
use license_ipc::Nonce;

use crate::transport::{self, Stream};
use crate::ClientError;

/// Where the agent listens unless configured otherwise (DESIGN.md §3.2):
/// `/run/license-agent/agent.sock` on Unix, the pipe `\\.\pipe\license-agent` on Windows.
pub const DEFAULT_SOCKET_PATH: &str = transport::DEFAULT_VALIDATION_PATH;

/// Read and write timeout of a connection unless configured otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach the agent: socket path and timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The agent's socket: a Unix socket's path, or on Windows a pipe name.
    pub socket_path: PathBuf,
    /// Longest wait for the agent's answer (each read).
    pub read_timeout: Duration,
    /// Longest wait for the agent to accept a request (each write).
    pub write_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self::new(DEFAULT_SOCKET_PATH)
    }
}

impl ClientConfig {
    /// The given socket with the default timeouts.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        Self {
            socket_path: socket_path.into(),
            read_timeout: DEFAULT_TIMEOUT,
            write_timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same configuration with both timeouts set to `timeout`. A zero duration is not a
    /// valid socket timeout and counts as one millisecond.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self.write_timeout = timeout;
        self
    }
}

/// The agent's verdict on one license token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    /// Whether the license is valid now.
    pub valid: bool,
    /// Why it is not; `None` exactly when `valid` is true.
    pub reason: Option<Reason>,
    /// When the license expires (RFC 3339); `None` when it does not, or when not valid.
    pub expires_at: Option<String>,
    /// The licensed features (empty when not valid).
    pub features: Vec<String>,
    /// Free-form license metadata (empty when not valid).
    pub metadata: BTreeMap<String, String>,
}

impl Validation {
    /// Whether the license is valid now.
    pub fn is_valid(&self) -> bool {
        self.valid
    }

    /// Whether the license is valid and grants `feature`.
    pub fn has_feature(&self, feature: &str) -> bool {
        self.valid && self.features.iter().any(|f| f == feature)
    }

    /// A metadata value of a valid license.
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// Checks an answer against the nonce of the request it answers.
    fn from_response(response: Response, sent: &str) -> Result<Self, ClientError> {
        match response {
            Response::Valid(v) => {
                if !v.valid {
                    return Err(ClientError::Malformed(
                        "an answer with features and metadata must say \"valid\": true".into(),
                    ));
                }
                if !v.nonce.eq_ignore_ascii_case(sent) {
                    return Err(ClientError::NonceMismatch);
                }
                Ok(Validation {
                    valid: true,
                    reason: None,
                    expires_at: v.expires_at,
                    features: v.features,
                    metadata: v.metadata,
                })
            }
            Response::Invalid(i) => {
                if i.valid {
                    return Err(ClientError::Malformed(
                        "an answer with a reason must say \"valid\": false".into(),
                    ));
                }
                // An answer without a nonce is one the agent gave before it could read the
                // request's (e.g. `not_authorized`); it can only refuse, so it is accepted as a
                // refusal. An answer with another nonce is not ours at all.
                if let Some(nonce) = &i.nonce {
                    if !nonce.eq_ignore_ascii_case(sent) {
                        return Err(ClientError::NonceMismatch);
                    }
                }
                Ok(Validation {
                    valid: false,
                    reason: Some(i.reason),
                    expires_at: None,
                    features: Vec::new(),
                    metadata: BTreeMap::new(),
                })
            }
        }
    }
}

/// A connection to the license agent.
///
/// Requests on one connection are sequential (`&mut self`); share a client between threads
/// behind a mutex, or open one per thread. After an error that may have left the connection
/// half-read (timeout, malformed or oversized answer, nonce mismatch, close), the connection is
/// dropped and later calls fail with [`ClientError::Closed`]: connect again.
#[derive(Debug)]
pub struct Client {
    stream: Option<Stream>,
}

impl Client {
    /// Connects to the agent at `path` with the default timeouts.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        Self::connect_with(&ClientConfig::new(path.as_ref()))
    }

    /// Connects to the agent at [`DEFAULT_SOCKET_PATH`] with the default timeouts.
    pub fn connect_default() -> Result<Self, ClientError> {
        Self::connect_with(&ClientConfig::default())
    }

    /// Connects as `config` says.
    pub fn connect_with(config: &ClientConfig) -> Result<Self, ClientError> {
        let stream = Stream::connect(
            &config.socket_path,
            config.read_timeout,
            config.write_timeout,
        )
        .map_err(|source| ClientError::Connect {
            path: config.socket_path.clone(),
            source,
        })?;
        Ok(Self {
            stream: Some(stream),
        })
    }

    /// Asks the agent whether `license_token` (the base64 token as issued) is valid now.
    ///
    /// `Ok` means the agent answered this very request; read the verdict in the
    /// [`Validation`]. `Err` means there is no verdict: treat the license as not validated.
    pub fn validate_license(&mut self, license_token: &str) -> Result<Validation, ClientError> {
        let stream = self.stream.as_mut().ok_or(ClientError::Closed)?;
        let result = exchange(stream, license_token);
        // Only a completed exchange (or one refused before anything was sent) leaves the
        // stream at a frame boundary.
        if let Err(e) = &result {
            if !matches!(e, ClientError::RequestTooLarge(_)) {
                self.stream = None;
            }
        }
        result
    }
}

/// One request and its answer on `stream`.
fn exchange(stream: &mut Stream, license_token: &str) -> Result<Validation, ClientError> {
    let nonce = Nonce::random().to_string();
    let request = serde_json::json!({
        "op": "validate_license",
        "license_token": license_token,
        "nonce": nonce,
    })
    .to_string();
    if request.len() > ipc::MAX_FRAME_LEN {
        return Err(ClientError::RequestTooLarge(request.len()));
    }
    if let Err(e) = stream.write_all(&ipc::encode_frame(request.as_bytes())) {
        let e = ClientError::from_io(e);
        // An agent that refuses this peer answers `not_authorized` as soon as it connects and
        // closes: the write then fails, but the answer may be waiting to be read. Only a
        // nonce-less refusal can be read this way (any other answer cannot be to this request).
        if matches!(e, ClientError::Closed) {
            if let Ok(Response::Invalid(refusal)) = read_answer(stream) {
                if refusal.nonce.is_none() {
                    return Validation::from_response(Response::Invalid(refusal), &nonce);
                }
            }
        }
        return Err(e);
    }
    Validation::from_response(read_answer(stream)?, &nonce)
}

/// Reads and parses one answer.
fn read_answer(stream: &mut Stream) -> Result<Response, ClientError> {
    let payload = read_frame(stream)?;
    serde_json::from_slice(&payload)
        .map_err(|e| ClientError::Malformed(format!("not a protocol answer: {e}")))
}

/// Reads one frame's payload, refusing an oversized one before reading it.
fn read_frame(stream: &mut Stream) -> Result<Vec<u8>, ClientError> {
    let mut header = [0u8; 4];
    stream
        .read_exact(&mut header)
        .map_err(ClientError::from_io)?;
    let len = ipc::frame_len(header).map_err(|e| match e {
        ipc::FrameError::TooLarge(n) => ClientError::FrameTooLarge(n),
        other => ClientError::Malformed(other.to_string()),
    })?;
    let mut payload = vec![0u8; len];
    stream
        .read_exact(&mut payload)
        .map_err(ClientError::from_io)?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(nonce: &str, flag: bool) -> Response {
        Response::Valid(ipc::ValidAnswer {
            valid: flag,
            expires_at: Some("2030-01-01T00:00:00Z".into()),
            features: vec!["pos".into(), "loyalty".into()],
            metadata: BTreeMap::from([("site".into(), "Lyon".into())]),
            nonce: nonce.into(),
        })
    }

    fn invalid(nonce: Option<&str>, flag: bool) -> Response {
        Response::Invalid(ipc::InvalidAnswer {
            valid: flag,
            reason: Reason::Revoked,
            nonce: nonce.map(str::to_string),
        })
    }

    const N: &str = "00112233445566778899aabbccddeeff";

    #[test]
    fn a_valid_answer_with_our_nonce_is_valid() {
        let v = Validation::from_response(valid(N, true), N).unwrap();
        assert!(v.is_valid());
        assert!(v.has_feature("pos"));
        assert!(!v.has_feature("pos2"));
        assert_eq!(v.metadata("site"), Some("Lyon"));
        assert_eq!(v.reason, None);
    }

    #[test]
    fn nonces_compare_without_case() {
        let upper = N.to_ascii_uppercase();
        assert!(Validation::from_response(valid(&upper, true), N).is_ok());
    }

    #[test]
    fn another_nonce_is_refused_whatever_the_verdict() {
        let other = "ffeeddccbbaa99887766554433221100";
        assert!(matches!(
            Validation::from_response(valid(other, true), N),
            Err(ClientError::NonceMismatch)
        ));
        assert!(matches!(
            Validation::from_response(invalid(Some(other), false), N),
            Err(ClientError::NonceMismatch)
        ));
    }

    #[test]
    fn inconsistent_valid_flags_are_malformed() {
        assert!(matches!(
            Validation::from_response(valid(N, false), N),
            Err(ClientError::Malformed(_))
        ));
        assert!(matches!(
            Validation::from_response(invalid(Some(N), true), N),
            Err(ClientError::Malformed(_))
        ));
    }

    #[test]
    fn a_refusal_without_nonce_is_a_refusal() {
        let v = Validation::from_response(invalid(None, false), N).unwrap();
        assert!(!v.is_valid());
        assert!(!v.has_feature("pos"));
        assert_eq!(v.reason, Some(Reason::Revoked));
    }
}
