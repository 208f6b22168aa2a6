//! Bootstrap enrollment, `POST /api/public/bootstrap` (seed 004, DESIGN.md §3.1).
//!
//! A machine presents a one-time install token and, preferably, a CSR for a key it generated
//! itself; the server answers with the machine's certificate `CN = client_id:machine_id`, the CA
//! certificate and what the agent pins (server pin, license signing public key). Every field
//! the machine sends is parsed here into a bounded, typed value: control characters, over-long
//! values and unknown fields are refused before any handler sees them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::identity::{ClientId, MachineId};
use crate::pin::CertPin;
use crate::rotation::SignatureError;

/// Longest hostname accepted, in characters (the DNS limit).
pub const MAX_HOSTNAME_LEN: usize = 253;
/// Longest hardware id accepted, in characters.
pub const MAX_HARDWARE_ID_LEN: usize = 128;
/// Longest install token accepted, in characters (tokens issued are 48).
pub const MAX_TOKEN_LEN: usize = 128;
/// Longest CSR accepted, in bytes of PEM.
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// Why a field of an enrollment request was refused. Each names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FieldError {
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is longer than {max} characters")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} contains a control character")]
    ControlCharacter { field: &'static str },
    #[error("{field} contains a character outside [A-Za-z0-9._:-]")]
    BadCharacter { field: &'static str },
    #[error("arch must be one of amd64, arm64, armv7 (got {0:?})")]
    UnknownArch(String),
}

/// Lengths count characters, as the OpenAPI document's `maxLength` does.
fn bounded(field: &'static str, s: &str, max: usize) -> Result<(), FieldError> {
    if s.is_empty() {
        return Err(FieldError::Empty { field });
    }
    if s.chars().count() > max {
        return Err(FieldError::TooLong { field, max });
    }
    if s.chars().any(char::is_control) {
        return Err(FieldError::ControlCharacter { field });
    }
    Ok(())
}

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = FieldError;
            fn try_from(s: String) -> Result<Self, FieldError> {
                let check: fn(&str) -> Result<(), FieldError> = $check;
                check(&s)?;
                Ok(Self(s))
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_newtype!(
    /// A machine's hostname as it reports it: 1..=253 characters, no control characters, no
    /// whitespace at either end.
    Hostname,
    |s| {
        bounded("hostname", s, MAX_HOSTNAME_LEN)?;
        if s.trim() != s {
            return Err(FieldError::BadCharacter { field: "hostname" });
        }
        Ok(())
    }
);

string_newtype!(
    /// A stable hardware identifier (DMI product UUID, `/etc/machine-id`, …):
    /// 1..=128 characters from `[A-Za-z0-9._:-]`.
    HardwareId,
    |s| {
        bounded("hardware_id", s, MAX_HARDWARE_ID_LEN)?;
        if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)) {
            return Err(FieldError::BadCharacter { field: "hardware_id" });
        }
        Ok(())
    }
);

impl fmt::Debug for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hostname({:?})", self.0)
    }
}

impl fmt::Debug for HardwareId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HardwareId({:?})", self.0)
    }
}

string_newtype!(
    /// A one-time install token. Its value is a credential: Debug never prints it.
    InstallToken,
    |s| bounded("token", s, MAX_TOKEN_LEN)
);

impl fmt::Debug for InstallToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InstallToken(<redacted>)")
    }
}

/// CPU architecture of the machine, which picks the agent binary to download.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Arch {
    Amd64,
    Arm64,
    Armv7,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
            Arch::Armv7 => "armv7",
        }
    }

    /// The architecture this program was built for.
    pub fn current() -> Option<Self> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::Amd64),
            "aarch64" => Some(Arch::Arm64),
            "arm" => Some(Arch::Armv7),
            _ => None,
        }
    }
}

/// Every spelling [`Arch::try_from`] accepts, first the canonical ones.
pub const ARCH_NAMES: [&str; 7] = [
    "amd64", "arm64", "armv7", "x86_64", "aarch64", "armv7l", "armhf",
];

/// In the OpenAPI document: a string, one of [`ARCH_NAMES`].
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Arch {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some(
                "CPU architecture; `uname -m` spellings are accepted for the canonical ones",
            ))
            .enum_values(Some(ARCH_NAMES))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Arch {}

impl TryFrom<String> for Arch {
    type Error = FieldError;
    fn try_from(s: String) -> Result<Self, FieldError> {
        // `uname -m` spellings are accepted too, so install.sh can pass them through.
        match s.as_str() {
            "amd64" | "x86_64" => Ok(Arch::Amd64),
            "arm64" | "aarch64" => Ok(Arch::Arm64),
            "armv7" | "armv7l" | "armhf" => Ok(Arch::Armv7),
            _ => Err(FieldError::UnknownArch(s.chars().take(32).collect())),
        }
    }
}

