//! Process hardening at daemon start (DESIGN.md §2): no core dumps and no ptrace attach by
//! other processes of the same user, so unsealed secrets cannot be lifted from a dump or a
//! debugger. On Windows: no crash dialog or Windows Error Reporting dump (`SetErrorMode`), and a
//! process DACL that gives Administrators no memory-read or debugging rights (see
//! `platform::windows::acl::PROCESS`). Besides the TPM's FFI (`platform/tpm/esys.rs`) and the
//! Windows FFI (`platform/windows`), the one file with `unsafe`.
#![allow(unsafe_code)]

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HardeningError {
    #[error("{call} failed: {source}")]
    Call {
        call: &'static str,
        source: std::io::Error,
    },
}

/// Windows: no crash dialog or error-reporting dump, and a process DACL that refuses
/// memory-read and debugging handles.
#[cfg(windows)]
pub fn make_non_dumpable() -> Result<(), HardeningError> {
    use windows_sys::Win32::System::Diagnostics::Debug::{
        SetErrorMode, SEM_FAILCRITICALERRORS, SEM_NOGPFAULTERRORBOX,
    };
    // SAFETY: sets this process's error mode flags; no pointers.
    unsafe { SetErrorMode(SEM_FAILCRITICALERRORS | SEM_NOGPFAULTERRORBOX) };
    super::windows::acl::set_process(super::windows::acl::PROCESS).map_err(|source| {
        HardeningError::Call {
            call: "SetKernelObjectSecurity(process)",
            source,
        }
    })
}

/// Makes the process non-dumpable and sets its core-dump size limit to zero.
#[cfg(unix)]
pub fn make_non_dumpable() -> Result<(), HardeningError> {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes plain integers, touches no memory of ours, and
    // only changes this process's dumpable flag.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        return Err(HardeningError::Call {
            call: "prctl(PR_SET_DUMPABLE)",
            source: std::io::Error::last_os_error(),
        });
    }
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `zero` is a valid, initialised rlimit that outlives the call; setrlimit only
    // reads it.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
    if rc != 0 {
        return Err(HardeningError::Call {
            call: "setrlimit(RLIMIT_CORE)",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether the process is currently dumpable.
#[cfg(all(test, unix))]
pub fn is_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE reads a flag and takes no pointers.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(windows)]
    #[test]
    fn administrators_lose_memory_and_debug_rights() {
        make_non_dumpable().unwrap();
        let sddl = crate::platform::windows::acl::process().unwrap();
        assert!(sddl.contains("(A;;0x1400;;;BA)"), "{sddl}");
        assert!(
            !sddl.contains(";;;WD)") && !sddl.contains(";;;AU)"),
            "{sddl}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn process_becomes_non_dumpable_without_core_limit() {
        make_non_dumpable().unwrap();
        assert!(!is_dumpable());
        let mut limit = libc::rlimit {
            rlim_cur: 1,
            rlim_max: 1,
        };
        // SAFETY: `limit` is a valid rlimit the call writes into.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut limit) }, 0);
        assert_eq!((limit.rlim_cur, limit.rlim_max), (0, 0));
    }
}
