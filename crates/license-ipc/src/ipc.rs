//! The local socket protocol between POS applications and the agent (DESIGN.md §3.2).
//!
//! Each message is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON; a
//! connection carries any number of request/response pairs. Frames over [`MAX_FRAME_LEN`] are
//! refused. Requests:
//!
//! ```json
//! {"op": "validate_license", "license_token": "<base64>", "nonce": "<32 hex chars>"}
//! ```
//!
//! Answers: `{"valid": true, "expires_at": "<RFC 3339>"|null, "features": [...], "metadata": {...}, "nonce": "..."}`
//! or `{"valid": false, "reason": "<code>", "nonce": "..."}` with a stable [`Reason`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::stable_codes;

use crate::Nonce;

/// Largest frame payload, in bytes.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Longest `nonce` a refusal echoes, in bytes. A well-formed nonce is 32 characters; a longer
/// string is not echoed, so that no answer can outgrow [`MAX_FRAME_LEN`] by quoting its request.
pub const MAX_ECHOED_NONCE_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of {0} bytes is over the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
}

/// The payload length announced by a frame header.
pub fn frame_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    match len {
        0 => Err(FrameError::Empty),
        n if n > MAX_FRAME_LEN => Err(FrameError::TooLarge(n)),
        n => Ok(n),
    }
}

/// A frame: length header and payload.
pub fn encode_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

stable_codes! {
    /// Stable reason codes of a refused validation or request.
    pub enum Reason {
        /// The token is not a token (bad base64, wrong magic or format, bad claims).
        Malformed => "malformed",
        /// The token does not decrypt under its secret or its signature does not verify (or
        /// names a license key this verifier does not know).
        BadSignature => "bad_signature",
        /// The token is signed by a license key the server retired (and the verifier heard of).
        KeyRetired => "key_retired",
        /// The machine holds no secret of the token's version (never had it, or it is gone).
        UnknownSecretVersion => "unknown_secret_version",
        /// The token's secret version was invalidated by an administrator or the server.
        SecretInvalidated => "secret_invalidated",
        /// The license (or its secret's grace) has expired.
        Expired => "expired",
        /// The license is not valid yet.
        NotYetValid => "not_yet_valid",
        /// The token is for another machine.
        WrongMachine => "wrong_machine",
        /// The license was revoked by the server.
        Revoked => "revoked",
        /// The request's nonce was seen before.
        ReplayedNonce => "replayed_nonce",
        /// Rotation is overdue and degraded mode is forbidden: validations fail closed.
        DegradedModeDisabled => "degraded_mode_disabled",
        /// The server revoked this machine (or its certificate), and the agent's policy
        /// (`on_machine_revoked = "deny"`, the default) fails closed until it is restored.
        MachineRevoked => "machine_revoked",
        /// The request is not valid JSON or misses a field.
        BadRequest => "bad_request",
        /// The `op` is not one this agent knows.
        UnknownOp => "unknown_op",
        /// The frame was larger than the limit.
        FrameTooLarge => "frame_too_large",
        /// The peer's uid/gid is not allowed on this socket.
        NotAuthorized => "not_authorized",
        /// The agent could not answer (e.g. the audit record could not be written).
        Internal => "internal",
    }
}

/// A request, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    ValidateLicense { license_token: String, nonce: Nonce },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ValidateFields {
    #[allow(dead_code)]
    op: String,
    license_token: String,
    nonce: Nonce,
}

/// Why a frame is not a request; each has its reason code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    #[error("not a JSON object: {0}")]
    NotJson(String),
    #[error("unknown op {0:?}")]
    UnknownOp(String),
    #[error("{0}")]
    BadField(String),
}

impl RequestError {
    pub fn reason(&self) -> Reason {
        match self {
            RequestError::UnknownOp(_) => Reason::UnknownOp,
            RequestError::NotJson(_) | RequestError::BadField(_) => Reason::BadRequest,
        }
    }
}

