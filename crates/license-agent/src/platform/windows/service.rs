//! The agent as a Windows service (`license-agent`, LocalSystem, automatic start): installing it
//! with its recovery actions, starting and stopping it, asking its state, and running inside the
//! service control manager (`license-agent service-run`, the service's command line).
//!
//! Recovery: the SCM restarts the agent 5 s after a first and second failure and 30 s after
//! later ones, the count reset after a day without failure, and it also counts a non-zero exit
//! (not only a crash) as a failure — the Windows side of systemd's `Restart=on-failure`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
    ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};

/// The service's name (`sc query license-agent`).
pub const SERVICE_NAME: &str = "license-agent";
const DISPLAY_NAME: &str = "License Secret Agent";
const DESCRIPTION: &str = "Keeps this till's license secrets, rotates them with the license server over mutual TLS, and validates license tokens for local POS applications (named pipe \\\\.\\pipe\\license-agent).";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    #[error("service control manager: {what}: {source}")]
    Scm {
        what: &'static str,
        source: windows_service::Error,
    },
    #[error("the service did not reach {wanted} within {seconds} s (it is {now})")]
    Timeout {
        wanted: &'static str,
        now: String,
        seconds: u64,
    },
}

fn scm(what: &'static str) -> impl FnOnce(windows_service::Error) -> ServiceError {
    move |source| ServiceError::Scm { what, source }
}

/// What `sc query` would say, in words.
pub fn state_name(state: ServiceState) -> &'static str {
    match state {
        ServiceState::Stopped => "stopped",
        ServiceState::StartPending => "starting",
        ServiceState::StopPending => "stopping",
        ServiceState::Running => "running",
        ServiceState::ContinuePending => "resuming",
        ServiceState::PausePending => "pausing",
        ServiceState::Paused => "paused",
    }
}

/// Installs (or updates) the service to run `exe service-run --config CONFIG` as LocalSystem at
/// boot, with the recovery actions above. Returns whether it was newly created.
pub fn install(exe: &Path, config: &Path) -> Result<bool, ServiceError> {
    let manager = ServiceManager::local_computer(
        None::<&str>,
        ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE,
    )
    .map_err(scm("open"))?;
    let info = ServiceInfo {
        name: SERVICE_NAME.into(),
        display_name: DISPLAY_NAME.into(),
        service_type: ServiceType::OWN_PROCESS,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: exe.to_path_buf(),
        launch_arguments: vec![
            OsString::from("service-run"),
            OsString::from("--config"),
            config.as_os_str().to_owned(),
        ],
        dependencies: vec![],
        account_name: None,
        account_password: None,
    };
    let access = ServiceAccess::QUERY_STATUS
        | ServiceAccess::CHANGE_CONFIG
        | ServiceAccess::START
        | ServiceAccess::STOP;
    let (service, created) = match manager.open_service(SERVICE_NAME, access) {
        Ok(service) => {
            service.change_config(&info).map_err(scm("change config"))?;
            (service, false)
        }
        Err(_) => (
            manager
                .create_service(&info, access)
                .map_err(scm("create"))?,
            true,
        ),
    };
    let _ = service.set_description(DESCRIPTION);
    service
        .update_failure_actions(ServiceFailureActions {
            reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(86_400)),
            reboot_msg: None,
            command: None,
            actions: Some(vec![restart_after(5), restart_after(5), restart_after(30)]),
        })
        .map_err(scm("recovery actions"))?;
    // Wine's SCM lacks this setting; Windows has it since Vista.
    if let Err(e) = service.set_failure_actions_on_non_crash_failures(true) {
        tracing::debug!(error = %e, "failure actions on non-crash failures not set");
    }
    Ok(created)
}

fn restart_after(seconds: u64) -> ServiceAction {
    ServiceAction {
        action_type: ServiceActionType::Restart,
        delay: Duration::from_secs(seconds),
    }
}

fn open(access: ServiceAccess) -> Result<windows_service::service::Service, ServiceError> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .map_err(scm("open"))?;
    manager
        .open_service(SERVICE_NAME, access)
        .map_err(scm("open service"))
}

/// The service's state, or `None` when it is not installed.
pub fn query() -> Option<ServiceState> {
    let service = open(ServiceAccess::QUERY_STATUS).ok()?;
    service.query_status().ok().map(|s| s.current_state)
}

/// Whether the service is installed and not stopped.
pub fn is_running() -> bool {
    query().is_some_and(|s| s != ServiceState::Stopped)
}

