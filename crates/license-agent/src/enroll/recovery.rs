//! Recovery after the TPM was cleared or replaced (seed §8.1 "perte de secret"): the primary
//! key's Name no longer matches, so the machine key and every sealed secret are gone for good.
//!
//! The agent notices at start, raises an alert, and re-keys through the server without an
//! operator: a new machine key in the (new) TPM, a CSR, and its single-use recovery token
//! (kept 0600 outside the TPM) at `POST /api/public/recover`. The server supersedes the old
//! certificate, audits `machine.recover` and asks for a rotation, so the next round delivers a
//! new secret to the new key and re-issued tokens. The unusable sealed blobs are kept aside.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use license_protocol::enroll::RecoverRequest;

use crate::config::AgentConfig;
use crate::net::client::ServerClient;
use crate::net::tls;
use crate::platform::files::{write_atomic, PRIVATE, PUBLIC};
use crate::platform::keys::{self, MachineKey};
use crate::platform::tpm::{Tpm, PRIMARY_NAME_FILE};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoveryError {
    #[error("no recovery token (server.recovery_token_file): re-run the installer with a new install token")]
    NoToken,
    #[error("{0}")]
    Failed(String),
}

fn failed(e: impl std::fmt::Display) -> RecoveryError {
    RecoveryError::Failed(e.to_string())
}

fn set_aside(path: &Path) -> Option<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = path.with_extension(format!("lost-{stamp}"));
    std::fs::rename(path, &aside).ok().map(|()| aside)
}

/// Re-keys the machine through the server; returns the new TPM and the new serial.
pub async fn recover(config: &AgentConfig) -> Result<(Arc<Tpm>, String), RecoveryError> {
    let token_file = config
        .server
        .recovery_token_file
        .as_ref()
        .ok_or(RecoveryError::NoToken)?;
    let token = zeroize::Zeroizing::new(
        std::fs::read_to_string(token_file).map_err(|_| RecoveryError::NoToken)?,
    );

    // The old primary's Name and sealed blobs belong to a TPM that no longer exists.
    let state_dir = &config.agent.state_dir;
    set_aside(&state_dir.join(PRIMARY_NAME_FILE));
    let tpm = Tpm::open_exclusive(&config.tpm.tcti, state_dir).map_err(failed)?;
    let blob = tpm.create_machine_key().map_err(failed)?;
    let key: Arc<dyn MachineKey> = Arc::new(tpm.machine_key(&blob).map_err(failed)?);
    let csr = keys::csr_pem(key.clone()).map_err(failed)?;

    let client = ServerClient::new(
        &config.server.public_url,
        tls::pin_only(config.server.cert_pin).map_err(failed)?,
    )
    .map_err(failed)?;
    let request = RecoverRequest {
        machine_id: config.agent.id,
        recovery_token: token.trim().to_string(),
        csr,
    };
    let answer = client.recover(&request).await.map_err(failed)?;
    if answer.machine_id != config.agent.id {
        return Err(failed("the server answered for another machine"));
    }

    // Key first, then certificate and CA, then the next token: each write is atomic.
    let s = &config.server;
    write_atomic(&s.client_key, keys::tpm_key_file(&blob).as_bytes(), PRIVATE).map_err(failed)?;
    write_atomic(&s.client_cert, answer.certificate.as_bytes(), PRIVATE).map_err(failed)?;
    write_atomic(&s.ca_cert, answer.ca_cert.as_bytes(), PUBLIC).map_err(failed)?;
    write_atomic(token_file, answer.recovery_token.as_bytes(), PRIVATE).map_err(failed)?;
    if let Some(aside) = set_aside(&config.tpm.sealed_storage) {
        tracing::warn!(kept = %aside.display(), "secrets sealed by the previous TPM are unusable; kept aside");
    }
    Ok((tpm, answer.serial))
}
