//! Who may use the agent's local sockets: the peer's credentials as the kernel reports them
//! (SO_PEERCRED) against the config's lists. Replaced as a whole when the config is reloaded
//! (SIGHUP); each new connection reads a snapshot.

use std::sync::{Arc, RwLock};

use crate::config::AgentConfig;
pub use crate::platform::local_socket::{Peer, Principal};

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
    /// Validation socket: peers by user…
    pub ipc_users: Vec<Principal>,
    /// …or by group.
    pub ipc_groups: Vec<Principal>,
    /// Management socket: read role (users, or on Windows groups too).
    pub mgmt_readers: Vec<Principal>,
    /// Management socket: admin role (reads too).
    pub mgmt_admins: Vec<Principal>,
}

pub type SharedAccess = Arc<RwLock<Access>>;

/// SYSTEM and BUILTIN\Administrators: the Windows management socket's admins by default, as
/// root is on Linux through `management.admin_uids = [0]`.
pub const WINDOWS_DEFAULT_ADMINS: [&str; 2] = ["S-1-5-18", "S-1-5-32-544"];

impl Access {
    pub fn from_config(config: &AgentConfig) -> Self {
        let sids = |list: &[String]| list.iter().cloned().map(Principal::Sid).collect::<Vec<_>>();
        if cfg!(windows) {
            let mut admins = sids(&config.management.admin_sids);
            if admins.is_empty() {
                admins = WINDOWS_DEFAULT_ADMINS
                    .iter()
                    .map(|s| Principal::Sid((*s).to_string()))
                    .collect();
            }
            Self {
                ipc_users: sids(&config.ipc.allowed_sids),
                ipc_groups: sids(&config.ipc.allowed_groups),
                mgmt_readers: sids(&config.management.allowed_sids),
                mgmt_admins: admins,
            }
        } else {
            let uids = |list: &[u32]| list.iter().copied().map(Principal::Uid).collect();
            Self {
                ipc_users: uids(&config.ipc.allowed_uids),
                ipc_groups: config
                    .ipc
                    .allowed_gids
                    .iter()
                    .copied()
                    .map(Principal::Gid)
                    .collect(),
                mgmt_readers: uids(&config.management.allowed_uids),
                mgmt_admins: uids(&config.management.admin_uids),
            }
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
        self.ipc_users.contains(&peer.user)
            || peer.groups.iter().any(|g| self.ipc_groups.contains(g))
    }

    /// `peer`'s role on the management socket: by uid on Unix; by user or group SID on Windows.
    pub fn role(&self, peer: &Peer) -> Role {
        let listed = |list: &[Principal]| {
            list.contains(&peer.user)
                || peer
                    .groups
                    .iter()
                    .any(|g| matches!(g, Principal::Sid(_)) && list.contains(g))
        };
        if listed(&self.mgmt_admins) {
            Role::Admin
        } else if listed(&self.mgmt_readers) {
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
            ipc_users: vec![Principal::Uid(1000)],
            ipc_groups: vec![Principal::Gid(50)],
            mgmt_readers: vec![Principal::Uid(1001)],
            mgmt_admins: vec![Principal::Uid(0)],
        };
        let peer = |uid, gid| Peer {
            user: Principal::Uid(uid),
            groups: vec![Principal::Gid(gid)],
            pid: None,
        };
        assert!(access.may_validate(&peer(1000, 1)));
        assert!(access.may_validate(&peer(7, 50)));
        assert!(!access.may_validate(&peer(7, 7)));
        assert_eq!(access.role(&peer(0, 0)), Role::Admin);
        assert_eq!(access.role(&peer(1001, 0)), Role::Reader);
        assert_eq!(access.role(&peer(1000, 0)), Role::None);
        // A gid never gives a management role (Unix roles are by uid).
        let by_gid = Access {
            mgmt_admins: vec![Principal::Gid(0)],
            ..access
        };
        assert_eq!(by_gid.role(&peer(5, 0)), Role::None);
    }

    #[test]
    fn windows_peers_by_user_or_group_sid() {
        let sid = |s: &str| Principal::Sid(s.into());
        let access = Access {
            ipc_users: vec![sid("S-1-5-21-1-2-3-1001")],
            ipc_groups: vec![sid("S-1-5-21-1-2-3-2000")],
            mgmt_readers: vec![sid("S-1-5-32-545")],
            mgmt_admins: vec![sid("S-1-5-32-544")],
        };
        let peer = |user: &str, groups: &[&str]| Peer {
            user: sid(user),
            groups: groups.iter().map(|g| sid(g)).collect(),
            pid: Some(42),
        };
        assert!(access.may_validate(&peer("S-1-5-21-1-2-3-1001", &[])));
        assert!(access.may_validate(&peer("S-1-5-21-1-2-3-1002", &["S-1-5-21-1-2-3-2000"])));
        assert!(!access.may_validate(&peer("S-1-5-21-1-2-3-1002", &["S-1-5-32-545"])));
        assert_eq!(
            access.role(&peer("S-1-5-18", &["S-1-5-32-544"])),
            Role::Admin
        );
        assert_eq!(
            access.role(&peer("S-1-5-21-9", &["S-1-5-32-545"])),
            Role::Reader
        );
        assert_eq!(access.role(&peer("S-1-5-21-9", &[])), Role::None);
        assert_eq!(
            peer("S-1-5-21-9", &[]).details(),
            serde_json::json!({"sid": "S-1-5-21-9", "pid": 42})
        );
        assert_eq!(peer("S-1-5-21-9", &[]).actor().uid, None);
    }
}
