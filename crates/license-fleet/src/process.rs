//! A server process's cost as Linux accounts it: CPU time (user + system, `/proc/PID/stat`)
//! and resident memory (`VmRSS`, `/proc/PID/status`).

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    #[error("/proc/{pid}: {source}")]
    Read { pid: u32, source: std::io::Error },
    #[error("/proc/{pid}: {field} not found")]
    Field { pid: u32, field: &'static str },
}

/// Clock ticks per second of `/proc/PID/stat` (USER_HZ: 100 on every Linux this runs on).
const TICKS_PER_SEC: u64 = 100;

/// CPU time used by `pid` so far (user + system).
pub fn cpu_time(pid: u32) -> Result<Duration, ProcessError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|source| ProcessError::Read { pid, source })?;
    parse_cpu(&stat).ok_or(ProcessError::Field {
        pid,
        field: "utime/stime",
    })
}

/// utime + stime of a `/proc/PID/stat` line (fields 14 and 15, after the command in
/// parentheses, which may itself hold spaces and parentheses).
fn parse_cpu(stat: &str) -> Option<Duration> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state): utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis(
        (utime + stime) * 1000 / TICKS_PER_SEC,
    ))
}

/// Resident memory of `pid`, bytes.
pub fn rss_bytes(pid: u32) -> Result<u64, ProcessError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|source| ProcessError::Read { pid, source })?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or(ProcessError::Field {
            pid,
            field: "VmRSS",
        })
}

/// CPU time of several processes together.
pub fn total_cpu(pids: &[u32]) -> Result<Duration, ProcessError> {
    pids.iter().map(|pid| cpu_time(*pid)).sum()
}

/// Resident memory of several processes together.
pub fn total_rss(pids: &[u32]) -> Result<u64, ProcessError> {
    pids.iter().map(|pid| rss_bytes(*pid)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command() {
        let line = "1234 (license server) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0";
        assert_eq!(parse_cpu(line), Some(Duration::from_millis(3000)));
        assert_eq!(parse_cpu("garbage"), None);
    }

    #[test]
    fn this_process_has_a_cost() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() > 0);
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {}
        assert!(total_cpu(&[pid]).unwrap() > Duration::ZERO);
    }
}
