//! The one place that calls the tpm2-tss ESAPI (`Esys_*`) and marshalling (`Tss2_MU_*`) C
//! functions directly, behind a small safe API used by [`super::Tpm`].
//!
//! Why raw calls instead of `tss_esapi::Context`: tss-esapi 7 has no `TPM2_ReadClock` and does not
//! expose its `ESYS_CONTEXT`, so the clock (needed for rollback detection) could only be read on a
//! second connection, which a `swtpm:` socket or `/dev/tpm0` does not allow. Its builders also
//! refuse an ECC key that both signs and decrypts, which the machine key is. So this file owns the
//! ESYS context, uses tss-esapi only for its `tss2_esys` bindings and constants, and keeps every
//! `unsafe` block next to the FFI call it wraps. Nothing here logs or formats secret bytes; buffers
//! that carried secrets are zeroized before they are freed.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::ptr::{null, null_mut};

use tss_esapi::constants::tss::{
    TPM2_ALG_AES, TPM2_ALG_CFB, TPM2_ALG_ECC, TPM2_ALG_ECDSA, TPM2_ALG_KEYEDHASH, TPM2_ALG_NULL,
    TPM2_ALG_SHA256, TPM2_ECC_NIST_P256, TPM2_RH_NULL, TPM2_SE_HMAC, TPM2_ST_HASHCHECK,
    TPMA_OBJECT_DECRYPT, TPMA_OBJECT_FIXEDPARENT, TPMA_OBJECT_FIXEDTPM, TPMA_OBJECT_NODA,
    TPMA_OBJECT_RESTRICTED, TPMA_OBJECT_SENSITIVEDATAORIGIN, TPMA_OBJECT_SIGN_ENCRYPT,
    TPMA_OBJECT_USERWITHAUTH, TPMA_SESSION_CONTINUESESSION, TPMA_SESSION_DECRYPT,
    TPMA_SESSION_ENCRYPT,
};
use tss_esapi::tss2_esys::{
    Esys_Create, Esys_CreatePrimary, Esys_ECDH_ZGen, Esys_Finalize, Esys_FlushContext, Esys_Free,
    Esys_GetCapability, Esys_Initialize, Esys_Load, Esys_ReadClock, Esys_Sign,
    Esys_StartAuthSession, Esys_TRSess_SetAttributes, Esys_TR_FromTPMPublic, Esys_TR_GetName,
    Esys_Unseal, Tss2_MU_TPM2B_PRIVATE_Marshal, Tss2_MU_TPM2B_PRIVATE_Unmarshal,
    Tss2_MU_TPM2B_PUBLIC_Marshal, Tss2_MU_TPM2B_PUBLIC_Unmarshal, Tss2_TctiLdr_Finalize,
    Tss2_TctiLdr_Initialize, ESYS_CONTEXT, ESYS_TR, ESYS_TR_NONE, ESYS_TR_PASSWORD,
    ESYS_TR_RH_OWNER, TPM2B_DIGEST, TPM2B_ECC_PARAMETER, TPM2B_ECC_POINT, TPM2B_NAME,
    TPM2B_PRIVATE, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPM2B_SENSITIVE_DATA,
    TPMS_CAPABILITY_DATA, TPMS_ECC_PARMS, TPMS_ECC_POINT, TPMS_KEYEDHASH_PARMS, TPMS_SCHEME_HASH,
    TPMS_SENSITIVE_CREATE, TPMS_SIGNATURE_ECC, TPMS_TIME_INFO, TPMT_ECC_SCHEME, TPMT_KDF_SCHEME,
    TPMT_KEYEDHASH_SCHEME, TPMT_PUBLIC, TPMT_SIGNATURE, TPMT_SIG_SCHEME, TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT, TPMT_TK_HASHCHECK, TPMU_PUBLIC_ID, TPMU_PUBLIC_PARMS, TPMU_SIG_SCHEME,
    TPMU_SYM_KEY_BITS, TPMU_SYM_MODE, TSS2_RC, TSS2_TCTI_CONTEXT,
};
use zeroize::{Zeroize, Zeroizing};

/// Most bytes a keyed-hash sealed object can hold (`MAX_SYM_DATA` of the TPM 2.0 library spec).
pub(super) const MAX_SEALED_LEN: usize = 128;
/// Upper bound of a marshalled [`ObjectBlob`]: both structures whole (their wire forms are
/// smaller). Longer input is refused before the TSS unmarshaller sees it.
pub(super) const MAX_BLOB_BODY_LEN: usize =
    std::mem::size_of::<TPM2B_PUBLIC>() + std::mem::size_of::<TPM2B_PRIVATE>();
/// `TSS2_ESYS_RC_BAD_VALUE`, reported when the ESAPI returned something we cannot use.
const INTERNAL_RC: TSS2_RC = 0x0007_000b;
/// Size of a P-256 coordinate and scalar.
const P256_LEN: usize = 32;

/// A failed TSS/TPM call: which command, and the raw `TSS2_RC` (never any data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct EsysError {
    pub(super) command: &'static str,
    pub(super) rc: TSS2_RC,
}

