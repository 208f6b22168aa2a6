//! The server's data directory: configuration, key material and (by default) the SQLite file.
//!
//! ```text
//! DATA_DIR/                (0700)
//!   server.toml            configuration (ServerConfig; 0600: the database URL may carry a
//!                          password)
//!   ca.pem     ca.key      internal CA (key 0600)
//!   server.pem server.key  TLS certificate of all three listeners (key 0600); server.pem is
//!                          replaced atomically when the certificate renews itself, and
//!                          carries the CA's cross-certificate during a CA rollover
//!   license-keys.json      Ed25519 license keys that sign tokens and rotate answers, current,
//!                          previous and retired (0600; see `license_keys`); older data
//!                          directories have a bare license-signing.key (PKCS#8)
//!   master-keys.json       master keys encrypting secrets at rest, by id (0600; see
//!                          `master_keys`); older data directories have a bare master.key
//!   server-trust.json      TLS key and CA rollovers: the next TLS key, retired pins, the
//!                          previous CA and the cross-certificate (0600; see `server_trust`)
//!   release-keys.json      Ed25519 release key that signs agent release manifests (0600; see
//!                          `release_keys`); only the publishing host needs it
//!   license.db             SQLite database (default storage)
//!   downloads/             agent binaries served under /downloads/
//! ```
//!
//! Replicas on one PostgreSQL database each get a copy of this directory (same CA, same TLS
//! key, so the agents' pin matches every replica).

use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use license_protocol::pin::CertPin;
use rand::RngCore as _;
use zeroize::Zeroizing;

