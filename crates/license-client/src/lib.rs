//! Client library for POS applications: asks the local License Secret Agent whether a license
//! token is valid, over the agent's Unix socket, or its named pipe on Windows (DESIGN.md §3.2;
//! the wire protocol is in `docs/PROTOCOL.md`).
//!
//! A POS application links this crate (Rust) or its C ABI (`liblicense_client.so`, on Windows
//! `license_client.dll`, and `include/license_client.h`, see [`ffi`]) instead of speaking the
//! socket protocol itself. The client sends each request with a fresh random nonce and only
//! accepts an answer that echoes it, reads at most [`MAX_FRAME_LEN`] bytes per answer, and never
//! waits longer than its timeouts. [`transport`] is the byte stream underneath, the one place
//! that differs between Unix and Windows.
//!
//! # Example
//!
//! The example starts a stand-in agent (on a temporary socket, or a pipe on Windows) that
//! answers every request with a valid license; a real application connects to
//! [`DEFAULT_SOCKET_PATH`] with [`Client::connect_default`].
//!
//! ```
//! use license_client::{Client, ClientError};
//! # use std::io::{Read, Write};
//! # use license_ipc::ipc::{self, Request, Response, ValidAnswer};
//! #
//! # let dir = tempfile::tempdir()?;
//! # let socket = if cfg!(windows) {
//! #     std::path::PathBuf::from(format!(r"\\.\pipe\license-client-doc-{}", std::process::id()))
//! # } else {
//! #     dir.path().join("agent.sock")
//! # };
//! # let mut listener = license_client::transport::Listener::bind(&socket)?;
//! # std::thread::spawn(move || -> std::io::Result<()> {
//! #     let mut conn = listener.accept()?;
//! #     loop {
//! #         let mut header = [0u8; 4];
//! #         if conn.read_exact(&mut header).is_err() { return Ok(()); }
//! #         let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
//! #         conn.read_exact(&mut payload)?;
//! #         let Ok(Request::ValidateLicense { nonce, .. }) = ipc::parse_request(&payload) else {
//! #             return Ok(());
//! #         };
//! #         let answer = Response::Valid(ValidAnswer {
//! #             valid: true,
//! #             expires_at: Some("2030-01-01T00:00:00Z".into()),
//! #             features: vec!["pos".into(), "loyalty".into()],
//! #             metadata: Default::default(),
//! #             nonce: nonce.to_string(),
//! #         });
//! #         conn.write_all(&ipc::encode_frame(&serde_json::to_vec(&answer)?))?;
//! #     }
//! # });
//! let mut client = Client::connect(&socket)?;
//! let validation = client.validate_license("bGljZW5zZSB0b2tlbg==")?;
//! if validation.is_valid() && validation.has_feature("loyalty") {
//!     println!("loyalty enabled until {:?}", validation.expires_at);
//! } else {
//!     println!("not licensed: {:?}", validation.reason);
//! }
//! // The same connection serves further requests.
//! assert!(client.validate_license("bGljZW5zZSB0b2tlbg==")?.has_feature("pos"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! An `Err` from [`Client::validate_license`] means there is no verdict (agent unreachable,
//! timed out, answered something that is not an answer to this request): the application must
//! treat the license as not validated.
#![deny(unsafe_code)]

mod client;
mod error;
#[allow(unsafe_code)]
pub mod ffi;
pub mod transport;

pub use client::{Client, ClientConfig, Validation, DEFAULT_SOCKET_PATH, DEFAULT_TIMEOUT};
pub use error::ClientError;
pub use license_ipc::ipc::{Reason, MAX_FRAME_LEN};
