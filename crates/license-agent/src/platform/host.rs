//! What the daemon tells, and hears from, whatever runs it: systemd on Linux (`sd_notify`
//! readiness, status, watchdog; SIGTERM/SIGINT to stop, SIGHUP to reload), the service control
//! manager on Windows (see `platform/windows/service.rs`: stop and shutdown to stop, the
//! `paramchange` control to reload; Ctrl-C in the foreground). The daemon calls these and never
//! asks which system it runs on.

use std::future::Future;

/// The service is ready: sockets bound, secrets loaded.
pub fn ready() {
    #[cfg(unix)]
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    #[cfg(windows)]
    super::windows::service::report_running();
}

/// One line of status (`systemctl status`); nothing on Windows.
pub fn status(_line: &str) {
    #[cfg(unix)]
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(_line)]);
}

/// A reload begins.
pub fn reloading() {
    #[cfg(unix)]
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
}

/// A reload ended: ready again.
pub fn reloaded() {
    #[cfg(unix)]
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}

/// The daemon is stopping.
pub fn stopping() {
    #[cfg(unix)]
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    #[cfg(windows)]
    super::windows::service::report_stopping();
}

/// Alive: systemd's watchdog ping (Windows' recovery actions act on exits, not pings).
pub fn watchdog() {
    #[cfg(unix)]
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`, unless `WATCHDOG_PID` names another
/// process), as sd_watchdog_enabled(3) reads it.
pub fn watchdog_usec() -> Option<u64> {
    let usec = std::env::var("WATCHDOG_USEC")
        .ok()?
        .parse::<u64>()
        .ok()
        .filter(|u| *u > 0)?;
    match std::env::var("WATCHDOG_PID").ok().map(|p| p.parse::<u32>()) {
        Some(Ok(pid)) if pid != std::process::id() => None,
        _ => Some(usec),
    }
}

/// An alert for the system's own log: the Windows event log (journald already has it on
/// Linux, through the `ALERT` log record).
pub fn alert(_kind: &str, _message: &str) {
    #[cfg(windows)]
    if !super::windows::eventlog::report(&format!("ALERT {_kind}: {_message}")) {
        tracing::debug!("the event log did not take the alert");
    }
}

/// Requests to reload the config: SIGHUP, or the service's `paramchange` control.
#[derive(Debug)]
pub struct Reloads {
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
}

impl Reloads {
    /// Listens from now on.
    pub fn listen() -> std::io::Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            hangup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?,
        })
    }

    /// The next request.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            self.hangup.recv().await;
        }
        #[cfg(windows)]
        super::windows::service::reload_requested().await;
    }
}

/// Completes when the daemon is asked to stop: SIGTERM or SIGINT; the service manager's stop
/// or shutdown, or Ctrl-C. Registered when called, so a request that arrives while the daemon
/// is still starting is not lost (nor does it kill the process before it can drain).
pub fn shutdown_requested() -> std::io::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(windows)]
    {
        let mut ctrl_c = tokio::signal::windows::ctrl_c()?;
        Ok(async move {
            tokio::select! {
                _ = ctrl_c.recv() => {}
                () = super::windows::service::stop_requested() => {}
            }
        })
    }
}
