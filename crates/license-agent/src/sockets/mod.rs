//! The agent's local sockets: one [`listener`] (accept, connection limit, framing, idle
//! timeout, peer credentials, drain) serves both the [`validation`] socket (POS applications)
//! and the [`management`] socket (`license-agent-cli`).

pub mod listener;
pub mod management;
pub mod validation;
