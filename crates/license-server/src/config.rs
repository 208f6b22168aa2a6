//! `server.toml` in the data directory: where the server listens and how it presents itself.
//!
//! `license-server init` writes it from its flags; `serve` reads it, and its own flags override
//! single keys. Unknown keys are refused, naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default address of the public listener (bootstrap, install.sh, downloads).
pub const DEFAULT_PUBLIC_LISTEN: &str = "0.0.0.0:8443";
/// Default address of the agent listener (mTLS).
pub const DEFAULT_AGENT_LISTEN: &str = "0.0.0.0:8444";
/// Default address of the admin listener: loopback only.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8445";
/// Machine certificates live a year; renewal is per machine.
pub const DEFAULT_CERTIFICATE_VALIDITY_DAYS: u32 = 365;
/// Shortest machine-certificate lifetime `certificate_validity_secs` may set (tests).
pub const MIN_CERTIFICATE_VALIDITY_SECS: u64 = 60;
/// Longest machine-certificate lifetime, either key: ten years.
pub const MAX_CERTIFICATE_VALIDITY_DAYS: u32 = 3650;
/// A machine whose certificate expired may still renew it, proven by its old key, for this
/// many days after the expiry (a till switched off for up to two years recovers by itself).
pub const DEFAULT_CERTIFICATE_RENEW_AFTER_EXPIRY_DAYS: u32 = 730;
/// The server's own TLS certificate lives two years and renews itself at 2/3 of that.
pub const DEFAULT_SERVER_CERTIFICATE_VALIDITY_DAYS: u32 = 730;
/// How often a running server checks whether its TLS certificate is due for renewal.
pub const DEFAULT_SERVER_CERTIFICATE_CHECK_INTERVAL_SECS: u64 = 3600;
/// Install tokens live 24 h (seed 004).
pub const DEFAULT_INSTALL_TOKEN_TTL_SECS: u64 = 24 * 3600;
/// Bootstrap requests allowed per client IP and minute.
pub const DEFAULT_BOOTSTRAP_RATE_PER_MINUTE: u32 = 30;
/// Connections per IPv4 address or IPv6 /64 and listener.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: u32 = 64;
/// Seconds a write may make no progress before the connection is closed.
pub const DEFAULT_WRITE_STALL_TIMEOUT_SECS: u64 = 30;
/// A new secret version is valid 2 days from its issue (`valid_until = valid_from + this`).
pub const DEFAULT_SECRET_VALIDITY_SECS: u64 = 2 * 86_400;
/// Tokens under a secret keep validating 7 days past its `valid_until` (`grace_until`).
pub const DEFAULT_SECRET_GRACE_SECS: u64 = 7 * 86_400;
/// A machine not seen for a day raises a `fleet.machine_unseen` alert.
pub const DEFAULT_MACHINE_UNSEEN_ALERT_SECS: u64 = 86_400;
/// Shortest non-zero `machine_unseen_alert_secs`: twice the resolution `last_seen_at` is kept to.
pub const MIN_MACHINE_UNSEEN_ALERT_SECS: u64 = 600;
/// An active certificate expiring within a week (its agent renews at two thirds of its life)
/// raises a `fleet.certificate_expiring` alert.
pub const DEFAULT_CERTIFICATE_EXPIRY_ALERT_DAYS: u32 = 7;
/// How often each server checks the fleet's conditions.
pub const DEFAULT_FLEET_CHECK_INTERVAL_SECS: u64 = 300;
/// Retries of a fleet webhook delivery.
pub const DEFAULT_FLEET_WEBHOOK_RETRIES: u32 = 3;
/// Upper bound of both secret durations: one year.
pub const MAX_SECRET_DURATION_SECS: u64 = 365 * 86_400;
/// A dashboard session ends 8 hours after sign-in, however busy.
pub const DEFAULT_DASHBOARD_SESSION_LIFETIME_SECS: u64 = 8 * 3600;
/// A dashboard session ends after 30 minutes without a request.
pub const DEFAULT_DASHBOARD_SESSION_IDLE_SECS: u64 = 30 * 60;
/// Longest dashboard session lifetime: 7 days.
pub const MAX_DASHBOARD_SESSION_LIFETIME_SECS: u64 = 7 * 86_400;
/// Dashboard sessions held at once (in memory); signing in beyond it ends the least recently
/// used one.
pub const DEFAULT_DASHBOARD_MAX_SESSIONS: u32 = 256;
/// Dashboard sign-in attempts allowed per client IP and minute.
pub const DEFAULT_DASHBOARD_SIGN_IN_PER_MINUTE: u32 = 10;
/// A watch stream with nothing to say sends a ping this often (seconds): each ping is a write
/// per connected machine, so not more often than the idle timeouts on the way need (TCP load
/// balancers and NATs drop idle flows after 4 minutes or more; set HAProxy's `timeout tunnel`,
/// or `timeout client`/`server`, above it).
pub const DEFAULT_WATCH_HEARTBEAT_SECS: u64 = 60;
/// A watch stream ends after this long (± a tenth), and the agent reconnects: its certificate
/// and machine are checked again then (seconds). A revocation does not wait for it (it is
/// pushed, and ends the stream), nor does a renewal (a new connection): six hours.
pub const DEFAULT_WATCH_MAX_SECS: u64 = 21_600;
/// A change for every machine (a key rollover, an update announcement) or a resync asks
/// agents to spread their rounds over up to this many seconds.
pub const DEFAULT_WATCH_SPREAD_SECS: u64 = 60;
/// How often each serving process reads the change feed (milliseconds).
pub const DEFAULT_WATCH_FEED_INTERVAL_MS: u64 = 250;
/// Connections the agent listener serves at once (each connected agent holds one).
pub const DEFAULT_AGENT_MAX_CONNECTIONS: u32 = 20_000;
/// Agent requests handled at once per serving process; more are answered 503 with
/// `Retry-After` (the watch stream counts only while it is being opened).
pub const DEFAULT_AGENT_MAX_INFLIGHT: u32 = 256;
/// `Retry-After` of a shed request is drawn between half this and this (seconds).
pub const DEFAULT_AGENT_RETRY_AFTER_SECS: u64 = 30;
/// Routed reads go to the read replica only while it holds every commit made on the primary
/// up to this many milliseconds ago (`read_replica_max_lag_ms`).
pub const DEFAULT_READ_REPLICA_MAX_LAG_MS: u64 = 1000;
/// The Windows agent (`license-agent.exe`) Windows installers are built from, relative to the
/// data directory.
pub const DEFAULT_WINDOWS_STUB: &str = "windows/license-agent.exe";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