use crate::config::{ConfigError, ServerConfig};
use crate::license_keys::{LicenseKeyError, LicenseKeyRing, LicenseKeys};
use crate::master_keys::{MasterKey, MasterKeyError, MasterKeyRing, MasterKeySet, FIRST_KEY_ID};
use crate::pki::{CertificateAuthority, PkiError};
use crate::server_trust::Announcement;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    #[error("{0} is already initialized (found {1}); refusing to overwrite key material")]
    AlreadyInitialized(String, &'static str),
    #[error("{0} is not initialized: run `license-server init --data-dir {0}` first")]
    NotInitialized(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadKey { path: String, message: String },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    MasterKeys(#[from] MasterKeyError),
    #[error(transparent)]
    LicenseKeys(#[from] LicenseKeyError),
    #[error(transparent)]
    Rollover(#[from] crate::server_trust::RolloverError),
    #[error(transparent)]
    ReleaseKeys(#[from] crate::release_keys::ReleaseKeyFileError),
}

/// Paths inside a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("server.toml")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.root.join("server.key")
    }
    /// The single license key of data directories made before license key rollover.
    pub fn signing_key(&self) -> PathBuf {
        self.root.join(crate::license_keys::LEGACY_KEY_FILE)
    }
    /// The license key set.
    pub fn license_keys(&self) -> PathBuf {
        self.root.join(crate::license_keys::KEY_SET_FILE)
    }
    /// The single master key of data directories made before master key rollover.
    pub fn master_key(&self) -> PathBuf {
        self.root.join(crate::master_keys::LEGACY_KEY_FILE)
    }
    /// The master key set.
    pub fn master_keys(&self) -> PathBuf {
        self.root.join(crate::master_keys::KEY_SET_FILE)
    }
    pub fn downloads(&self) -> PathBuf {
        self.root.join("downloads")
    }
    pub fn default_database_url(&self) -> String {
        format!("sqlite://{}", self.root.join("license.db").display())
    }

    fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
        move |source| DataDirError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// `server.toml` is written last by [`DataDir::init`]: without it nothing here is usable.
    fn check_initialized(&self) -> Result<(), DataDirError> {
        if self.config().exists() {
            Ok(())
        } else {
            Err(DataDirError::NotInitialized(
                self.root.display().to_string(),
            ))
        }
    }

    fn read(&self, path: &Path) -> Result<Zeroizing<String>, DataDirError> {
        self.check_initialized()?;
        std::fs::read_to_string(path)
            .map(Zeroizing::new)
            .map_err(Self::io_err(path))
    }

    /// Writes a new file that must not exist yet, with the given mode.
    fn write_new(&self, path: &Path, contents: &[u8], mode: u32) -> Result<(), DataDirError> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(Self::io_err(path))?;
        f.write_all(contents)
            .and_then(|()| f.sync_all())
            .map_err(Self::io_err(path))
    }

    /// Replaces `server.pem` atomically (a temporary file in the same directory, synced, then
    /// renamed over it, then the directory synced): a crash leaves the old or the new
    /// certificate, never a torn one.
    pub fn replace_server_cert(&self, pem: &str) -> Result<(), DataDirError> {
        let path = self.server_cert();
        let tmp = self
            .root
            .join(format!(".server.pem.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        self.write_new(&tmp, pem.as_bytes(), 0o644)?;
        std::fs::rename(&tmp, &path).map_err(Self::io_err(&path))?;
        std::fs::File::open(&self.root)
            .and_then(|dir| dir.sync_all())
            .map_err(Self::io_err(&self.root))
    }

    pub fn load_config(&self) -> Result<ServerConfig, DataDirError> {
        self.check_initialized()?;
        let config = ServerConfig::load(&self.config())?;
        let urls = [&config.database_url, &config.database_read_url];
        if urls.into_iter().flatten().any(|url| url_has_password(url)) {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(self.config()).map_or(0, |m| m.permissions().mode());
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %self.config().display(),
                    mode = format!("{:o}", mode & 0o777),
                    "server.toml holds a database password and is readable by others: chmod 600 it"
                );
            }
        }
        Ok(config)
    }

    /// Creates the CA, the TLS certificate, the license signing key, the master key, the release key and the
    /// configuration. Refuses to touch a directory that already holds key material.
    pub fn init(
        &self,
        config: &ServerConfig,
        dns_names: &[String],
        ips: &[IpAddr],
    ) -> Result<InitReport, DataDirError> {
        for (path, name) in [(self.config(), "server.toml"), (self.ca_key(), "ca.key")] {
            if path.exists() {
                return Err(DataDirError::AlreadyInitialized(
                    self.root.display().to_string(),
                    name,
                ));
            }
        }
        std::fs::create_dir_all(&self.root).map_err(Self::io_err(&self.root))?;
        // The directory holds the keys and the configuration (with the database URL, which
        // may carry a password): the service's user only.
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
                .map_err(Self::io_err(&self.root))?;
        }
        std::fs::create_dir_all(self.downloads()).map_err(Self::io_err(&self.root))?;

        let ca =
            CertificateAuthority::generate(&format!("License Secret Agent CA {}", short_random()))?;
        let (server_cert, server_key) = ca.issue_server_certificate(
            dns_names,
            ips,
            time::Duration::days(config.server_certificate_validity_days.into()),
        )?;
        let license_keys = LicenseKeys::generate(crate::clock::Timestamp::now());
        let master = MasterKeySet::new(vec![MasterKey::generate(
            FIRST_KEY_ID,
            crate::clock::Timestamp::now(),
        )]);

        self.write_new(&self.ca_key(), ca.key_pem().as_bytes(), 0o600)?;
        self.write_new(&self.ca_cert(), ca.cert_pem().as_bytes(), 0o644)?;
        self.write_new(
            &self.server_key(),
            server_key.serialize_pem().as_bytes(),
            0o600,
        )?;
        self.write_new(&self.server_cert(), server_cert.pem.as_bytes(), 0o644)?;
        license_keys.write(&self.root)?;
        master.write(&self.root)?;
        crate::release_keys::ReleaseKeyFile {
            keys: vec![crate::release_keys::ReleaseKey::generate(
                crate::clock::Timestamp::now(),
            )],
        }
        .write(&self.root)?;
        // Written last: its presence marks a complete initialization.
        // 0600: `database_url` may carry a password.
        self.write_new(&self.config(), config.to_toml().as_bytes(), 0o600)?;

        Ok(InitReport {
            server_pin: CertPin::of_certificate_der(&server_cert.der).map_err(|e| {
                DataDirError::BadKey {
                    path: self.server_cert().display().to_string(),
                    message: e.to_string(),
                }
            })?,
            license_public_key: license_public_key_string(license_keys.signing_key()),
        })
    }

    /// Loads everything `serve` and `admin` need, after completing a TLS key or CA rollover
    /// step that was interrupted (`server_trust::finish`).
    pub fn load_keys(&self) -> Result<ServerKeys, DataDirError> {
        let validity_days = self.load_config()?.server_certificate_validity_days;
        crate::server_trust::finish(self, validity_days)?;
        let ca =
            CertificateAuthority::load(&self.read(&self.ca_cert())?, &self.read(&self.ca_key())?)?;
        let server_cert_pem = self.read(&self.server_cert())?.to_string();
        let server_key_pem = self.read(&self.server_key())?;
        let cert_der = pem_first_der(&server_cert_pem).ok_or_else(|| DataDirError::BadKey {
            path: self.server_cert().display().to_string(),
            message: "no PEM certificate".into(),
        })?;
        let server_pin =
            CertPin::of_certificate_der(&cert_der).map_err(|e| DataDirError::BadKey {
                path: self.server_cert().display().to_string(),
                message: e.to_string(),
            })?;
        let license_keys = LicenseKeyRing::load(&self.root)?;
        let master_keys = MasterKeyRing::load(&self.root)?;
        let trust = Announcement::load(self, server_pin, ca.cert_pem())?;
        Ok(ServerKeys {
            trust,
            ca,
            server_cert_pem,
            server_key_pem,
            server_pin,
            license_keys,
            master_keys,
        })
    }
}

/// What `init` prints: the values an operator hands to installers.
#[derive(Debug, Clone)]
pub struct InitReport {
    pub server_pin: CertPin,
    pub license_public_key: String,
}

/// Key material of a running server. Debug prints none of it.
pub struct ServerKeys {
    pub ca: CertificateAuthority,
    pub server_cert_pem: String,
    pub server_key_pem: Zeroizing<String>,
    pub server_pin: CertPin,
    /// The license keys: the current one signs tokens and rotate answers (`license_keys`);
    /// loaded now so a bad key set fails at start, re-read when its file changes.
    pub license_keys: LicenseKeyRing,
    /// Encrypt machine secrets at rest, by id; the database's registry says which one seals
    /// new secrets (`service::keys`).
    pub master_keys: MasterKeyRing,
    /// The TLS keys and CAs announced to agents, the previous CA and the cross-certificate
    /// (`server_trust`).
    pub trust: Announcement,
}

impl ServerKeys {
    /// The CA certificates machine certificates may chain to: the current CA and, during a
    /// rollover, the previous one.
    pub fn client_roots_pem(&self) -> String {
        let mut pem = self.ca.cert_pem().trim_end().to_string();
        pem.push('\n');
        if let Some(previous) = &self.trust.previous_ca {
            pem.push_str(previous.trim_end());
            pem.push('\n');
        }
        pem
    }
}

impl std::fmt::Debug for ServerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerKeys")
            .field("server_pin", &self.server_pin)
            .finish_non_exhaustive()
    }
}

