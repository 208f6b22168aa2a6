//! The agent's named pipes: the Windows form of its Unix sockets. Same framing and protocol
//! (byte mode), one pipe instance per connection, and the caller's identity taken from the
//! pipe itself: the agent impersonates the client for an instant (the client grants only
//! identification-level impersonation) and reads the user and group SIDs from that token, as
//! SO_PEERCRED gives a uid and gid on Linux.
//!
//! Who may connect at all is the pipe's DACL: SYSTEM and Administrators, plus the SIDs the
//! config allows (validation) or authenticated users (management); network logons are denied
//! and remote clients refused outright (`PIPE_REJECT_REMOTE_CLIENTS`). The first instance is
//! created with `FILE_FLAG_FIRST_PIPE_INSTANCE`, so the agent never serves a name another
//! process already holds (a squatter makes the agent fail to start, loudly, instead).

use std::os::windows::io::AsRawHandle as _;

use tokio::net::windows::named_pipe::{NamedPipeServer, PipeMode, ServerOptions};
use windows_sys::Win32::Foundation::{CloseHandle, HANDLE};
use windows_sys::Win32::Security::Authorization::ConvertSidToStringSidW;
use windows_sys::Win32::Security::{
    GetTokenInformation, RevertToSelf, TokenGroups, TokenUser, PSID, SECURITY_ATTRIBUTES,
    TOKEN_GROUPS, TOKEN_QUERY, TOKEN_USER,
};
use windows_sys::Win32::System::Pipes::{GetNamedPipeClientProcessId, ImpersonateNamedPipeClient};
use windows_sys::Win32::System::SystemServices::{SE_GROUP_ENABLED, SE_GROUP_USE_FOR_DENY_ONLY};
use windows_sys::Win32::System::Threading::{
    GetCurrentThread, OpenProcess, OpenProcessToken, OpenThreadToken,
    PROCESS_QUERY_LIMITED_INFORMATION,
};

use super::acl::SecurityDescriptor;
use super::{last_error, take_local_wide};

/// Read and write, but not `FILE_CREATE_PIPE_INSTANCE`: a client may talk, never serve.
const CLIENT_RIGHTS: &str = "0x12019b";

/// The pipe's DACL in SDDL: network logons denied, SYSTEM and Administrators full control,
/// `clients` (SIDs; `None`: authenticated users) read and write.
pub fn pipe_sddl(clients: Option<&[String]>) -> String {
    let mut sddl = String::from("D:P(D;;GA;;;NU)(A;;GA;;;SY)(A;;GA;;;BA)");
    match clients {
        None => sddl.push_str(&format!("(A;;{CLIENT_RIGHTS};;;AU)")),
        Some(sids) => {
            for sid in sids {
                sddl.push_str(&format!("(A;;{CLIENT_RIGHTS};;;{sid})"));
            }
        }
    }
    sddl
}

/// Who is at the other end of a pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipePeer {
    pub user_sid: String,
    /// Enabled, non-deny-only groups of the client's token.
    pub group_sids: Vec<String>,
    pub pid: Option<u32>,
}

/// A named pipe served one connection at a time per instance.
#[derive(Debug)]
pub struct PipeListener {
    name: String,
    sddl: String,
    next: NamedPipeServer,
}

impl PipeListener {
    /// Creates the pipe's first instance. Fails if any process already serves `name`.
    pub fn bind(name: &str, sddl: String) -> std::io::Result<Self> {
        let next = create(name, &sddl, true)?;
        Ok(Self {
            name: name.to_string(),
            sddl,
            next,
        })
    }

    /// Waits for a client; the next instance is ready before this one is handed over.
    pub async fn accept(&mut self) -> std::io::Result<(NamedPipeServer, PipePeer)> {
        self.next.connect().await?;
        let fresh = create(&self.name, &self.sddl, false)?;
        let connected = std::mem::replace(&mut self.next, fresh);
        let peer = identify(connected.as_raw_handle() as HANDLE)?;
        Ok((connected, peer))
    }
}

