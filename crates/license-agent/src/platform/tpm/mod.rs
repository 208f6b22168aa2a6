//! The agent's TPM 2.0: sealing secrets, the non-exportable machine key, and the TPM clock.
//!
//! Why: DESIGN.md §2 wants the machine's secrets and private key held by the TPM when there is
//! one, so a copied disk is worthless on another machine, and §2/§4 want the TPM clock as a second
//! witness against clock rollback. Everything hangs off one storage primary key (ECC P-256,
//! restricted decrypt, owner hierarchy, fixed template, so the TPM re-derives the same key each
//! time). Its Name is recorded in `state_dir/tpm-primary.name` on first use; if the TPM was cleared
//! or swapped the Name differs and [`Tpm::open`] fails closed with [`TpmError::PrimaryMismatch`].
//!
//! Children of the primary (sealed secrets, the machine key) are returned to the caller as opaque
//! blobs to store on disk: `version (1) || kind || TPM2B_PUBLIC || TPM2B_PRIVATE`. The private part
//! is encrypted and integrity-protected by the primary, so a tampered blob, or a blob from another
//! TPM, fails to load ([`TpmError::Tampered`]). Loaded children are flushed after every operation
//! (the TPM has only a few object slots and the daemon runs for days); the primary and one salted
//! parameter-encryption session stay loaded for the life of a [`Tpm`] and are flushed on drop.
//! Sealed data, unsealed data and ECDH results are encrypted on the way to and from the TPM.
//!
//! All TPM calls are blocking and serialized on one connection behind a mutex; async code calls
//! them through [`crate::platform::blocking`]. The owner hierarchy must have an empty authorization value (the
//! default). The FFI lives in `esys`, the only file with `unsafe` besides
//! process hardening (`platform/hardening.rs`).
//!
//! Without a resource manager (`swtpm:` socket, `/dev/tpm0`) transient objects outlive the process
//! that loaded them, so a process killed mid-operation leaves them taking the TPM's few slots. An
//! advisory lock on `state_dir/tpm.lock` says who may clean up: its holder is the only agent process
//! using the TPM, so whatever is loaded was left behind and is flushed. The daemon holds it for its
//! life ([`Tpm::open_exclusive`]); a one-shot command takes it when it is free ([`Tpm::open`]).

mod esys;

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use license_protocol::secret::{EcdhKey, SecretError};
use p256::elliptic_curve::sec1::ToEncodedPoint as _;
use zeroize::Zeroizing;

use esys::{Esys, EsysError, ObjectBlob, ObjectKind};

/// File in the state directory recording the primary key's Name (hex), written on first use.
pub const PRIMARY_NAME_FILE: &str = "tpm-primary.name";
/// Lock file in the state directory held by the process allowed to flush leftover objects.
pub const LOCK_FILE: &str = "tpm.lock";
/// How long the daemon waits for a one-shot command to release [`LOCK_FILE`].
const EXCLUSIVE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// Most bytes [`Tpm::seal`] accepts (the TPM's `MAX_SYM_DATA`).
pub const MAX_SEAL_LEN: usize = esys::MAX_SEALED_LEN;
/// First byte of every blob this module returns.
const BLOB_FORMAT_V1: u8 = 1;
/// Second byte: what the blob holds.
const KIND_SEALED: u8 = 1;
const KIND_MACHINE_KEY: u8 = 2;

/// What went wrong with the TPM. Messages name the command and the TSS response code, never data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TpmError {
    /// No TPM behind the TCTI (missing device, swtpm not running, unknown TCTI, …).
    #[error("TPM unavailable: {0}")]
    Unavailable(String),
    /// The primary key's Name differs from the recorded one: the TPM was cleared or replaced, so
    /// nothing sealed before can be trusted to load (fail closed; an operator must re-enroll).
    #[error("TPM storage primary key does not match the recorded one (TPM cleared or replaced)")]
    PrimaryMismatch,
    /// The blob is not one of ours (wrong format, kind, template, or trailing bytes).
    #[error("TPM blob is malformed")]
    BadBlob,
    /// The TPM refused to load the blob: it was modified, or it belongs to another TPM or primary.
    #[error("TPM refused the blob: tampered, or made by another TPM or primary key")]
    Tampered,
    /// [`Tpm::seal`] was given more than [`MAX_SEAL_LEN`] bytes, or none.
    #[error("cannot seal {0} bytes: between 1 and {MAX_SEAL_LEN} bytes can be sealed")]
    SealSize(usize),
    /// Another process kept [`LOCK_FILE`] longer than the daemon waits for it (a second daemon
    /// on the same state directory, or a hung command).
    #[error("TPM lock {0} is held by another process")]
    Busy(PathBuf),
    /// Reading or writing the recorded primary Name or the lock file.
    #[error("TPM state file {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A TPM command failed (command name and response code).
    #[error("TPM error: {0}")]
    Esys(String),
}