/// `ed25519:<base64 of the 32-byte public key>`, the form the agent pins.
pub fn license_public_key_string(key: &ed25519_dalek::SigningKey) -> String {
    license_protocol::license_keys::public_key_string(&key.verifying_key())
}

pub(crate) fn short_random() -> String {
    let mut b = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Whether a database URL carries a password (`scheme://user:password@host/…`).
fn url_has_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// DER of the first certificate in a PEM string.
pub fn pem_first_der(pem: &str) -> Option<Vec<u8>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()?
        .ok()
        .map(|c| c.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn init_keeps_the_directory_and_the_configuration_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("data"));
        let mut config = ServerConfig::new("localhost".into());
        config.database_url = Some("postgres://lsa:s3cret@db.example/lsa".into());
        dir.init(&config, &["localhost".into()], &[]).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.root()), 0o700);
        assert_eq!(mode(&dir.config()), 0o600);
        assert_eq!(mode(&dir.ca_key()), 0o600);
        assert_eq!(mode(&dir.server_key()), 0o600);
        assert_eq!(
            mode(&dir.root().join(crate::release_keys::RELEASE_KEYS_FILE)),
            0o600
        );
    }

    #[test]
    fn finds_passwords_in_database_urls() {
        assert!(url_has_password("postgres://lsa:s3cret@db/lsa"));
        assert!(url_has_password(
            "postgres://lsa:p%40ss@db:5432/lsa?sslmode=require"
        ));
        assert!(!url_has_password("postgres://lsa@db/lsa"));
        assert!(!url_has_password("postgres://db/lsa?user=a:b"));
        assert!(!url_has_password(
            "sqlite:///var/lib/license-server/license.db"
        ));
    }
}