impl EsysError {
    fn check(command: &'static str, rc: TSS2_RC) -> Result<(), Self> {
        if rc == 0 {
            Ok(())
        } else {
            Err(Self { command, rc })
        }
    }

    /// The error was sent by the TPM itself (layer 0), not by the TCTI or the ESAPI library.
    fn is_from_tpm(self) -> bool {
        self.rc & 0x00ff_0000 == 0
    }

    /// A TPM "format one" error about a command parameter (not a handle or a session), e.g.
    /// `TPM_RC_INTEGRITY` or `TPM_RC_BINDING` on `TPM2_Load`: the object itself is refused.
    pub(super) fn is_bad_parameter(self) -> bool {
        self.is_from_tpm() && self.rc & 0x80 != 0 && self.rc & 0x40 != 0
    }

    /// The TPM no longer knows a handle or session we hold (it was reset, or the object was
    /// flushed behind our back): `TPM_RC_HANDLE`, `TPM_RC_REFERENCE_Hx`/`_Sx`, `TPM_RC_INITIALIZE`.
    pub(super) fn is_stale_handle(self) -> bool {
        if !self.is_from_tpm() {
            return false;
        }
        // Format one, P clear: the error is about a handle (N < 8) or a session (N >= 8).
        let fmt1_handle = self.rc & 0x80 != 0 && self.rc & 0x40 == 0;
        let fmt1_code = self.rc & 0x3f;
        let reference = (0x910..=0x91e).contains(&self.rc);
        (fmt1_handle && fmt1_code == 0x0b) || reference || self.rc == 0x100
    }
}

impl std::fmt::Display for EsysError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let layer = match (self.rc >> 16) & 0xff {
            0 => "TPM",
            7 => "ESAPI",
            8 => "SAPI",
            9 => "marshalling",
            10 => "TCTI",
            11 | 12 => "resource manager",
            _ => "TSS",
        };
        write!(
            f,
            "{} failed: {layer} error 0x{:08x}",
            self.command, self.rc
        )
    }
}

/// A transient object the TPM has loaded (an `ESYS_TR`). Flush it with [`Esys::flush`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Handle(ESYS_TR);

/// What an object blob holds; each kind has exactly one template (see the `*_template` fns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ObjectKind {
    /// Keyed-hash object holding up to [`MAX_SEALED_LEN`] caller bytes.
    Sealed,
    /// Non-exportable ECC P-256 key that signs and decrypts (ECDH).
    MachineKey,
}

/// A TPM object that lives outside the TPM: its public area and its private area wrapped
/// (encrypted and integrity-protected) by the parent. Only the TPM holding the parent can load it.
#[derive(Clone, Copy)]
pub(super) struct ObjectBlob {
    public: TPM2B_PUBLIC,
    private: TPM2B_PRIVATE,
}

impl std::fmt::Debug for ObjectBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectBlob").finish_non_exhaustive()
    }
}

impl ObjectBlob {
    /// Marshals as `TPM2B_PUBLIC || TPM2B_PRIVATE` in TPM wire format.
    pub(super) fn marshal(&self) -> Result<Vec<u8>, EsysError> {
        let mut buf =
            vec![0u8; std::mem::size_of::<TPM2B_PUBLIC>() + std::mem::size_of::<TPM2B_PRIVATE>()];
        let mut offset = 0;
        // SAFETY: `self.public` is a valid struct; `buf` is writable for `buf.len()` bytes and the
        // function never writes past `buffer_size`; `offset` is a valid out pointer.
        let rc = unsafe {
            Tss2_MU_TPM2B_PUBLIC_Marshal(
                &self.public,
                buf.as_mut_ptr(),
                buf.len() as _,
                &mut offset,
            )
        };
        EsysError::check("Tss2_MU_TPM2B_PUBLIC_Marshal", rc)?;
        // SAFETY: as above; `offset` is within `buf` (set by the previous call).
        let rc = unsafe {
            Tss2_MU_TPM2B_PRIVATE_Marshal(
                &self.private,
                buf.as_mut_ptr(),
                buf.len() as _,
                &mut offset,
            )
        };
        EsysError::check("Tss2_MU_TPM2B_PRIVATE_Marshal", rc)?;
        buf.truncate(offset as usize);
        Ok(buf)
    }

