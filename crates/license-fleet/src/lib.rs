//! Fleet simulator: thousands of simulated agents against real `license-server` processes,
//! to show what a large fleet costs and that it holds.
//!
//! Each simulated agent has its own machine identity, enrolled through the real bootstrap
//! (`POST /api/public/bootstrap` with a one-time install token and a CSR) and kept in a cache
//! file so that runs can be repeated against the same server ([`identity`]). It then behaves
//! as `license-agent` does on the wire ([`agent`]): rounds of secret status and license
//! tokens, a signed secret rotation with its acknowledgement when the server asks for one or
//! its own schedule says so, and either
//!
//! - `watch` (today's agent): one kept HTTP/2 connection holding `GET /api/v1/watch`, a round
//!   when a change is pushed and every `watch_poll_interval` otherwise; or
//! - `poll` (the agent before the watch stream): a new TLS connection, with a full handshake,
//!   for every round, every `poll_interval`.
//!
//! A run mixes profiles ([`agent::Profile`]): online, flapping (drops its connection and comes
//! back), offline (never connects during the run) and revoked (refused; backs off as a real
//! agent does). Every request's latency is recorded per route ([`stats`]), and every pushed
//! change with the time it arrived, so a benchmark can measure propagation. [`process`] reads
//! a server process's CPU time and memory from `/proc`.
//!
//! The `license-fleet` binary drives it from the command line (`enroll`, `run`); the crate's
//! benchmark and tests drive it against servers they start.

pub mod agent;
pub mod http;
pub mod identity;
pub mod process;
pub mod stats;

pub use agent::{run_fleet, Fleet, FleetConfig, Mode, Profile, ProfileMix};
pub use identity::{Enroller, Identity, IdentityCache};
pub use stats::Report;
