//! The C ABI of the client (`include/license_client.h`), for POS applications in C, C++, C#,
//! Java or Python that load `liblicense_client.so` (`license_client.dll` on Windows) instead of
//! linking Rust.
//!
//! Besides the Windows pipe transport (`transport/windows.rs`), this is the only module of the
//! crate with `unsafe` code: turning C pointers into Rust references. Every function is
//! NULL-safe, never lets a panic cross into C (a panic becomes [`LSA_ERR_INTERNAL`] or NULL),
//! and records a message for [`lsa_last_error`] when it fails.
//!
//! Ownership, as the header documents it: a `lsa_client*` from [`lsa_client_connect`] is freed
//! with [`lsa_client_free`]; a `lsa_validation*` from [`lsa_validate_license`] is freed with
//! [`lsa_validation_free`]; every `const char*` returned by an accessor is borrowed from its
//! `lsa_validation` and lives exactly as long as it; the string of [`lsa_last_error`] lives until
//! the next call into this library on the same thread.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_uint, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::ptr;
use std::time::Duration;

use crate::{Client, ClientConfig, ClientError, Validation};

/// The exchange completed; the verdict is in the `lsa_validation`.
pub const LSA_OK: c_int = 0;
/// A required pointer was NULL, or the token is not UTF-8.
pub const LSA_ERR_INVALID_ARGUMENT: c_int = -1;
/// The agent's socket could not be reached.
pub const LSA_ERR_CONNECT: c_int = -2;
/// Reading from or writing to the socket failed.
pub const LSA_ERR_IO: c_int = -3;
/// The agent did not answer within the timeout.
pub const LSA_ERR_TIMEOUT: c_int = -4;
/// The connection is closed (by the agent, or after an earlier error): connect again.
pub const LSA_ERR_CLOSED: c_int = -5;
/// The agent's answer is not a well-formed answer.
pub const LSA_ERR_MALFORMED: c_int = -6;
/// The answer (or the request) is over the 64 KiB frame limit.
pub const LSA_ERR_FRAME_TOO_LARGE: c_int = -7;
/// The answer does not echo the request's nonce.
pub const LSA_ERR_NONCE_MISMATCH: c_int = -8;
/// A bug in this library (a caught panic).
pub const LSA_ERR_INTERNAL: c_int = -99;

/// `lsa_client`: an open connection to the agent. Opaque to C.
#[derive(Debug)]
pub struct LsaClient {
    client: Client,
}

/// `lsa_validation`: one verdict, with NUL-terminated copies of its strings. Opaque to C.
#[derive(Debug)]
pub struct LsaValidation {
    valid: bool,
    reason: Option<CString>,
    expires_at: Option<CString>,
    features: Vec<CString>,
    metadata: BTreeMap<String, CString>,
}

impl LsaValidation {
    fn new(v: Validation) -> Result<Self, ClientError> {
        let c = |s: String| {
            CString::new(s)
                .map_err(|_| ClientError::Malformed("the answer contains a NUL character".into()))
        };
        Ok(Self {
            valid: v.valid,
            reason: v.reason.map(|r| c(r.as_str().to_string())).transpose()?,
            expires_at: v.expires_at.map(c).transpose()?,
            features: v.features.into_iter().map(c).collect::<Result<_, _>>()?,
            metadata: v
                .metadata
                .into_iter()
                .map(|(k, v)| Ok((k, c(v)?)))
                .collect::<Result<_, ClientError>>()?,
        })
    }
}

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn set_last_error(message: impl std::fmt::Display) {
    let text = message.to_string().replace('\0', " ");
    let c = CString::new(text).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(c));
}

fn code_of(e: &ClientError) -> c_int {
    match e {
        ClientError::Connect { .. } => LSA_ERR_CONNECT,
        ClientError::Io(_) => LSA_ERR_IO,
        ClientError::Timeout => LSA_ERR_TIMEOUT,
        ClientError::Closed => LSA_ERR_CLOSED,
        ClientError::Malformed(_) => LSA_ERR_MALFORMED,
        ClientError::FrameTooLarge(_) | ClientError::RequestTooLarge(_) => LSA_ERR_FRAME_TOO_LARGE,
        ClientError::NonceMismatch => LSA_ERR_NONCE_MISMATCH,
    }
}

/// Runs `f`, turning a panic into `on_panic` and an error message.
fn no_panic<T>(on_panic: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        set_last_error("internal error in license-client (panic)");
        on_panic
    })
}

/// The message of the last failed call on this thread, or NULL if none failed yet.
///
/// The string belongs to the library and stays valid until the next call into the library on
/// the same thread.
#[no_mangle]
pub extern "C" fn lsa_last_error() -> *const c_char {
    no_panic(ptr::null(), || {
        LAST_ERROR.with(|e| e.borrow().as_ref().map_or(ptr::null(), |c| c.as_ptr()))
    })
}

