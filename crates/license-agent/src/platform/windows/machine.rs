//! What Windows says about the machine: its name and a stable id (the `MachineGuid` Windows
//! sets at installation, `HKLM\SOFTWARE\Microsoft\Cryptography`).

use windows_sys::Win32::System::Registry::{RegGetValueW, HKEY_LOCAL_MACHINE, RRF_RT_REG_SZ};
use windows_sys::Win32::System::SystemInformation::{
    ComputerNamePhysicalDnsHostname, GetComputerNameExW,
};

use super::wide;

/// The DNS host name (`GetComputerNameExW`).
pub fn hostname() -> Option<String> {
    let mut buffer = [0u16; 256];
    let mut len = buffer.len() as u32;
    // SAFETY: `buffer` holds `len` u16s; the call writes at most that and sets `len`.
    let ok = unsafe {
        GetComputerNameExW(
            ComputerNamePhysicalDnsHostname,
            buffer.as_mut_ptr(),
            &mut len,
        )
    };
    (ok != 0 && len > 0).then(|| String::from_utf16_lossy(&buffer[..len as usize]))
}

/// `MachineGuid`, the id Windows gives an installation.
pub fn machine_guid() -> Option<String> {
    let key = wide(r"SOFTWARE\Microsoft\Cryptography");
    let value = wide("MachineGuid");
    let mut buffer = [0u16; 128];
    let mut size = (buffer.len() * 2) as u32;
    // SAFETY: names are NUL-terminated; `buffer` holds `size` bytes, the call writes at most that.
    let rc = unsafe {
        RegGetValueW(
            HKEY_LOCAL_MACHINE,
            key.as_ptr(),
            value.as_ptr(),
            RRF_RT_REG_SZ,
            std::ptr::null_mut(),
            buffer.as_mut_ptr().cast(),
            &mut size,
        )
    };
    if rc != 0 {
        return None;
    }
    let len = buffer.iter().position(|&c| c == 0).unwrap_or(buffer.len());
    Some(String::from_utf16_lossy(&buffer[..len]))
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_the_machine() {
        assert!(!super::hostname().unwrap().is_empty());
        let guid = super::machine_guid().unwrap();
        assert_eq!(guid.len(), 36, "{guid}");
    }
}
