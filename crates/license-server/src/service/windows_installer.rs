//! Windows installers: the Windows agent (`license-agent.exe`, the "stub") with a trailer
//! naming this server, its pin and a new one-time install token (issue #14, "EXE = stub +
//! token"; the format is `license_protocol::installer`'s).
//!
//! One audited action mints the token and builds the file: the stub is read before the token
//! is minted, and the trailer appended before the token's transaction commits, so a missing,
//! unreadable or foreign stub leaves no token behind (only the refusal in the audit trail).
//! Shared by `admin token create --windows-installer`, the admin API and the dashboard.

use std::path::{Path, PathBuf};

use license_protocol::enroll::InstallToken;
use license_protocol::installer::{self, InstallerPayload};
use serde_json::json;

use super::admin::{Admin, AdminError, CreatedInstallToken};
use crate::store::StoreError;

/// The installer just built: the token's record, and the file carrying its value. Debug shows
/// neither the token nor the file.
pub struct WindowsInstaller {
    pub created: CreatedInstallToken,
    /// The installer's bytes: the stub, then the trailer.
    pub exe: Vec<u8>,
}

impl std::fmt::Debug for WindowsInstaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowsInstaller")
            .field("created", &self.created)
            .field("exe_len", &self.exe.len())
            .finish()
    }
}

/// Where the stub comes from, and what to name when it is unusable: the configuration key
/// (`windows_stub`) or a command-line flag (`--windows-stub`).
#[derive(Debug, Clone)]
pub struct StubSource {
    pub path: PathBuf,
    pub field: &'static str,
}

impl StubSource {
    /// The stub the server is configured with (`windows_stub`).
    pub fn configured(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            field: "windows_stub",
        }
    }

    fn refused(&self, reason: impl Into<String>) -> AdminError {
        AdminError::WindowsStub {
            field: self.field,
            path: self.path.display().to_string(),
            reason: reason.into(),
        }
    }

    /// The stub's bytes: a regular file, read whole.
    async fn read(&self) -> Result<Vec<u8>, AdminError> {
        let meta = tokio::fs::metadata(&self.path).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound && self.field == "windows_stub" {
                self.refused(format!(
                    "{e}; copy the Windows agent (license-agent.exe) there, or set windows_stub in server.toml"
                ))
            } else {
                self.refused(e.to_string())
            }
        })?;
        if !meta.is_file() {
            return Err(self.refused("not a regular file"));
        }
        tokio::fs::read(&self.path)
            .await
            .map_err(|e| self.refused(e.to_string()))
    }
}

impl Admin<'_> {
    /// Mints an install token as [`Admin::create_install_token`] does and builds the Windows
    /// installer carrying it (`install_token.create`, audited with the stub's path).
    pub async fn create_windows_installer(
        &self,
        client_id: &str,
        ttl_secs: Option<u64>,
        machine_id: Option<&str>,
        stub: &StubSource,
    ) -> Result<WindowsInstaller, AdminError> {
        let ttl = ttl_secs.unwrap_or(self.state.settings.install_token_ttl_secs);
        // Read before the write transaction begins, so no database lock waits on the disk.
        let bytes = stub.read().await;
        let mut tx = self.begin().await?;
        let result = async {
            let bytes = bytes?;
            let created = self
                .create_install_token_in(&mut tx, client_id, ttl, machine_id)
                .await?;
            // Never refused: a minted token is 47 characters of base64url.
            let token = InstallToken::try_from(created.token.clone())
                .map_err(|e| StoreError::Corrupt(format!("a minted install token: {e}")))?;
            let payload = InstallerPayload {
                server: self.state.settings.public_url.clone(),
                pin: self.state.keys.server_pin,
                token,
            };
            let exe =
                installer::append(&bytes, &payload).map_err(|e| stub.refused(e.to_string()))?;
            Ok(WindowsInstaller { created, exe })
        }
        .await;
        let target = result.as_ref().ok().map(|i| i.created.record.id.clone());
        self.finish(
            tx,
            "install_token.create",
            target.as_deref(),
            json!({"client_id": client_id, "ttl_secs": ttl, "machine_id": machine_id,
                   "windows_installer": stub.path.display().to_string()}),
            result,
        )
        .await
    }
}