/// Connects to the agent's socket (`NULL`: [`DEFAULT_SOCKET_PATH`](crate::DEFAULT_SOCKET_PATH))
/// with 5 s timeouts. Returns NULL on failure (see [`lsa_last_error`]).
///
/// On Unix the path is any bytes; on Windows it is a pipe name in UTF-8
/// (`\\.\pipe\license-agent`).
///
/// # Safety
/// `socket_path` is NULL or a NUL-terminated string readable for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn lsa_client_connect(socket_path: *const c_char) -> *mut LsaClient {
    // SAFETY: forwarded from this function's contract; 0 means the default timeout.
    unsafe { lsa_client_connect_timeout(socket_path, 0) }
}

/// Like [`lsa_client_connect`], with read and write timeouts of `timeout_ms` milliseconds
/// (0: the default 5 s).
///
/// # Safety
/// `socket_path` is NULL or a NUL-terminated string readable for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn lsa_client_connect_timeout(
    socket_path: *const c_char,
    timeout_ms: c_uint,
) -> *mut LsaClient {
    let path = if socket_path.is_null() {
        None
    } else {
        // SAFETY: non-NULL, and the caller guarantees a NUL-terminated string that outlives the
        // call; it is copied into the config below before returning.
        Some(unsafe { CStr::from_ptr(socket_path) })
    };
    no_panic(ptr::null_mut(), || {
        let mut config = match path.map(socket_path_of) {
            None => ClientConfig::default(),
            Some(Ok(p)) => ClientConfig::new(p),
            Some(Err(e)) => {
                set_last_error(e);
                return ptr::null_mut();
            }
        };
        if timeout_ms > 0 {
            config = config.with_timeout(Duration::from_millis(u64::from(timeout_ms)));
        }
        match Client::connect_with(&config) {
            Ok(client) => Box::into_raw(Box::new(LsaClient { client })),
            Err(e) => {
                set_last_error(&e);
                ptr::null_mut()
            }
        }
    })
}

/// The socket path a C string names: its bytes on Unix.
#[cfg(unix)]
fn socket_path_of(path: &CStr) -> Result<PathBuf, &'static str> {
    use std::os::unix::ffi::OsStrExt as _;
    Ok(std::ffi::OsStr::from_bytes(path.to_bytes()).into())
}

/// The pipe name a C string names: UTF-8 on Windows.
#[cfg(windows)]
fn socket_path_of(path: &CStr) -> Result<PathBuf, &'static str> {
    path.to_str()
        .map(PathBuf::from)
        .map_err(|_| "lsa_client_connect: socket_path is not UTF-8")
}

/// Asks the agent whether `license_token` is valid. Returns `LSA_OK` (0) when the agent
/// answered, valid or not, with the verdict in `*out`; otherwise a negative `LSA_ERR_*` code,
/// `*out` set to NULL (when `out` is not NULL) and a message for [`lsa_last_error`].
///
/// # Safety
/// `client` is NULL or a live pointer from [`lsa_client_connect`] not used by another thread
/// during the call; `license_token` is NULL or a NUL-terminated string; `out` is NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn lsa_validate_license(
    client: *mut LsaClient,
    license_token: *const c_char,
    out: *mut *mut LsaValidation,
) -> c_int {
    if out.is_null() || client.is_null() || license_token.is_null() {
        if !out.is_null() {
            // SAFETY: `out` is non-NULL and writable per the contract.
            unsafe { out.write(ptr::null_mut()) };
        }
        set_last_error("lsa_validate_license: client, license_token and out must not be NULL");
        return LSA_ERR_INVALID_ARGUMENT;
    }
    // SAFETY: `out` is non-NULL and writable per the contract.
    unsafe { out.write(ptr::null_mut()) };
    // SAFETY: non-NULL, from `lsa_client_connect` (contract), so a live, aligned `LsaClient`
    // that no other thread uses during this call: a unique borrow is sound.
    let client = unsafe { &mut *client };
    // SAFETY: non-NULL NUL-terminated string that outlives the call (contract).
    let token = unsafe { CStr::from_ptr(license_token) };
    let result = no_panic(Err(LSA_ERR_INTERNAL), || {
        let token = token.to_str().map_err(|_| {
            set_last_error("lsa_validate_license: license_token is not UTF-8");
            LSA_ERR_INVALID_ARGUMENT
        })?;
        let fail = |e: ClientError| {
            set_last_error(&e);
            code_of(&e)
        };
        let validation = client.client.validate_license(token).map_err(fail)?;
        let validation = LsaValidation::new(validation).map_err(fail)?;
        Ok(Box::into_raw(Box::new(validation)))
    });
    match result {
        Ok(v) => {
            // SAFETY: `out` is non-NULL and writable per the contract.
            unsafe { out.write(v) };
            LSA_OK
        }
        Err(code) => code,
    }
}

