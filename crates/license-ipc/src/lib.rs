//! The local socket wire types of the License Secret Agent: framing, validation requests and
//! answers with their reason codes, management requests and answers.
//!
//! A POS application (through `license-client`) and `license-agent-cli` only frame JSON on a
//! Unix socket; they take their wire types from this crate, which does no I/O and links no
//! cryptography, X.509 or OpenAPI code. The agent reads the same types (through
//! `license_protocol::ipc` and `license_protocol::mgmt`, which re-export these modules), so
//! both ends of a socket are defined once.
//!
//! - [`ipc`]: the validation socket between POS applications and the agent (DESIGN.md §3.2).
//! - [`mgmt`]: the management socket between `license-agent-cli` and the agent.
//! - [`Nonce`]: the request nonce an answer must echo.
//!
//! ```
//! use license_ipc::ipc::{self, Reason, Request, Response};
//! use license_ipc::Nonce;
//!
//! // A client's request, framed: 4-byte big-endian length, then UTF-8 JSON.
//! let nonce = Nonce::random();
//! let payload = serde_json::json!({
//!     "op": "validate_license",
//!     "license_token": "bGljZW5zZSB0b2tlbg==",
//!     "nonce": nonce.to_string(),
//! })
//! .to_string();
//! let frame = ipc::encode_frame(payload.as_bytes());
//! let len = ipc::frame_len(frame[..4].try_into().unwrap()).unwrap();
//!
//! // The agent parses the payload into a typed request, or a refusal with its reason code.
//! let Ok(Request::ValidateLicense { nonce: echoed, .. }) = ipc::parse_request(&frame[4..4 + len]) else {
//!     panic!("a well-formed request");
//! };
//! assert_eq!(echoed, nonce);
//! let (err, _) = ipc::parse_request(br#"{"op":"format_disk"}"#).unwrap_err();
//! assert_eq!(err.reason(), Reason::UnknownOp);
//!
//! // Answers are JSON too; a refusal names a stable reason.
//! let answer = Response::invalid(Reason::Revoked, Some(nonce.to_string()));
//! let json = serde_json::to_string(&answer).unwrap();
//! assert_eq!(serde_json::from_str::<Response>(&json).unwrap().nonce(), Some(&*nonce.to_string()));
//! ```
#![forbid(unsafe_code)]

mod codes;
pub mod ipc;
pub mod mgmt;
mod nonce;

pub use nonce::Nonce;
