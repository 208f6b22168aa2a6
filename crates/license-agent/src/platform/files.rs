//! Durable file writes: temp file in the same directory, fsync, rename, fsync the directory,
//! with the final mode set before any byte is written (keys are never world-readable, even
//! for an instant). On Windows the mode stands for an ACL (`platform::windows::acl`): private
//! files are SYSTEM's and Administrators' only, public ones readable by Users too; NTFS
//! journals the rename, and a directory cannot be fsynced there.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::Path;

/// Mode of private keys, of the machine certificate (seed §6.2: `client.pem` 600) and of the
/// config (it names the key paths).
pub const PRIVATE: u32 = 0o600;
/// Mode of the CA certificate, license tokens and the metrics file (the umask of the unit,
/// 0077, still makes them 0600 under systemd).
pub const PUBLIC: u32 = 0o644;

pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = create_private(&tmp, mode)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Renames `from` over `to` and makes the rename durable (fsync of the directory).
pub fn rename_durable(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    let dir = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    sync_dir(dir)
}

/// Makes `path` executable by everyone (0755); nothing to do on Windows, where the extension
/// makes a program.
pub fn make_executable(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
    }
    #[cfg(windows)]
    {
        let _ = path;
        Ok(())
    }
}

/// Creates (truncating) `path` with `mode` already applied, before any byte is written.
fn create_private(path: &Path, mode: u32) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(mode);
    }
    let file = options.open(path)?;
    #[cfg(windows)]
    super::windows::acl::set(path, acl_of(mode, false))?;
    Ok(file)
}

/// The ACL standing for `mode`: readable by Users only if the mode lets others read.
#[cfg(windows)]
fn acl_of(mode: u32, dir: bool) -> &'static str {
    use super::windows::acl;
    match (mode & 0o004 != 0, dir) {
        (false, false) => acl::PRIVATE_FILE,
        (true, false) => acl::PUBLIC_FILE,
        (false, true) => acl::PRIVATE_DIR,
        (true, true) => acl::PUBLIC_DIR,
    }
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    return File::open(dir)?.sync_all();
    #[cfg(windows)]
    {
        let _ = dir;
        Ok(())
    }
}

/// Creates a directory (and parents) with the given mode if it does not exist.
pub fn ensure_dir(path: &Path, mode: u32) -> std::io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(path)
    }
    #[cfg(windows)]
    {
        std::fs::create_dir_all(path)?;
        super::windows::acl::set(path, acl_of(mode, true))
    }
}

/// The gid `[ipc] socket_group` names, looked up in the system's group database (none on
/// Windows, where the pipe's DACL names the allowed SIDs instead).
pub fn socket_gid(
    ipc: &crate::config::IpcSection,
) -> Result<Option<u32>, crate::config::ConfigError> {
    let Some(group) = &ipc.socket_group else {
        return Ok(None);
    };
    #[cfg(windows)]
    return Err(crate::config::ConfigError::Invalid {
        key: "ipc.socket_group",
        message: format!("`{group}`: a Linux setting; on Windows use ipc.allowed_groups"),
    });
    #[cfg(unix)]
    group_id(group)
        .map(Some)
        .ok_or_else(|| crate::config::ConfigError::Invalid {
            key: "ipc.socket_group",
            message: format!("no group named `{group}`"),
        })
}

/// The gid of `group`: a number as is, else a name looked up in the group database (NSS).
#[cfg(unix)]
#[allow(unsafe_code)]
pub fn group_id(group: &str) -> Option<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Some(gid);
    }
    let name = std::ffi::CString::new(group).ok()?;
    // SAFETY: `libc::group` is plain data (integers and pointers); all zeroes is a valid value.
    let mut entry: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    let mut buffer = vec![0_u8; 16 * 1024];
    // SAFETY: every pointer is valid for the call; `buffer` outlives `entry`'s borrowed strings,
    // and only the gid (a plain integer) is read back.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            &mut found,
        )
    };
    (rc == 0 && !found.is_null()).then_some(entry.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn groups_by_number_or_name() {
        assert_eq!(group_id("4242"), Some(4242));
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-here"), None);
        assert_eq!(group_id("bad\0name"), None);
    }

    #[test]
    fn writes_with_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_atomic(&p, b"one", PRIVATE).unwrap();
        write_atomic(&p, b"two", PRIVATE).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        #[cfg(windows)]
        super::super::windows::acl::tests::assert_private(
            &super::super::windows::acl::get(&p).unwrap(),
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