fn default_public() -> SocketAddr {
    DEFAULT_PUBLIC_LISTEN.parse().expect("constant address")
}
fn default_agent() -> SocketAddr {
    DEFAULT_AGENT_LISTEN.parse().expect("constant address")
}
fn default_admin() -> SocketAddr {
    DEFAULT_ADMIN_LISTEN.parse().expect("constant address")
}
fn default_validity() -> u32 {
    DEFAULT_CERTIFICATE_VALIDITY_DAYS
}
fn default_renew_after_expiry() -> u32 {
    DEFAULT_CERTIFICATE_RENEW_AFTER_EXPIRY_DAYS
}
fn default_server_validity() -> u32 {
    DEFAULT_SERVER_CERTIFICATE_VALIDITY_DAYS
}
fn default_server_check() -> u64 {
    DEFAULT_SERVER_CERTIFICATE_CHECK_INTERVAL_SECS
}
fn default_ttl() -> u64 {
    DEFAULT_INSTALL_TOKEN_TTL_SECS
}
fn default_rate() -> u32 {
    DEFAULT_BOOTSTRAP_RATE_PER_MINUTE
}
fn default_per_address() -> u32 {
    DEFAULT_MAX_CONNECTIONS_PER_ADDRESS
}
fn default_write_stall() -> u64 {
    DEFAULT_WRITE_STALL_TIMEOUT_SECS
}
fn default_unseen_alert() -> u64 {
    DEFAULT_MACHINE_UNSEEN_ALERT_SECS
}
fn default_certificate_alert() -> u32 {
    DEFAULT_CERTIFICATE_EXPIRY_ALERT_DAYS
}
fn default_fleet_check() -> u64 {
    DEFAULT_FLEET_CHECK_INTERVAL_SECS
}
fn default_webhook_retries() -> u32 {
    DEFAULT_FLEET_WEBHOOK_RETRIES
}
fn default_secret_validity() -> u64 {
    DEFAULT_SECRET_VALIDITY_SECS
}
fn default_secret_grace() -> u64 {
    DEFAULT_SECRET_GRACE_SECS
}
fn default_session_lifetime() -> u64 {
    DEFAULT_DASHBOARD_SESSION_LIFETIME_SECS
}
fn default_session_idle() -> u64 {
    DEFAULT_DASHBOARD_SESSION_IDLE_SECS
}
fn default_max_sessions() -> u32 {
    DEFAULT_DASHBOARD_MAX_SESSIONS
}
fn default_watch_heartbeat() -> u64 {
    DEFAULT_WATCH_HEARTBEAT_SECS
}
fn default_watch_max() -> u64 {
    DEFAULT_WATCH_MAX_SECS
}
fn default_watch_spread() -> u64 {
    DEFAULT_WATCH_SPREAD_SECS
}
fn default_watch_feed_interval() -> u64 {
    DEFAULT_WATCH_FEED_INTERVAL_MS
}
fn default_agent_max_connections() -> u32 {
    DEFAULT_AGENT_MAX_CONNECTIONS
}
fn default_agent_max_inflight() -> u32 {
    DEFAULT_AGENT_MAX_INFLIGHT
}
fn default_agent_retry_after() -> u64 {
    DEFAULT_AGENT_RETRY_AFTER_SECS
}
fn default_read_replica_max_lag() -> u64 {
    DEFAULT_READ_REPLICA_MAX_LAG_MS
}
fn default_sign_in_rate() -> u32 {
    DEFAULT_DASHBOARD_SIGN_IN_PER_MINUTE
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_public")]
    pub public_listen: SocketAddr,
    #[serde(default = "default_agent")]
    pub agent_listen: SocketAddr,
    #[serde(default = "default_admin")]
    pub admin_listen: SocketAddr,
    /// Host name machines use to reach this server (first name in the TLS certificate).
    pub public_host: String,
    /// URL of the public listener as machines see it; derived from `public_host` and the bound
    /// port when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// URL of the agent listener as machines see it; derived likewise when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_url: Option<String>,
    /// `sqlite://…` or `postgres://…`; the SQLite file in the data directory when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// `postgres://…` of a hot standby of `database_url` (PostgreSQL only): the per-request
    /// certificate check, the secret status and the machine's licenses are read there while it
    /// is fresh enough (`read_replica_max_lag_ms`, and every change the server saw for the
    /// machine), from `database_url` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_read_url: Option<String>,
    /// Milliseconds the read replica may lag the primary and still be read (100 to 60000).
    #[serde(default = "default_read_replica_max_lag")]
    pub read_replica_max_lag_ms: u64,
    /// Lifetime of a machine certificate, days (ignored when `certificate_validity_secs` is set).
    #[serde(default = "default_validity")]
    pub certificate_validity_days: u32,
    /// Lifetime of a machine certificate, seconds; takes precedence over
    /// `certificate_validity_days` (short lifetimes for tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_validity_secs: Option<u64>,
    /// Days after its expiry during which a machine may still renew its certificate with it
    /// (`POST /api/v1/renew-certificate` only); 0 disables renewal after expiry.
    #[serde(default = "default_renew_after_expiry")]
    pub certificate_renew_after_expiry_days: u32,
    /// Lifetime of the server's own TLS certificate, days; it renews itself (same key) at 2/3.
    #[serde(default = "default_server_validity")]
    pub server_certificate_validity_days: u32,
    /// How often the running server checks whether its TLS certificate is due, seconds.
    #[serde(default = "default_server_check")]
    pub server_certificate_check_interval_secs: u64,
    #[serde(default = "default_ttl")]
    pub install_token_ttl_secs: u64,
    #[serde(default = "default_rate")]
    pub bootstrap_rate_per_minute: u32,
    /// Connections one IPv4 address or IPv6 /64 may hold open on each listener (0: no cap,
    /// e.g. behind a TCP load balancer that caps per client itself).
    #[serde(default = "default_per_address")]
    pub max_connections_per_address: u32,
    /// A connection whose peer stops reading (a write making no progress) is closed after
    /// this many seconds.
    #[serde(default = "default_write_stall")]
    pub write_stall_timeout_secs: u64,
    /// Lifetime of a secret version from its issue to `valid_until`, in seconds.
    #[serde(default = "default_secret_validity")]
    pub secret_validity_secs: u64,
    /// Grace after `valid_until` during which tokens under the version still validate.
    #[serde(default = "default_secret_grace")]
    pub secret_grace_secs: u64,
    /// Where fleet alerts are POSTed (JSON), `http://` or `https://` (public roots); they are
    /// audited and logged either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_webhook_url: Option<String>,
    /// Retries of a fleet webhook delivery (1 s, 2 s, 4 s … apart).
    #[serde(default = "default_webhook_retries")]
    pub fleet_webhook_retries: u32,
    /// An unrevoked machine with no request to the agent listener for this long raises
    /// `fleet.machine_unseen` (0: never).
    #[serde(default = "default_unseen_alert")]
    pub machine_unseen_alert_secs: u64,
    /// An unrevoked machine whose active certificate expires within this many days (no
    /// renewal) raises `fleet.certificate_expiring` (0: never).
    #[serde(default = "default_certificate_alert")]
    pub certificate_expiry_alert_days: u32,
    /// How often the server checks the fleet's conditions, seconds.
    #[serde(default = "default_fleet_check")]
    pub fleet_check_interval_secs: u64,
    /// A dashboard session ends this many seconds after sign-in (60 to 604800).
    #[serde(default = "default_session_lifetime")]
    pub dashboard_session_lifetime_secs: u64,
    /// A dashboard session ends after this many seconds without a request (60 to the
    /// lifetime).
    #[serde(default = "default_session_idle")]
    pub dashboard_session_idle_secs: u64,
    /// Dashboard sessions held at once, in memory (1 to 100000).
    #[serde(default = "default_max_sessions")]
    pub dashboard_max_sessions: u32,
    /// Dashboard sign-in attempts allowed per client IP and minute (at least 1).
    #[serde(default = "default_sign_in_rate")]
    pub dashboard_sign_in_per_minute: u32,
    /// The Windows agent (`license-agent.exe`) that Windows installers are built from: an
    /// absolute path, or one relative to the data directory; [`DEFAULT_WINDOWS_STUB`] when
    /// absent. Only read when an installer is asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows_stub: Option<PathBuf>,
    /// Connections to the database per serving process (1 to 1000); 8 on SQLite and 16 on
    /// PostgreSQL when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_max_connections: Option<u32>,
    /// Seconds between pings on a quiet watch stream (1 to 300).
    #[serde(default = "default_watch_heartbeat")]
    pub watch_heartbeat_secs: u64,
    /// Seconds a watch stream lasts (± a tenth) before the agent reconnects (10 to 86400).
    #[serde(default = "default_watch_max")]
    pub watch_max_secs: u64,
    /// Seconds over which agents spread the rounds a change for every machine, or a resync,
    /// asks for (0 to 3600).
    #[serde(default = "default_watch_spread")]
    pub watch_spread_secs: u64,
    /// Milliseconds between two reads of the change feed by each serving process (50 to 5000).
    #[serde(default = "default_watch_feed_interval")]
    pub watch_feed_interval_ms: u64,
    /// Connections the agent listener serves at once (1 to 1000000); each connected agent
    /// holds one. The process's open-file limit is raised to its hard limit at start.
    #[serde(default = "default_agent_max_connections")]
    pub agent_max_connections: u32,
    /// Agent requests handled at once per serving process (1 to 100000); more are answered
    /// 503 `server_busy` with `Retry-After`.
    #[serde(default = "default_agent_max_inflight")]
    pub agent_max_inflight: u32,
    /// Largest `Retry-After` of a shed agent request, seconds (1 to 3600); each answer draws
    /// between half of it and all of it.
    #[serde(default = "default_agent_retry_after")]
    pub agent_retry_after_secs: u64,
}