/// Borrows a validation from a C pointer.
///
/// # Safety
/// `v` is NULL or a live pointer from [`lsa_validate_license`].
unsafe fn validation<'a>(v: *const LsaValidation) -> Option<&'a LsaValidation> {
    // SAFETY: NULL gives None; otherwise a live, aligned `LsaValidation` (contract) that is only
    // ever read through shared references until `lsa_validation_free`.
    unsafe { v.as_ref() }
}

fn str_ptr(s: Option<&CString>) -> *const c_char {
    s.map_or(ptr::null(), |c| c.as_ptr())
}

/// 1 when the license is valid, 0 when not (or `v` is NULL).
///
/// # Safety
/// `v` is NULL or a live pointer from [`lsa_validate_license`].
#[no_mangle]
pub unsafe extern "C" fn lsa_validation_is_valid(v: *const LsaValidation) -> c_int {
    // SAFETY: forwarded contract.
    let v = unsafe { validation(v) };
    c_int::from(v.is_some_and(|v| v.valid))
}

/// The reason code (e.g. `"revoked"`) of a refusal; NULL when valid or `v` is NULL.
///
/// # Safety
/// `v` is NULL or a live pointer from [`lsa_validate_license`].
#[no_mangle]
pub unsafe extern "C" fn lsa_validation_reason(v: *const LsaValidation) -> *const c_char {
    // SAFETY: forwarded contract.
    let v = unsafe { validation(v) };
    str_ptr(v.and_then(|v| v.reason.as_ref()))
}

/// The license's expiry (RFC 3339); NULL when it does not expire, is not valid, or `v` is NULL.
///
/// # Safety
/// `v` is NULL or a live pointer from [`lsa_validate_license`].
#[no_mangle]
pub unsafe extern "C" fn lsa_validation_expires_at(v: *const LsaValidation) -> *const c_char {
    // SAFETY: forwarded contract.
    let v = unsafe { validation(v) };
    str_ptr(v.and_then(|v| v.expires_at.as_ref()))
}

/// How many features the license grants (0 when not valid or `v` is NULL).
///
/// # Safety
/// `v` is NULL or a live pointer from [`lsa_validate_license`].
#[no_mangle]
pub unsafe extern "C" fn lsa_validation_feature_count(v: *const LsaValidation) -> usize {
    // SAFETY: forwarded contract.
    let v = unsafe { validation(v) };
    v.map_or(0, |v| v.features.len())
}

/// Feature `i` (from 0); NULL when `i` is out of range or `v` is NULL.
///
/// # Safety
/// `v` is NULL or a live pointer from [`lsa_validate_license`].
#[no_mangle]
pub unsafe extern "C" fn lsa_validation_feature(
    v: *const LsaValidation,
    i: usize,
) -> *const c_char {
    // SAFETY: forwarded contract.
    let v = unsafe { validation(v) };
    str_ptr(v.and_then(|v| v.features.get(i)))
}

/// The metadata value under `key`; NULL when absent, or `v` or `key` is NULL.
///
/// # Safety
/// `v` is NULL or a live pointer from [`lsa_validate_license`]; `key` is NULL or a
/// NUL-terminated string readable for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn lsa_validation_metadata(
    v: *const LsaValidation,
    key: *const c_char,
) -> *const c_char {
    // SAFETY: forwarded contract.
    let Some(v) = (unsafe { validation(v) }) else {
        return ptr::null();
    };
    if key.is_null() {
        return ptr::null();
    }
    // SAFETY: non-NULL NUL-terminated string that outlives the call (contract).
    let key = unsafe { CStr::from_ptr(key) };
    let Ok(key) = key.to_str() else {
        return ptr::null();
    };
    str_ptr(v.metadata.get(key))
}

/// Frees a validation and every string borrowed from it. NULL is a no-op.
///
/// # Safety
/// `v` is NULL or a pointer from [`lsa_validate_license`] not freed before and not used after.
#[no_mangle]
pub unsafe extern "C" fn lsa_validation_free(v: *mut LsaValidation) {
    if !v.is_null() {
        // SAFETY: from `Box::into_raw` in `lsa_validate_license`, freed once (contract).
        drop(unsafe { Box::from_raw(v) });
    }
}

/// Closes the connection and frees the client. NULL is a no-op.
///
/// # Safety
/// `client` is NULL or a pointer from [`lsa_client_connect`] not freed before and not used
/// after (nor during, by another thread).
#[no_mangle]
pub unsafe extern "C" fn lsa_client_free(client: *mut LsaClient) {
    if !client.is_null() {
        // SAFETY: from `Box::into_raw` in `lsa_client_connect_timeout`, freed once (contract).
        drop(unsafe { Box::from_raw(client) });
    }
}
