//! The simulated machines' identities: enrolled through the real bootstrap, kept in a cache
//! file (one JSON object per line) so a run can be repeated against the same server without
//! enrolling again. The file holds private keys: it is written 0600, and belongs with the
//! server's test data it was enrolled against.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::http::{h1_round, request, HttpError, Target};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("{path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {message}")]
    Corrupt {
        path: String,
        line: usize,
        message: String,
    },
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("{what}: the server answered {status}: {body}")]
    Refused {
        what: &'static str,
        status: u16,
        body: String,
    },
    #[error("making a key or CSR: {0}")]
    Key(String),
}

/// One enrolled machine.
#[derive(Clone, Serialize, Deserialize)]
pub struct Identity {
    pub machine_id: String,
    pub client_id: String,
    pub certificate_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Identity")
            .field("machine_id", &self.machine_id)
            .finish_non_exhaustive()
    }
}

/// The cache file.
#[derive(Debug, Clone)]
pub struct IdentityCache {
    path: PathBuf,
}

impl IdentityCache {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every machine in the file (none when it does not exist), in the order they were first
    /// written; a machine written again (a renewed certificate) has its last identity.
    pub fn load(&self) -> Result<Vec<Identity>, IdentityError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(self.file_error(source)),
        };
        let mut identities: Vec<Identity> = Vec::new();
        let mut at = std::collections::HashMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let identity: Identity =
                serde_json::from_str(line).map_err(|e| IdentityError::Corrupt {
                    path: self.path.display().to_string(),
                    line: i + 1,
                    message: e.to_string(),
                })?;
            match at.get(&identity.machine_id) {
                Some(&index) => identities[index] = identity,
                None => {
                    at.insert(identity.machine_id.clone(), identities.len());
                    identities.push(identity);
                }
            }
        }
        Ok(identities)
    }

    /// Appends `identities` (the file is created 0600).
    pub fn append(&self, identities: &[Identity]) -> Result<(), IdentityError> {
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&self.path).map_err(|e| self.file_error(e))?;
        let mut text = String::new();
        for identity in identities {
            // Plain strings: serializing cannot fail.
            text.push_str(&serde_json::to_string(identity).unwrap_or_default());
            text.push('\n');
        }
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| self.file_error(e))
    }

    fn file_error(&self, source: std::io::Error) -> IdentityError {
        IdentityError::File {
            path: self.path.display().to_string(),
            source,
        }
    }
}

/// A new P-256 key (PKCS#8 PEM) and a CSR for it (PEM): for an enrollment or a renewal.
pub fn new_key_and_csr() -> Result<(String, String), IdentityError> {
    let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Key(e.to_string()))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| IdentityError::Key(e.to_string()))?;
    Ok((key.serialize_pem(), csr))
}

/// `POST path` on the admin listener with an admin token and an empty JSON body (the routes
/// that act on one object, such as `/api/admin/machines/{id}/revoke`); the JSON answer.
pub async fn admin_post(
    admin: &Target,
    path: &str,
    admin_token: &str,
) -> Result<serde_json::Value, IdentityError> {
    Enroller::post(
        admin,
        path,
        Some(admin_token),
        json!({}),
        "an admin request",
    )
    .await
}

/// Enrolls machines the way `license-agent enroll` does: a one-time install token per machine
/// (made through the admin API), then `POST /api/public/bootstrap` with a fresh P-256 key's CSR.
#[derive(Debug, Clone)]
pub struct Enroller {
    pub public: Target,
    pub admin: Target,
    pub admin_token: String,
}