impl ServerConfig {
    pub fn new(public_host: String) -> Self {
        Self {
            public_listen: default_public(),
            agent_listen: default_agent(),
            admin_listen: default_admin(),
            public_host,
            public_url: None,
            agent_url: None,
            database_url: None,
            database_read_url: None,
            read_replica_max_lag_ms: DEFAULT_READ_REPLICA_MAX_LAG_MS,
            certificate_validity_days: DEFAULT_CERTIFICATE_VALIDITY_DAYS,
            certificate_validity_secs: None,
            certificate_renew_after_expiry_days: DEFAULT_CERTIFICATE_RENEW_AFTER_EXPIRY_DAYS,
            server_certificate_validity_days: DEFAULT_SERVER_CERTIFICATE_VALIDITY_DAYS,
            server_certificate_check_interval_secs: DEFAULT_SERVER_CERTIFICATE_CHECK_INTERVAL_SECS,
            install_token_ttl_secs: DEFAULT_INSTALL_TOKEN_TTL_SECS,
            bootstrap_rate_per_minute: DEFAULT_BOOTSTRAP_RATE_PER_MINUTE,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            write_stall_timeout_secs: DEFAULT_WRITE_STALL_TIMEOUT_SECS,
            secret_validity_secs: DEFAULT_SECRET_VALIDITY_SECS,
            secret_grace_secs: DEFAULT_SECRET_GRACE_SECS,
            fleet_webhook_url: None,
            fleet_webhook_retries: DEFAULT_FLEET_WEBHOOK_RETRIES,
            machine_unseen_alert_secs: DEFAULT_MACHINE_UNSEEN_ALERT_SECS,
            certificate_expiry_alert_days: DEFAULT_CERTIFICATE_EXPIRY_ALERT_DAYS,
            fleet_check_interval_secs: DEFAULT_FLEET_CHECK_INTERVAL_SECS,
            dashboard_session_lifetime_secs: DEFAULT_DASHBOARD_SESSION_LIFETIME_SECS,
            dashboard_session_idle_secs: DEFAULT_DASHBOARD_SESSION_IDLE_SECS,
            dashboard_max_sessions: DEFAULT_DASHBOARD_MAX_SESSIONS,
            dashboard_sign_in_per_minute: DEFAULT_DASHBOARD_SIGN_IN_PER_MINUTE,
            windows_stub: None,
            database_max_connections: None,
            watch_heartbeat_secs: DEFAULT_WATCH_HEARTBEAT_SECS,
            watch_max_secs: DEFAULT_WATCH_MAX_SECS,
            watch_spread_secs: DEFAULT_WATCH_SPREAD_SECS,
            watch_feed_interval_ms: DEFAULT_WATCH_FEED_INTERVAL_MS,
            agent_max_connections: DEFAULT_AGENT_MAX_CONNECTIONS,
            agent_max_inflight: DEFAULT_AGENT_MAX_INFLIGHT,
            agent_retry_after_secs: DEFAULT_AGENT_RETRY_AFTER_SECS,
        }
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Parses and checks the text of a config file (what [`ServerConfig::load`] reads).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<config>".into(),
            message: e.message().to_string(),
        })?;
        config.check()?;
        Ok(config)
    }

    /// Cross-field checks, naming the key at fault.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.certificate_validity_days == 0
            || self.certificate_validity_days > MAX_CERTIFICATE_VALIDITY_DAYS
        {
            return Err(ConfigError::Invalid {
                key: "certificate_validity_days",
                message: format!("must be between 1 and {MAX_CERTIFICATE_VALIDITY_DAYS}"),
            });
        }
        let max_secs = u64::from(MAX_CERTIFICATE_VALIDITY_DAYS) * 86_400;
        if let Some(secs) = self.certificate_validity_secs {
            if !(MIN_CERTIFICATE_VALIDITY_SECS..=max_secs).contains(&secs) {
                return Err(ConfigError::Invalid {
                    key: "certificate_validity_secs",
                    message: format!(
                        "must be between {MIN_CERTIFICATE_VALIDITY_SECS} and {max_secs} ({MAX_CERTIFICATE_VALIDITY_DAYS} days)"
                    ),
                });
            }
        }
        if self.certificate_renew_after_expiry_days > MAX_CERTIFICATE_VALIDITY_DAYS {
            return Err(ConfigError::Invalid {
                key: "certificate_renew_after_expiry_days",
                message: format!(
                    "must be between 0 (no renewal after expiry) and {MAX_CERTIFICATE_VALIDITY_DAYS}"
                ),
            });
        }
        if self.server_certificate_validity_days == 0
            || self.server_certificate_validity_days > MAX_CERTIFICATE_VALIDITY_DAYS
        {
            return Err(ConfigError::Invalid {
                key: "server_certificate_validity_days",
                message: format!("must be between 1 and {MAX_CERTIFICATE_VALIDITY_DAYS}"),
            });
        }
        if !(1..=86_400).contains(&self.server_certificate_check_interval_secs) {
            return Err(ConfigError::Invalid {
                key: "server_certificate_check_interval_secs",
                message: "must be between 1 and 86400 (a day)".into(),
            });
        }
        if self.install_token_ttl_secs < 60 || self.install_token_ttl_secs > 30 * 86_400 {
            return Err(ConfigError::Invalid {
                key: "install_token_ttl_secs",
                message: "must be between 60 and 2592000 (30 days)".into(),
            });
        }
        if self.bootstrap_rate_per_minute == 0 {
            return Err(ConfigError::Invalid {
                key: "bootstrap_rate_per_minute",
                message: "must be at least 1".into(),
            });
        }
        if !(1..=3_600).contains(&self.write_stall_timeout_secs) {
            return Err(ConfigError::Invalid {
                key: "write_stall_timeout_secs",
                message: "must be between 1 and 3600".into(),
            });
        }
        if self.secret_validity_secs == 0 || self.secret_validity_secs > MAX_SECRET_DURATION_SECS {
            return Err(ConfigError::Invalid {
                key: "secret_validity_secs",
                message: format!("must be between 1 and {MAX_SECRET_DURATION_SECS} (365 days)"),
            });
        }
        if self.secret_grace_secs > MAX_SECRET_DURATION_SECS {
            return Err(ConfigError::Invalid {
                key: "secret_grace_secs",
                message: format!("must be between 0 and {MAX_SECRET_DURATION_SECS} (365 days)"),
            });
        }
        self.check_fleet_alerts()?;
        if !(60..=MAX_DASHBOARD_SESSION_LIFETIME_SECS)
            .contains(&self.dashboard_session_lifetime_secs)
        {
            return Err(ConfigError::Invalid {
                key: "dashboard_session_lifetime_secs",
                message: format!(
                    "must be between 60 and {MAX_DASHBOARD_SESSION_LIFETIME_SECS} (7 days)"
                ),
            });
        }
        if !(60..=self.dashboard_session_lifetime_secs).contains(&self.dashboard_session_idle_secs)
        {
            return Err(ConfigError::Invalid {
                key: "dashboard_session_idle_secs",
                message: "must be between 60 and dashboard_session_lifetime_secs".into(),
            });
        }
        if !(1..=100_000).contains(&self.dashboard_max_sessions) {
            return Err(ConfigError::Invalid {
                key: "dashboard_max_sessions",
                message: "must be between 1 and 100000".into(),
            });
        }
        let ranges: [(&'static str, u64, u64, u64); 9] = [
            (
                "agent_max_connections",
                u64::from(self.agent_max_connections),
                1,
                1_000_000,
            ),
            ("watch_heartbeat_secs", self.watch_heartbeat_secs, 1, 300),
            ("watch_max_secs", self.watch_max_secs, 10, 86_400),
            ("watch_spread_secs", self.watch_spread_secs, 0, 3_600),
            (
                "watch_feed_interval_ms",
                self.watch_feed_interval_ms,
                50,
                5_000,
            ),
            (
                "agent_max_inflight",
                u64::from(self.agent_max_inflight),
                1,
                100_000,
            ),
            (
                "agent_retry_after_secs",
                self.agent_retry_after_secs,
                1,
                3_600,
            ),
            (
                "read_replica_max_lag_ms",
                self.read_replica_max_lag_ms,
                100,
                60_000,
            ),
            (
                "database_max_connections",
                self.database_max_connections.map_or(1, u64::from),
                1,
                1_000,
            ),
        ];
        for (key, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!("must be between {min} and {max}"),
                });
            }
        }
        if self.dashboard_sign_in_per_minute == 0 {
            return Err(ConfigError::Invalid {
                key: "dashboard_sign_in_per_minute",
                message: "must be at least 1".into(),
            });
        }
        for (key, url) in [
            ("public_url", &self.public_url),
            ("agent_url", &self.agent_url),
        ] {
            if let Some(url) = url {
                if !is_https_origin(url) {
                    return Err(ConfigError::Invalid {
                        key,
                        message: "must be https://host[:port] without a trailing /".into(),
                    });
                }
            }
        }
        self.check_read_replica()?;
        if self
            .windows_stub
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(ConfigError::Invalid {
                key: "windows_stub",
                message: "must be a path to license-agent.exe (or absent for the default)".into(),
            });
        }
        if !is_host(&self.public_host) {
            return Err(ConfigError::Invalid {
                key: "public_host",
                message: "must be a host name or IP address".into(),
            });
        }
        Ok(())
    }

    /// `database_read_url`: a PostgreSQL URL, beside a PostgreSQL `database_url`.
    fn check_read_replica(&self) -> Result<(), ConfigError> {
        let Some(url) = &self.database_read_url else {
            return Ok(());
        };
        let is_postgres = |url: &str| {
            crate::store::Backend::of_url(url).is_ok_and(|b| b == crate::store::Backend::Postgres)
        };
        if !is_postgres(url) || url.contains(char::is_whitespace) {
            return Err(ConfigError::Invalid {
                key: "database_read_url",
                message: "must be a postgres:// URL (a hot standby of database_url)".into(),
            });
        }
        if !self.database_url.as_deref().is_some_and(is_postgres) {
            return Err(ConfigError::Invalid {
                key: "database_read_url",
                message: "read replicas need database_url on PostgreSQL; the database is \
                          SQLite (remove database_read_url)"
                    .into(),
            });
        }
        Ok(())
    }

    /// The fleet alert keys.
    fn check_fleet_alerts(&self) -> Result<(), ConfigError> {
        let unseen = self.machine_unseen_alert_secs;
        if unseen != 0 && !(MIN_MACHINE_UNSEEN_ALERT_SECS..=365 * 86_400).contains(&unseen) {
            return Err(ConfigError::Invalid {
                key: "machine_unseen_alert_secs",
                message: format!(
                    "must be 0 (no alert) or between {MIN_MACHINE_UNSEEN_ALERT_SECS} and 31536000 (365 days)"
                ),
            });
        }
        if self.certificate_expiry_alert_days > 365 {
            return Err(ConfigError::Invalid {
                key: "certificate_expiry_alert_days",
                message: "must be between 0 (no alert) and 365".into(),
            });
        }
        if !(1..=86_400).contains(&self.fleet_check_interval_secs) {
            return Err(ConfigError::Invalid {
                key: "fleet_check_interval_secs",
                message: "must be between 1 and 86400 (a day)".into(),
            });
        }
        if self.fleet_webhook_retries > 10 {
            return Err(ConfigError::Invalid {
                key: "fleet_webhook_retries",
                message: "must be between 0 and 10".into(),
            });
        }
        if let Some(url) = &self.fleet_webhook_url {
            let scheme_ok = url.starts_with("https://") || url.starts_with("http://");
            if !scheme_ok || url.contains(char::is_whitespace) {
                return Err(ConfigError::Invalid {
                    key: "fleet_webhook_url",
                    message: "must be an http:// or https:// URL".into(),
                });
            }
        }
        Ok(())
    }

    /// Lifetime of a new machine certificate, seconds: `certificate_validity_secs` when set,
    /// else `certificate_validity_days`.
    pub fn machine_certificate_validity_secs(&self) -> i64 {
        let secs = self
            .certificate_validity_secs
            .unwrap_or(u64::from(self.certificate_validity_days) * 86_400);
        i64::try_from(secs).unwrap_or(i64::MAX)
    }

    /// The Windows agent that installers are built from: `windows_stub`, resolved against
    /// `data_dir` when relative, else `data_dir/`[`DEFAULT_WINDOWS_STUB`].
    pub fn windows_stub_path(&self, data_dir: &Path) -> PathBuf {
        data_dir.join(
            self.windows_stub
                .as_deref()
                .unwrap_or(Path::new(DEFAULT_WINDOWS_STUB)),
        )
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }
}

