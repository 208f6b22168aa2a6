//! File and directory ACLs: what stands for Unix modes on Windows. A private file (keys, config,
//! secrets, state) is readable by SYSTEM and Administrators only; a public one (CA certificate,
//! metrics) also by Users. The DACL is protected (no inherited entries), so a file keeps its ACL
//! whatever the folder it sits in allows.

use std::path::Path;

use windows_sys::Win32::Foundation::LocalFree;
use windows_sys::Win32::Security::Authorization::{
    ConvertSecurityDescriptorToStringSecurityDescriptorW,
    ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
};
use windows_sys::Win32::Security::{
    GetFileSecurityW, SetFileSecurityW, DACL_SECURITY_INFORMATION,
    PROTECTED_DACL_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR,
};

use super::{last_error, take_local_wide, wide};

/// SYSTEM and Administrators: full control; nobody else. Inherited by what a folder holds.
pub const PRIVATE_DIR: &str = "D:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)";
/// A folder Users may list and read (files keep their own protected ACLs).
pub const PUBLIC_DIR: &str = "D:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)(A;OICI;0x1200a9;;;BU)";
pub const PRIVATE_FILE: &str = "D:P(A;;FA;;;SY)(A;;FA;;;BA)";
pub const PUBLIC_FILE: &str = "D:P(A;;FA;;;SY)(A;;FA;;;BA)(A;;FR;;;BU)";

/// A security descriptor parsed from SDDL, freed on drop.
#[derive(Debug)]
pub struct SecurityDescriptor(PSECURITY_DESCRIPTOR);

impl SecurityDescriptor {
    pub fn from_sddl(sddl: &str) -> std::io::Result<Self> {
        let text = wide(sddl);
        let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
        // SAFETY: `text` is NUL-terminated and outlives the call; `sd` receives a LocalAlloc'd
        // descriptor that Drop frees.
        let ok = unsafe {
            ConvertStringSecurityDescriptorToSecurityDescriptorW(
                text.as_ptr(),
                SDDL_REVISION_1,
                &mut sd,
                std::ptr::null_mut(),
            )
        };
        if ok == 0 {
            return Err(last_error());
        }
        Ok(Self(sd))
    }

    pub fn as_ptr(&self) -> PSECURITY_DESCRIPTOR {
        self.0
    }
}

impl Drop for SecurityDescriptor {
    fn drop(&mut self) {
        // SAFETY: allocated by ConvertStringSecurityDescriptorToSecurityDescriptorW, freed once.
        unsafe { LocalFree(self.0) };
    }
}

/// Replaces `path`'s DACL with the one in `sddl` (protected: nothing inherited).
pub fn set(path: &Path, sddl: &str) -> std::io::Result<()> {
    let sd = SecurityDescriptor::from_sddl(sddl)?;
    let name = wide(path);
    // SAFETY: `name` is NUL-terminated, `sd` a valid descriptor; both outlive the call.
    let ok = unsafe {
        SetFileSecurityW(
            name.as_ptr(),
            DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION,
            sd.as_ptr(),
        )
    };
    if ok == 0 {
        return Err(last_error());
    }
    Ok(())
}

/// `path`'s DACL as SDDL (for checks and `check-config`).
pub fn get(path: &Path) -> std::io::Result<String> {
    let name = wide(path);
    dacl_sddl(|buffer, len, needed| {
        // SAFETY: `name` is NUL-terminated; `buffer` holds `len` bytes (or is null with `len`
        // 0, a size query); `needed` receives the size.
        unsafe {
            GetFileSecurityW(
                name.as_ptr(),
                DACL_SECURITY_INFORMATION,
                buffer,
                len,
                needed,
            )
        }
    })
}

/// A security descriptor's DACL as SDDL, read with `query` as the Get*Security functions do:
/// once for the size, once into a buffer that large.
fn dacl_sddl(
    query: impl Fn(PSECURITY_DESCRIPTOR, u32, &mut u32) -> windows_sys::core::BOOL,
) -> std::io::Result<String> {
    let mut needed = 0u32;
    query(std::ptr::null_mut(), 0, &mut needed);
    if needed == 0 {
        return Err(last_error());
    }
    // 8-byte aligned, at least `needed` bytes.
    let mut buffer = vec![0u64; (needed as usize).div_ceil(8)];
    if query(buffer.as_mut_ptr().cast(), needed, &mut needed) == 0 {
        return Err(last_error());
    }
    sddl_of(buffer.as_mut_ptr().cast())
}