    /// Parses `TPM2B_PUBLIC || TPM2B_PRIVATE`; `None` if longer than [`MAX_BLOB_BODY_LEN`],
    /// malformed, followed by extra bytes, or not in the one form [`ObjectBlob::marshal`]
    /// writes (so a blob reads back as exactly the bytes stored).
    pub(super) fn unmarshal(bytes: &[u8]) -> Option<Self> {
        if bytes.len() > MAX_BLOB_BODY_LEN {
            return None;
        }
        let mut blob = Self {
            public: TPM2B_PUBLIC::default(),
            private: TPM2B_PRIVATE::default(),
        };
        let mut offset = 0;
        // SAFETY: `bytes` is readable for `bytes.len()` bytes and the function never reads past
        // `buffer_size`; `dest` and `offset` are valid, exclusively borrowed out pointers.
        let rc = unsafe {
            Tss2_MU_TPM2B_PUBLIC_Unmarshal(
                bytes.as_ptr(),
                bytes.len() as _,
                &mut offset,
                &mut blob.public,
            )
        };
        if rc != 0 {
            return None;
        }
        // SAFETY: as above.
        let rc = unsafe {
            Tss2_MU_TPM2B_PRIVATE_Unmarshal(
                bytes.as_ptr(),
                bytes.len() as _,
                &mut offset,
                &mut blob.private,
            )
        };
        if rc != 0 || offset as usize != bytes.len() {
            return None;
        }
        // The unmarshaller reads a few fields more loosely than the marshaller writes them
        // (e.g. a size prefix of an optional member); only the canonical form is ours.
        (blob.marshal().ok()?.as_slice() == bytes).then_some(blob)
    }

    /// True if the public area is exactly our template for `kind` (apart from `unique`), so a
    /// blob made by someone else with weaker attributes (e.g. an exportable key) is refused.
    pub(super) fn has_template(&self, kind: ObjectKind) -> bool {
        let expected = match kind {
            ObjectKind::Sealed => sealed_template(),
            ObjectKind::MachineKey => machine_key_template(),
        };
        let (got, want) = (&self.public.publicArea, &expected.publicArea);
        if got.type_ != want.type_
            || got.nameAlg != want.nameAlg
            || got.objectAttributes != want.objectAttributes
            || got.authPolicy.size != 0
        {
            return false;
        }
        match kind {
            // SAFETY: `type_` is KEYEDHASH (checked above), so `keyedHashDetail` is the member
            // the unmarshaller filled; it is plain integers.
            ObjectKind::Sealed => unsafe {
                got.parameters.keyedHashDetail.scheme.scheme == TPM2_ALG_NULL
            },
            // SAFETY: `type_` is ECC (checked above), so `eccDetail` is the member the
            // unmarshaller filled; it is plain integers.
            ObjectKind::MachineKey => unsafe {
                let p = &got.parameters.eccDetail;
                p.symmetric.algorithm == TPM2_ALG_NULL
                    && p.scheme.scheme == TPM2_ALG_NULL
                    && p.curveID == TPM2_ECC_NIST_P256
                    && p.kdf.scheme == TPM2_ALG_NULL
            },
        }
    }

    /// The uncompressed SEC1 point (`04 || x || y`) of an ECC object.
    pub(super) fn ecc_point(&self) -> Option<[u8; 1 + 2 * P256_LEN]> {
        if self.public.publicArea.type_ != TPM2_ALG_ECC {
            return None;
        }
        // SAFETY: `type_` is ECC, so `unique.ecc` is the member the TPM/unmarshaller filled.
        let point = unsafe { self.public.publicArea.unique.ecc };
        let mut out = [0u8; 1 + 2 * P256_LEN];
        out[0] = 4;
        copy_left_padded(&point.x, &mut out[1..1 + P256_LEN])?;
        copy_left_padded(&point.y, &mut out[1 + P256_LEN..])?;
        Some(out)
    }
}

/// Copies a TPM big-endian number into `out`, left-padding with zeros; `None` if it is longer.
fn copy_left_padded(param: &TPM2B_ECC_PARAMETER, out: &mut [u8]) -> Option<()> {
    let len = usize::from(param.size);
    if len > out.len() || len > param.buffer.len() {
        return None;
    }
    let start = out.len() - len;
    out[..start].fill(0);
    out[start..].copy_from_slice(&param.buffer[..len]);
    Some(())
}

fn ecc_parameter(bytes: &[u8]) -> TPM2B_ECC_PARAMETER {
    let mut p = TPM2B_ECC_PARAMETER {
        size: bytes.len() as u16,
        buffer: [0; 128],
    };
    p.buffer[..bytes.len()].copy_from_slice(bytes);
    p
}

fn public(area: TPMT_PUBLIC) -> TPM2B_PUBLIC {
    TPM2B_PUBLIC {
        size: 0,
        publicArea: area,
    }
}

/// The storage primary key: the TCG provisioning guidance's ECC P-256 SRK template (restricted
/// decrypt, AES-128-CFB, owner hierarchy, empty unique), so the same TPM always derives the same
/// key and its Name identifies the TPM's owner seed.
fn primary_template() -> TPM2B_PUBLIC {
    public(TPMT_PUBLIC {
        type_: TPM2_ALG_ECC,
        nameAlg: TPM2_ALG_SHA256,
        objectAttributes: TPMA_OBJECT_FIXEDTPM
            | TPMA_OBJECT_FIXEDPARENT
            | TPMA_OBJECT_SENSITIVEDATAORIGIN
            | TPMA_OBJECT_USERWITHAUTH
            | TPMA_OBJECT_NODA
            | TPMA_OBJECT_RESTRICTED
            | TPMA_OBJECT_DECRYPT,
        authPolicy: TPM2B_DIGEST::default(),
        parameters: TPMU_PUBLIC_PARMS {
            eccDetail: TPMS_ECC_PARMS {
                symmetric: TPMT_SYM_DEF_OBJECT {
                    algorithm: TPM2_ALG_AES,
                    keyBits: TPMU_SYM_KEY_BITS { aes: 128 },
                    mode: TPMU_SYM_MODE { aes: TPM2_ALG_CFB },
                },
                scheme: TPMT_ECC_SCHEME {
                    scheme: TPM2_ALG_NULL,
                    ..Default::default()
                },
                curveID: TPM2_ECC_NIST_P256,
                kdf: TPMT_KDF_SCHEME {
                    scheme: TPM2_ALG_NULL,
                    ..Default::default()
                },
            },
        },
        unique: TPMU_PUBLIC_ID {
            ecc: TPMS_ECC_POINT::default(),
        },
    })
}

