//! The agent's side of the network: TLS to the license server with the server's key pinned
//! ([`tls`]), the server keys and CAs trusted ([`trust`]), the calls the agent makes
//! ([`client`]: bootstrap, recovery, agent API), and [`AgentApi`], the daemon's agent-API
//! client, which reconnects with a new identity after its certificate is renewed, and with a
//! new trust after the server announced a rollover.

pub mod client;
pub mod tls;
pub mod trust;
pub mod watch;

use std::sync::{Arc, RwLock};

use crate::config::{AgentConfig, ServerSection};
use crate::platform::keys::MachineKey;
use client::{ClientError, ServerClient};
use license_protocol::server_trust::AgentTrust;
use tls::TlsError;
use trust::{TrustError, TrustFile};

/// Why no agent API client could be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Trust(#[from] TrustError),
}

/// An mTLS client for the agent API (`[server] url`), the handshake signed by `key` with the
/// certificate in `client_cert`, the server checked against the pins and CAs of `trust`.
fn connect(
    server: &ServerSection,
    trust: &AgentTrust,
    key: Arc<dyn MachineKey>,
) -> Result<ServerClient, ConnectError> {
    let tls = tls::mutual(trust, &server.client_cert, key)?;
    Ok(ServerClient::new(&server.url, tls)?)
}

/// A one-shot mTLS client for the agent API, with the server trust held on disk.
pub fn agent_client(
    config: &AgentConfig,
    key: Arc<dyn MachineKey>,
) -> Result<ServerClient, ConnectError> {
    let trust = TrustFile::from_config(config).load()?;
    connect(&config.server, &trust, key)
}

/// The daemon's agent API client: the current identity's connection, replaced (for new
/// requests) when the certificate or key changes, or the server trust does.
#[derive(Debug)]
pub struct AgentApi {
    server: ServerSection,
    trust: RwLock<AgentTrust>,
    client: Arc<RwLock<ServerClient>>,
}

/// The daemon's current connection, for the watch stream (follows renewals and rollovers).
#[derive(Debug, Clone)]
pub struct CurrentConnection(Arc<RwLock<ServerClient>>);

impl watch::Connection for CurrentConnection {
    fn current(&self) -> ServerClient {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl AgentApi {
    /// Connects with the server trust held on disk (`trust`).
    pub fn connect(config: &AgentConfig, key: Arc<dyn MachineKey>) -> Result<Self, ConnectError> {
        let trust = TrustFile::from_config(config).load()?;
        Ok(Self {
            client: Arc::new(RwLock::new(connect(&config.server, &trust, key)?)),
            trust: RwLock::new(trust),
            server: config.server.clone(),
        })
    }

    /// A handle on the current connection, for the watch stream.
    pub fn connection(&self) -> CurrentConnection {
        CurrentConnection(self.client.clone())
    }

    /// The connection for the next request.
    pub fn current(&self) -> ServerClient {
        self.client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The server trust connections are made with.
    pub fn trust(&self) -> AgentTrust {
        self.trust.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reconnects with `key` and the certificate now at `[server] client_cert`.
    pub fn reconnect(&self, key: Arc<dyn MachineKey>) -> Result<(), ConnectError> {
        let fresh = connect(&self.server, &self.trust(), key)?;
        *self.client.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// Connects from now on with `trust` (a server announcement just accepted).
    pub fn adopt_trust(
        &self,
        trust: AgentTrust,
        key: Arc<dyn MachineKey>,
    ) -> Result<(), ConnectError> {
        let fresh = connect(&self.server, &trust, key)?;
        *self.client.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        *self.trust.write().unwrap_or_else(|e| e.into_inner()) = trust;
        Ok(())
    }
}
