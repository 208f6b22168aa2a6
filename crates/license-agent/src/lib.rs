//! License Secret Agent, POS side: the daemon that holds this machine's rotating secrets and
//! answers "is this license valid here?" for local applications, plus its one-shot commands.
//! The `license-agent` binary (`src/bin/license-agent.rs`) only parses the command line and
//! calls [`commands`].
//!
//! # Where things are
//!
//! Folders follow a validation request from the socket to the secret, then the engine that
//! keeps the secrets fresh beside it. A module only imports modules listed below it.
//!
//! | module | what it is |
//! |---|---|
//! | [`commands`] | the one-shot commands (`enroll`, `status`, `check-config`, `server-status`, `renew-cert`) and `run` |
//! | [`daemon`] | `license-agent run`: wires everything below together, signals, systemd notify/watchdog, reload |
//! | [`sockets`] | the local sockets: one [`listener`](sockets::listener) (accept, connection limit, framing, idle timeout, peer credentials, drain) used by the [`validation`](sockets::validation) and [`management`](sockets::management) sockets |
//! | [`access`] | who may use which socket (uids, gids, roles), reloadable |
//! | [`engine`] | the rotation engine: [`decide`](engine::decide) (pure decisions from state and time: what is due, backoff, degraded or not, what to purge), the [`round`](engine::round) that talks to the server behind the [`AgentServer`](engine::server::AgentServer) trait, licenses, renewal, status, `state.json`, and the [`control`](engine::control) channel management uses |
//! | [`update`] | updates of the agent itself: the staging directory the daemon fills and the update step (`license-agent update apply`, root) that installs, health-checks and rolls back |
//! | [`enroll`] | joining the fleet: first enrollment, hardware identity, re-keying after a TPM clear |
//! | [`validation`] | where a validation is answered: [`Validator`](validation::Validator) (the checks in order), the [`keyring`](validation::keyring), the [`replay`](validation::replay) window, [`revocations`](validation::revocations); the verdict itself is `license_protocol::verdict` |
//! | [`stores`] | where secrets rest: the [`SecretStore`](stores::SecretStore) trait, [`file`](stores::file), [`tpm`](stores::tpm), and the [`fallback`](stores::fallback) between them |
//! | [`alerts`] | seed §7.2 alerts: audit, log, webhook |
//! | [`metrics`] | `metrics.prom` (seed §7.1) |
//! | [`audit`] | the agent's side of the tamper-evident log (`license-audit`), off the async workers |
//! | [`net`] | the network client: pinned TLS, the server's HTTP API |
//! | [`platform`] | what the machine gives: [`tpm`](platform::tpm), machine [`keys`](platform::keys), [`hardening`](platform::hardening), the guarded [`clock`](platform::clock), durable [`files`](platform::files), [`blocking`](platform::blocking) calls |
//! | [`config`] | `config.toml`: parsing, defaults, checks |

// In layer order (see the table above); a blank line between modules keeps rustfmt from
// sorting them, and `tests/layering.rs` checks both the order and the imports.
pub mod commands;

pub mod daemon;

pub mod sockets;

pub mod access;

pub mod engine;

pub mod update;

pub mod enroll;

pub mod validation;

pub mod stores;

pub mod alerts;

pub mod metrics;

pub mod audit;

pub mod net;

pub mod platform;

pub mod config;