impl From<Arch> for String {
    fn from(a: Arch) -> String {
        a.as_str().to_string()
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /api/public/bootstrap` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct BootstrapRequest {
    /// The one-time install token.
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = String, min_length = 1, max_length = 128,
               pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$")
    )]
    pub token: InstallToken,
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = String, min_length = 1, max_length = 253,
               pattern = r"^[^\s\u0000-\u001F\u007F-\u009F]([^\u0000-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F])?$")
    )]
    pub hostname: Hostname,
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = String, min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9._:-]*$")
    )]
    pub hardware_id: HardwareId,
    pub arch: Arch,
    /// PEM CSR for a key the machine generated itself (preferred). Without it the server
    /// generates the key pair and returns `private_key` once (seed mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(max_length = 16384))]
    pub csr: Option<String>,
    /// Re-enrollment of a machine the server already knows by this hardware id: base64 of a
    /// DER ECDSA P-256 signature, by the key of the machine's latest certificate, over
    /// [`BootstrapRequest::reenrollment_message`]. Without it (or an install token bound to that machine) the
    /// server refuses to let this request take the machine over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_key_signature: Option<String>,
}

impl BootstrapRequest {
    /// What the machine's previous key signs to re-enroll it (`previous_key_signature`): a
    /// domain label, then the SHA-256 of the install token (single use, so a signature cannot
    /// be replayed with another token), the hardware id, and the SHA-256 of the CSR as sent
    /// (empty without one), one per line.
    pub fn reenrollment_message(&self) -> Vec<u8> {
        use sha2::{Digest as _, Sha256};
        let hex = |bytes: &[u8]| -> String {
            Sha256::digest(bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        format!(
            "license-agent re-enrollment v1\n{}\n{}\n{}\n",
            hex(self.token.as_str().as_bytes()),
            self.hardware_id.as_str(),
            hex(self.csr.as_deref().unwrap_or("").as_bytes()),
        )
        .into_bytes()
    }

    /// Sets `previous_key_signature` from an ECDSA signature over
    /// [`Self::reenrollment_message`] (SHA-256 of it, signed wherever the key lives).
    pub fn set_previous_key_signature(&mut self, signature: &p256::ecdsa::Signature) {
        use base64::Engine as _;
        self.previous_key_signature =
            Some(base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes()));
    }

    /// Checks `previous_key_signature` against the SubjectPublicKeyInfo of the machine's
    /// latest certificate.
    pub fn verify_previous_key(&self, spki_der: &[u8]) -> Result<(), SignatureError> {
        use base64::Engine as _;
        use p256::ecdsa::signature::Verifier as _;
        use p256::pkcs8::DecodePublicKey as _;
        let signature = self
            .previous_key_signature
            .as_deref()
            .ok_or(SignatureError::Malformed)?;
        let key = p256::ecdsa::VerifyingKey::from_public_key_der(spki_der)
            .map_err(|_| SignatureError::UnsupportedKey)?;
        let der = base64::engine::general_purpose::STANDARD
            .decode(signature)
            .map_err(|_| SignatureError::Malformed)?;
        let sig = p256::ecdsa::Signature::from_der(&der).map_err(|_| SignatureError::Malformed)?;
        key.verify(&self.reenrollment_message(), &sig)
            .map_err(|_| SignatureError::Invalid)
    }
}

/// `POST /api/public/bootstrap` response.
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BootstrapResponse {
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Uuid))]
    pub client_id: ClientId,
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Uuid))]
    pub machine_id: MachineId,
    /// PEM certificate, `CN = client_id:machine_id`.
    pub certificate: String,
    /// Hex serial of `certificate`.
    pub serial: String,
    /// PEM PKCS#8 private key, only in server-generated-key mode (no CSR sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    /// PEM certificate of the issuing CA.
    pub ca_cert: String,
    /// Base URL of the agent API (mTLS).
    pub api_url: String,
    /// Where the agent binary for this machine's arch is served.
    pub binary_url: String,
    /// RFC 3339 expiry of `certificate`.
    pub expires_at: String,
    /// Pin of the server's TLS key, `sha256:<base64>`.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub server_pin: CertPin,
    /// The license signing public key the agent pins: `ed25519:<base64 of 32 bytes>`.
    pub license_public_key: String,
    /// Single-use credential for [`RecoverRequest`]: lets this machine get a new certificate
    /// for a new key when its TPM was cleared. Stored hashed by the server; kept 0600 by the
    /// agent outside the TPM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_token: Option<String>,
}

/// `POST /api/public/recover`: a machine whose key is gone (TPM cleared) proves who it is with
/// its recovery token and sends a CSR for a new key.
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct RecoverRequest {
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Uuid))]
    pub machine_id: MachineId,
    pub recovery_token: String,
    /// PEM CSR for the machine's new key.
    #[cfg_attr(feature = "openapi", schema(max_length = 16384))]
    pub csr: String,
}

impl fmt::Debug for RecoverRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecoverRequest")
            .field("machine_id", &self.machine_id)
            .finish_non_exhaustive()
    }
}

/// `POST /api/public/recover` response: the new certificate and the next recovery token (the
/// one presented is spent).
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RecoverResponse {
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Uuid))]
    pub client_id: ClientId,
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Uuid))]
    pub machine_id: MachineId,
    pub certificate: String,
    pub serial: String,
    pub expires_at: String,
    pub ca_cert: String,
    pub recovery_token: String,
}

impl fmt::Debug for RecoverResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecoverResponse")
            .field("machine_id", &self.machine_id)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for BootstrapResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapResponse")
            .field("client_id", &self.client_id)
            .field("machine_id", &self.machine_id)
            .field("serial", &self.serial)
            .field(
                "private_key",
                &self.private_key.as_ref().map(|_| "<redacted>"),
            )
            .field("api_url", &self.api_url)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(v: serde_json::Value) -> Result<BootstrapRequest, serde_json::Error> {
        serde_json::from_value(v)
    }

    fn base() -> serde_json::Value {
        json!({"token": "t", "hostname": "pos-01", "hardware_id": "4C4C-44", "arch": "x86_64"})
    }

    #[test]
    fn parses_a_good_request() {
        let r = req(base()).unwrap();
        assert_eq!(r.arch, Arch::Amd64);
        assert!(r.csr.is_none());
        assert_eq!(format!("{:?}", r.token), "InstallToken(<redacted>)");
    }

    #[test]
    fn refuses_bad_fields_naming_them() {
        let cases = [
            (
                "hostname",
                json!("pos\u{7}01"),
                "hostname contains a control character",
            ),
            ("hostname", json!("x".repeat(254)), "hostname is longer"),
            ("hostname", json!(""), "hostname is empty"),
            (
                "hardware_id",
                json!("a b"),
                "hardware_id contains a character",
            ),
            (
                "hardware_id",
                json!("a\nb"),
                "hardware_id contains a control",
            ),
            (
                "hardware_id",
                json!("h".repeat(129)),
                "hardware_id is longer",
            ),
            ("arch", json!("sparc"), "arch must be one of"),
            ("token", json!("t".repeat(129)), "token is longer"),
        ];
        for (field, value, expected) in cases {
            let mut v = base();
            v[field] = value;
            let err = req(v).unwrap_err().to_string();
            assert!(err.contains(expected), "{field}: {err}");
        }
        let mut v = base();
        v["extra"] = json!(1);
        assert!(req(v).unwrap_err().to_string().contains("unknown field"));
    }

    /// Limits count characters, as the OpenAPI document's `maxLength` does: 253 two-byte
    /// characters are a hostname, 254 are not.
    #[test]
    fn lengths_are_in_characters() {
        let mut v = base();
        v["hostname"] = json!("é".repeat(MAX_HOSTNAME_LEN));
        v["token"] = json!("ü".repeat(MAX_TOKEN_LEN));
        assert!(req(v).is_ok());
        let mut v = base();
        v["hostname"] = json!("é".repeat(MAX_HOSTNAME_LEN + 1));
        assert!(req(v).is_err());
    }

    #[test]
    fn every_documented_arch_name_parses() {
        for name in ARCH_NAMES {
            assert!(Arch::try_from(name.to_string()).is_ok(), "{name}");
        }
        for canonical in [Arch::Amd64, Arch::Arm64, Arch::Armv7] {
            assert!(ARCH_NAMES.contains(&canonical.as_str()));
        }
    }
}

#[cfg(test)]
mod robustness {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Arbitrary bytes from the network never panic the request parser.
        #[test]
        fn any_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = serde_json::from_slice::<BootstrapRequest>(&bytes);
        }

        /// Any string in any field either becomes a bounded, control-free value or is refused.
        #[test]
        fn accepted_fields_keep_their_invariants(host in ".{0,300}", hw in ".{0,200}", arch in ".{0,12}") {
            let v = serde_json::json!({"token": "t", "hostname": host, "hardware_id": hw, "arch": arch});
            if let Ok(req) = serde_json::from_value::<BootstrapRequest>(v) {
                prop_assert!(req.hostname.as_str().chars().count() <= MAX_HOSTNAME_LEN);
                prop_assert!(!req.hostname.as_str().chars().any(char::is_control));
                prop_assert!(req.hardware_id.as_str().len() <= MAX_HARDWARE_ID_LEN);
                prop_assert!(req.hardware_id.as_str().bytes().all(|b| b.is_ascii_graphic()));
            }
        }
    }
}

crate::object::objects_only!(BootstrapRequest, RecoverRequest);
