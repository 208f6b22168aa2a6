//! Who may use the agent's local sockets: the peer's credentials as the kernel reports them
//! (SO_PEERCRED) against the config's lists. Replaced as a whole when the config is reloaded
//! (SIGHUP); each new connection reads a snapshot.

use std::sync::{Arc, RwLock};

use license_audit::Actor;

use crate::config::AgentConfig;

/// The process at the other end of a local connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl Peer {
    /// The peer as an audit actor.
    pub fn actor(&self) -> Actor {
        Actor::peer(self.uid, self.pid.map_or(0, i32::unsigned_abs))
    }
}

/// What a peer may do on the management socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Nothing.
    None,
    /// `status`, `metrics`, `validate`.
    Reader,
    /// Everything, actions included.
    Admin,
}

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

    /// Replaces the shared lists (config reload).
    pub fn replace(shared: &SharedAccess, config: &AgentConfig) {
        *shared.write().unwrap_or_else(|e| e.into_inner()) = Self::from_config(config);
    }

    /// A snapshot for one connection.
    pub fn current(shared: &SharedAccess) -> Self {
        shared.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether `peer` may ask for validations.
    pub fn may_validate(&self, peer: &Peer) -> bool {
        self.ipc_uids.contains(&peer.uid) || self.ipc_gids.contains(&peer.gid)
    }

    /// `peer`'s role on the management socket (by uid only).
    pub fn role(&self, peer: &Peer) -> Role {
        if self.mgmt_admins.contains(&peer.uid) {
            Role::Admin
        } else if self.mgmt_readers.contains(&peer.uid) {
            Role::Reader
        } else {
            Role::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_validation_rights() {
        let access = Access {
            ipc_uids: vec![1000],
            ipc_gids: vec![50],
            mgmt_readers: vec![1001],
            mgmt_admins: vec![0],
        };
        let peer = |uid, gid| Peer {
            uid,
            gid,
            pid: None,
        };
        assert!(access.may_validate(&peer(1000, 1)));
        assert!(access.may_validate(&peer(7, 50)));
        assert!(!access.may_validate(&peer(7, 7)));
        assert_eq!(access.role(&peer(0, 0)), Role::Admin);
        assert_eq!(access.role(&peer(1001, 0)), Role::Reader);
        assert_eq!(access.role(&peer(1000, 0)), Role::None);
    }
}