impl Enroller {
    fn anonymous(target: &Target) -> Result<Arc<rustls::ClientConfig>, HttpError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| HttpError::Material(e.to_string()))?
            .with_root_certificates(target.roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    async fn post(
        target: &Target,
        path: &str,
        bearer: Option<&str>,
        body: serde_json::Value,
        what: &'static str,
    ) -> Result<serde_json::Value, IdentityError> {
        let mut req = request(
            "POST",
            &target.uri(path),
            Some(body.to_string().into_bytes()),
        );
        if let Some(token) = bearer {
            if let Ok(value) = format!("Bearer {token}").parse() {
                req.headers_mut().insert("authorization", value);
            }
        }
        let mut answers = h1_round(target, Self::anonymous(target)?, vec![req]).await?;
        let (answer, _) = answers.remove(0);
        if answer.status != 200 {
            return Err(IdentityError::Refused {
                what,
                status: answer.status,
                body: String::from_utf8_lossy(&answer.body).into_owned(),
            });
        }
        serde_json::from_slice(&answer.body).map_err(|e| IdentityError::Refused {
            what,
            status: answer.status,
            body: e.to_string(),
        })
    }

    /// A new client named `name`; its id.
    pub async fn create_client(&self, name: &str) -> Result<String, IdentityError> {
        let client = Self::post(
            &self.admin,
            "/api/admin/clients",
            Some(&self.admin_token),
            json!({"name": name}),
            "creating the client",
        )
        .await?;
        Ok(client["id"].as_str().unwrap_or_default().to_string())
    }

    /// One machine of `client_id`, with hardware id `hardware_id`.
    pub async fn enroll(
        &self,
        client_id: &str,
        hardware_id: &str,
    ) -> Result<Identity, IdentityError> {
        let token = Self::post(
            &self.admin,
            "/api/admin/install-tokens",
            Some(&self.admin_token),
            json!({"client_id": client_id}),
            "creating an install token",
        )
        .await?;
        let token = token["token"].as_str().unwrap_or_default();
        let (key_pem, csr) = new_key_and_csr()?;
        let answer = Self::post(
            &self.public,
            "/api/public/bootstrap",
            None,
            json!({"token": token, "hostname": format!("sim-{hardware_id}"),
                   "hardware_id": hardware_id, "arch": "amd64", "csr": csr}),
            "bootstrap",
        )
        .await?;
        let field = |name: &str| answer[name].as_str().unwrap_or_default().to_string();
        Ok(Identity {
            machine_id: field("machine_id"),
            client_id: field("client_id"),
            certificate_pem: field("certificate"),
            key_pem,
        })
    }

    /// `count` machines of one new client, `concurrency` enrollments at a time, with hardware
    /// ids `{prefix}-{n}`; each appended to `cache` as soon as a batch is done.
    pub async fn enroll_many(
        &self,
        prefix: &str,
        count: usize,
        concurrency: usize,
        cache: &IdentityCache,
    ) -> Result<Vec<Identity>, IdentityError> {
        let client = self.create_client(&format!("fleet-{prefix}")).await?;
        let mut enrolled = Vec::with_capacity(count);
        let mut next = 0;
        while next < count {
            let batch: Vec<_> = (next..count.min(next + concurrency.max(1)))
                .map(|n| {
                    let (enroller, client) = (self.clone(), client.clone());
                    let hardware_id = format!("{prefix}-{n:07}");
                    tokio::spawn(async move { enroller.enroll(&client, &hardware_id).await })
                })
                .collect();
            next += batch.len();
            let mut done = Vec::new();
            for task in batch {
                done.push(
                    task.await
                        .map_err(|e| IdentityError::Key(e.to_string()))??,
                );
            }
            cache.append(&done)?;
            enrolled.extend(done);
        }
        Ok(enrolled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_round_trips_and_names_a_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let cache = IdentityCache::new(dir.path().join("machines.jsonl"));
        assert!(cache.load().unwrap().is_empty(), "no file: no identity");
        let one = Identity {
            machine_id: "m1".into(),
            client_id: "c".into(),
            certificate_pem: "CERT".into(),
            key_pem: "KEY".into(),
        };
        let two = Identity {
            machine_id: "m2".into(),
            ..one.clone()
        };
        cache.append(&[one.clone(), two]).unwrap();
        // m1 renewed: written again, read back in its place with its last identity.
        let renewed = Identity {
            certificate_pem: "CERT2".into(),
            key_pem: "KEY2".into(),
            ..one
        };
        cache.append(&[renewed]).unwrap();
        let loaded = cache.load().unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(
            (
                loaded[0].machine_id.as_str(),
                loaded[0].certificate_pem.as_str()
            ),
            ("m1", "CERT2")
        );
        assert_eq!(loaded[1].machine_id, "m2");
        assert!(!format!("{:?}", loaded[0]).contains("KEY"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(cache.path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(cache.path(), "{}\n").unwrap();
        let err = cache.load().unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
