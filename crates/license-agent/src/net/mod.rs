//! The agent's side of the network: TLS to the license server with the server's key pinned,
//! and the calls the agent makes (bootstrap, agent API).

pub mod client;
pub mod tls;
