//! Wire types shared by `license-server` and `license-agent`.
//!
//! This crate does no I/O. Everything that crosses the network between the agent and the
//! server is defined here once, and every value read from the wire is parsed into a typed
//! value (or refused) at the boundary, so that neither side ever handles an unchecked string.
//!
//! - [`identity`]: the machine identity carried in a certificate's CN, `client_id:machine_id`.
//! - [`pin`]: server pins, `sha256:<base64 of SHA-256 of the SubjectPublicKeyInfo>`.
//! - [`enroll`]: `POST /api/public/bootstrap` request and response.
//! - [`installer`]: the trailer the server appends to the Windows installer (server, pin,
//!   one-time token).
//! - [`agent_api`]: messages of the mTLS agent API.
//! - [`watch`]: the change stream an agent holds (`GET /api/v1/watch`, server-sent events).
//! - [`error`]: the JSON error body every endpoint answers with.
//! - [`secret`]: machine secrets and their ECIES delivery to the machine's key.
//! - [`rotation`]: rotate-secret request and response, with their signatures.
//! - [`license_keys`]: license signing key ids, the key set the server announces, the keys an
//!   agent trusts.
//! - [`server_trust`]: the server's TLS keys and CAs an agent trusts, and their rollover.
//! - [`release`]: agent releases: versions, signed manifests, release keys, rollout, update
//!   reports.
//! - [`token`]: license tokens, signed and encrypted (format v2; v1 still read).
//! - [`verdict`]: the one verdict on a token and its reason codes (agent and server).
//! - [`whole`]: integers in JSON bodies read as JSON Schema reads them (`60.0` is `60`).
//! - [`ipc`]: the local socket protocol between POS applications and the agent.
//! - [`mgmt`]: the management socket between `license-agent-cli` and the agent.
//!
//! [`ipc`], [`mgmt`] and [`rotation::Nonce`] are defined in the `license-ipc` crate, so that a
//! client of the agent's sockets does not link this crate's cryptography, and re-exported here.
//!
//! ```
//! use license_protocol::identity::MachineIdentity;
//!
//! let id: MachineIdentity = "550e8400-e29b-41d4-a716-446655440000:6ba7b810-9dad-11d1-80b4-00c04fd430c8"
//!     .parse()
//!     .unwrap();
//! assert_eq!(id.machine_id.to_string(), "6ba7b810-9dad-11d1-80b4-00c04fd430c8");
//! assert!("not-a-cn".parse::<MachineIdentity>().is_err());
//! ```
#![forbid(unsafe_code)]

pub mod agent_api;
pub mod enroll;
pub mod error;
pub mod identity;
pub mod installer;
/// The validation socket's wire types, defined in `license-ipc` (which clients take without the
/// cryptography of this crate) and re-exported here under their old path.
pub use license_ipc::ipc;
pub mod license_keys;
mod object;
/// The management socket's wire types, defined in `license-ipc` and re-exported here.
pub use license_ipc::mgmt;
pub mod pin;
pub mod release;
pub mod rotation;
pub mod secret;
pub mod server_trust;
pub mod token;
pub mod verdict;
pub mod watch;
pub mod whole;
