//! Machine certificate renewal (DESIGN.md §4b "nothing expires unattended"): at 2/3 of its
//! life (see [`super::decide::renewal_at`]) the engine asks the server for a new certificate,
//! over mTLS with the current one — or with the expired one, for a till that was switched off
//! past its expiry (the server allows that for a bounded time, docs/SECURITY.md). File-store
//! machines make a fresh key at each renewal; a TPM machine keeps its non-exportable key.
//!
//! Crash-safe (kill -9 at any step leaves a working identity):
//! 1. the next key is written to `client.key.next` (file keys only) — kept across a crash, so a
//!    retry asks with the same key;
//! 2. the server answers (it supersedes the old certificate; a retry with the old certificate
//!    and the same key gets the same new certificate back);
//! 3. the new certificate is written to `client.pem.next`;
//! 4. `client.key.next` → `client.key`, then `client.pem.next` → `client.pem` (renames).
//!
//! At start, [`IdentityFiles::settle`] finishes what a crash interrupted after step 3, and
//! discards a `client.pem.next` that matches no key; a `client.key.next` without its
//! certificate makes the next round renew first.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use license_protocol::agent_api::RenewCertificateResponse;
use license_protocol::identity::MachineIdentity;
use p256::pkcs8::EncodePublicKey as _;

use license_audit::Outcome;

use super::server::AgentServer;
use super::{decide, Engine};
use crate::alerts::AlertKind;
use crate::audit::agent_event;
use crate::config::AgentConfig;
use crate::net::client::ClientError;
use crate::net::ConnectError;
use crate::platform::blocking;
use crate::platform::clock::rfc3339;
use crate::platform::files::{rename_durable, write_atomic, PRIVATE};
use crate::platform::keys::{self, FileMachineKey, KeyError, MachineKey};

