//! `license-server`: entry point. Parses the command line, runs one command, and maps the
//! outcome to a documented exit code.
//!
//! Exit codes: 0 success; 1 runtime failure (I/O, database, TLS); 2 bad usage, flags or
//! configuration; 3 not found; 4 refused (conflict, already initialized).

mod cli;
mod output;

use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser as _;
use license_server::clock::Timestamp;
use license_server::config::{https_url, ServerConfig};
use license_server::datadir::{DataDir, DataDirError};
use license_server::http::{self, Listeners};
use license_server::license_keys::LicenseKeyError;
use license_server::server_trust::RolloverError;
use license_server::service::admin::{Admin, AdminError};
use license_server::service::keys::{self, KeysError, Progress, RotateOptions};
use license_server::service::licenses::LicenseRequest;
use license_server::service::reads::Reads;
use license_server::service::{AppState, Settings};
use license_server::store::admin_tokens::Role;
use license_server::store::replica::ReadReplica;
use license_server::store::Store;
use serde_json::json;

use cli::{
    AdminArgs, AdminCommand, ApiTokenCommand, AuditCommand, CertCommand, Cli, ClientCommand,
    Command, InitArgs, KeysCommand, LicenseCommand, ListenArgs, MachineCommand, ReleaseCommand,
    ServeArgs, TokenCommand,
};
use license_server::service::releases::{PublishRequest, ReleaseAdmin, ReleaseError};
use license_server::service::windows_installer::StubSource;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RoleArg {
    Readonly,
    Admin,
}

/// Why the program stopped, with its exit code.
#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Runtime(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
}

impl MainError {
    fn exit_code(&self) -> u8 {
        match self {
            MainError::Runtime(_) => 1,
            MainError::Usage(_) => 2,
            MainError::NotFound(_) => 3,
            MainError::Refused(_) => 4,
        }
    }
}

impl From<DataDirError> for MainError {
    fn from(e: DataDirError) -> Self {
        match e {
            DataDirError::AlreadyInitialized(..) => MainError::Refused(e.to_string()),
            DataDirError::NotInitialized(_) | DataDirError::Config(_) => {
                MainError::Usage(e.to_string())
            }
            _ => MainError::Runtime(e.to_string()),
        }
    }
}

impl From<AdminError> for MainError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::NotFound { .. } => MainError::NotFound(e.to_string()),
            AdminError::InvalidInput { .. } | AdminError::WindowsStub { .. } => {
                MainError::Usage(e.to_string())
            }
            AdminError::Conflict(_) => MainError::Refused(e.to_string()),
            _ => MainError::Runtime(e.to_string()),
        }
    }
}

impl From<KeysError> for MainError {
    fn from(e: KeysError) -> Self {
        match e {
            KeysError::StagedElsewhere(_)
            | KeysError::ReplicasLacking { .. }
            | KeysError::CaStillNeeded { .. } => MainError::Refused(e.to_string()),
            KeysError::Rollover(
                RolloverError::AlreadyStaged(_)
                | RolloverError::NothingStaged
                | RolloverError::PreviousCaTrusted(_)
                | RolloverError::NoPreviousCa,
            ) => MainError::Refused(e.to_string()),
            KeysError::NotHeld(_) => MainError::Usage(e.to_string()),
            KeysError::LicenseKeys(LicenseKeyError::Unknown(_)) => {
                MainError::NotFound(e.to_string())
            }
            KeysError::LicenseKeys(
                LicenseKeyError::RetireCurrent(_) | LicenseKeyError::AlreadyRetired(_),
            ) => MainError::Refused(e.to_string()),
            _ => MainError::Runtime(e.to_string()),
        }
    }
}

impl From<ReleaseError> for MainError {
    fn from(e: ReleaseError) -> Self {
        match e {
            ReleaseError::NotFound { .. } => MainError::NotFound(e.to_string()),
            ReleaseError::InvalidInput { .. } | ReleaseError::File { .. } => {
                MainError::Usage(e.to_string())
            }
            ReleaseError::Conflict(_) | ReleaseError::KeyNotHeld(_) => {
                MainError::Refused(e.to_string())
            }
            _ => MainError::Runtime(e.to_string()),
        }
    }
}