/// A sealed data object: keyed-hash, no scheme, data supplied by us (so no sensitiveDataOrigin),
/// bound to this TPM and parent, empty auth (the wrapping by the primary is the protection).
fn sealed_template() -> TPM2B_PUBLIC {
    public(TPMT_PUBLIC {
        type_: TPM2_ALG_KEYEDHASH,
        nameAlg: TPM2_ALG_SHA256,
        objectAttributes: TPMA_OBJECT_FIXEDTPM
            | TPMA_OBJECT_FIXEDPARENT
            | TPMA_OBJECT_USERWITHAUTH
            | TPMA_OBJECT_NODA,
        authPolicy: TPM2B_DIGEST::default(),
        parameters: TPMU_PUBLIC_PARMS {
            keyedHashDetail: TPMS_KEYEDHASH_PARMS {
                scheme: TPMT_KEYEDHASH_SCHEME {
                    scheme: TPM2_ALG_NULL,
                    ..Default::default()
                },
            },
        },
        unique: TPMU_PUBLIC_ID {
            keyedHash: TPM2B_DIGEST::default(),
        },
    })
}

/// The machine key: ECC P-256 generated inside the TPM, never exportable, usable for ECDSA
/// (scheme given per `TPM2_Sign`) and ECDH (`TPM2_ECDH_ZGen`): both uses need scheme NULL.
fn machine_key_template() -> TPM2B_PUBLIC {
    public(TPMT_PUBLIC {
        type_: TPM2_ALG_ECC,
        nameAlg: TPM2_ALG_SHA256,
        objectAttributes: TPMA_OBJECT_FIXEDTPM
            | TPMA_OBJECT_FIXEDPARENT
            | TPMA_OBJECT_SENSITIVEDATAORIGIN
            | TPMA_OBJECT_USERWITHAUTH
            | TPMA_OBJECT_NODA
            | TPMA_OBJECT_SIGN_ENCRYPT
            | TPMA_OBJECT_DECRYPT,
        authPolicy: TPM2B_DIGEST::default(),
        parameters: TPMU_PUBLIC_PARMS {
            eccDetail: TPMS_ECC_PARMS {
                symmetric: TPMT_SYM_DEF_OBJECT {
                    algorithm: TPM2_ALG_NULL,
                    ..Default::default()
                },
                scheme: TPMT_ECC_SCHEME {
                    scheme: TPM2_ALG_NULL,
                    ..Default::default()
                },
                curveID: TPM2_ECC_NIST_P256,
                kdf: TPMT_KDF_SCHEME {
                    scheme: TPM2_ALG_NULL,
                    ..Default::default()
                },
            },
        },
        unique: TPMU_PUBLIC_ID {
            ecc: TPMS_ECC_POINT::default(),
        },
    })
}

/// Frees an ESAPI-allocated output when dropped (`Esys_Free`), after zeroizing it.
struct EsysBox<T>(*mut T);

impl<T: Copy> EsysBox<T> {
    fn get(&self) -> Option<T> {
        // SAFETY: the pointer is either null or an output the ESAPI allocated and initialized
        // for type `T`; `T: Copy` is plain C data.
        unsafe { self.0.as_ref().copied() }
    }
}

impl<T> Drop for EsysBox<T> {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the pointer came from the ESAPI (malloc'd, `size_of::<T>()` bytes, not yet
            // freed, owned by us): zeroing it is in bounds, and `Esys_Free` is its deallocator.
            unsafe {
                std::ptr::write_bytes(self.0, 0, 1);
                Esys_Free(self.0.cast());
            }
        }
    }
}

/// An ESYS context on its own TCTI connection. Not `Sync`: every method takes `&mut self`.
pub(super) struct Esys {
    ctx: *mut ESYS_CONTEXT,
    tcti: *mut TSS2_TCTI_CONTEXT,
    /// The storage primary key and its Name, once created (see [`Esys::primary`]).
    primary: Option<(ESYS_TR, Vec<u8>)>,
    /// Salted HMAC session for parameter encryption, once started (see [`Esys::session`]).
    session: Option<ESYS_TR>,
}

// SAFETY: the ESYS and TCTI contexts have no thread affinity (no thread-local state; the TCTI is
// a socket or a file descriptor), so moving them to another thread is sound. They are not safe to
// use from two threads at once, which `Esys` prevents by not being `Sync` and requiring `&mut
// self` for every call (the owner keeps it behind a `Mutex`).
unsafe impl Send for Esys {}

