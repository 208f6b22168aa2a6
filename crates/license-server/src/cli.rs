//! Command line of `license-server`: `init`, `serve`, `admin …`, `openapi`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use license_server::clock::Timestamp;

#[derive(Debug, Parser)]
#[command(
    name = "license-server",
    version,
    about = "License Secret Agent server: per-machine PKI, enrollment, admin API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a data directory: CA, TLS certificate, license signing key, master key, database.
    Init(InitArgs),
    /// Run the public, agent (mTLS) and admin listeners.
    Serve(ServeArgs),
    /// Administer clients, install tokens, machines, certificates and licenses (works on the
    /// database directly, so the server need not be running).
    Admin(AdminArgs),
    /// Print the OpenAPI document of every route.
    Openapi,
}

/// Listener and URL overrides shared by `init` (written to server.toml) and `serve`.
#[derive(Debug, Args, Clone, Default)]
pub struct ListenArgs {
    /// Public listener (bootstrap, install.sh, downloads) [default: 0.0.0.0:8443].
    #[arg(long, value_name = "ADDR")]
    pub public_listen: Option<SocketAddr>,
    /// Agent listener, TLS 1.3 with client certificates [default: 0.0.0.0:8444].
    #[arg(long, value_name = "ADDR")]
    pub agent_listen: Option<SocketAddr>,
    /// Admin listener [default: 127.0.0.1:8445].
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Public URL as machines see it [default: https://PUBLIC_HOST:PORT].
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
    /// Agent API URL as machines see it [default: https://PUBLIC_HOST:PORT].
    #[arg(long, value_name = "URL")]
    pub agent_url: Option<String>,
    /// Database: sqlite://PATH or postgres://… [default: DATA_DIR/license.db].
    #[arg(long, value_name = "URL", env = "LICENSE_SERVER_DATABASE_URL")]
    pub database_url: Option<String>,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// DNS name in the server certificate (repeatable); the first is the public host.
    #[arg(long = "dns-name", value_name = "NAME")]
    pub dns_names: Vec<String>,
    /// IP address in the server certificate (repeatable) [default: 127.0.0.1 when no name].
    #[arg(long = "ip", value_name = "IP")]
    pub ips: Vec<IpAddr>,
    #[command(flatten)]
    pub listen: ListenArgs,
    /// Lifetime of machine certificates, in days.
    #[arg(long, value_name = "DAYS")]
    pub certificate_validity_days: Option<u32>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub listen: ListenArgs,
    /// Bootstrap requests allowed per client IP and minute.
    #[arg(long, value_name = "N")]
    pub bootstrap_rate_per_minute: Option<u32>,
    /// Lifetime of a new secret version, issue to valid_until [server.toml: 172800].
    #[arg(long, value_name = "SECS")]
    pub secret_validity_secs: Option<u64>,
    /// Grace after valid_until during which tokens still validate [server.toml: 604800].
    #[arg(long, value_name = "SECS")]
    pub secret_grace_secs: Option<u64>,
    /// Print the ready line as JSON (addresses and URLs) for scripts and tests.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    #[arg(
        long,
        value_name = "DIR",
        global = true,
        env = "LICENSE_SERVER_DATA_DIR"
    )]
    pub data_dir: Option<PathBuf>,
    /// Database override [default: from DATA_DIR/server.toml].
    #[arg(
        long,
        value_name = "URL",
        global = true,
        env = "LICENSE_SERVER_DATABASE_URL"
    )]
    pub database_url: Option<String>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Clients (the vendor's customers).
    #[command(subcommand)]
    Client(ClientCommand),
    /// One-time install tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Enrolled machines.
    #[command(subcommand)]
    Machine(MachineCommand),
    /// Machine certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Licenses: issue, list, revoke, print a token.
    #[command(subcommand)]
    License(LicenseCommand),
    /// Bearer tokens for the admin HTTP API.
    #[command(subcommand, name = "api-token")]
    ApiToken(ApiTokenCommand),
    /// The server-side audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The server's keys: what each one is, what depends on it, and their rollovers.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Agent releases: publish, list, roll out, pause, resume, withdraw, rotate the release key.
    #[command(subcommand)]
    Release(ReleaseCommand),
}

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Store an agent binary and sign its manifest with the release key (created on first
    /// use); it is offered at once to the machines its rollout covers.
    Publish {
        /// The agent binary.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// MAJOR.MINOR.PATCH.
        #[arg(long, value_name = "V")]
        version: license_protocol::release::Version,
        /// Release channel (a-z, 0-9, '-').
        #[arg(long, value_name = "C", default_value = license_server::service::releases::DEFAULT_CHANNEL)]
        channel: license_protocol::release::Channel,
        /// Architecture as Rust names it [default: this host's, std::env::consts::ARCH].
        #[arg(long, value_name = "ARCH")]
        arch: Option<String>,
        /// Agents older than this must not take the release.
        #[arg(long, value_name = "V")]
        min_version: Option<license_protocol::release::Version>,
        /// Mark it a rollback: agents newer than it take it all the same.
        #[arg(long)]
        rollback: bool,
        /// Share of the channel's machines offered the release, 0 to 100.
        #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
        percent: u8,
        /// Clients whose every machine is offered the release, comma separated.
        #[arg(long, value_delimiter = ',', value_name = "UUID,…")]
        clients: Vec<uuid::Uuid>,
        /// Failed or refused updates that halt the rollout.
        #[arg(long, value_name = "N", default_value_t = license_server::service::releases::DEFAULT_HALT_AFTER_FAILURES,
              value_parser = clap::value_parser!(u32).range(1..))]
        halt_after_failures: u32,
    },
    /// Every release, newest first, with its rollout and the machines' report counts.
    List {
        #[arg(long, value_name = "C")]
        channel: Option<String>,
    },
    /// One release.
    Show {
        /// The release id, or a version exactly one release has.
        release: String,
    },
    /// Set the percentage of machines offered the release and add named clients.
    Rollout {
        /// The release id, or a version exactly one release has.
        release: String,
        /// 0 to 100.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(0..=100))]
        percent: Option<u8>,
        /// Clients to add, comma separated.
        #[arg(long, value_delimiter = ',', value_name = "UUID,…")]
        clients: Vec<uuid::Uuid>,
    },
    /// Stop offering the release until resumed.
    Pause {
        /// The release id, or a version exactly one release has.
        release: String,
    },
    /// Offer a paused or halted release again (clears a halt).
    Resume {
        /// The release id, or a version exactly one release has.
        release: String,
    },
    /// Withdraw the release for good: no more offers nor downloads.
    Withdraw {
        /// The release id, or a version exactly one release has.
        release: String,
    },
    /// A new release key becomes current, the previous one is retired, and every release not
    /// withdrawn is re-signed with the new key.
    #[command(name = "rotate-key")]
    RotateKey,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Every key the server holds: the CA, the TLS certificate, the license keys and the
    /// master keys, with their age, what depends on them and when they expire.
    Status,
    /// Roll the license signing key over: a new key signs new tokens and rotate answers; the
    /// current one becomes previous and its tokens keep validating. Agents learn the new key
    /// at their next poll. Replicas with their own data directory need a copy of
    /// license-keys.json (docs/OPERATIONS.md).
    #[command(name = "rotate-license")]
    RotateLicense,
    /// Retire a license key (e.g. compromised): tokens signed by it answer `key_retired` on
    /// every agent that has heard of it. Refused for the current key (rotate first).
    #[command(name = "retire-license")]
    RetireLicense {
        /// The key's id (16 hex digits, as `keys status` lists it).
        key_id: license_protocol::license_keys::KeyId,
    },
    /// Announce a new TLS key (step 1 of 2): agents learn its pin at their next poll and
    /// accept either key from then on. Switch to it with `switch-tls` once they have
    /// (docs/OPERATIONS.md "Rolling the TLS key over").
    #[command(name = "rotate-tls")]
    RotateTls,
    /// Serve the announced TLS key (step 2 of 2) with a fresh certificate; agents refuse the
    /// old key once they hear of the switch. Takes effect when serving processes restart.
    #[command(name = "switch-tls")]
    SwitchTls,
    /// Roll the CA over: a new CA, cross-signed by the current one, issues machine
    /// certificates (each machine moves at its next renewal) and the server's; the current CA
    /// stays trusted until `retire-ca`. Takes effect when serving processes restart.
    #[command(name = "rotate-ca")]
    RotateCa,
    /// Stop trusting the previous CA. Refused while active machine certificates it issued can
    /// still renew (`keys status` counts them), unless --force.
    #[command(name = "retire-ca")]
    RetireCa {
        /// Retire it anyway (e.g. compromised): machines still under it can no longer connect.
        #[arg(long)]
        force: bool,
    },
    /// Roll the master key over online: a new key seals new secrets, every stored secret is
    /// re-encrypted under it in batches, then the old key is retired. Safe to run again after
    /// an interruption: it finishes the job. Replicas with their own data directory need a
    /// copy of master-keys.json (docs/OPERATIONS.md).
    #[command(name = "rotate-master")]
    RotateMaster {
        /// Keep the old key in the key set once no secret uses it.
        #[arg(long)]
        keep_old: bool,
        /// Secrets re-encrypted per transaction.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        batch_size: i64,
        /// How long to wait for every serving process to hold the new key, e.g. 30s, 5m.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    Create {
        #[arg(long)]
        name: String,
    },
    List,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Mint a token; it is printed once (or only written into a Windows installer) and stored
    /// hashed.
    Create {
        #[arg(long = "client", value_name = "CLIENT_ID")]
        client: String,
        /// Lifetime, e.g. 24h, 30m, 2d [default: 24h].
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// Bind the token to this machine of the client: it re-enrolls that machine (a wiped or
        /// replaced till) under whatever hardware id it reports, with a new key.
        #[arg(long = "machine", value_name = "MACHINE_ID")]
        machine: Option<String>,
        /// Write the Windows installer carrying the token to this file (mode 0600) instead of
        /// printing the token: the Windows agent with the server, its pin and the token appended.
        #[arg(long, value_name = "OUT.exe")]
        windows_installer: Option<PathBuf>,
        /// The Windows agent (license-agent.exe) to build the installer from [default:
        /// `windows_stub` in server.toml, else DATA_DIR/windows/license-agent.exe].
        #[arg(long, value_name = "PATH", requires = "windows_installer")]
        windows_stub: Option<PathBuf>,
    },
    List {
        #[arg(long = "client", value_name = "CLIENT_ID")]
        client: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum MachineCommand {
    List {
        #[arg(long = "client", value_name = "CLIENT_ID")]
        client: Option<String>,
    },
    Show {
        id: String,
    },
    /// Block this machine only; effective at its next request.
    Revoke {
        id: String,
    },
    Restore {
        id: String,
    },
    /// Forget the machine, its certificates, secrets and licenses.
    Delete {
        id: String,
    },
    /// Ask the machine to rotate its secret now (it sees the request in its secret status).
    Rotate {
        id: String,
    },
    /// The machine's secret versions: states and dates (never the secrets).
    Secrets {
        id: String,
    },
    /// Invalidate one secret version: tokens under it stop validating.
    #[command(name = "invalidate-secret")]
    InvalidateSecret {
        id: String,
        version: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum LicenseCommand {
    /// Issue a license for one machine; prints it, with its token once the machine holds a secret.
    Issue {
        #[arg(long = "machine", value_name = "MACHINE_ID")]
        machine: String,
        /// Features granted, comma separated: pos.sale,pos.refund
        #[arg(long, value_delimiter = ',', required = true, value_name = "A,B")]
        features: Vec<String>,
        /// Expiry, RFC 3339 [default: never].
        #[arg(long, value_name = "RFC3339", value_parser = parse_time, conflicts_with = "expires_in")]
        expires: Option<Timestamp>,
        /// Expiry relative to now: 30d, 12h.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        expires_in: Option<std::time::Duration>,
        /// Start of validity, RFC 3339 [default: now].
        #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
        not_before: Option<Timestamp>,
        /// A metadata entry (repeatable).
        #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        metadata: Vec<(String, String)>,
    },
    List {
        #[arg(long = "machine", value_name = "MACHINE_ID")]
        machine: Option<String>,
    },
    /// Revoke a license: online validation answers `revoked`, the agent learns it at its next fetch.
    Revoke { id: String },
    /// Print the license's token under its machine's current secret version.
    Token { id: String },
}

fn parse_time(s: &str) -> Result<Timestamp, String> {
    Timestamp::parse_rfc3339(s)
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    Stats,
    List {
        #[arg(long = "machine", value_name = "MACHINE_ID")]
        machine: Option<String>,
        #[arg(long = "client", value_name = "CLIENT_ID")]
        client: Option<String>,
    },
    Revoke {
        serial: String,
    },
    Restore {
        serial: String,
    },
    /// Delete revoked, superseded and expired certificates.
    Purge,
}

#[derive(Debug, Subcommand)]
pub enum ApiTokenCommand {
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "readonly")]
        role: crate::RoleArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    List {
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: i64,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
}