fn runtime(e: impl std::fmt::Display) -> MainError {
    MainError::Runtime(e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LICENSE_SERVER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("license-server: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("license-server: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run(cli: Cli) -> Result<(), MainError> {
    match cli.command {
        Command::Init(args) => init(args).await,
        Command::Serve(args) => serve(args).await,
        Command::Admin(args) => admin(args).await,
        Command::Openapi => {
            println!("{}", http::openapi().to_pretty_json().map_err(runtime)?);
            Ok(())
        }
    }
}

fn apply_listen(config: &mut ServerConfig, listen: &ListenArgs) {
    let ListenArgs {
        public_listen,
        agent_listen,
        admin_listen,
        public_url,
        agent_url,
        database_url,
    } = listen.clone();
    if let Some(a) = public_listen {
        config.public_listen = a;
    }
    if let Some(a) = agent_listen {
        config.agent_listen = a;
    }
    if let Some(a) = admin_listen {
        config.admin_listen = a;
    }
    config.public_url = public_url.or(config.public_url.take());
    config.agent_url = agent_url.or(config.agent_url.take());
    config.database_url = database_url.or(config.database_url.take());
}

fn database_url(dir: &DataDir, config: &ServerConfig) -> String {
    config
        .database_url
        .clone()
        .unwrap_or_else(|| dir.default_database_url())
}

async fn open_store(url: &str) -> Result<Store, MainError> {
    open_store_with(url, None).await
}

async fn open_store_with(url: &str, max_connections: Option<u32>) -> Result<Store, MainError> {
    Store::open_with(url, max_connections)
        .await
        .map_err(|e| MainError::Runtime(format!("database {}: {e}", redact_url(url))))
}

/// A database URL without its password, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

async fn init(args: InitArgs) -> Result<(), MainError> {
    let dir = DataDir::new(&args.data_dir);
    let mut ips = args.ips.clone();
    if args.dns_names.is_empty() && ips.is_empty() {
        ips.push(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let public_host = args
        .dns_names
        .first()
        .cloned()
        .unwrap_or_else(|| ips[0].to_string());
    let mut config = ServerConfig::new(public_host);
    apply_listen(&mut config, &args.listen);
    if let Some(days) = args.certificate_validity_days {
        config.certificate_validity_days = days;
    }
    config
        .check()
        .map_err(|e| MainError::Usage(e.to_string()))?;
    let report = dir.init(&config, &args.dns_names, &ips)?;
    let url = database_url(&dir, &config);
    open_store(&url).await?.close().await;
    if args.json {
        output::json(&json!({
            "data_dir": dir.root(),
            "ca_cert": dir.ca_cert(),
            "server_pin": report.server_pin.to_string(),
            "license_public_key": report.license_public_key,
            "database": redact_url(&url),
        }));
    } else {
        println!("Initialized {}", dir.root().display());
        println!("  CA certificate      {}", dir.ca_cert().display());
        println!("  server pin          {}", report.server_pin);
        println!("  license public key  {}", report.license_public_key);
        println!("  database            {}", redact_url(&url));
        println!(
            "Next: license-server serve --data-dir {}",
            dir.root().display()
        );
    }
    Ok(())
}

async fn load_state(
    dir: &DataDir,
    config: &ServerConfig,
    urls: Option<(String, String)>,
) -> Result<Arc<AppState>, MainError> {
    let keys = dir.load_keys()?;
    let store =
        open_store_with(&database_url(dir, config), config.database_max_connections).await?;
    // Connected when first read: a replica that is down does not keep the server from serving.
    let replica = match &config.database_read_url {
        Some(url) => Some(ReadReplica::new(
            Store::connect_replica(url, config.database_max_connections).map_err(|e| {
                MainError::Runtime(format!("database_read_url {}: {e}", redact_url(url)))
            })?,
        )),
        None => None,
    };
    let reads = Reads::new(
        replica,
        std::time::Duration::from_millis(config.read_replica_max_lag_ms),
    );
    let (public_url, agent_url) = urls.unwrap_or_else(|| {
        (
            config
                .public_url
                .clone()
                .unwrap_or_else(|| https_url(&config.public_host, config.public_listen.port())),
            config
                .agent_url
                .clone()
                .unwrap_or_else(|| https_url(&config.public_host, config.agent_listen.port())),
        )
    });
    Ok(Arc::new(AppState {
        store,
        keys,
        settings: Settings {
            public_url,
            agent_url,
            certificate_validity_secs: config.machine_certificate_validity_secs(),
            certificate_renew_after_expiry_days: config.certificate_renew_after_expiry_days,
            server_certificate_validity_days: config.server_certificate_validity_days,
            server_certificate_check_interval_secs: config.server_certificate_check_interval_secs,
            data_dir: dir.clone(),
            install_token_ttl_secs: config.install_token_ttl_secs,
            bootstrap_rate_per_minute: config.bootstrap_rate_per_minute,
            max_connections_per_address: config.max_connections_per_address,
            write_stall_timeout_secs: config.write_stall_timeout_secs,
            downloads_dir: dir.downloads(),
            secret_validity_secs: secs(config.secret_validity_secs),
            secret_grace_secs: secs(config.secret_grace_secs),
            fleet_alerts: license_server::service::fleet_alerts::FleetAlertSettings {
                webhook_url: config.fleet_webhook_url.clone(),
                webhook_retries: config.fleet_webhook_retries,
                machine_unseen_secs: secs(config.machine_unseen_alert_secs),
                certificate_expiry_days: config.certificate_expiry_alert_days,
                check_interval_secs: config.fleet_check_interval_secs,
            },
            dashboard_sessions: license_server::http::dashboard::session::SessionPolicy {
                lifetime_secs: secs(config.dashboard_session_lifetime_secs),
                idle_secs: secs(config.dashboard_session_idle_secs),
                max_sessions: usize::try_from(config.dashboard_max_sessions).unwrap_or(usize::MAX),
            },
            dashboard_sign_in_per_minute: config.dashboard_sign_in_per_minute,
            windows_stub: config.windows_stub_path(dir.root()),
            watch: license_server::service::WatchSettings {
                heartbeat_secs: config.watch_heartbeat_secs,
                max_secs: config.watch_max_secs,
                spread_secs: u32::try_from(config.watch_spread_secs).unwrap_or(u32::MAX),
                feed_interval_ms: config.watch_feed_interval_ms,
            },
            agent_max_connections: usize::try_from(config.agent_max_connections)
                .unwrap_or(usize::MAX),
            shedding: license_server::service::Shedding {
                max_inflight: usize::try_from(config.agent_max_inflight).unwrap_or(usize::MAX),
                retry_after_secs: config.agent_retry_after_secs,
            },
        },
        release_keys: Default::default(),
        changes: Default::default(),
        reads,
    }))
}

/// Seconds as stored: the configuration checks bound them far below `i64::MAX`.
fn secs(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Raises the soft limit on open files to the hard limit: three listeners of up to 1024
/// connections each, the database pool and the data files must fit, and running out on one
/// listener would also stop `accept` on the others. Returns the limit now in force.
#[allow(unsafe_code)]
fn raise_open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read or write the struct passed by reference.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    Some(limit.rlim_cur)
}

async fn serve(args: ServeArgs) -> Result<(), MainError> {
    match raise_open_files_limit() {
        Some(n) if n < 4096 => tracing::warn!(
            limit = n,
            "few open files allowed (RLIMIT_NOFILE); raise LimitNOFILE for the service"
        ),
        Some(n) => tracing::debug!(limit = n, "open files limit"),
        None => tracing::warn!("cannot read RLIMIT_NOFILE"),
    }
    let dir = DataDir::new(&args.data_dir);
    let mut config = dir.load_config()?;
    apply_listen(&mut config, &args.listen);
    if let Some(rate) = args.bootstrap_rate_per_minute {
        config.bootstrap_rate_per_minute = rate;
    }
    if let Some(secs) = args.secret_validity_secs {
        config.secret_validity_secs = secs;
    }
    if let Some(secs) = args.secret_grace_secs {
        config.secret_grace_secs = secs;
    }
    config
        .check()
        .map_err(|e| MainError::Usage(e.to_string()))?;
    let listeners = Listeners::bind(&config).await.map_err(runtime)?;
    let [public, agent, admin] = listeners.local_addrs().map_err(runtime)?;
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| https_url(&config.public_host, public.port()));
    let agent_url = config
        .agent_url
        .clone()
        .unwrap_or_else(|| https_url(&config.public_host, agent.port()));
    let state = load_state(&dir, &config, Some((public_url.clone(), agent_url.clone()))).await?;
    // A replica missing a master key rows are under would fail every request touching them.
    keys::check_held_keys(&state).await?;
    if args.json {
        output::json_line(&json!({
            "event": "ready", "public": public, "agent": agent, "admin": admin,
            "public_url": public_url, "agent_url": agent_url, "server_pin": state.keys.server_pin.to_string(),
        }));
    } else {
        println!("license-server ready");
        println!("  public  {public}  ({public_url})");
        println!("  agent   {agent}  ({agent_url}, TLS 1.3 + client certificate)");
        println!("  admin   {admin}");
        println!("  pin     {}", state.keys.server_pin);
    }
    tracing::info!(%public, %agent, %admin, "listening");
    http::run(listeners, state, shutdown_signal())
        .await
        .map_err(runtime)?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The uid running the CLI, for the audit actor.
fn current_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

async fn admin(args: AdminArgs) -> Result<(), MainError> {
    let Some(data_dir) = args.data_dir.as_deref() else {
        return Err(MainError::Usage(
            "--data-dir is required (or set LICENSE_SERVER_DATA_DIR)".into(),
        ));
    };
    let dir = DataDir::new(data_dir);
    let mut config = dir.load_config()?;
    if let Some(url) = &args.database_url {
        config.database_url = Some(url.clone());
    }
    let state = load_state(&dir, &config, None).await?;
    let actor = format!("cli:uid={}", current_uid());
    let json = args.json;
    let result = match args.command {
        AdminCommand::Keys(command) => keys_command(&state, &actor, command, json).await,
        AdminCommand::Release(command) => {
            release_command(&ReleaseAdmin::new(&state, actor), command, json).await
        }
        command => admin_command(&Admin::new(&state, actor), command, json).await,
    };
    state.store.close().await;
    result
}

async fn admin_command(
    admin: &Admin<'_>,
    command: AdminCommand,
    json: bool,
) -> Result<(), MainError> {
    use output::print;
    match command {
        AdminCommand::Client(ClientCommand::Create { name }) => {
            print(json, &admin.create_client(&name).await?)
        }
        AdminCommand::Client(ClientCommand::List) => print(json, &admin.list_clients().await?),
        AdminCommand::Token(TokenCommand::Create {
            client,
            ttl,
            machine,
            windows_installer: None,
            windows_stub: _,
        }) => {
            let created = admin
                .create_install_token(&client, ttl.map(|d| d.as_secs()), machine.as_deref())
                .await?;
            if json {
                output::json(&created);
            } else {
                println!(
                    "Install token for client {} (shown once, expires {}):",
                    created.record.client_id, created.record.expires_at
                );
                if let Some(machine) = &created.record.machine_id {
                    println!("  (bound to machine {machine}: it re-enrolls that machine)");
                }
                println!("  {}", created.token);
                println!("Install on the machine, as root:");
                println!("  {}", created.install_command);
            }
        }
        AdminCommand::Token(TokenCommand::List { client }) => {
            print(json, &admin.list_install_tokens(client.as_deref()).await?)
        }
        AdminCommand::Machine(MachineCommand::List { client }) => {
            print(json, &admin.list_machines(client.as_deref()).await?)
        }
        AdminCommand::Machine(MachineCommand::Show { id }) => {
            print(json, &admin.get_machine(&id).await?)
        }
        AdminCommand::Machine(MachineCommand::Revoke { id }) => {
            print(json, &admin.revoke_machine(&id).await?)
        }
        AdminCommand::Machine(MachineCommand::Restore { id }) => {
            print(json, &admin.restore_machine(&id).await?)
        }
        AdminCommand::Machine(MachineCommand::Delete { id }) => {
            admin.delete_machine(&id).await?;
            print(json, &output::Done(format!("machine {id} deleted")));
        }
        AdminCommand::Machine(MachineCommand::Rotate { id }) => {
            print(json, &admin.request_rotation(&id).await?)
        }
        AdminCommand::Machine(MachineCommand::Secrets { id }) => {
            print(json, &admin.list_secrets(&id).await?)
        }
        AdminCommand::Machine(MachineCommand::InvalidateSecret { id, version }) => {
            print(json, &admin.invalidate_secret(&id, version).await?)
        }
        AdminCommand::License(command) => license_command(admin, command, json).await?,
        AdminCommand::Cert(CertCommand::Stats) => print(json, &admin.certificate_stats().await?),
        AdminCommand::Cert(CertCommand::List { machine, client }) => print(
            json,
            &admin
                .list_certificates(machine.as_deref(), client.as_deref())
                .await?,
        ),
        AdminCommand::Cert(CertCommand::Revoke { serial }) => {
            print(json, &admin.revoke_certificate(&serial).await?)
        }
        AdminCommand::Cert(CertCommand::Restore { serial }) => {
            print(json, &admin.restore_certificate(&serial).await?)
        }
        AdminCommand::Cert(CertCommand::Purge) => print(json, &admin.purge_certificates().await?),
        AdminCommand::ApiToken(ApiTokenCommand::Create { name, role }) => {
            let role = match role {
                RoleArg::Readonly => Role::Readonly,
                RoleArg::Admin => Role::Admin,
            };
            let created = admin.create_admin_token(&name, role).await?;
            if json {
                output::json(&created);
            } else {
                println!(
                    "Admin API token {:?} ({}), shown once:",
                    created.record.name,
                    created.record.role.as_str()
                );
                println!("  {}", created.token);
            }
        }
        AdminCommand::Audit(AuditCommand::List { since, limit }) => {
            print(json, &admin.audit_events(since, limit).await?)
        }
        AdminCommand::Token(TokenCommand::Create {
            client,
            ttl,
            machine,
            windows_installer: Some(out),
            windows_stub,
        }) => {
            let stub = match windows_stub {
                Some(path) => StubSource {
                    path,
                    field: "--windows-stub",
                },
                None => StubSource::configured(&admin.settings().windows_stub),
            };
            let request = InstallerRequest {
                client: &client,
                ttl_secs: ttl.map(|d| d.as_secs()),
                machine: machine.as_deref(),
                stub: &stub,
                out: &out,
            };
            windows_installer(admin, &request, json).await?;
        }
        AdminCommand::Keys(_) | AdminCommand::Release(_) => {
            return Err(MainError::Usage(
                "keys and release commands run on their own".into(),
            ))
        }
    }
    Ok(())
}

/// What `admin token create --windows-installer` asks for.
struct InstallerRequest<'a> {
    client: &'a str,
    ttl_secs: Option<u64>,
    machine: Option<&'a str>,
    stub: &'a StubSource,
    out: &'a Path,
}

/// `admin token create --windows-installer OUT`: mints the token into the installer and writes
/// it to `out` (0600, through a temporary file renamed over it). The temporary file is created
/// first, so an unwritable destination costs no token; the token itself is never printed.
async fn windows_installer(
    admin: &Admin<'_>,
    request: &InstallerRequest<'_>,
    json: bool,
) -> Result<(), MainError> {
    let out = request.out;
    let at = |e: &dyn std::fmt::Display| {
        MainError::Runtime(format!("--windows-installer {}: {e}", out.display()))
    };
    let name = out.file_name().and_then(|n| n.to_str());
    let Some(name) = name.filter(|_| !out.is_dir()) else {
        return Err(MainError::Usage(format!(
            "--windows-installer {}: not a file name",
            out.display()
        )));
    };
    let tmp = out.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| at(&e))?;
    let built = admin
        .create_windows_installer(
            request.client,
            request.ttl_secs,
            request.machine,
            request.stub,
        )
        .await;
    let installer = match built {
        Ok(installer) => installer,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    let record = &installer.created.record;
    let written = file
        .write_all(&installer.exe)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, out));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(at(&format!(
            "{e}; install token {} was minted but not written anywhere: it expires unused at {}",
            record.id, record.expires_at
        )));
    }
    let settings = admin.settings();
    let pin = admin.server_pin().to_string();
    if json {
        let mut report = serde_json::to_value(record).map_err(runtime)?;
        report["windows_installer"] = json!(out);
        report["server"] = json!(settings.public_url);
        report["server_pin"] = json!(pin);
        output::json(&report);
    } else {
        println!(
            "Windows installer for client {} written to {} (mode 0600)",
            record.client_id,
            out.display()
        );
        println!(
            "  install token  {} (single use, expires {})",
            record.id, record.expires_at
        );
        if let Some(machine) = &record.machine_id {
            println!("  (bound to machine {machine}: it re-enrolls that machine)");
        }
        println!("  enrolls with   {} (pin {pin})", settings.public_url);
        println!(
            "Run it as an administrator on the Windows machine (docs/WINDOWS.md). It carries the token: keep it private until used."
        );
    }
    Ok(())
}

async fn release_command(
    releases: &ReleaseAdmin<'_>,
    command: ReleaseCommand,
    json: bool,
) -> Result<(), MainError> {
    let one = |view: &license_server::service::releases::ReleaseView| {
        if json {
            output::json(view);
        } else {
            output::release(view);
        }
    };
    match command {
        ReleaseCommand::Publish {
            file,
            version,
            channel,
            arch,
            min_version,
            rollback,
            percent,
            clients,
            halt_after_failures,
        } => {
            let request = PublishRequest {
                file,
                version,
                channel,
                arch: arch.unwrap_or_else(|| std::env::consts::ARCH.to_string()),
                min_version,
                rollback,
                percent,
                clients,
                halt_after_failures,
            };
            one(&releases.publish(&request).await?);
        }
        ReleaseCommand::List { channel } => {
            output::print(json, &releases.list(channel.as_deref()).await?);
        }
        ReleaseCommand::Show { release } => one(&releases.show(&release).await?),
        ReleaseCommand::Rollout {
            release,
            percent,
            clients,
        } => {
            if percent.is_none() && clients.is_empty() {
                return Err(MainError::Usage(
                    "rollout: give --percent, --clients or both".into(),
                ));
            }
            one(&releases.rollout(&release, percent, &clients).await?);
        }
        ReleaseCommand::Pause { release } => one(&releases.pause(&release).await?),
        ReleaseCommand::Resume { release } => one(&releases.resume(&release).await?),
        ReleaseCommand::Withdraw { release } => one(&releases.withdraw(&release).await?),
        ReleaseCommand::RotateKey => {
            let report = releases.rotate_key().await?;
            if json {
                output::json(&report);
            } else {
                output::release_key_rotated(&report);
            }
        }
    }
    Ok(())
}

fn trust_report(report: &keys::ServerTrustReport, json: bool) {
    if json {
        output::json(report);
    } else {
        output::server_trust_report(report);
    }
}

async fn keys_command(
    state: &AppState,
    actor: &str,
    command: KeysCommand,
    json: bool,
) -> Result<(), MainError> {
    match command {
        KeysCommand::Status => {
            let status = keys::status(state).await?;
            if json {
                output::json(&status);
            } else {
                output::keys_status(&status);
            }
        }
        KeysCommand::RotateMaster {
            keep_old,
            batch_size,
            wait,
        } => {
            let options = RotateOptions {
                keep_old,
                batch_size,
                wait,
            };
            // Progress: lines for people on stdout; JSON lines on stderr with --json, so
            // stdout stays one JSON document.
            let mut progress = |p: &Progress| {
                if json {
                    output::json_line_stderr(p);
                } else {
                    output::rotate_progress(p);
                }
            };
            let report = keys::rotate_master(state, actor, &options, &mut progress).await?;
            if json {
                output::json(&report);
            } else {
                output::rotate_report(&report);
            }
        }
        KeysCommand::RotateLicense => {
            let report = keys::rotate_license(state, actor).await?;
            if json {
                output::json(&report);
            } else {
                output::license_keys_report(&report);
            }
        }
        KeysCommand::RotateTls => trust_report(&keys::rotate_tls(state, actor).await?, json),
        KeysCommand::SwitchTls => trust_report(&keys::switch_tls(state, actor).await?, json),
        KeysCommand::RotateCa => trust_report(&keys::rotate_ca(state, actor).await?, json),
        KeysCommand::RetireCa { force } => {
            trust_report(&keys::retire_ca(state, actor, force).await?, json);
        }
        KeysCommand::RetireLicense { key_id } => {
            let report = keys::retire_license(state, actor, key_id).await?;
            if json {
                output::json(&report);
            } else {
                output::license_keys_report(&report);
            }
        }
    }
    Ok(())
}

async fn license_command(
    admin: &Admin<'_>,
    command: LicenseCommand,
    json: bool,
) -> Result<(), MainError> {
    use output::print;
    match command {
        LicenseCommand::Issue {
            machine,
            features,
            expires,
            expires_in,
            not_before,
            metadata,
        } => {
            let expires_at = match (expires, expires_in) {
                (Some(at), _) => Some(at),
                (None, Some(d)) => {
                    Some(Timestamp::now().plus_secs(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)))
                }
                (None, None) => None,
            };
            let issued = admin
                .issue_license(&LicenseRequest {
                    machine_id: machine,
                    features,
                    metadata: metadata.into_iter().collect(),
                    not_before,
                    expires_at,
                })
                .await?;
            if json {
                output::json(&issued);
            } else {
                print(false, &issued.license);
                match &issued.token {
                    Some(t) => output::token(t),
                    None => println!(
                        "No token yet: the machine has no acknowledged secret; it fetches its tokens after its first rotation."
                    ),
                }
            }
        }
        LicenseCommand::List { machine } => {
            print(json, &admin.list_licenses(machine.as_deref()).await?)
        }
        LicenseCommand::Revoke { id } => print(json, &admin.revoke_license(&id).await?),
        LicenseCommand::Token { id } => {
            let token = admin.license_token(&id).await?;
            if json {
                output::json(&token);
            } else {
                output::token(&token);
            }
        }
    }
    Ok(())
}