/// Starts the service (if not running) and waits until it runs.
pub fn start(wait: Duration) -> Result<(), ServiceError> {
    let service = open(ServiceAccess::QUERY_STATUS | ServiceAccess::START)?;
    let status = service.query_status().map_err(scm("query"))?;
    if status.current_state != ServiceState::Running
        && status.current_state != ServiceState::StartPending
    {
        service.start::<&str>(&[]).map_err(scm("start"))?;
    }
    wait_for(&service, ServiceState::Running, "running", wait)
}

/// Stops the service (if running) and waits until it stopped.
pub fn stop(wait: Duration) -> Result<(), ServiceError> {
    let service = open(ServiceAccess::QUERY_STATUS | ServiceAccess::STOP)?;
    let status = service.query_status().map_err(scm("query"))?;
    if status.current_state != ServiceState::Stopped {
        let _ = service.stop();
    }
    wait_for(&service, ServiceState::Stopped, "stopped", wait)
}

/// Stops and removes the service.
pub fn uninstall(wait: Duration) -> Result<(), ServiceError> {
    if query().is_none() {
        return Ok(());
    }
    stop(wait)?;
    let service = open(ServiceAccess::DELETE)?;
    service.delete().map_err(scm("delete"))
}

fn wait_for(
    service: &windows_service::service::Service,
    state: ServiceState,
    wanted: &'static str,
    wait: Duration,
) -> Result<(), ServiceError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let now = service.query_status().map_err(scm("query"))?.current_state;
        if now == state {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(ServiceError::Timeout {
                wanted,
                now: state_name(now).into(),
                seconds: wait.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// --- inside the service ---------------------------------------------------------------------

/// Set while the process runs as the service.
static STATUS: OnceLock<service_control_handler::ServiceStatusHandle> = OnceLock::new();
static STOP: Notify = Notify::const_new();
static RELOAD: Notify = Notify::const_new();
/// What the service runs, handed from [`run_dispatcher`] to the SCM's thread.
static MAIN: Mutex<Option<Box<dyn FnOnce() -> u8 + Send>>> = Mutex::new(None);

fn set_status(state: ServiceState, exit: u8, wait_hint: Duration) {
    let Some(handle) = STATUS.get() else { return };
    let controls = if state == ServiceState::Running {
        ServiceControlAccept::STOP
            | ServiceControlAccept::SHUTDOWN
            | ServiceControlAccept::PARAM_CHANGE
    } else {
        ServiceControlAccept::empty()
    };
    let _ = handle.set_service_status(ServiceStatus {
        service_type: ServiceType::OWN_PROCESS,
        current_state: state,
        controls_accepted: controls,
        exit_code: if exit == 0 {
            ServiceExitCode::Win32(0)
        } else {
            ServiceExitCode::ServiceSpecific(u32::from(exit))
        },
        checkpoint: 0,
        wait_hint,
        process_id: None,
    });
}

/// The daemon is ready (no-op outside the service).
pub fn report_running() {
    set_status(ServiceState::Running, 0, Duration::ZERO);
}

/// The daemon is draining (no-op outside the service).
pub fn report_stopping() {
    set_status(ServiceState::StopPending, 0, Duration::from_secs(15));
}

/// Completes when the SCM asks the service to stop (never outside the service).
pub async fn stop_requested() {
    STOP.notified().await;
}

/// Completes at the next `paramchange` control (`sc control license-agent paramchange`).
pub async fn reload_requested() {
    RELOAD.notified().await;
}

windows_service::define_windows_service!(ffi_service_main, service_main);

fn service_main(_arguments: Vec<OsString>) {
    let handler = |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown => {
            STOP.notify_one();
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::ParamChange => {
            RELOAD.notify_one();
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    };
    let Ok(handle) = service_control_handler::register(SERVICE_NAME, handler) else {
        return;
    };
    let _ = STATUS.set(handle);
    set_status(ServiceState::StartPending, 0, Duration::from_secs(30));
    let main = MAIN.lock().unwrap_or_else(|e| e.into_inner()).take();
    let code = main.map_or(1, |main| main());
    set_status(ServiceState::Stopped, code, Duration::ZERO);
}

/// Hands the process to the SCM, which calls `main` on its own thread; returns when the
/// service has stopped. Fails when the process was not started by the SCM.
pub fn run_dispatcher(main: impl FnOnce() -> u8 + Send + 'static) -> Result<(), ServiceError> {
    *MAIN.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(main));
    windows_service::service_dispatcher::start(SERVICE_NAME, ffi_service_main).map_err(scm(
        "dispatcher (is this process started by the service manager?)",
    ))
}

/// Where the installer puts the agent's binary: `%ProgramFiles%\LicenseAgent`.
pub fn program_dir() -> PathBuf {
    let base = std::env::var_os("ProgramFiles").unwrap_or_else(|| r"C:\Program Files".into());
    PathBuf::from(base).join("LicenseAgent")
}