/// Test hook: `LICENSE_AGENT_TEST_CRASH_AT=renew_after_key|renew_after_answer|renew_after_cert|
/// renew_after_key_promoted` aborts the process at that step, as `kill -9` would.
fn crash_point(step: &str) {
    super::crash_point(step);
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RenewalError {
    #[error("{path}: {message}")]
    Certificate { path: String, message: String },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("certificate request: {0}")]
    Csr(#[from] rcgen::Error),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Server(#[from] ClientError),
    #[error("renewed certificate refused: {0}")]
    BadAnswer(&'static str),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

impl RenewalError {
    /// Whether the server refused (rather than could not be reached).
    pub fn refused(&self) -> bool {
        matches!(self, RenewalError::Server(ClientError::Refused { .. }))
    }
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> RenewalError + '_ {
    move |source| RenewalError::Write {
        path: path.display().to_string(),
        source,
    }
}

/// What the agent needs to know of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// DER of the SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// The identity in its CN, when it is one.
    pub identity: Option<MachineIdentity>,
}

impl Certificate {
    /// Parses the first certificate of a PEM text (`origin` names it in errors).
    pub fn from_pem(pem: &str, origin: &Path) -> Result<Self, RenewalError> {
        let bad = |message: &str| RenewalError::Certificate {
            path: origin.display().to_string(),
            message: message.to_string(),
        };
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| bad("no PEM certificate"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|_| bad("not an X.509 certificate"))?;
        let validity = cert.validity();
        let identity = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .and_then(|cn| cn.parse().ok());
        Ok(Self {
            serial: cert.raw_serial_as_string().replace(':', ""),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
            spki: cert.public_key().raw.to_vec(),
            identity,
        })
    }

    pub fn read(path: &Path) -> Result<Self, RenewalError> {
        let pem = std::fs::read_to_string(path).map_err(|e| RenewalError::Certificate {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_pem(&pem, path)
    }

    /// "expires DATE" or "expired on DATE" (RFC 3339).
    pub fn expiry_phrase(&self, now: i64) -> String {
        if now >= self.not_after {
            format!("expired on {}", rfc3339(self.not_after))
        } else {
            format!("expires {}", rfc3339(self.not_after))
        }
    }
}

/// The DER SubjectPublicKeyInfo of a key.
fn spki_of(key: &dyn MachineKey) -> Result<Vec<u8>, KeyError> {
    key.public_key()
        .to_public_key_der()
        .map(|der| der.as_bytes().to_vec())
        .map_err(|e| KeyError::Operation(e.to_string()))
}

/// The public key of a file key, `None` for a TPM key file (or no file).
fn file_key_spki(path: &Path) -> Option<Vec<u8>> {
    let pem = zeroize::Zeroizing::new(std::fs::read_to_string(path).ok()?);
    spki_of(&FileMachineKey::from_pem(&pem)?).ok()
}

/// What [`IdentityFiles::settle`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Nothing,
    /// A renewal interrupted after its certificate was written is complete now.
    Promoted {
        serial: String,
    },
    /// A next certificate that matched no key was removed.
    Discarded,
}

/// The machine's identity files and where the next one is prepared.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

impl IdentityFiles {
    pub fn from_config(config: &AgentConfig) -> Self {
        Self {
            cert: config.server.client_cert.clone(),
            key: config.server.client_key.clone(),
        }
    }

    pub fn next_cert(&self) -> PathBuf {
        with_suffix(&self.cert, ".next")
    }

    pub fn next_key(&self) -> PathBuf {
        with_suffix(&self.key, ".next")
    }

    /// A renewal was started (its key made) and not finished.
    pub fn pending(&self) -> bool {
        self.next_key().exists()
    }

    /// Finishes a renewal a crash interrupted after its certificate was written; run before
    /// the key and certificate are loaded.
    pub fn settle(&self) -> Result<Settled, RenewalError> {
        let next_cert = self.next_cert();
        if !next_cert.exists() {
            return Ok(Settled::Nothing);
        }
        let Ok(next) = Certificate::read(&next_cert) else {
            std::fs::remove_file(&next_cert).map_err(write_error(&next_cert))?;
            return Ok(Settled::Discarded);
        };
        let next_key = self.next_key();
        if file_key_spki(&next_key).as_ref() == Some(&next.spki) {
            rename_durable(&next_key, &self.key).map_err(write_error(&self.key))?;
        } else {
            // The key was promoted before the crash, or is the TPM's (it does not change).
            let current = file_key_spki(&self.key)
                .or_else(|| Certificate::read(&self.cert).ok().map(|c| c.spki));
            if current.as_ref() != Some(&next.spki) {
                std::fs::remove_file(&next_cert).map_err(write_error(&next_cert))?;
                return Ok(Settled::Discarded);
            }
        }
        rename_durable(&next_cert, &self.cert).map_err(write_error(&self.cert))?;
        Ok(Settled::Promoted {
            serial: next.serial,
        })
    }

    /// The key to renew with: the current one for a TPM key; for a file key, the next key of
    /// an interrupted renewal or a fresh one, written before it is used.
    fn next_machine_key(
        &self,
        current: &Arc<dyn MachineKey>,
    ) -> Result<Arc<dyn MachineKey>, RenewalError> {
        if current.kind() != "file" {
            return Ok(current.clone());
        }
        let path = self.next_key();
        if let Ok(pem) = std::fs::read_to_string(&path) {
            if let Some(key) = FileMachineKey::from_pem(&zeroize::Zeroizing::new(pem)) {
                return Ok(Arc::new(key));
            }
        }
        let key = FileMachineKey::generate();
        write_atomic(&path, key.to_pem().as_bytes(), PRIVATE).map_err(write_error(&path))?;
        Ok(Arc::new(key))
    }
}

/// A finished renewal.
#[derive(Debug)]
pub struct Renewed {
    pub key: Arc<dyn MachineKey>,
    pub certificate: Certificate,
    pub response: RenewCertificateResponse,
}

/// Renews the certificate of `machine` (steps 1 to 4 of the module docs) and reconnects
/// `server` with the new identity.
pub async fn renew(
    files: &IdentityFiles,
    machine: &MachineIdentity,
    current: Arc<dyn MachineKey>,
    server: &impl AgentServer,
) -> Result<Renewed, RenewalError> {
    let key = {
        let (files, current) = (files.clone(), current.clone());
        blocking::run(move || files.next_machine_key(&current)).await?
    };
    crash_point("renew_after_key");
    let csr = {
        let key = key.clone();
        blocking::run(move || keys::csr_pem(key)).await?
    };
    let response = server.renew_certificate(csr).await?;
    crash_point("renew_after_answer");
    let next_cert = files.next_cert();
    let certificate = Certificate::from_pem(&response.certificate, &next_cert)?;
    if certificate.spki != spki_of(key.as_ref())? {
        return Err(RenewalError::BadAnswer(
            "it is not for the key this machine sent",
        ));
    }
    if certificate.identity.as_ref() != Some(machine) {
        return Err(RenewalError::BadAnswer("its CN is not this machine"));
    }
    {
        let (files, pem, file_key) = (
            files.clone(),
            response.certificate.clone(),
            key.kind() == "file",
        );
        blocking::run(move || -> Result<(), RenewalError> {
            let next_cert = files.next_cert();
            write_atomic(&next_cert, pem.as_bytes(), PRIVATE).map_err(write_error(&next_cert))?;
            crash_point("renew_after_cert");
            if file_key {
                rename_durable(&files.next_key(), &files.key).map_err(write_error(&files.key))?;
            }
            crash_point("renew_after_key_promoted");
            rename_durable(&next_cert, &files.cert).map_err(write_error(&files.cert))
        })
        .await?;
    }
    server.reconnect(key.clone())?;
    Ok(Renewed {
        key,
        certificate,
        response,
    })
}

impl<S: AgentServer> Engine<S> {
    /// Renews the machine certificate when it is due (or a renewal was left half done). A
    /// failure is audited and retried at the next round; once the certificate has expired it
    /// is also alerted (once until a renewal succeeds).
    pub(super) async fn renew_if_due(&mut self) {
        let now = self.validator.clock.now();
        let cert = &self.machine.certificate;
        let pending = self.settings.identity.pending();
        let validity = (cert.not_before, cert.not_after);
        let renewed_at = self.health.renewed_at;
        if !decide::renewal_due(pending, validity, &self.machine.id, renewed_at, now) {
            return;
        }
        let previous = cert.serial.clone();
        let expired = now >= cert.not_after;
        let expiry = cert.expiry_phrase(now);
        if expired {
            tracing::warn!("machine certificate {expiry}; renewing with it");
        }
        let identity = MachineIdentity {
            client_id: self.machine.client_id,
            machine_id: self.machine.id,
        };
        let renewed = renew(
            &self.settings.identity,
            &identity,
            self.machine.key.clone(),
            &self.server,
        )
        .await;
        match renewed {
            Ok(renewed) => {
                let key = if Arc::ptr_eq(&renewed.key, &self.machine.key) {
                    "kept"
                } else {
                    "new"
                };
                tracing::info!(serial = %renewed.certificate.serial, previous = %previous, key,
                    "machine certificate renewed; it expires {}", rfc3339(renewed.certificate.not_after));
                self.audit()
                    .note(
                        agent_event("certificate.renew", Outcome::Success)
                            .detail("serial", renewed.certificate.serial.clone())
                            .detail("previous", previous)
                            .detail("expires_at", rfc3339(renewed.certificate.not_after))
                            .detail("was_expired", expired)
                            .detail("key", key),
                    )
                    .await;
                self.machine.key = renewed.key;
                self.machine.certificate = renewed.certificate;
                self.health.certificate_alerted = false;
                self.health.renewed_at = Some(now);
            }
            Err(e) => {
                self.audit()
                    .note(
                        agent_event("certificate.renew", Outcome::Error)
                            .detail("reason", e.to_string())
                            .detail("was_expired", expired),
                    )
                    .await;
                if expired && !self.health.certificate_alerted {
                    self.health.certificate_alerted = true;
                    self.alerts
                        .raise(
                            AlertKind::CertificateExpired,
                            &format!(
                                "the machine certificate {expiry} and its renewal failed: {e}"
                            ),
                            serde_json::json!({"serial": previous}),
                        )
                        .await;
                } else {
                    tracing::warn!(error = %e, "machine certificate {expiry}; renewal failed, retrying at the next round");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> IdentityFiles {
        IdentityFiles {
            cert: dir.join("client.pem"),
            key: dir.join("client.key"),
        }
    }

    /// A self-signed certificate for `key`.
    fn certificate_for(key: &FileMachineKey) -> String {
        let pair = rcgen::KeyPair::from_pem(&key.to_pem()).unwrap();
        rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&pair)
            .unwrap()
            .pem()
    }

    #[test]
    fn settle_promotes_a_written_renewal_and_discards_strays() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        let old = FileMachineKey::generate();
        std::fs::write(&f.key, old.to_pem().as_bytes()).unwrap();
        std::fs::write(&f.cert, certificate_for(&old)).unwrap();
        assert_eq!(f.settle().unwrap(), Settled::Nothing);

        // Crash after step 3: both next files are there.
        let new = FileMachineKey::generate();
        std::fs::write(f.next_key(), new.to_pem().as_bytes()).unwrap();
        std::fs::write(f.next_cert(), certificate_for(&new)).unwrap();
        assert!(matches!(f.settle().unwrap(), Settled::Promoted { .. }));
        assert_eq!(
            file_key_spki(&f.key),
            Some(Certificate::read(&f.cert).unwrap().spki)
        );
        assert!(!f.next_key().exists() && !f.next_cert().exists());

        // Crash between the two renames: the key is in place, the certificate is not.
        let newer = FileMachineKey::generate();
        std::fs::write(&f.key, newer.to_pem().as_bytes()).unwrap();
        std::fs::write(f.next_cert(), certificate_for(&newer)).unwrap();
        assert!(matches!(f.settle().unwrap(), Settled::Promoted { .. }));
        assert_eq!(
            file_key_spki(&f.key),
            Some(Certificate::read(&f.cert).unwrap().spki)
        );

        // A next certificate for no key we hold is removed; a pending key stays for the retry.
        std::fs::write(f.next_cert(), certificate_for(&FileMachineKey::generate())).unwrap();
        std::fs::write(f.next_key(), new.to_pem().as_bytes()).unwrap();
        assert_eq!(f.settle().unwrap(), Settled::Discarded);
        assert!(!f.next_cert().exists() && f.pending());
        assert_eq!(
            file_key_spki(&f.key),
            Some(Certificate::read(&f.cert).unwrap().spki)
        );
    }

    #[test]
    fn certificates_are_read_with_their_dates_and_phrased() {
        let key = FileMachineKey::generate();
        let cert = Certificate::from_pem(&certificate_for(&key), Path::new("x")).unwrap();
        assert_eq!(cert.spki, spki_of(&key).unwrap());
        assert!(cert.not_after > cert.not_before);
        assert!(cert
            .expiry_phrase(cert.not_after)
            .starts_with("expired on "));
        assert!(cert.expiry_phrase(cert.not_before).starts_with("expires "));
        assert!(Certificate::from_pem("nope", Path::new("x")).is_err());
    }
}