/// SYSTEM (the service's account) full control of the agent's process; Administrators only
/// query its state: no `PROCESS_VM_READ`, no debugging handle, no thread injection without
/// SeDebugPrivilege (which Windows lets no DACL stop).
pub const PROCESS: &str = "D:P(A;;0x1fffff;;;SY)(A;;0x1400;;;BA)";

/// Replaces this process's DACL.
pub fn set_process(sddl: &str) -> std::io::Result<()> {
    use windows_sys::Win32::Security::SetKernelObjectSecurity;
    use windows_sys::Win32::System::Threading::GetCurrentProcess;
    let sd = SecurityDescriptor::from_sddl(sddl)?;
    // SAFETY: the pseudo-handle of this process and a valid descriptor outliving the call.
    let ok = unsafe {
        SetKernelObjectSecurity(GetCurrentProcess(), DACL_SECURITY_INFORMATION, sd.as_ptr())
    };
    if ok == 0 {
        return Err(last_error());
    }
    Ok(())
}

/// This process's DACL as SDDL.
pub fn process() -> std::io::Result<String> {
    use windows_sys::Win32::Security::GetKernelObjectSecurity;
    use windows_sys::Win32::System::Threading::GetCurrentProcess;
    dacl_sddl(|buffer, len, needed| {
        // SAFETY: this process's pseudo-handle; `buffer` holds `len` bytes (or is null with
        // `len` 0, a size query); `needed` receives the size.
        unsafe {
            GetKernelObjectSecurity(
                GetCurrentProcess(),
                DACL_SECURITY_INFORMATION,
                buffer,
                len,
                needed,
            )
        }
    })
}

fn sddl_of(sd: PSECURITY_DESCRIPTOR) -> std::io::Result<String> {
    let mut text = std::ptr::null_mut();
    // SAFETY: `sd` is a valid descriptor for the call; `text` receives a LocalAlloc'd string
    // that take_local_wide frees.
    let ok = unsafe {
        ConvertSecurityDescriptorToStringSecurityDescriptorW(
            sd,
            SDDL_REVISION_1,
            DACL_SECURITY_INFORMATION,
            &mut text,
            std::ptr::null_mut(),
        )
    };
    if ok == 0 {
        return Err(last_error());
    }
    // SAFETY: a LocalAlloc'd, NUL-terminated string from the call above.
    Ok(unsafe { take_local_wide(text) })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The trustees an SDDL DACL names.
    fn trustees(sddl: &str) -> Vec<String> {
        sddl.split('(')
            .skip(1)
            .filter_map(|ace| ace.trim_end_matches(')').rsplit(';').next())
            .map(str::to_string)
            .collect()
    }

    /// Who may hold a private file: SYSTEM, Administrators, and the file's owner. Windows keeps
    /// the DACL as set (SYSTEM and Administrators); wine keeps Unix modes and reads a 0600 file
    /// back as SYSTEM and its owner, so the owner is allowed here.
    pub(crate) fn assert_private(sddl: &str) {
        let owner = crate::platform::windows::pipe::current_user_sid().unwrap();
        let names = trustees(sddl);
        assert!(!names.is_empty(), "{sddl}");
        for name in names {
            assert!(
                ["SY", "BA", owner.as_str()].contains(&name.as_str()),
                "{name} in {sddl}"
            );
        }
    }

    #[test]
    fn private_files_are_for_system_and_administrators_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, b"x").unwrap();
        // (Wine reads a public file back as its Unix mode too, without Users: only the
        // private side is observable here.)
        set(&path, PUBLIC_FILE).unwrap();
        set(&path, PRIVATE_FILE).unwrap();
        assert_private(&get(&path).unwrap());
    }

    #[test]
    fn bad_sddl_is_an_error() {
        assert!(SecurityDescriptor::from_sddl("D:(nonsense)").is_err());
    }
}