/// The TPM's clock (`TPMS_CLOCK_INFO` from `TPM2_ReadClock`).
///
/// `clock_ms` counts milliseconds the TPM has been powered; it never goes backwards except when
/// the owner clears the TPM, and its persisted value may lag by up to the NV write interval after
/// an unclean power loss (`safe == false` then). `reset_count` grows at each TPM Reset (reboot),
/// `restart_count` at each TPM Restart/Resume since the last Reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpmClock {
    pub clock_ms: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub safe: bool,
}

/// One TPM connection with its primary key loaded. `Send + Sync`; commands are serialized.
pub struct Tpm {
    tcti: String,
    /// Name of the primary as recorded in the state directory (and checked on every re-creation).
    primary_name: Vec<u8>,
    esys: Mutex<Esys>,
    /// [`LOCK_FILE`], when this process holds it; declared after `esys` so our objects are
    /// flushed before the lock is released.
    _lock: Option<fs::File>,
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm")
            .field("tcti", &self.tcti)
            .field("primary_name", &hex::encode(&self.primary_name))
            .finish_non_exhaustive()
    }
}

/// An error inside one attempt: TSS failures stay raw so [`Tpm::run`] can spot stale handles.
enum OpError {
    Esys(EsysError),
    Tpm(TpmError),
}

impl From<EsysError> for OpError {
    fn from(e: EsysError) -> Self {
        Self::Esys(e)
    }
}

impl From<TpmError> for OpError {
    fn from(e: TpmError) -> Self {
        Self::Tpm(e)
    }
}

impl From<OpError> for TpmError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::Tpm(e) => e,
            // The TPM refuses a blob's contents as a parameter error on TPM2_Load
            // (TPM_RC_INTEGRITY, TPM_RC_BINDING, TPM_RC_SIZE, …).
            OpError::Esys(e) if e.command == "TPM2_Load" && e.is_bad_parameter() => {
                TpmError::Tampered
            }
            OpError::Esys(e) => TpmError::Esys(e.to_string()),
        }
    }
}

impl Tpm {
    /// Opens the TPM through a TCTI string (`device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=P`,
    /// `tabrmd`, …), then creates the primary storage key from its fixed template and checks its
    /// Name against `state_dir/tpm-primary.name`: written on first use; a different Name (TPM
    /// cleared or replaced) is [`TpmError::PrimaryMismatch`]. For one-shot commands: takes
    /// [`LOCK_FILE`] (and so cleans up leftovers) only if no daemon holds it.
    pub fn open(tcti: &str, state_dir: &Path) -> Result<Arc<Tpm>, TpmError> {
        let lock = try_lock(&state_dir.join(LOCK_FILE)).ok().flatten();
        Self::open_with(tcti, state_dir, lock)
    }

    /// Like [`Tpm::open`], for the one long-lived user of the TPM (the daemon): waits for
    /// [`LOCK_FILE`] (up to 30 s, the time for a one-shot command to finish) and holds it for the
    /// life of the returned [`Tpm`].
    pub fn open_exclusive(tcti: &str, state_dir: &Path) -> Result<Arc<Tpm>, TpmError> {
        let path = state_dir.join(LOCK_FILE);
        let deadline = std::time::Instant::now() + EXCLUSIVE_WAIT;
        let lock = loop {
            match try_lock(&path) {
                Ok(Some(lock)) => break lock,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Ok(None) => return Err(TpmError::Busy(path)),
                Err(source) => return Err(TpmError::State { path, source }),
            }
        };
        Self::open_with(tcti, state_dir, Some(lock))
    }

    fn open_with(
        tcti: &str,
        state_dir: &Path,
        lock: Option<fs::File>,
    ) -> Result<Arc<Tpm>, TpmError> {
        let mut esys =
            Esys::open(tcti).map_err(|e| TpmError::Unavailable(format!("TCTI {tcti:?}: {e}")))?;
        // Without a resource manager, objects a crashed predecessor left loaded stay in the TPM;
        // holding the lock means no other agent process has any loaded.
        let managed = tcti.contains("tpmrm") || tcti.starts_with("tabrmd");
        if lock.is_some() && !managed {
            match esys.flush_leftovers() {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    flushed = n,
                    "flushed TPM objects left by a previous run (no resource manager)"
                ),
                Err(e) => tracing::warn!(error = %e, "could not list leftover TPM objects"),
            }
        }
        let name = esys.primary().map_err(OpError::from)?.1.to_vec();
        let path = state_dir.join(PRIMARY_NAME_FILE);
        match fs::read_to_string(&path) {
            Ok(recorded) => {
                if recorded.trim() != hex::encode(&name) {
                    tracing::error!(
                        path = %path.display(),
                        "TPM primary key Name differs from the recorded one: TPM cleared or replaced"
                    );
                    return Err(TpmError::PrimaryMismatch);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                write_atomically(&path, format!("{}\n", hex::encode(&name)).as_bytes()).map_err(
                    |source| TpmError::State {
                        path: path.clone(),
                        source,
                    },
                )?;
                tracing::info!(path = %path.display(), "recorded the TPM primary key Name");
            }
            Err(source) => return Err(TpmError::State { path, source }),
        }
        Ok(Arc::new(Tpm {
            tcti: tcti.to_owned(),
            primary_name: name,
            esys: Mutex::new(esys),
            _lock: lock,
        }))
    }