impl std::fmt::Debug for Esys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Esys").finish_non_exhaustive()
    }
}

impl Drop for Esys {
    fn drop(&mut self) {
        // Without a resource manager (`swtpm:`, `/dev/tpm0`) transient objects outlive the
        // connection: flush ours so restarts do not fill the TPM's few object slots.
        self.forget_objects();
        // SAFETY: both contexts were initialized by `open` and are finalized exactly once, the
        // ESYS context first since it uses the TCTI.
        unsafe {
            Esys_Finalize(&mut self.ctx);
            Tss2_TctiLdr_Finalize(&mut self.tcti);
        }
    }
}

impl Esys {
    /// Connects through the TCTI loader (`device:/dev/tpmrm0`, `swtpm:host=…,port=…`, `tabrmd`, …).
    pub(super) fn open(tcti_conf: &str) -> Result<Self, EsysError> {
        let conf = CString::new(tcti_conf).map_err(|_| EsysError {
            command: "Tss2_TctiLdr_Initialize",
            rc: 0x000a_000b,
        })?;
        let mut tcti = null_mut();
        // SAFETY: `conf` is a valid NUL-terminated string; `tcti` is a valid out pointer.
        let rc = unsafe { Tss2_TctiLdr_Initialize(conf.as_ptr(), &mut tcti) };
        EsysError::check("Tss2_TctiLdr_Initialize", rc)?;
        let mut ctx = null_mut();
        // SAFETY: `tcti` was just initialized and outlives the ESYS context (finalized after it
        // in `Drop`); a null ABI version means "the library's own".
        let rc = unsafe { Esys_Initialize(&mut ctx, tcti, null_mut()) };
        if let Err(e) = EsysError::check("Esys_Initialize", rc) {
            // SAFETY: `tcti` is initialized and not used after this.
            unsafe { Tss2_TctiLdr_Finalize(&mut tcti) };
            return Err(e);
        }
        Ok(Self {
            ctx,
            tcti,
            primary: None,
            session: None,
        })
    }

    /// The storage primary key (created in the owner hierarchy on first use, then kept loaded)
    /// and its Name.
    pub(super) fn primary(&mut self) -> Result<(Handle, &[u8]), EsysError> {
        if self.primary.is_none() {
            let handle = self.create_primary()?;
            match self.name(handle) {
                Ok(name) => self.primary = Some((handle.0, name)),
                Err(e) => {
                    let _ = self.flush(handle);
                    return Err(e);
                }
            }
        }
        match &self.primary {
            Some((handle, name)) => Ok((Handle(*handle), name.as_slice())),
            None => Err(EsysError {
                command: "TPM2_CreatePrimary",
                rc: INTERNAL_RC,
            }),
        }
    }

    fn create_primary(&mut self) -> Result<Handle, EsysError> {
        let sensitive = TPM2B_SENSITIVE_CREATE::default();
        let template = primary_template();
        let mut handle = ESYS_TR_NONE;
        // SAFETY: all input pointers are valid for the call; null outputs are allowed by the
        // ESAPI ("not required"); `handle` is a valid out pointer.
        let rc = unsafe {
            Esys_CreatePrimary(
                self.ctx,
                ESYS_TR_RH_OWNER,
                ESYS_TR_PASSWORD,
                ESYS_TR_NONE,
                ESYS_TR_NONE,
                &sensitive,
                &template,
                &Default::default(),
                &Default::default(),
                &mut handle,
                null_mut(),
                null_mut(),
                null_mut(),
                null_mut(),
            )
        };
        EsysError::check("TPM2_CreatePrimary", rc)?;
        Ok(Handle(handle))
    }

