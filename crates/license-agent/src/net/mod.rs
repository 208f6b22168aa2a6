//! The agent's side of the network: TLS to the license server with the server's key pinned
//! ([`tls`]), the calls the agent makes ([`client`]: bootstrap, recovery, agent API), and
//! [`AgentApi`], the daemon's agent-API client, which reconnects with a new identity after its
//! certificate is renewed.

pub mod client;
pub mod tls;

use std::sync::{Arc, RwLock};

use crate::config::{AgentConfig, ServerSection};
use crate::platform::keys::MachineKey;
use client::{ClientError, ServerClient};
use tls::TlsError;

/// Why no agent API client could be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// An mTLS client for the agent API (`[server] url`), the handshake signed by `key` with the
/// certificate in `client_cert`, the server checked against the pin and the CA.
fn connect(server: &ServerSection, key: Arc<dyn MachineKey>) -> Result<ServerClient, ConnectError> {
    let tls = tls::mutual(server.cert_pin, &server.ca_cert, &server.client_cert, key)?;
    Ok(ServerClient::new(&server.url, tls)?)
}

/// A one-shot mTLS client for the agent API.
pub fn agent_client(
    config: &AgentConfig,
    key: Arc<dyn MachineKey>,
) -> Result<ServerClient, ConnectError> {
    connect(&config.server, key)
}

/// The daemon's agent API client: the current identity's connection, replaced (for new
/// requests) when the certificate or key changes.
#[derive(Debug)]
pub struct AgentApi {
    server: ServerSection,
    client: RwLock<ServerClient>,
}

impl AgentApi {
    pub fn connect(config: &AgentConfig, key: Arc<dyn MachineKey>) -> Result<Self, ConnectError> {
        Ok(Self {
            client: RwLock::new(connect(&config.server, key)?),
            server: config.server.clone(),
        })
    }

    /// The connection for the next request.
    pub fn current(&self) -> ServerClient {
        self.client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reconnects with `key` and the certificate now at `[server] client_cert`.
    pub fn reconnect(&self, key: Arc<dyn MachineKey>) -> Result<(), ConnectError> {
        let fresh = connect(&self.server, key)?;
        *self.client.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }
}