fn create(name: &str, sddl: &str, first: bool) -> std::io::Result<NamedPipeServer> {
    let sd = SecurityDescriptor::from_sddl(sddl)?;
    let mut attributes = SECURITY_ATTRIBUTES {
        nLength: std::mem::size_of::<SECURITY_ATTRIBUTES>() as u32,
        lpSecurityDescriptor: sd.as_ptr(),
        bInheritHandle: 0,
    };
    let mut options = ServerOptions::new();
    options
        .first_pipe_instance(first)
        .reject_remote_clients(true)
        .pipe_mode(PipeMode::Byte)
        .access_inbound(true)
        .access_outbound(true);
    // SAFETY: `attributes` is a valid SECURITY_ATTRIBUTES whose descriptor (`sd`) outlives the
    // call; the pipe keeps its own copy of the descriptor.
    unsafe { options.create_with_security_attributes_raw(name, (&raw mut attributes).cast()) }
}

/// A handle closed on drop.
struct Owned(HANDLE);

impl Drop for Owned {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: a handle this module opened, closed once.
            unsafe { CloseHandle(self.0) };
        }
    }
}

/// The client's identity: its token by impersonation (identification level), else — where
/// impersonation is not available — the token of the process the pipe names as its client.
fn identify(pipe: HANDLE) -> std::io::Result<PipePeer> {
    let mut pid = 0u32;
    // SAFETY: `pipe` is a connected pipe handle; `pid` receives the client's process id.
    let pid = (unsafe { GetNamedPipeClientProcessId(pipe, &mut pid) } != 0).then_some(pid);
    let token = match impersonated_token(pipe) {
        Ok(token) => token,
        Err(e) => {
            tracing::debug!(error = %e, "no impersonation token; using the client process's");
            process_token(pid.ok_or(e)?)?
        }
    };
    let user_sid = token_user(&token)?;
    let group_sids = token_groups(&token)?;
    Ok(PipePeer {
        user_sid,
        group_sids,
        pid,
    })
}

fn impersonated_token(pipe: HANDLE) -> std::io::Result<Owned> {
    // SAFETY: `pipe` is a connected server handle. The impersonation is undone below before
    // anything else runs on this thread.
    if unsafe { ImpersonateNamedPipeClient(pipe) } == 0 {
        return Err(last_error());
    }
    let mut token: HANDLE = std::ptr::null_mut();
    // SAFETY: opens this thread's impersonation token for query, as the process (open as self).
    let opened = unsafe { OpenThreadToken(GetCurrentThread(), TOKEN_QUERY, 1, &mut token) };
    let error = last_error();
    // SAFETY: ends the impersonation started above; must succeed or the process must not go on
    // as someone else.
    if unsafe { RevertToSelf() } == 0 {
        std::process::abort();
    }
    if opened == 0 {
        return Err(error);
    }
    Ok(Owned(token))
}

fn process_token(pid: u32) -> std::io::Result<Owned> {
    // SAFETY: plain call; the handle is owned below.
    let process = Owned(unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) });
    if process.0.is_null() {
        return Err(last_error());
    }
    let mut token: HANDLE = std::ptr::null_mut();
    // SAFETY: `process` is a live process handle; `token` receives a handle owned below.
    if unsafe { OpenProcessToken(process.0, TOKEN_QUERY, &mut token) } == 0 {
        return Err(last_error());
    }
    Ok(Owned(token))
}

/// `GetTokenInformation` into an 8-byte-aligned buffer.
fn token_information(token: &Owned, class: i32) -> std::io::Result<Vec<u64>> {
    let mut needed = 0u32;
    // SAFETY: a size query: no buffer.
    unsafe { GetTokenInformation(token.0, class, std::ptr::null_mut(), 0, &mut needed) };
    if needed == 0 {
        return Err(last_error());
    }
    let mut buffer = vec![0u64; (needed as usize).div_ceil(8)];
    // SAFETY: `buffer` holds at least `needed` bytes.
    let ok = unsafe {
        GetTokenInformation(
            token.0,
            class,
            buffer.as_mut_ptr().cast(),
            needed,
            &mut needed,
        )
    };
    if ok == 0 {
        return Err(last_error());
    }
    Ok(buffer)
}