/// A DNS name (labels of letters, digits, `-` and `_`, at most 63 bytes each and 253 in all)
/// or an IP address: what goes into certificates, URLs and the install script.
fn is_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `https://host[:port]`: a host as [`is_host`] reads it (IPv6 bracketed), an optional port,
/// nothing else (no path, user, query or whitespace).
fn is_https_origin(url: &str) -> bool {
    let Some(authority) = url.strip_prefix("https://") else {
        return false;
    };
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) if v6.parse::<std::net::Ipv6Addr>().is_ok() => (None, port),
            _ => return false,
        },
        None => match authority.rsplit_once(':') {
            Some((host, _)) => (Some(host), &authority[host.len()..]),
            None => (Some(authority), ""),
        },
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok());
    port_ok && host.is_none_or(|h| is_host(h) && !h.contains(':'))
}

/// `https://host:port`, with IPv6 literals bracketed.
pub fn https_url(host: &str, port: u16) -> String {
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(_)) => format!("https://[{host}]:{port}"),
        _ => format!("https://{host}:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = toml::from_str::<ServerConfig>("public_host = \"x\"\nbogus = 1\n").unwrap_err();
        assert!(err.message().contains("bogus"), "{err}");
        let mut c = ServerConfig::new("localhost".into());
        c.certificate_validity_days = 0;
        assert!(c
            .check()
            .unwrap_err()
            .to_string()
            .starts_with("certificate_validity_days"));
        let mut c = ServerConfig::new("localhost".into());
        c.agent_url = Some("http://x".into());
        assert!(c.check().unwrap_err().to_string().starts_with("agent_url"));
        let mut c = ServerConfig::new("localhost".into());
        c.secret_validity_secs = 0;
        assert!(c
            .check()
            .unwrap_err()
            .to_string()
            .starts_with("secret_validity_secs"));
        let mut c = ServerConfig::new("localhost".into());
        c.secret_grace_secs = MAX_SECRET_DURATION_SECS + 1;
        assert!(c
            .check()
            .unwrap_err()
            .to_string()
            .starts_with("secret_grace_secs"));
        for (key, set) in [
            (
                "certificate_validity_secs",
                (|c: &mut ServerConfig| c.certificate_validity_secs = Some(59))
                    as fn(&mut ServerConfig),
            ),
            ("certificate_renew_after_expiry_days", |c| {
                c.certificate_renew_after_expiry_days = 3651
            }),
            ("server_certificate_validity_days", |c| {
                c.server_certificate_validity_days = 0
            }),
            ("server_certificate_check_interval_secs", |c| {
                c.server_certificate_check_interval_secs = 0
            }),
            ("machine_unseen_alert_secs", |c| {
                c.machine_unseen_alert_secs = 60
            }),
            ("certificate_expiry_alert_days", |c| {
                c.certificate_expiry_alert_days = 366
            }),
            ("fleet_check_interval_secs", |c| {
                c.fleet_check_interval_secs = 0
            }),
            ("fleet_webhook_retries", |c| c.fleet_webhook_retries = 11),
            ("fleet_webhook_url", |c| {
                c.fleet_webhook_url = Some("ftp://x".into())
            }),
        ] {
            let mut c = ServerConfig::new("localhost".into());
            set(&mut c);
            assert!(c.check().unwrap_err().to_string().starts_with(key), "{key}");
        }
        let mut c = ServerConfig::new("localhost".into());
        c.certificate_validity_secs = Some(60);
        c.check().unwrap();
        assert_eq!(c.machine_certificate_validity_secs(), 60);
        c.certificate_validity_secs = None;
        assert_eq!(c.machine_certificate_validity_secs(), 365 * 86_400);
        c.certificate_renew_after_expiry_days = 0;
        c.check().unwrap();
        // Old configuration files without the secret keys get the defaults.
        let old: ServerConfig = toml::from_str("public_host = \"x\"\n").unwrap();
        assert_eq!(old.secret_validity_secs, DEFAULT_SECRET_VALIDITY_SECS);
        assert_eq!(old.secret_grace_secs, DEFAULT_SECRET_GRACE_SECS);
        assert_eq!(
            old.certificate_renew_after_expiry_days,
            DEFAULT_CERTIFICATE_RENEW_AFTER_EXPIRY_DAYS
        );
        assert_eq!(
            old.server_certificate_validity_days,
            DEFAULT_SERVER_CERTIFICATE_VALIDITY_DAYS
        );
        assert_eq!(old.certificate_validity_secs, None);
        assert_eq!(
            old.dashboard_session_lifetime_secs,
            DEFAULT_DASHBOARD_SESSION_LIFETIME_SECS
        );
        assert_eq!(old.dashboard_max_sessions, DEFAULT_DASHBOARD_MAX_SESSIONS);
    }

    #[test]
    fn dashboard_keys_are_bounded() {
        for (key, set) in [
            (
                "dashboard_session_lifetime_secs",
                (|c: &mut ServerConfig| c.dashboard_session_lifetime_secs = 59)
                    as fn(&mut ServerConfig),
            ),
            ("dashboard_session_idle_secs", |c| {
                c.dashboard_session_idle_secs = c.dashboard_session_lifetime_secs + 1
            }),
            ("dashboard_max_sessions", |c| c.dashboard_max_sessions = 0),
            ("dashboard_sign_in_per_minute", |c| {
                c.dashboard_sign_in_per_minute = 0
            }),
        ] {
            let mut c = ServerConfig::new("localhost".into());
            set(&mut c);
            assert!(c.check().unwrap_err().to_string().starts_with(key), "{key}");
        }
    }

    #[test]
    fn the_read_replica_needs_postgres_on_both_sides() {
        let pg = "database_url = \"postgres://lsa@db/lsa\"\n";
        let base = format!("public_host = \"x\"\n{pg}");
        let old = ServerConfig::parse(&base).unwrap();
        assert_eq!(old.database_read_url, None);
        assert_eq!(old.read_replica_max_lag_ms, DEFAULT_READ_REPLICA_MAX_LAG_MS);
        let c = ServerConfig::parse(&format!(
            "{base}database_read_url = \"postgresql://lsa@standby/lsa\"\nread_replica_max_lag_ms = 100\n"
        ))
        .unwrap();
        assert_eq!(
            c.database_read_url.as_deref(),
            Some("postgresql://lsa@standby/lsa")
        );
        let back: ServerConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back.database_read_url, c.database_read_url);
        assert_eq!(back.read_replica_max_lag_ms, 100);
        for bad in [
            format!("{base}database_read_url = \"sqlite:///tmp/x.db\"\n"),
            format!("{base}database_read_url = \"mysql://db/lsa\"\n"),
            format!("{base}database_read_url = \"postgres://db/lsa x\"\n"),
            // The SQLite file of the data directory: no replica to read.
            "public_host = \"x\"\ndatabase_read_url = \"postgres://standby/lsa\"\n".into(),
            "public_host = \"x\"\ndatabase_url = \"sqlite:///tmp/x.db\"\n\
             database_read_url = \"postgres://standby/lsa\"\n"
                .into(),
        ] {
            let err = ServerConfig::parse(&bad).unwrap_err().to_string();
            assert!(err.starts_with("database_read_url"), "{bad}: {err}");
        }
        for lag in [0, 99, 60_001] {
            let err = ServerConfig::parse(&format!("{base}read_replica_max_lag_ms = {lag}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("read_replica_max_lag_ms"), "{lag}: {err}");
        }
        ServerConfig::parse(&format!("{base}read_replica_max_lag_ms = 60000\n")).unwrap();
    }

    #[test]
    fn windows_stub_defaults_to_the_data_directory() {
        let data = Path::new("/var/lib/license-server");
        let old: ServerConfig = toml::from_str("public_host = \"x\"\n").unwrap();
        assert_eq!(old.windows_stub, None);
        assert_eq!(
            old.windows_stub_path(data),
            data.join("windows/license-agent.exe")
        );
        // Absent from what `init` writes, so older servers read it unchanged.
        assert!(!ServerConfig::new("x".into())
            .to_toml()
            .contains("windows_stub"));
        let base = "public_host = \"x\"\n";
        let absolute =
            ServerConfig::parse(&format!("{base}windows_stub = \"/opt/lsa/agent.exe\"\n")).unwrap();
        assert_eq!(
            absolute.windows_stub_path(data),
            Path::new("/opt/lsa/agent.exe")
        );
        let relative =
            ServerConfig::parse(&format!("{base}windows_stub = \"stubs/a.exe\"\n")).unwrap();
        assert_eq!(relative.windows_stub_path(data), data.join("stubs/a.exe"));
        let back: ServerConfig = toml::from_str(&relative.to_toml()).unwrap();
        assert_eq!(back.windows_stub, relative.windows_stub);
        let err = ServerConfig::parse(&format!("{base}windows_stub = \"\"\n")).unwrap_err();
        assert!(err.to_string().starts_with("windows_stub"), "{err}");
        assert!(ServerConfig::parse(&format!("{base}windows_stub = 3\n")).is_err());
    }

    #[test]
    fn hosts_and_urls_are_names_not_text() {
        let base = "public_host = \"licenses.example.com\"\n";
        ServerConfig::parse(base).unwrap();
        for good in [
            "localhost",
            "10.0.0.1",
            "::1",
            "lsa-1.example.com",
            "a_b.internal",
        ] {
            let text = format!("public_host = {}\n", toml::Value::from(good));
            ServerConfig::parse(&text).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "",
            "a b",
            "a\u{0}b",
            "x;rm -rf /",
            "-x",
            "a..b",
            "é.example",
            "a/b",
        ] {
            let text = format!("public_host = {}\n", toml::Value::from(bad));
            let err = ServerConfig::parse(&text).unwrap_err().to_string();
            assert!(err.starts_with("public_host"), "{bad:?}: {err}");
        }
        for good in [
            "https://a.example",
            "https://a.example:8443",
            "https://[::1]:8443",
            "https://10.0.0.1",
        ] {
            let text = format!("{base}public_url = {}\n", toml::Value::from(good));
            ServerConfig::parse(&text).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "https://",
            "https://a.example/",
            "https://a.example/x",
            "https://a.example:99999",
            "https://a.example:",
            "https://u@a.example",
            "https://a.example:1 $(id)",
            "https://[::1",
            "https://::1:8443",
            "https://a.example?x",
        ] {
            let text = format!("{base}public_url = {}\n", toml::Value::from(bad));
            let err = ServerConfig::parse(&text).unwrap_err().to_string();
            assert!(err.starts_with("public_url"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn shipped_example_parses() {
        let example = include_str!("../../../packaging/server.example.toml");
        let c: ServerConfig = toml::from_str(example).unwrap();
        c.check().unwrap();
        assert_eq!(c.public_host, "licenses.example.com");
        assert_eq!(c.secret_validity_secs, DEFAULT_SECRET_VALIDITY_SECS);
        assert_eq!(c.secret_grace_secs, DEFAULT_SECRET_GRACE_SECS);
    }

    #[test]
    fn round_trips() {
        let c = ServerConfig::new("localhost".into());
        let back: ServerConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back.public_listen, c.public_listen);
        assert_eq!(https_url("::1", 1), "https://[::1]:1");
    }
}
