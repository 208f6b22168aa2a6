//! What the machine says about itself at enrollment: hostname, hardware id, architecture.

use license_protocol::enroll::{FieldError, HardwareId, Hostname};

/// Where a stable hardware id is looked for, best first. The DMI UUID identifies the board
/// (survives a reinstall) but is readable by root only; `/etc/machine-id` is the fallback.
#[cfg(unix)]
const HARDWARE_ID_SOURCES: &[&str] = &[
    "/sys/class/dmi/id/product_uuid",
    "/etc/machine-id",
    "/var/lib/dbus/machine-id",
];

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HardwareError {
    #[error("cannot determine the hostname; pass --hostname")]
    NoHostname,
    #[error("no hardware id found in {sources}; pass --hardware-id")]
    NoHardwareId { sources: String },
    #[error("{0}")]
    Field(#[from] FieldError),
}

pub fn hostname(explicit: Option<String>) -> Result<Hostname, HardwareError> {
    #[cfg(unix)]
    let system = || {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .map(|s| s.trim().to_string())
            .ok()
    };
    #[cfg(windows)]
    let system = crate::platform::windows::machine::hostname;
    let name = match explicit {
        Some(name) => name,
        None => system().ok_or(HardwareError::NoHostname)?,
    };
    Ok(Hostname::try_from(name)?)
}

pub fn hardware_id(explicit: Option<String>) -> Result<HardwareId, HardwareError> {
    if let Some(id) = explicit {
        return Ok(HardwareId::try_from(id)?);
    }
    #[cfg(windows)]
    return crate::platform::windows::machine::machine_guid()
        .and_then(|s| HardwareId::try_from(s).ok())
        .ok_or_else(|| HardwareError::NoHardwareId {
            sources: r"HKLM\SOFTWARE\Microsoft\Cryptography\MachineGuid".into(),
        });
    #[cfg(unix)]
    HARDWARE_ID_SOURCES
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|s| s.trim().to_string())
        .find_map(|s| HardwareId::try_from(s).ok())
        .ok_or_else(|| HardwareError::NoHardwareId {
            sources: HARDWARE_ID_SOURCES.join(", "),
        })
}