/// Parses one frame's payload. The nonce is returned whenever it can be read and is at most
/// [`MAX_ECHOED_NONCE_LEN`] bytes, so that even a refusal echoes it.
pub fn parse_request(payload: &[u8]) -> Result<Request, (RequestError, Option<String>)> {
    let value: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| (RequestError::NotJson(e.to_string()), None))?;
    let nonce = value
        .get("nonce")
        .and_then(|n| n.as_str())
        .filter(|n| n.len() <= MAX_ECHOED_NONCE_LEN)
        .map(str::to_string);
    let Some(op) = value.get("op").and_then(|o| o.as_str()) else {
        return Err((
            RequestError::BadField("missing string field `op`".into()),
            nonce,
        ));
    };
    match op {
        "validate_license" => {
            let fields: ValidateFields = serde_json::from_value(value.clone())
                .map_err(|e| (RequestError::BadField(e.to_string()), nonce.clone()))?;
            Ok(Request::ValidateLicense {
                license_token: fields.license_token,
                nonce: fields.nonce,
            })
        }
        other => Err((
            RequestError::UnknownOp(other.chars().take(64).collect()),
            nonce,
        )),
    }
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Response {
    Valid(ValidAnswer),
    Invalid(InvalidAnswer),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidAnswer {
    /// Always `true`.
    pub valid: bool,
    /// RFC 3339, or `null` for a license that does not expire.
    pub expires_at: Option<String>,
    pub features: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub nonce: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvalidAnswer {
    /// Always `false`.
    pub valid: bool,
    pub reason: Reason,
    /// The request's nonce when it could be read.
    #[serde(default)]
    pub nonce: Option<String>,
}

impl Response {
    pub fn invalid(reason: Reason, nonce: Option<String>) -> Self {
        Response::Invalid(InvalidAnswer {
            valid: false,
            reason,
            nonce,
        })
    }

    pub fn nonce(&self) -> Option<&str> {
        match self {
            Response::Valid(v) => Some(&v.nonce),
            Response::Invalid(i) => i.nonce.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        assert_eq!(encode_frame(b"{}"), [0, 0, 0, 2, b'{', b'}']);
        assert_eq!(frame_len([0, 0, 0, 2]), Ok(2));
        assert_eq!(frame_len([0, 0, 0, 0]), Err(FrameError::Empty));
        assert_eq!(frame_len([0, 1, 0, 1]), Err(FrameError::TooLarge(65537)));
        assert_eq!(frame_len([0, 1, 0, 0]), Ok(MAX_FRAME_LEN));
    }

    #[test]
    fn requests_and_their_errors() {
        let ok = br#"{"op":"validate_license","license_token":"AAAA","nonce":"00112233445566778899aabbccddeeff"}"#;
        assert!(matches!(
            parse_request(ok),
            Ok(Request::ValidateLicense { .. })
        ));
        let cases: [(&[u8], Reason, bool); 6] = [
            (b"not json", Reason::BadRequest, false),
            (br#"{"op":"format_disk","nonce":"x"}"#, Reason::UnknownOp, true),
            (br#"{"license_token":"A"}"#, Reason::BadRequest, false),
            (br#"{"op":"validate_license","license_token":5,"nonce":"00112233445566778899aabbccddeeff"}"#, Reason::BadRequest, true),
            (br#"{"op":"validate_license","license_token":"A","nonce":"short"}"#, Reason::BadRequest, true),
            (br#"{"op":"validate_license","license_token":"A","nonce":"00112233445566778899aabbccddeeff","x":1}"#, Reason::BadRequest, true),
        ];
        for (payload, reason, has_nonce) in cases {
            let (err, nonce) = parse_request(payload).unwrap_err();
            assert_eq!(err.reason(), reason, "{}", String::from_utf8_lossy(payload));
            assert_eq!(nonce.is_some(), has_nonce);
        }
    }

    #[test]
    fn answers_have_the_documented_shape() {
        let valid = Response::Valid(ValidAnswer {
            valid: true,
            expires_at: None,
            features: vec!["a".into()],
            metadata: BTreeMap::new(),
            nonce: "n".into(),
        });
        let json = serde_json::to_value(&valid).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"valid": true, "expires_at": null, "features": ["a"], "metadata": {}, "nonce": "n"})
        );
        let invalid = Response::invalid(Reason::ReplayedNonce, Some("n".into()));
        let json = serde_json::to_value(&invalid).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"valid": false, "reason": "replayed_nonce", "nonce": "n"})
        );
        assert_eq!(serde_json::from_value::<Response>(json).unwrap(), invalid);
        // A newer agent's code is still a refusal to an older client, not a parse error.
        let newer = serde_json::json!({"valid": false, "reason": "quota_exceeded", "nonce": "n"});
        assert_eq!(
            serde_json::from_value::<Response>(newer).unwrap(),
            Response::invalid(Reason::Unrecognized, Some("n".into()))
        );
    }

    #[test]
    fn a_refusal_never_outgrows_a_frame_by_echoing_its_nonce() {
        // A frame of the largest size, nearly all of it a nonce that is not one.
        let filler = MAX_FRAME_LEN - r#"{"op":"x","nonce":""}"#.len();
        let payload = format!(r#"{{"op":"x","nonce":"{}"}}"#, "a".repeat(filler));
        assert_eq!(payload.len(), MAX_FRAME_LEN);
        let (err, nonce) = parse_request(payload.as_bytes()).unwrap_err();
        assert_eq!(
            nonce, None,
            "a nonce over {MAX_ECHOED_NONCE_LEN} bytes is not echoed"
        );
        let answer = serde_json::to_vec(&Response::invalid(err.reason(), nonce)).unwrap();
        assert!(answer.len() <= MAX_FRAME_LEN);
        // One of the longest echoed nonces is still echoed.
        let payload = format!(
            r#"{{"op":"x","nonce":"{}"}}"#,
            "a".repeat(MAX_ECHOED_NONCE_LEN)
        );
        let (_, nonce) = parse_request(payload.as_bytes()).unwrap_err();
        assert_eq!(nonce.map(|n| n.len()), Some(MAX_ECHOED_NONCE_LEN));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = parse_request(&bytes);
        }
    }
}
