//! Windows FFI behind small safe functions: ACLs on files and pipes, DPAPI, the named pipes'
//! peer identity, the service control manager, the event log, the machine's name and id, and
//! process hardening. Each submodule keeps its `unsafe` next to the call it wraps, with a
//! `SAFETY:` comment; nothing outside `platform` calls Windows directly.
#![allow(unsafe_code)]

pub mod acl;
pub mod dpapi;
pub mod eventlog;
pub mod machine;
pub mod pipe;
pub mod service;

use std::ffi::OsStr;
use std::os::windows::ffi::OsStrExt as _;

/// `s` as a NUL-terminated UTF-16 string for the W functions.
pub fn wide(s: impl AsRef<OsStr>) -> Vec<u16> {
    s.as_ref().encode_wide().chain(std::iter::once(0)).collect()
}

/// The calling thread's last error as an `io::Error`.
pub fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// A NUL-terminated UTF-16 string owned by LocalAlloc, read into a `String` and freed.
///
/// # Safety
/// `p` is null or a NUL-terminated UTF-16 string allocated with LocalAlloc that nothing else
/// frees.
unsafe fn take_local_wide(p: *mut u16) -> String {
    if p.is_null() {
        return String::new();
    }
    let mut len = 0;
    // SAFETY: the caller guarantees NUL termination.
    while unsafe { *p.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: `len` u16s before the NUL are initialised.
    let s = String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(p, len) });
    // SAFETY: allocated by LocalAlloc (caller), freed once here.
    unsafe { windows_sys::Win32::Foundation::LocalFree(p.cast()) };
    s
}
