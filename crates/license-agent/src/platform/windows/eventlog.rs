//! Alerts to the Windows event log (Application log, source `license-agent`): what journald's
//! `ALERT` records are on Linux. Where the event log does not take the record (no event log
//! service, as under wine), the alert is still in the audit log, the service's log file and the
//! webhook.

use windows_sys::Win32::System::EventLog::{
    DeregisterEventSource, RegisterEventSourceW, ReportEventW, EVENTLOG_ERROR_TYPE,
};

use super::wide;

/// Event id of every alert (the alert's name is in the text).
const ALERT_EVENT_ID: u32 = 1000;

/// Writes one error record; whether the event log took it.
pub fn report(text: &str) -> bool {
    let source = wide("license-agent");
    // SAFETY: `source` is NUL-terminated; a null server name is the local machine.
    let handle = unsafe { RegisterEventSourceW(std::ptr::null(), source.as_ptr()) };
    if handle.is_null() {
        return false;
    }
    let message = wide(text);
    let strings = [message.as_ptr()];
    // SAFETY: `handle` is a registered source; `strings` holds one NUL-terminated string that
    // outlives the call; no binary data.
    let ok = unsafe {
        ReportEventW(
            handle,
            EVENTLOG_ERROR_TYPE,
            0,
            ALERT_EVENT_ID,
            std::ptr::null_mut(),
            1,
            0,
            strings.as_ptr(),
            std::ptr::null(),
        )
    };
    // SAFETY: registered above, deregistered once.
    unsafe { DeregisterEventSource(handle) };
    ok != 0
}
