//! DPAPI, machine scope: what protects the file store's key material on Windows. A blob
//! protected here can be unprotected on this machine only (by any of its processes: the file's
//! ACL, SYSTEM and Administrators, is what keeps other users out), so a copied disk or backup
//! of `secret.key` is worthless elsewhere. An entropy string ties blobs to this use.

use windows_sys::Win32::Foundation::LocalFree;
use windows_sys::Win32::Security::Cryptography::{
    CryptProtectData, CryptUnprotectData, CRYPTPROTECT_LOCAL_MACHINE, CRYPTPROTECT_UI_FORBIDDEN,
    CRYPT_INTEGER_BLOB,
};
use zeroize::{Zeroize as _, Zeroizing};

use super::last_error;

const ENTROPY: &[u8] = b"lsa/secret-store-key/v1";

fn blob(bytes: &[u8]) -> CRYPT_INTEGER_BLOB {
    CRYPT_INTEGER_BLOB {
        cbData: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
        pbData: bytes.as_ptr().cast_mut(),
    }
}

/// Takes DPAPI's LocalAlloc'd output, zeroizing it before it is freed.
///
/// # Safety
/// `out` was filled by a successful CryptProtectData/CryptUnprotectData call.
unsafe fn take(out: CRYPT_INTEGER_BLOB) -> Zeroizing<Vec<u8>> {
    // SAFETY: DPAPI returned `cbData` bytes at `pbData`.
    let bytes = unsafe { std::slice::from_raw_parts_mut(out.pbData, out.cbData as usize) };
    let copy = Zeroizing::new(bytes.to_vec());
    bytes.zeroize();
    // SAFETY: allocated by DPAPI with LocalAlloc, freed once here.
    unsafe { LocalFree(out.pbData.cast()) };
    copy
}

/// Protects `secret` for this machine.
pub fn protect(secret: &[u8]) -> std::io::Result<Vec<u8>> {
    let input = blob(secret);
    let entropy = blob(ENTROPY);
    let mut out = CRYPT_INTEGER_BLOB {
        cbData: 0,
        pbData: std::ptr::null_mut(),
    };
    // SAFETY: input and entropy point at live slices for the call; `out` receives a LocalAlloc'd
    // buffer taken (and freed) below.
    let ok = unsafe {
        CryptProtectData(
            &input,
            std::ptr::null(),
            &entropy,
            std::ptr::null(),
            std::ptr::null(),
            CRYPTPROTECT_LOCAL_MACHINE | CRYPTPROTECT_UI_FORBIDDEN,
            &mut out,
        )
    };
    if ok == 0 {
        return Err(last_error());
    }
    // SAFETY: filled by the successful call above.
    Ok(unsafe { take(out) }.to_vec())
}

/// Unprotects a blob made by [`protect`] on this machine.
pub fn unprotect(protected: &[u8]) -> std::io::Result<Zeroizing<Vec<u8>>> {
    let input = blob(protected);
    let entropy = blob(ENTROPY);
    let mut out = CRYPT_INTEGER_BLOB {
        cbData: 0,
        pbData: std::ptr::null_mut(),
    };
    // SAFETY: as in `protect`.
    let ok = unsafe {
        CryptUnprotectData(
            &input,
            std::ptr::null_mut(),
            &entropy,
            std::ptr::null(),
            std::ptr::null(),
            CRYPTPROTECT_UI_FORBIDDEN,
            &mut out,
        )
    };
    if ok == 0 {
        return Err(last_error());
    }
    // SAFETY: filled by the successful call above.
    Ok(unsafe { take(out) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_tampering() {
        let secret = [7u8; 32];
        let sealed = protect(&secret).unwrap();
        assert!(!sealed.windows(32).any(|w| w == secret), "not in clear");
        assert_eq!(&unprotect(&sealed).unwrap()[..], &secret);
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(unprotect(&bad).is_err());
    }
}