    /// Flushes the session and the primary (errors ignored: after a TPM reset they are gone
    /// already), so the next command starts afresh.
    pub(super) fn forget_objects(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = self.flush(Handle(session));
        }
        if let Some((primary, _)) = self.primary.take() {
            let _ = self.flush(Handle(primary));
        }
    }

    fn name(&mut self, handle: Handle) -> Result<Vec<u8>, EsysError> {
        let mut name: *mut TPM2B_NAME = null_mut();
        // SAFETY: `handle` is a live ESYS_TR of this context; `name` is a valid out pointer.
        let rc = unsafe { Esys_TR_GetName(self.ctx, handle.0, &mut name) };
        let name = EsysBox(name);
        EsysError::check("Esys_TR_GetName", rc)?;
        let name = name.get().ok_or(EsysError {
            command: "Esys_TR_GetName",
            rc: INTERNAL_RC,
        })?;
        let len = usize::from(name.size).min(name.name.len());
        Ok(name.name[..len].to_vec())
    }

    /// A salted HMAC session keyed by the primary, started once and reused, with AES-128-CFB
    /// parameter encryption of the first command parameter (`decrypt`) and/or the first
    /// response parameter (`encrypt`): sealed data, unsealed data and ECDH results never cross
    /// the bus (or the TCTI socket) in clear. The TPM refuses a direction for a command that has
    /// no such parameter, hence the per-command choice.
    fn session(&mut self, decrypt: bool, encrypt: bool) -> Result<ESYS_TR, EsysError> {
        let session = match self.session {
            Some(s) => s,
            None => {
                let (primary, _) = self.primary()?;
                let s = self.start_session(primary)?;
                self.session = Some(s);
                s
            }
        };
        let mut attrs = TPMA_SESSION_CONTINUESESSION;
        if decrypt {
            attrs |= TPMA_SESSION_DECRYPT;
        }
        if encrypt {
            attrs |= TPMA_SESSION_ENCRYPT;
        }
        // SAFETY: `session` is a live session handle of this context.
        let rc = unsafe { Esys_TRSess_SetAttributes(self.ctx, session, attrs, 0xff) };
        EsysError::check("Esys_TRSess_SetAttributes", rc)?;
        Ok(session)
    }

    fn start_session(&mut self, primary: Handle) -> Result<ESYS_TR, EsysError> {
        let symmetric = TPMT_SYM_DEF {
            algorithm: TPM2_ALG_AES,
            keyBits: TPMU_SYM_KEY_BITS { aes: 128 },
            mode: TPMU_SYM_MODE { aes: TPM2_ALG_CFB },
        };
        let mut session = ESYS_TR_NONE;
        // SAFETY: `primary` is a live handle (the salt is encrypted to it); a null nonceCaller
        // lets the ESAPI pick a random one; `symmetric` and `session` are valid pointers.
        let rc = unsafe {
            Esys_StartAuthSession(
                self.ctx,
                primary.0,
                ESYS_TR_NONE,
                ESYS_TR_NONE,
                ESYS_TR_NONE,
                ESYS_TR_NONE,
                null(),
                TPM2_SE_HMAC,
                &symmetric,
                TPM2_ALG_SHA256,
                &mut session,
            )
        };
        EsysError::check("TPM2_StartAuthSession", rc)?;
        Ok(session)
    }

    /// Creates a child of the primary: a sealed object holding `data`, or a machine key.
    pub(super) fn create(
        &mut self,
        kind: ObjectKind,
        data: &[u8],
    ) -> Result<ObjectBlob, EsysError> {
        let (primary, _) = self.primary()?;
        let session = self.session(true, false)?;
        let template = match kind {
            ObjectKind::Sealed => sealed_template(),
            ObjectKind::MachineKey => machine_key_template(),
        };
        let mut sensitive = TPM2B_SENSITIVE_CREATE {
            size: 0,
            sensitive: TPMS_SENSITIVE_CREATE {
                userAuth: Default::default(),
                data: TPM2B_SENSITIVE_DATA {
                    size: 0,
                    buffer: [0; 256],
                },
            },
        };
        let len = data.len().min(MAX_SEALED_LEN);
        sensitive.sensitive.data.buffer[..len].copy_from_slice(&data[..len]);
        sensitive.sensitive.data.size = len as u16;
        let mut private: *mut TPM2B_PRIVATE = null_mut();
        let mut public: *mut TPM2B_PUBLIC = null_mut();
        // SAFETY: input pointers are valid for the call; `private`/`public` are valid out
        // pointers whose results are owned (and freed) by `EsysBox` below; other outputs null.
        let rc = unsafe {
            Esys_Create(
                self.ctx,
                primary.0,
                session,
                ESYS_TR_NONE,
                ESYS_TR_NONE,
                &sensitive,
                &template,
                &Default::default(),
                &Default::default(),
                &mut private,
                &mut public,
                null_mut(),
                null_mut(),
                null_mut(),
            )
        };
        sensitive.sensitive.data.buffer.zeroize();
        let (private, public) = (EsysBox(private), EsysBox(public));
        EsysError::check("TPM2_Create", rc)?;
        match (public.get(), private.get()) {
            (Some(public), Some(private)) => Ok(ObjectBlob { public, private }),
            _ => Err(EsysError {
                command: "TPM2_Create",
                rc: INTERNAL_RC,
            }),
        }
    }

    /// Loads `blob` under the primary, runs `f` with its handle, and flushes it whatever happens.
    pub(super) fn with_loaded<T, E: From<EsysError>>(
        &mut self,
        blob: &ObjectBlob,
        f: impl FnOnce(&mut Self, Handle) -> Result<T, E>,
    ) -> Result<T, E> {
        let (primary, _) = self.primary()?;
        let session = self.session(true, false)?;
        let mut handle = ESYS_TR_NONE;
        // SAFETY: `blob`'s structs are valid inputs; `handle` is a valid out pointer.
        let rc = unsafe {
            Esys_Load(
                self.ctx,
                primary.0,
                session,
                ESYS_TR_NONE,
                ESYS_TR_NONE,
                &blob.private,
                &blob.public,
                &mut handle,
            )
        };
        EsysError::check("TPM2_Load", rc)?;
        let handle = Handle(handle);
        let out = f(self, handle);
        let flushed = self.flush(handle);
        let out = out?;
        flushed?;
        Ok(out)
    }

    /// Flushes a transient object or session from the TPM and forgets its ESYS_TR.
    pub(super) fn flush(&mut self, handle: Handle) -> Result<(), EsysError> {
        // SAFETY: `handle` is an ESYS_TR of this context; it is not used after this call.
        let rc = unsafe { Esys_FlushContext(self.ctx, handle.0) };
        EsysError::check("TPM2_FlushContext", rc)
    }

    /// `TPM2_Unseal` of a loaded sealed object.
    pub(super) fn unseal(&mut self, item: Handle) -> Result<Zeroizing<Vec<u8>>, EsysError> {
        let session = self.session(false, true)?;
        let mut out: *mut TPM2B_SENSITIVE_DATA = null_mut();
        // SAFETY: `item` is a loaded object; `out` is a valid out pointer owned by `EsysBox`.
        let rc = unsafe {
            Esys_Unseal(
                self.ctx,
                item.0,
                session,
                ESYS_TR_NONE,
                ESYS_TR_NONE,
                &mut out,
            )
        };
        let out = EsysBox(out);
        EsysError::check("TPM2_Unseal", rc)?;
        let mut data = out.get().ok_or(EsysError {
            command: "TPM2_Unseal",
            rc: INTERNAL_RC,
        })?;
        let len = usize::from(data.size).min(data.buffer.len());
        let secret = Zeroizing::new(data.buffer[..len].to_vec());
        data.buffer.zeroize();
        Ok(secret)
    }

    /// `TPM2_Sign` with ECDSA/SHA-256 over a caller-computed digest; returns `(r, s)`.
    pub(super) fn sign_ecdsa_sha256(
        &mut self,
        key: Handle,
        digest: &[u8; 32],
    ) -> Result<([u8; P256_LEN], [u8; P256_LEN]), EsysError> {
        const CMD: &str = "TPM2_Sign";
        let session = self.session(false, false)?;
        let mut in_digest = TPM2B_DIGEST {
            size: 32,
            ..Default::default()
        };
        in_digest.buffer[..32].copy_from_slice(digest);
        let scheme = TPMT_SIG_SCHEME {
            scheme: TPM2_ALG_ECDSA,
            details: TPMU_SIG_SCHEME {
                ecdsa: TPMS_SCHEME_HASH {
                    hashAlg: TPM2_ALG_SHA256,
                },
            },
        };
        // A NULL ticket: allowed because the key is not restricted.
        let validation = TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        };
        let mut sig: *mut TPMT_SIGNATURE = null_mut();
        // SAFETY: inputs are valid for the call; `sig` is a valid out pointer owned by `EsysBox`.
        let rc = unsafe {
            Esys_Sign(
                self.ctx,
                key.0,
                session,
                ESYS_TR_NONE,
                ESYS_TR_NONE,
                &in_digest,
                &scheme,
                &validation,
                &mut sig,
            )
        };
        let sig = EsysBox(sig);
        EsysError::check(CMD, rc)?;
        let sig = sig.get().ok_or(EsysError {
            command: CMD,
            rc: INTERNAL_RC,
        })?;
        if sig.sigAlg != TPM2_ALG_ECDSA {
            return Err(EsysError {
                command: CMD,
                rc: INTERNAL_RC,
            });
        }
        // SAFETY: `sigAlg` is ECDSA, so `ecdsa` is the member the ESAPI filled.
        let ecc: TPMS_SIGNATURE_ECC = unsafe { sig.signature.ecdsa };
        let (mut r, mut s) = ([0u8; P256_LEN], [0u8; P256_LEN]);
        copy_left_padded(&ecc.signatureR, &mut r).ok_or(EsysError {
            command: CMD,
            rc: INTERNAL_RC,
        })?;
        copy_left_padded(&ecc.signatureS, &mut s).ok_or(EsysError {
            command: CMD,
            rc: INTERNAL_RC,
        })?;
        Ok((r, s))
    }

    /// `TPM2_ECDH_ZGen`: the x-coordinate of `key`'s private scalar times the peer point.
    pub(super) fn ecdh_zgen(
        &mut self,
        key: Handle,
        peer_x: &[u8; P256_LEN],
        peer_y: &[u8; P256_LEN],
    ) -> Result<Zeroizing<[u8; P256_LEN]>, EsysError> {
        const CMD: &str = "TPM2_ECDH_ZGen";
        let session = self.session(true, true)?;
        let in_point = TPM2B_ECC_POINT {
            size: 0,
            point: TPMS_ECC_POINT {
                x: ecc_parameter(peer_x),
                y: ecc_parameter(peer_y),
            },
        };
        let mut out: *mut TPM2B_ECC_POINT = null_mut();
        // SAFETY: `in_point` is valid for the call; `out` is a valid out pointer owned by `EsysBox`.
        let rc = unsafe {
            Esys_ECDH_ZGen(
                self.ctx,
                key.0,
                session,
                ESYS_TR_NONE,
                ESYS_TR_NONE,
                &in_point,
                &mut out,
            )
        };
        let out = EsysBox(out);
        EsysError::check(CMD, rc)?;
        let mut point = out.get().ok_or(EsysError {
            command: CMD,
            rc: INTERNAL_RC,
        })?;
        let mut z = Zeroizing::new([0u8; P256_LEN]);
        let copied = copy_left_padded(&point.point.x, z.as_mut());
        point.point.x.buffer.zeroize();
        point.point.y.buffer.zeroize();
        copied.ok_or(EsysError {
            command: CMD,
            rc: INTERNAL_RC,
        })?;
        Ok(z)
    }

    /// Flushes every transient object and loaded session in the TPM. Only for a TPM reached
    /// without a resource manager (swtpm socket, `/dev/tpm0`), which admits one client at a
    /// time: whatever is loaded then was left by a predecessor that died without flushing
    /// (kill -9), and would otherwise fill the TPM's few object slots.
    pub(super) fn flush_leftovers(&mut self) -> Result<usize, EsysError> {
        /// TPM2_CAP_HANDLES; first transient object handle; first loaded session handle.
        const CAP_HANDLES: u32 = 0x0000_0001;
        const TRANSIENT_FIRST: u32 = 0x8000_0000;
        const LOADED_SESSION_FIRST: u32 = 0x0200_0000;
        let mut flushed = 0;
        for first in [TRANSIENT_FIRST, LOADED_SESSION_FIRST] {
            let mut more = 0u8;
            let mut data: *mut TPMS_CAPABILITY_DATA = null_mut();
            // SAFETY: `more` and `data` are valid out pointers; `data` is freed by `EsysBox`.
            let rc = unsafe {
                Esys_GetCapability(
                    self.ctx,
                    ESYS_TR_NONE,
                    ESYS_TR_NONE,
                    ESYS_TR_NONE,
                    CAP_HANDLES,
                    first,
                    64,
                    &mut more,
                    &mut data,
                )
            };
            let data = EsysBox(data);
            EsysError::check("TPM2_GetCapability", rc)?;
            let Some(data) = data.get() else { continue };
            // SAFETY: for TPM2_CAP_HANDLES the TPM fills the `handles` member of the union.
            let handles = unsafe { data.data.handles };
            let count = (handles.count as usize).min(handles.handle.len());
            for &tpm_handle in &handles.handle[..count] {
                let mut tr: ESYS_TR = ESYS_TR_NONE;
                // SAFETY: `tr` is a valid out pointer; the handle comes from the TPM itself.
                let rc = unsafe {
                    Esys_TR_FromTPMPublic(
                        self.ctx,
                        tpm_handle,
                        ESYS_TR_NONE,
                        ESYS_TR_NONE,
                        ESYS_TR_NONE,
                        &mut tr,
                    )
                };
                if EsysError::check("Esys_TR_FromTPMPublic", rc).is_ok() {
                    // SAFETY: `tr` was just created for this context and is not used afterwards.
                    let rc = unsafe { Esys_FlushContext(self.ctx, tr) };
                    if EsysError::check("TPM2_FlushContext", rc).is_ok() {
                        flushed += 1;
                    }
                }
            }
        }
        Ok(flushed)
    }

    /// `TPM2_ReadClock` (no authorization needed).
    pub(super) fn read_clock(&mut self) -> Result<TPMS_TIME_INFO, EsysError> {
        let mut out: *mut TPMS_TIME_INFO = null_mut();
        // SAFETY: `out` is a valid out pointer owned by `EsysBox`.
        let rc =
            unsafe { Esys_ReadClock(self.ctx, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &mut out) };
        let out = EsysBox(out);
        EsysError::check("TPM2_ReadClock", rc)?;
        out.get().ok_or(EsysError {
            command: "TPM2_ReadClock",
            rc: INTERNAL_RC,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed_blob() -> Vec<u8> {
        let mut private = TPM2B_PRIVATE {
            size: 4,
            ..Default::default()
        };
        private.buffer[..4].copy_from_slice(b"wrap");
        let blob = ObjectBlob {
            public: sealed_template(),
            private,
        };
        blob.marshal().unwrap()
    }

    #[test]
    fn blobs_read_back_as_the_bytes_stored() {
        let bytes = sealed_blob();
        let blob = ObjectBlob::unmarshal(&bytes).unwrap();
        assert!(blob.has_template(ObjectKind::Sealed));
        assert_eq!(blob.marshal().unwrap(), bytes);
        // Trailing bytes, and input longer than any blob, are refused before parsing.
        assert!(ObjectBlob::unmarshal(&[bytes.as_slice(), &[0]].concat()).is_none());
        let mut huge = bytes.clone();
        huge.resize(MAX_BLOB_BODY_LEN + 1, 0);
        assert!(ObjectBlob::unmarshal(&huge).is_none());
        // A public area whose size prefix claims two more bytes than its fields take, the two
        // bytes supplied: not the form the marshaller writes.
        let public_len = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
        let mut loose = bytes.clone();
        loose[..2].copy_from_slice(&u16::try_from(public_len + 2).unwrap().to_be_bytes());
        loose.splice(2 + public_len..2 + public_len, [0, 0]);
        assert!(ObjectBlob::unmarshal(&loose).is_none());
    }
}
