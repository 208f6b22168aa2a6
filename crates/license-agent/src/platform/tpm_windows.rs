//! The TPM on Windows: not driven yet. The same API as the Unix TPM module (`platform/tpm/mod.rs`,
//! tpm2-tss), so the stores and keys above compile unchanged, but [`Tpm::open`] always fails with
//! [`TpmError::Unavailable`] and the agent falls back to the file store, with the `tpm_unavailable`
//! alert and `license_agent_tpm_available 0`, exactly as on a Linux machine without a TPM.
//!
//! The message says whether Windows sees a TPM at all (TBS, `Tbsi_Context_Create`): a till with
//! one is told the agent does not use it yet (docs/WINDOWS.md); the NCrypt Platform Crypto
//! Provider is the way to it and cannot be exercised here (wine has no TPM and its NCrypt is a
//! stub that reports success for anything).
#![allow(unsafe_code)]

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use license_protocol::secret::{EcdhKey, SecretError};
use zeroize::Zeroizing;

/// Recorded primary key Name (Unix TPM module); kept for the API.
pub const PRIMARY_NAME_FILE: &str = "tpm-primary.name";
/// Most bytes a sealed blob may hold (the Unix TPM module's `MAX_SYM_DATA`).
pub const MAX_SEAL_LEN: usize = 128;
/// No blob is ever accepted here.
pub const MAX_BLOB_LEN: usize = 0;

/// What went wrong with the TPM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TpmError {
    #[error("TPM unavailable: {0}")]
    Unavailable(String),
    #[error("TPM storage primary key does not match the recorded one (TPM cleared or replaced)")]
    PrimaryMismatch,
    #[error("TPM blob is malformed")]
    BadBlob,
    #[error("TPM error: {0}")]
    Esys(String),
}

/// The TPM's clock (never read on Windows: there is no [`Tpm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpmClock {
    pub clock_ms: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub safe: bool,
}

/// A TPM connection: none can exist on Windows yet (the type has no value).
#[derive(Debug)]
pub struct Tpm {
    never: Infallible,
}

impl Tpm {
    /// Always [`TpmError::Unavailable`], saying whether Windows reports a TPM.
    pub fn open(tcti: &str, _state_dir: &Path) -> Result<Arc<Tpm>, TpmError> {
        Err(TpmError::Unavailable(format!(
            "{} (tcti {tcti:?} is a Linux setting)",
            windows_tpm_presence()
        )))
    }

    pub fn open_exclusive(tcti: &str, state_dir: &Path) -> Result<Arc<Tpm>, TpmError> {
        Self::open(tcti, state_dir)
    }

    pub fn primary_name(&self) -> &[u8] {
        match self.never {}
    }

    pub fn seal(&self, _data: &[u8]) -> Result<Vec<u8>, TpmError> {
        match self.never {}
    }

    pub fn unseal(&self, _blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        match self.never {}
    }

    pub fn create_machine_key(&self) -> Result<Vec<u8>, TpmError> {
        match self.never {}
    }

    pub fn machine_key(self: &Arc<Self>, _blob: &[u8]) -> Result<TpmMachineKey, TpmError> {
        match self.never {}
    }

    pub fn read_clock(&self) -> Result<TpmClock, TpmError> {
        match self.never {}
    }
}

/// A machine key held by the TPM: none on Windows yet.
#[derive(Debug)]
pub struct TpmMachineKey {
    never: Infallible,
}

impl TpmMachineKey {
    pub fn public_key(&self) -> p256::PublicKey {
        match self.never {}
    }

    pub fn sign_digest(&self, _digest: &[u8; 32]) -> Result<p256::ecdsa::Signature, TpmError> {
        match self.never {}
    }

    pub fn ecdh(&self, _peer: &p256::PublicKey) -> Result<Zeroizing<[u8; 32]>, TpmError> {
        match self.never {}
    }
}

impl EcdhKey for TpmMachineKey {
    fn public_key(&self) -> p256::PublicKey {
        match self.never {}
    }

    fn diffie_hellman(&self, _peer: &p256::PublicKey) -> Result<Zeroizing<[u8; 32]>, SecretError> {
        match self.never {}
    }
}

/// No TPM blob is readable here.
pub fn reencode_blob(_bytes: &[u8]) -> Result<Vec<u8>, TpmError> {
    Err(TpmError::BadBlob)
}

/// What TBS says about the machine's TPM, as a sentence.
fn windows_tpm_presence() -> String {
    use windows_sys::Win32::System::TpmBaseServices::{
        Tbsi_Context_Create, Tbsip_Context_Close, TBS_CONTEXT_PARAMS2, TBS_CONTEXT_VERSION_TWO,
    };
    let params = TBS_CONTEXT_PARAMS2 {
        version: TBS_CONTEXT_VERSION_TWO,
        Anonymous: windows_sys::Win32::System::TpmBaseServices::TBS_CONTEXT_PARAMS2_0 {
            // Bits: requestRaw (0), includeTpm12 (1), includeTpm20 (2).
            asUINT32: 0b100,
        },
    };
    let mut context = std::ptr::null_mut();
    // SAFETY: `params` is a valid TBS_CONTEXT_PARAMS2 that outlives the call (passed as its
    // version-1 prefix, as the API wants); `context` receives a handle closed below.
    let rc = unsafe { Tbsi_Context_Create((&raw const params).cast(), &mut context) };
    if rc == 0 {
        // SAFETY: `context` was just created by a successful call.
        unsafe { Tbsip_Context_Close(context) };
        "Windows reports a TPM 2.0, which this agent does not use yet (docs/WINDOWS.md)".into()
    } else {
        format!("Windows reports no usable TPM (TBS 0x{rc:08x})")
    }
}
