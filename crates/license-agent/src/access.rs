//! Who may use the agent's local sockets, from the config; replaced as a whole when the
//! config is reloaded (SIGHUP), read by each new connection.

use std::sync::{Arc, RwLock};

use crate::config::AgentConfig;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Validation socket: peers by uid…
    pub ipc_uids: Vec<u32>,
    /// …or by primary gid.
    pub ipc_gids: Vec<u32>,
    /// Management socket: read role.
    pub mgmt_readers: Vec<u32>,
    /// Management socket: admin role (reads too).
    pub mgmt_admins: Vec<u32>,
}

pub type SharedAccess = Arc<RwLock<Access>>;

impl Access {
    pub fn from_config(config: &AgentConfig) -> Self {
        Self {
            ipc_uids: config.ipc.allowed_uids.clone(),
            ipc_gids: config.ipc.allowed_gids.clone(),
            mgmt_readers: config.management.allowed_uids.clone(),
            mgmt_admins: config.management.admin_uids.clone(),
        }
    }

    pub fn shared(config: &AgentConfig) -> SharedAccess {
        Arc::new(RwLock::new(Self::from_config(config)))
    }

    /// A snapshot for one connection.
    pub fn current(shared: &SharedAccess) -> Self {
        shared.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
