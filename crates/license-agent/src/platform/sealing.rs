//! Key material at rest, as the system can protect it beyond the file's permissions: on Windows
//! with DPAPI in machine scope (a copy of the file is useless on another machine); on Unix it
//! is kept as is, the file's mode 0600 and the agent's user being the protection there (the TPM
//! store is the stronger option on both).

use zeroize::Zeroizing;

/// The form `material` is written to disk in.
pub fn seal(material: &[u8]) -> std::io::Result<Vec<u8>> {
    #[cfg(windows)]
    return super::windows::dpapi::protect(material);
    #[cfg(unix)]
    Ok(material.to_vec())
}

/// The material back from what [`seal`] wrote.
pub fn unseal(stored: &[u8]) -> std::io::Result<Zeroizing<Vec<u8>>> {
    #[cfg(windows)]
    return super::windows::dpapi::unprotect(stored);
    #[cfg(unix)]
    Ok(Zeroizing::new(stored.to_vec()))
}
