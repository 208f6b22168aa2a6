//! Joining the fleet: `license-agent enroll`, the first contact with the server (seed 004,
//! DESIGN.md §2); the machine's identity ([`hardware`]); and re-keying after the TPM was
//! cleared ([`recovery`]).
//!
//! The key pair is generated here and never leaves the machine: the server gets a CSR. The
//! server is authenticated by the pin given to the installer; its answer is checked before
//! anything is written (certificate CN, key, chain, pin). Files land in the config file's
//! directory (key 0600), the config last, so a half-finished enrollment leaves no config.

pub mod hardware;
#[cfg(windows)]
pub mod installer;
pub mod recovery;

use std::path::{Path, PathBuf};

use license_protocol::enroll::{BootstrapRequest, BootstrapResponse, InstallToken};
use license_protocol::identity::MachineIdentity;
use license_protocol::pin::CertPin;
use std::sync::Arc;

use crate::platform::keys::{self, FileMachineKey, KeyError, MachineKey};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::config::{
    AgentConfig, AgentSection, DegradedPolicy, IpcSection, ManagementSection, RevokedPolicy,
    ServerSection, TpmSection,
};
use crate::net::client::{ClientError, ServerClient};
use crate::net::tls::{self, TlsError};
use crate::platform::files::{ensure_dir, write_atomic, PRIVATE, PUBLIC};
use hardware::HardwareError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    #[error("{0} already exists: this machine looks enrolled (pass --force to enroll again)")]
    AlreadyEnrolled(String),
    #[error(transparent)]
    Hardware(#[from] HardwareError),
    #[error("certificate request: {0}")]
    Csr(#[from] rcgen::Error),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("TPM: {0}")]
    Tpm(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Server(#[from] ClientError),
    #[error("server answer refused: {0}")]
    BadAnswer(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// What the operator asked for.
#[derive(Debug)]
pub struct EnrollOptions {
    /// Public URL of the server (`https://host:8443`).
    pub server: String,
    pub pin: CertPin,
    pub token: InstallToken,
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
    pub log_dir: PathBuf,
    pub hostname: Option<String>,
    pub hardware_id: Option<String>,
    /// Seed mode: let the server generate the key pair (for installers that cannot make a CSR).
    pub server_generated_key: bool,
    pub force: bool,
    /// Validation socket path (default `/run/license-agent/agent.sock`).
    pub socket: Option<PathBuf>,
    /// UIDs allowed on the validation socket.
    pub allowed_uids: Vec<u32>,
    /// Group of the validation socket file.
    pub socket_group: Option<String>,
    /// Windows: SIDs of users allowed on the validation pipe…
    pub allowed_sids: Vec<String>,
    /// …and of groups whose members are.
    pub allowed_groups: Vec<String>,
    /// Generate the machine key inside the TPM reached through this TCTI (non-exportable).
    pub tpm_tcti: Option<String>,
}

/// What happened, for the human or `--json` output.
#[derive(Debug, Serialize)]
pub struct EnrollReport {
    pub client_id: String,
    pub machine_id: String,
    pub serial: String,
    pub certificate_expires_at: String,
    pub key_origin: &'static str,
    pub config: PathBuf,
    pub api_url: String,
}

/// Parses the one PEM certificate in `pem` and checks it is this machine's, signed by `ca`.
fn check_answer(
    answer: &BootstrapResponse,
    pin: &CertPin,
    expected_key_der: Option<&[u8]>,
) -> Result<(), EnrollError> {
    let bad = |m: &str| EnrollError::BadAnswer(m.to_string());
    if !answer.server_pin.matches(pin) {
        return Err(bad(
            "server announces a pin other than the one it was reached with",
        ));
    }
    if !answer.api_url.starts_with("https://") {
        return Err(bad("api_url is not https"));
    }
    let der = |pem: &str| -> Result<Vec<u8>, EnrollError> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .map(|c| c.to_vec())
            .ok_or_else(|| bad("certificate is not PEM"))
    };
    let cert_der = der(&answer.certificate)?;
    let ca_der = der(&answer.ca_cert)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
        .map_err(|_| bad("certificate does not parse"))?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
        .map_err(|_| bad("CA certificate does not parse"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("");
    let identity: MachineIdentity = cn
        .parse()
        .map_err(|_| bad("certificate CN is not client_id:machine_id"))?;
    if identity.client_id != answer.client_id || identity.machine_id != answer.machine_id {
        return Err(bad("certificate CN does not match client_id/machine_id"));
    }
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| bad("certificate is not signed by the CA"))?;
    if let Some(expected) = expected_key_der {
        if cert.public_key().raw != expected {
            return Err(bad("certificate is not for the key this machine generated"));
        }
    }
    Ok(())
}

/// A key pair made on this machine: the key, and what its key file holds.
struct LocalKey {
    key: Arc<dyn MachineKey>,
    file: Zeroizing<String>,
}

/// The key as the operator asked: in the TPM, in a file, or none (the server makes it).
fn local_key(opts: &EnrollOptions) -> Result<Option<LocalKey>, EnrollError> {
    if opts.server_generated_key {
        return Ok(None);
    }
    let Some(tcti) = &opts.tpm_tcti else {
        let key = FileMachineKey::generate();
        let file = key.to_pem();
        return Ok(Some(LocalKey {
            key: Arc::new(key),
            file,
        }));
    };
    ensure_dir(&opts.state_dir, 0o700).map_err(|source| EnrollError::Write {
        path: opts.state_dir.display().to_string(),
        source,
    })?;
    let tpm_error = |e: crate::platform::tpm::TpmError| EnrollError::Tpm(e.to_string());
    let tpm = crate::platform::tpm::Tpm::open(tcti, &opts.state_dir).map_err(tpm_error)?;
    let blob = tpm.create_machine_key().map_err(tpm_error)?;
    let key = tpm.machine_key(&blob).map_err(tpm_error)?;
    Ok(Some(LocalKey {
        key: Arc::new(key),
        file: keys::tpm_key_file(&blob),
    }))
}

/// The machine key after the server answered: ours, or the one it generated (seed mode).
fn machine_key(
    local: Option<&LocalKey>,
    answer: &BootstrapResponse,
) -> Result<LocalKey, EnrollError> {
    if let Some(local) = local {
        return Ok(LocalKey {
            key: local.key.clone(),
            file: local.file.clone(),
        });
    }
    let pem = answer.private_key.as_ref().ok_or_else(|| {
        EnrollError::BadAnswer("no private_key in server-generated-key mode".into())
    })?;
    let key = FileMachineKey::from_pem(pem)
        .ok_or_else(|| EnrollError::BadAnswer("private_key is not a P-256 PKCS#8 key".into()))?;
    let file = key.to_pem();
    Ok(LocalKey {
        key: Arc::new(key),
        file,
    })
}

/// The directory of the config file, where the key, certificates and tokens go.
fn config_dir(config_path: &Path) -> PathBuf {
    config_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// The config an enrolled machine starts with.
fn agent_config(opts: &EnrollOptions, answer: &BootstrapResponse, dir: &Path) -> AgentConfig {
    AgentConfig {
        server: ServerSection {
            url: answer.api_url.clone(),
            public_url: opts.server.trim_end_matches('/').to_string(),
            cert_pin: opts.pin,
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            ca_cert: dir.join("ca.pem"),
            license_public_key: answer.license_public_key.clone(),
            recovery_token_file: answer
                .recovery_token
                .as_ref()
                .map(|_| dir.join("recovery.token")),
        },
        agent: AgentSection {
            id: answer.machine_id,
            client_id: answer.client_id,
            rotation_interval: crate::config::DEFAULT_ROTATION_INTERVAL_SECS,
            grace_period: crate::config::DEFAULT_GRACE_PERIOD_SECS,
            state_dir: opts.state_dir.clone(),
            log_dir: opts.log_dir.clone(),
            poll_interval: crate::config::DEFAULT_POLL_INTERVAL_SECS,
            watch: true,
            watch_poll_interval: crate::config::DEFAULT_WATCH_POLL_INTERVAL_SECS,
            metrics_file: opts.state_dir.join("metrics.prom"),
            audit_log: None,
            danger_unaudited_validations: false,
            audit_max_file_bytes: license_audit::DEFAULT_MAX_FILE_BYTES,
            audit_keep_files: license_audit::DEFAULT_KEEP_FILES,
            degraded_mode: DegradedPolicy::Allow,
            on_machine_revoked: RevokedPolicy::Deny,
        },
        tpm: TpmSection {
            fallback_encrypted_storage: opts.state_dir.join("secret.enc"),
            // Key material lives beside the config, apart from the store it protects.
            fallback_key_file: dir.join("secret.key"),
            enabled: opts.tpm_tcti.is_some(),
            tcti: opts
                .tpm_tcti
                .clone()
                .unwrap_or_else(|| crate::config::DEFAULT_TCTI.into()),
            sealed_storage: opts.state_dir.join("secrets.tpm.json"),
            ..TpmSection::default()
        },
        // Root on Linux; on Windows SYSTEM and Administrators are the default admins.
        management: if cfg!(windows) {
            ManagementSection::default()
        } else {
            ManagementSection {
                allowed_uids: vec![0],
                admin_uids: vec![0],
                ..ManagementSection::default()
            }
        },
        alerts: crate::config::AlertsSection::default(),
        update: crate::config::UpdateSection::default(),
        ipc: IpcSection {
            socket: opts
                .socket
                .clone()
                .unwrap_or_else(|| crate::config::DEFAULT_SOCKET.into()),
            allowed_uids: opts.allowed_uids.clone(),
            socket_group: opts.socket_group.clone(),
            allowed_sids: opts.allowed_sids.clone(),
            allowed_groups: opts.allowed_groups.clone(),
            ..IpcSection::default()
        },
    }
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), EnrollError> {
    write_atomic(path, bytes, mode).map_err(|source| EnrollError::Write {
        path: path.display().to_string(),
        source,
    })
}

/// Writes the key, the certificates, the recovery token, and the config last.
fn write_files(
    config_path: &Path,
    config: &AgentConfig,
    answer: &BootstrapResponse,
    key_file: &str,
) -> Result<(), EnrollError> {
    let s = &config.server;
    write(&s.client_key, key_file.as_bytes(), PRIVATE)?;
    write(&s.client_cert, answer.certificate.as_bytes(), PRIVATE)?;
    write(&s.ca_cert, answer.ca_cert.as_bytes(), PUBLIC)?;
    if let (Some(path), Some(token)) = (&s.recovery_token_file, &answer.recovery_token) {
        write(path, token.as_bytes(), PRIVATE)?;
    }
    write(config_path, config.to_toml().as_bytes(), PRIVATE)
}

/// Re-enrolling (`--force`) a machine that still has its key: the key signs the request, which
/// is how the server tells this machine from someone who merely knows its hardware id. Without
/// a usable key (a wiped disk) nothing is signed, and the server asks for an install token an
/// administrator bound to the machine.
fn sign_with_previous_key(config_path: &Path, request: &mut BootstrapRequest) {
    let Ok(config) = AgentConfig::load(config_path) else {
        return;
    };
    let signed = keys::load(&config, None).and_then(|key| {
        let digest: [u8; 32] = Sha256::digest(request.reenrollment_message()).into();
        key.sign_digest(&digest)
    });
    match signed {
        Ok(signature) => request.set_previous_key_signature(&signature),
        Err(e) => eprintln!(
            "note: the previous machine key is not usable ({e}); enrolling without proof of it"
        ),
    }
}

/// Enrolls this machine: key, bootstrap, checked answer, files (the config last).
pub async fn enroll(mut opts: EnrollOptions) -> Result<EnrollReport, EnrollError> {
    // The daemon runs from another directory: every path written to the config is absolute.
    for path in [
        &mut opts.config_path,
        &mut opts.state_dir,
        &mut opts.log_dir,
    ] {
        *path = std::path::absolute(&*path).map_err(|source| EnrollError::Write {
            path: path.display().to_string(),
            source,
        })?;
    }
    if opts.config_path.exists() && !opts.force {
        return Err(EnrollError::AlreadyEnrolled(
            opts.config_path.display().to_string(),
        ));
    }
    let arch = license_protocol::enroll::Arch::current().ok_or_else(|| {
        EnrollError::BadAnswer(format!(
            "unsupported architecture {}",
            std::env::consts::ARCH
        ))
    })?;
    let hostname = hardware::hostname(opts.hostname.clone())?;
    let hardware_id = hardware::hardware_id(opts.hardware_id.clone())?;
    // The key is made here (in the TPM when asked) and never leaves the machine.
    let local = local_key(&opts)?;
    let mut request = BootstrapRequest {
        token: opts.token.clone(),
        hostname,
        hardware_id,
        arch,
        csr: local
            .as_ref()
            .map(|local| keys::csr_pem(local.key.clone()))
            .transpose()?,
        previous_key_signature: None,
    };
    if opts.force {
        sign_with_previous_key(&opts.config_path, &mut request);
    }
    let client = ServerClient::new(&opts.server, tls::pin_only(opts.pin)?)?;
    let answer = client.bootstrap(&request).await?;

    let key = machine_key(local.as_ref(), &answer)?;
    let key_der = {
        use p256::pkcs8::EncodePublicKey as _;
        key.key
            .public_key()
            .to_public_key_der()
            .map_err(|e| EnrollError::BadAnswer(e.to_string()))?
    };
    check_answer(&answer, &opts.pin, Some(key_der.as_bytes()))?;

    let dir = config_dir(&opts.config_path);
    for d in [&dir, &opts.state_dir, &opts.log_dir] {
        ensure_dir(d, 0o700).map_err(|source| EnrollError::Write {
            path: d.display().to_string(),
            source,
        })?;
    }
    let config = agent_config(&opts, &answer, &dir);
    config
        .check()
        .map_err(|e| EnrollError::BadAnswer(e.to_string()))?;
    write_files(&opts.config_path, &config, &answer, &key.file)?;

    Ok(EnrollReport {
        client_id: answer.client_id.to_string(),
        machine_id: answer.machine_id.to_string(),
        serial: answer.serial.clone(),
        certificate_expires_at: answer.expires_at.clone(),
        key_origin: match &local {
            Some(local) if local.key.kind() == "tpm" => "tpm",
            Some(_) => "local",
            None => "server",
        },
        config: opts.config_path,
        api_url: answer.api_url,
    })
}
