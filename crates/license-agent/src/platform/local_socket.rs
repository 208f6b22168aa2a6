//! The agent's local sockets, whatever the system: a Unix socket file with the peer's
//! credentials from `SO_PEERCRED`, or a Windows named pipe with the peer's SIDs from its
//! access token (`platform::windows::pipe`). The sockets' listener serves both the same; who a
//! [`Peer`] may be is the access module's business.

use std::path::Path;

use license_audit::Actor;

/// A user or a group as the kernel names it: a uid or gid on Unix, a SID on Windows.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    Uid(u32),
    Gid(u32),
    Sid(String),
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Uid(uid) => write!(f, "uid {uid}"),
            Principal::Gid(gid) => write!(f, "gid {gid}"),
            Principal::Sid(sid) => f.write_str(sid),
        }
    }
}

/// The process at the other end of a local connection, as the kernel reports it
/// (`SO_PEERCRED` on Unix; the client's access token on Windows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The uid, or the user SID.
    pub user: Principal,
    /// The primary gid, or the token's enabled group SIDs.
    pub groups: Vec<Principal>,
    pub pid: Option<u32>,
}

impl Peer {
    /// The peer as an audit actor (a Windows user is named in the event's details).
    pub fn actor(&self) -> Actor {
        match self.user {
            Principal::Uid(uid) => Actor::peer(uid, self.pid.unwrap_or(0)),
            _ => Actor {
                uid: None,
                pid: self.pid,
            },
        }
    }

    /// The peer as JSON for audit details and logs: `{"uid", "gid", "pid"}` on Unix,
    /// `{"sid", "pid"}` on Windows.
    pub fn details(&self) -> serde_json::Value {
        let mut details = serde_json::Map::new();
        match &self.user {
            Principal::Uid(uid) => {
                details.insert("uid".into(), (*uid).into());
            }
            Principal::Sid(sid) => {
                details.insert("sid".into(), sid.clone().into());
            }
            // A group is never a peer's user.
            Principal::Gid(_) => {}
        }
        if let Some(Principal::Gid(gid)) = self.groups.first() {
            details.insert("gid".into(), (*gid).into());
        }
        details.insert("pid".into(), self.pid.into());
        details.into()
    }
}

/// A connection's stream.
#[cfg(unix)]
pub type LocalStream = tokio::net::UnixStream;
#[cfg(windows)]
pub type LocalStream = tokio::net::windows::named_pipe::NamedPipeServer;

/// Who may connect at all; who is *served* is decided per connection from the [`Peer`].
/// Each system reads the fields it has.
#[derive(Debug, Clone, Default)]
pub struct BindOptions {
    /// Unix: the socket file's mode…
    pub mode: u32,
    /// …and group.
    pub gid: Option<u32>,
    /// Windows: the SIDs the pipe's DACL lets in besides SYSTEM and Administrators; `None`:
    /// any authenticated user.
    pub sids: Option<Vec<String>>,
}

/// A bound local socket.
#[derive(Debug)]
pub struct LocalListener {
    #[cfg(unix)]
    inner: tokio::net::UnixListener,
    #[cfg(unix)]
    path: std::path::PathBuf,
    #[cfg(windows)]
    inner: super::windows::pipe::PipeListener,
}

impl LocalListener {
    /// Binds `path` (a socket file, replacing a stale one; or a pipe name). Fails when another
    /// process serves it.
    pub fn bind(path: &Path, options: &BindOptions) -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        format!("{} is served by another process", path.display()),
                    ))
                }
                Err(_) if path.exists() => std::fs::remove_file(path)?,
                Err(_) => {}
            }
            let inner = tokio::net::UnixListener::bind(path)?;
            if options.gid.is_some() {
                std::os::unix::fs::chown(path, None, options.gid)?;
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(options.mode))?;
            Ok(Self {
                inner,
                path: path.to_path_buf(),
            })
        }
        #[cfg(windows)]
        {
            use super::windows::pipe::{pipe_sddl, PipeListener};
            let name = path.to_str().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "pipe name is not UTF-8")
            })?;
            let inner = PipeListener::bind(name, pipe_sddl(options.sids.as_deref())).map_err(
                |e| match e.raw_os_error() {
                    // ERROR_ACCESS_DENIED / ERROR_PIPE_BUSY: the name is taken.
                    Some(5 | 231) => std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        format!("{name} is served by another process"),
                    ),
                    _ => e,
                },
            )?;
            Ok(Self { inner })
        }
    }

    /// The next connection and who is at its other end.
    pub async fn accept(&mut self) -> std::io::Result<(LocalStream, Peer)> {
        #[cfg(unix)]
        {
            let (stream, _) = self.inner.accept().await?;
            let cred = stream.peer_cred()?;
            let peer = Peer {
                user: Principal::Uid(cred.uid()),
                groups: vec![Principal::Gid(cred.gid())],
                pid: cred.pid().map(i32::unsigned_abs),
            };
            Ok((stream, peer))
        }
        #[cfg(windows)]
        {
            let (stream, peer) = self.inner.accept().await?;
            let peer = Peer {
                user: Principal::Sid(peer.user_sid),
                groups: peer.group_sids.into_iter().map(Principal::Sid).collect(),
                pid: peer.pid,
            };
            Ok((stream, peer))
        }
    }

    /// Stops serving: the socket file is removed (a pipe disappears with its last handle).
    pub fn close(self) {
        #[cfg(unix)]
        {
            drop(self.inner);
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