    /// The Name of the storage primary key (`nameAlg || digest`), as recorded.
    pub fn primary_name(&self) -> &[u8] {
        &self.primary_name
    }

    /// Runs one operation with the primary loaded. If the TPM lost our primary or session (a
    /// reset, or a resource manager that evicted them), they are re-created — checking the Name
    /// again — and the operation is retried once.
    fn run<T>(&self, mut op: impl FnMut(&mut Esys) -> Result<T, OpError>) -> Result<T, TpmError> {
        let mut esys = self
            .esys
            .lock()
            .map_err(|_| TpmError::Unavailable("TPM connection poisoned by a panic".into()))?;
        let mut attempt = |esys: &mut Esys| -> Result<T, OpError> {
            if esys.primary()?.1 != self.primary_name.as_slice() {
                esys.forget_objects();
                return Err(TpmError::PrimaryMismatch.into());
            }
            op(esys)
        };
        match attempt(&mut esys) {
            Err(OpError::Esys(e)) if e.is_stale_handle() => {
                tracing::warn!(error = %e, "TPM lost the primary key or session; re-creating them");
                esys.forget_objects();
                attempt(&mut esys).map_err(TpmError::from)
            }
            other => other.map_err(TpmError::from),
        }
    }

    /// Seals 1 to [`MAX_SEAL_LEN`] bytes under the primary as a keyed-hash sealed object; returns
    /// an opaque blob for the caller to store. Only this TPM, with this primary, can unseal it.
    pub fn seal(&self, data: &[u8]) -> Result<Vec<u8>, TpmError> {
        if data.is_empty() || data.len() > MAX_SEAL_LEN {
            return Err(TpmError::SealSize(data.len()));
        }
        let blob = self.run(|esys| Ok(esys.create(ObjectKind::Sealed, data)?))?;
        encode_blob(KIND_SEALED, &blob)
    }

    /// Loads and unseals a blob from [`Tpm::seal`]. A tampered blob, or one from another TPM or
    /// primary, is [`TpmError::Tampered`] (or [`TpmError::BadBlob`] if it does not even parse).
    pub fn unseal(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        let blob = decode_blob(KIND_SEALED, ObjectKind::Sealed, blob)?;
        self.run(|esys| esys.with_loaded(&blob, |esys, item| Ok(esys.unseal(item)?)))
    }

    /// Creates a non-exportable ECC P-256 key (fixedTPM, fixedParent, sensitiveDataOrigin,
    /// userWithAuth, sign + decrypt, not restricted) under the primary; returns its blob.
    pub fn create_machine_key(&self) -> Result<Vec<u8>, TpmError> {
        let blob = self.run(|esys| Ok(esys.create(ObjectKind::MachineKey, &[])?))?;
        encode_blob(KIND_MACHINE_KEY, &blob)
    }

    /// Loads a machine-key blob from [`Tpm::create_machine_key`]. The key is loaded once here
    /// (proving the blob belongs to this TPM) and again for each operation.
    pub fn machine_key(self: &Arc<Self>, blob: &[u8]) -> Result<TpmMachineKey, TpmError> {
        let blob = decode_blob(KIND_MACHINE_KEY, ObjectKind::MachineKey, blob)?;
        let public = blob
            .ecc_point()
            .and_then(|point| p256::PublicKey::from_sec1_bytes(&point).ok())
            .ok_or(TpmError::BadBlob)?;
        self.run(|esys| esys.with_loaded(&blob, |_, _| Ok::<_, OpError>(())))?;
        Ok(TpmMachineKey {
            tpm: Arc::clone(self),
            blob,
            public,
        })
    }

    /// `TPM2_ReadClock`: the TPM's own clock and reset/restart counters, for rollback detection.
    pub fn read_clock(&self) -> Result<TpmClock, TpmError> {
        let mut esys = self
            .esys
            .lock()
            .map_err(|_| TpmError::Unavailable("TPM connection poisoned by a panic".into()))?;
        let info = esys
            .read_clock()
            .map_err(|e| TpmError::Esys(e.to_string()))?;
        Ok(TpmClock {
            clock_ms: info.clockInfo.clock,
            reset_count: info.clockInfo.resetCount,
            restart_count: info.clockInfo.restartCount,
            safe: info.clockInfo.safe != 0,
        })
    }
}

