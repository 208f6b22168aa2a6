//! License server: the vendor side of License Secret Agent.
//!
//! A per-machine PKI (one mTLS client certificate per POS machine, `CN = client_id:machine_id`),
//! one-time install tokens and bootstrap enrollment, an agent API over TLS 1.3 mTLS with
//! per-request revocation, an admin API and CLI, and an append-only audit trail. Storage is
//! SQLite in the data directory by default, PostgreSQL for several replicas.
//!
//! The agent API also rotates each machine's secret (kept encrypted under the master key) and
//! hands out its license tokens, re-issued under every new secret version, and offers and serves
//! signed agent releases in a staged rollout (`service::releases`).
//!
//! The request path reads top-down in the tree: `http/{listener,tls}` → `http/{public,agent,admin}`
//! → `service/{enroll,recover,secrets,licenses,admin}` (certificates issued by one function,
//! `service::certificates::issue`) → `pki` and `store/<table family>`.
#![forbid(unsafe_code)]

pub mod clock;
pub mod config;
pub mod datadir;
pub mod http;
pub mod key_files;
pub mod license_keys;
pub mod master_keys;
pub mod pki;
pub mod release_keys;
pub mod server_trust;
pub mod service;
pub mod store;
pub mod webhook;