fn sid_string(sid: PSID) -> std::io::Result<String> {
    let mut text = std::ptr::null_mut();
    // SAFETY: `sid` points into a token information buffer alive for the call; `text` receives
    // a LocalAlloc'd string that take_local_wide frees.
    if unsafe { ConvertSidToStringSidW(sid, &mut text) } == 0 {
        return Err(last_error());
    }
    // SAFETY: from the successful call above.
    Ok(unsafe { take_local_wide(text) })
}

/// The SID of the user this process runs as.
pub fn current_user_sid() -> std::io::Result<String> {
    use windows_sys::Win32::System::Threading::GetCurrentProcess;
    let mut token: HANDLE = std::ptr::null_mut();
    // SAFETY: this process's pseudo-handle; `token` receives a handle owned below.
    if unsafe { OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &mut token) } == 0 {
        return Err(last_error());
    }
    token_user(&Owned(token))
}

fn token_user(token: &Owned) -> std::io::Result<String> {
    let buffer = token_information(token, TokenUser)?;
    // SAFETY: the buffer holds a TOKEN_USER (and the SID it points to), suitably aligned.
    let user = unsafe { &*buffer.as_ptr().cast::<TOKEN_USER>() };
    sid_string(user.User.Sid)
}

fn token_groups(token: &Owned) -> std::io::Result<Vec<String>> {
    let buffer = token_information(token, TokenGroups)?;
    // SAFETY: the buffer holds a TOKEN_GROUPS with `GroupCount` entries (and their SIDs).
    let groups = unsafe { &*buffer.as_ptr().cast::<TOKEN_GROUPS>() };
    // SAFETY: `Groups` is a trailing array of `GroupCount` entries inside the buffer.
    let entries =
        unsafe { std::slice::from_raw_parts(groups.Groups.as_ptr(), groups.GroupCount as usize) };
    entries
        .iter()
        .filter(|g| {
            g.Attributes & SE_GROUP_ENABLED as u32 != 0
                && g.Attributes & SE_GROUP_USE_FOR_DENY_ONLY as u32 == 0
        })
        .map(|g| sid_string(g.Sid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::windows::named_pipe::ClientOptions;

    #[test]
    fn sddl_lists_clients_and_denies_the_network() {
        let sddl = pipe_sddl(Some(&["S-1-5-21-1-2-3-1001".to_string()]));
        assert!(sddl.starts_with("D:P(D;;GA;;;NU)"));
        assert!(sddl.ends_with("(A;;0x12019b;;;S-1-5-21-1-2-3-1001)"));
        assert!(pipe_sddl(None).ends_with(";;;AU)"));
        SecurityDescriptor::from_sddl(&sddl).unwrap();
    }

    #[tokio::test]
    async fn serves_clients_and_names_them() {
        let name = format!(r"\\.\pipe\lsa-test-{}", std::process::id());
        // (A second bind on the name fails on Windows, FILE_FLAG_FIRST_PIPE_INSTANCE; wine
        // ignores the flag, so it is not checked here.)
        let mut listener = PipeListener::bind(&name, pipe_sddl(None)).unwrap();
        let client = {
            let name = name.clone();
            tokio::spawn(async move {
                let mut c = ClientOptions::new().open(&name).unwrap();
                c.write_all(b"ping").await.unwrap();
                let mut answer = [0u8; 4];
                c.read_exact(&mut answer).await.unwrap();
                answer
            })
        };
        let (mut conn, peer) = listener.accept().await.unwrap();
        let mut got = [0u8; 4];
        conn.read_exact(&mut got).await.unwrap();
        conn.write_all(b"pong").await.unwrap();
        assert_eq!(&client.await.unwrap(), b"pong");
        assert_eq!(&got, b"ping");
        assert!(peer.user_sid.starts_with("S-1-"), "{peer:?}");
        assert_eq!(peer.pid, Some(std::process::id()));
    }
}