/// The machine's TPM-resident P-256 key: signs (ECDSA) and agrees (ECDH) without ever leaving
/// the TPM. Holds the blob and the public key; the key is loaded and flushed per operation.
pub struct TpmMachineKey {
    tpm: Arc<Tpm>,
    blob: ObjectBlob,
    public: p256::PublicKey,
}

impl std::fmt::Debug for TpmMachineKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmMachineKey")
            .field(
                "public_key",
                &hex::encode(self.public.to_encoded_point(true).as_bytes()),
            )
            .finish_non_exhaustive()
    }
}

impl TpmMachineKey {
    pub fn public_key(&self) -> p256::PublicKey {
        self.public
    }

    /// ECDSA P-256 over a SHA-256 digest computed by the caller; the signature is low-S normalized.
    pub fn sign_digest(&self, digest: &[u8; 32]) -> Result<p256::ecdsa::Signature, TpmError> {
        let (r, s) = self.tpm.run(|esys| {
            esys.with_loaded(&self.blob, |esys, key| {
                Ok(esys.sign_ecdsa_sha256(key, digest)?)
            })
        })?;
        let sig = p256::ecdsa::Signature::from_scalars(r, s)
            .map_err(|_| TpmError::Esys("TPM2_Sign returned an invalid signature".into()))?;
        Ok(sig.normalize_s().unwrap_or(sig))
    }

    /// `TPM2_ECDH_ZGen` with `peer`: the x-coordinate of the shared point.
    pub fn ecdh(&self, peer: &p256::PublicKey) -> Result<Zeroizing<[u8; 32]>, TpmError> {
        let point = peer.to_encoded_point(false);
        let (Some(x), Some(y)) = (point.x(), point.y()) else {
            return Err(TpmError::Esys(
                "peer public key is the identity point".into(),
            ));
        };
        let (x, y): (&[u8; 32], &[u8; 32]) = (x.as_ref(), y.as_ref());
        self.tpm
            .run(|esys| esys.with_loaded(&self.blob, |esys, key| Ok(esys.ecdh_zgen(key, x, y)?)))
    }
}

impl EcdhKey for TpmMachineKey {
    fn public_key(&self) -> p256::PublicKey {
        self.public
    }

    fn diffie_hellman(&self, peer: &p256::PublicKey) -> Result<Zeroizing<[u8; 32]>, SecretError> {
        self.ecdh(peer)
            .map_err(|e| SecretError::KeyAgreement(e.to_string()))
    }
}

fn encode_blob(kind: u8, blob: &ObjectBlob) -> Result<Vec<u8>, TpmError> {
    let body = blob.marshal().map_err(|e| TpmError::Esys(e.to_string()))?;
    let mut out = Vec::with_capacity(2 + body.len());
    out.extend_from_slice(&[BLOB_FORMAT_V1, kind]);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Parses a blob as [`Tpm::unseal`] or [`Tpm::machine_key`] does before the TPM sees it, and
/// encodes it again: the same bytes when it parses. No TPM needed; for the fuzz target and
/// checks of stored blobs.
pub fn reencode_blob(bytes: &[u8]) -> Result<Vec<u8>, TpmError> {
    let (kind, object) = match bytes.get(1) {
        Some(&KIND_SEALED) => (KIND_SEALED, ObjectKind::Sealed),
        Some(&KIND_MACHINE_KEY) => (KIND_MACHINE_KEY, ObjectKind::MachineKey),
        _ => return Err(TpmError::BadBlob),
    };
    encode_blob(kind, &decode_blob(kind, object, bytes)?)
}

/// Longest blob [`Tpm::unseal`] and [`Tpm::machine_key`] read: the format and kind bytes, then
/// the object. Longer input is refused before the TSS unmarshaller sees it.
pub const MAX_BLOB_LEN: usize = 2 + esys::MAX_BLOB_BODY_LEN;

fn decode_blob(kind: u8, object: ObjectKind, bytes: &[u8]) -> Result<ObjectBlob, TpmError> {
    if bytes.len() > MAX_BLOB_LEN {
        return Err(TpmError::BadBlob);
    }
    match bytes {
        [BLOB_FORMAT_V1, k, body @ ..] if *k == kind => ObjectBlob::unmarshal(body)
            .filter(|blob| blob.has_template(object))
            .ok_or(TpmError::BadBlob),
        _ => Err(TpmError::BadBlob),
    }
}

/// Temp file, fsync, rename, fsync the directory: the Name file is either absent or complete.
fn write_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

/// Takes the advisory lock on `path` (created 0600 if missing) without waiting: `None` when
/// another process holds it.
fn try_lock(path: &Path) -> io::Result<Option<fs::File>> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}
