//! The part of a round that talks to the server (through [`AgentServer`]): secret status
//! (forced rotations, invalidated versions), the rotation itself when due, then license
//! tokens and revocations.
//!
//! Before anything else, a key set the server announces and this agent does not hold yet is
//! learned ([`license_keys`](super::license_keys)), so tokens and rotate answers under a new
//! license key verify in the same round.
//!
//! A rotation is: 1. ask (`rotate-secret`, signed by the machine key), check the server's
//! signature against the trusted license keys and decrypt with the machine key — a bad
//! signature or a server failing the pin is refused and the old secrets kept; 2. store the new
//! set durably (atomic replace) — from here the new secret serves; 3. acknowledge; 4. fetch
//! the tokens re-issued under the new version. A crash between any two steps leaves the old
//! or the new set on disk, and the server's idempotent answers (same pending version until
//! acknowledged) make the agent converge.

use std::collections::BTreeSet;

use license_audit::Outcome;
use license_protocol::rotation::{RotateSecretRequest, SignatureError};
use license_protocol::secret::{self, SecretError};
use sha2::{Digest as _, Sha256};

use super::licenses::write_tokens;
use super::server::AgentServer;
use super::Engine;
use super::{crash_point, decide};
use crate::audit::agent_event;
use crate::net::client::ClientError;
use crate::platform::blocking;
use crate::platform::keys::{Ecdh, KeyError};
use crate::stores::StoreError;

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotationError {
    #[error(transparent)]
    Server(#[from] ClientError),
    #[error("signing the request: {0}")]
    Signing(#[from] KeyError),
    #[error("rotation answer refused: server signature: {0}")]
    ServerSignature(#[from] SignatureError),
    #[error("rotation answer refused: server offered version {offered}, older than held {held}")]
    OlderVersion { offered: u64, held: u64 },
    #[error("rotation answer refused: secret: {0}")]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("license tokens: {path}: {source}")]
    Tokens {
        path: String,
        source: std::io::Error,
    },
}

impl RotationError {
    /// Whether this failure means "the server could not be reached" (degraded mode) rather
    /// than "the server answered something wrong".
    pub fn unreachable(&self) -> bool {
        matches!(
            self,
            RotationError::Server(ClientError::Transport(_) | ClientError::Busy { .. })
        )
    }

    /// The server shed the request and asked to come back after this many seconds.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            RotationError::Server(ClientError::Busy {
                retry_after_secs, ..
            }) => *retry_after_secs,
            _ => None,
        }
    }
}

impl<S: AgentServer> Engine<S> {
    /// One rotation, steps 1 to 3 of the module docs; returns the version now held.
    pub async fn rotate(&mut self) -> Result<u64, RotationError> {
        let now = self.validator.clock.now();
        let keyring = self.validator.keyring();
        let current = keyring.newest().map_or(0, |(v, _)| v);
        let id = self.machine.id;
        let mut request = RotateSecretRequest::unsigned(id, current, now);
        let digest: [u8; 32] = Sha256::digest(request.signing_bytes()).into();
        let key = self.machine.key.clone();
        let signature = blocking::run(move || key.sign_digest(&digest)).await?;
        request.set_signature(&signature);
        let answer = self.server.rotate_secret(&request).await?;
        let blob = answer.verify(&self.machine.license_keys, &id)?;
        let version = answer.secret_version;
        if version < current {
            return Err(RotationError::OlderVersion {
                offered: version,
                held: current,
            });
        }
        if version > current {
            let dates = answer.dates();
            let key = self.machine.key.clone();
            let secret = blocking::run(move || {
                secret::open(&Ecdh(key.as_ref()), &id, version, &dates, &blob)
            })
            .await?;
            crash_point("after_receive");
            let mut keyring = keyring;
            keyring.insert(version, dates, secret);
            self.commit_keyring(keyring).await?;
            self.persist_state().await;
            crash_point("after_store");
            tracing::info!(version, "new secret stored");
        }
        self.server.ack_secret(version).await?;
        crash_point("after_ack");
        self.health.rotations_total += 1;
        self.audit()
            .note(
                agent_event("secret.rotate", Outcome::Success)
                    .detail("version", version)
                    .detail("previous", current),
            )
            .await;
        self.vault.state.last_rotation = Some(now);
        self.vault.state.next_rotation_due = Some(decide::next_due(
            now,
            self.settings.rotation_interval,
            &mut rand::thread_rng(),
        ));
        Ok(version)
    }

    /// Step 4: the tokens of the machine's licenses under its newest version, and the
    /// licenses revoked since.
    pub(super) async fn refresh_licenses(&mut self) -> Result<(), RotationError> {
        let licenses = self.server.licenses().await?;
        self.learn_keys_of(&licenses.tokens).await?;
        let dir = self.settings.tokens_dir.clone();
        let tokens = licenses.tokens.clone();
        blocking::run(move || write_tokens(&dir, &tokens))
            .await
            .map_err(|(path, source)| RotationError::Tokens { path, source })?;
        self.vault.state.licenses = licenses
            .tokens
            .iter()
            .map(|t| (t.license_id, t.secret_version))
            .collect();
        let revoked: BTreeSet<uuid::Uuid> = licenses.revoked.iter().copied().collect();
        if revoked != self.vault.state.revoked_licenses {
            let ids: Vec<String> = revoked.iter().map(ToString::to_string).collect();
            self.audit()
                .note(agent_event("license.revocations", Outcome::Success).detail("revoked", ids))
                .await;
        }
        self.vault.state.revoked_licenses = revoked;
        self.validator.set_revoked(licenses.revoked);
        Ok(())
    }

    /// The server part of a round: status, rotation when it must, licenses when they may have
    /// changed (`decide::licenses_refresh_due`; `asked`: the server asked for this round).
    pub(super) async fn talk_to_server(&mut self, asked: bool) -> Result<(), RotationError> {
        let status = self.server.secret_status(&self.status_query()).await?;
        self.health.offer = status.update.clone();
        if let Some(cursor) = status.watch_cursor {
            self.health.watch_cursor.advance(cursor);
        }
        if let Some(server_time) = status.server_time {
            self.attest(server_time);
        }
        let now = self.validator.clock.now();
        self.vault.state.last_server_contact = Some(now);
        self.follow_license_keys(status.license_keys.as_deref())
            .await?;
        // After the license keys: the announcement is signed by them.
        self.follow_server_trust(status.server_trust.as_deref())
            .await?;
        let invalidated: BTreeSet<u64> = status.invalidated_versions.iter().copied().collect();
        if invalidated != self.vault.state.invalidated_versions {
            tracing::warn!(versions = ?invalidated, "server invalidated secret versions");
            self.audit()
                .note(
                    agent_event("secret.invalidated", Outcome::Success)
                        .detail("versions", invalidated.iter().copied().collect::<Vec<_>>()),
                )
                .await;
            self.vault.state.invalidated_versions = invalidated.clone();
            self.validator.set_invalidated(invalidated);
            self.purge().await;
        }
        let newest = self.validator.keyring().newest();
        let due = decide::rotation_due(
            self.vault.state.next_rotation_due,
            newest.map(|(_, d)| d),
            now,
        );
        let rotated = decide::must_rotate(newest.map(|(v, _)| v), due, &status);
        if rotated {
            let version = self.rotate().await?;
            tracing::info!(version, "rotation complete");
        }
        let watching = self.health.watching;
        let last = self.health.licenses_fetched;
        if decide::licenses_refresh_due(watching, asked, rotated, last, now) {
            self.refresh_licenses().await?;
            self.health.licenses_fetched = watching.then_some(now);
        }
        Ok(())
    }
}
