//! The agent's side of the network: TLS to the license server with the server's key pinned
//! ([`tls`]), and the calls the agent makes ([`client`]: bootstrap, recovery, agent API).

pub mod client;
pub mod tls;

use std::sync::Arc;

use crate::config::AgentConfig;
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

/// An mTLS client for the agent API (`[server] url`), the handshake signed by `key`, the
/// server checked against the pin and the CA.
pub fn agent_client(
    config: &AgentConfig,
    key: Arc<dyn MachineKey>,
) -> Result<ServerClient, ConnectError> {
    let s = &config.server;
    let tls = tls::mutual(s.cert_pin, &s.ca_cert, &s.client_cert, key)?;
    Ok(ServerClient::new(&s.url, tls)?)
}
