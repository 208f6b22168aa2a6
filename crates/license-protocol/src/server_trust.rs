//! The server's TLS keys and CAs an agent trusts, and how they roll over without touching a
//! till (DESIGN.md §2, docs/PROTOCOL.md "Server trust").
//!
//! An agent starts from what it was enrolled with: the pin of the server's TLS key and the CA
//! certificate. The server announces a [`ServerTrust`] (`GET /api/v1/server-trust`), signed by
//! its license keys (the agent trusts those along a chain of signatures from its own pin,
//! `license_keys`), listing:
//! - the pins of its TLS keys: `current` (served now), `next` (announced ahead of a switch, so
//!   agents accept either), `retired` (switched away from: refused from then on);
//! - its CA certificates: `current` (issues machine certificates and the server's), `previous`
//!   (still trusted until no active certificate needs it), `retired`. A CA the agent does not
//!   hold yet comes with a cross-certificate: the same name and key, signed by a CA the agent
//!   already holds, which is also what the server presents in its chain so that an agent that
//!   has not heard of the new CA still verifies the server.
//!
//! [`AgentTrust::accept`] takes a set only when it is signed by a trusted license key, is not
//! older than the one held, and leaves at least one pin and one CA; retirement is sticky (a pin
//! or CA once seen retired is never trusted again).
//!
//! ```
//! use license_protocol::license_keys::TrustedKeys;
//! use license_protocol::server_trust::{AgentTrust, AnnouncedPin, PinState, ServerTrust};
//! # use license_protocol::pin::CertPin;
//! # let mut ca = rcgen::CertificateParams::default();
//! # ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
//! # let ca_pem = ca.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem();
//! let license_key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
//! let (old, new) = (CertPin::of_spki_der(b"old"), CertPin::of_spki_der(b"new"));
//! let mut trust = AgentTrust::enrolled(old, &ca_pem).unwrap();
//! let announced = ServerTrust::sign(
//!     vec![AnnouncedPin::new(old, PinState::Current), AnnouncedPin::new(new, PinState::Next)],
//!     vec![license_protocol::server_trust::AnnouncedCa::current(&ca_pem)],
//!     10,
//!     &[&license_key],
//! );
//! trust.accept(&announced, &TrustedKeys::pinned(license_key.verifying_key())).unwrap();
//! assert_eq!(trust.pins().len(), 2);
//! ```

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::license_keys::{sign_with, KeySetSignature, TrustedKeys};
use crate::pin::CertPin;

/// Domain string of the announcement's signature.
const DOMAIN: &[u8] = b"lsa/server-trust/v1";

/// Where a TLS key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PinState {
    /// The key the server serves now.
    Current,
    /// Announced ahead of a switch: accepted as well as the current one.
    Next,
    /// Switched away from: refused.
    Retired,
}

/// Where a CA stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CaState {
    /// Issues machine certificates and the server's.
    Current,
    /// Rolled over from; trusted until no active certificate needs it.
    Previous,
    /// No longer trusted.
    Retired,
}

/// One TLS key of the announcement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AnnouncedPin {
    /// `sha256:<base64>` of the key's SubjectPublicKeyInfo.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub pin: CertPin,
    pub state: PinState,
}

impl AnnouncedPin {
    pub fn new(pin: CertPin, state: PinState) -> Self {
        Self { pin, state }
    }
}

/// One CA of the announcement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AnnouncedCa {
    /// The CA's self-signed certificate, PEM.
    pub certificate: String,
    /// The same name and key signed by the CA it rolled over from, PEM: how an agent that
    /// holds only the older CA learns this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_certificate: Option<String>,
    pub state: CaState,
}

impl AnnouncedCa {
    /// A current CA without a cross-certificate.
    pub fn current(pem: &str) -> Self {
        Self {
            certificate: pem.to_string(),
            cross_certificate: None,
            state: CaState::Current,
        }
    }
}

/// `GET /api/v1/server-trust`: the server's TLS keys and CAs, signed by each of its license
/// keys that is not retired, over `"lsa/server-trust/v1" || JSON([pins, cas, issued_at])`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServerTrust {
    pub pins: Vec<AnnouncedPin>,
    pub cas: Vec<AnnouncedCa>,
    /// Unix seconds of the last rollover step; an agent never goes back to an older one.
    pub issued_at: i64,
    pub signatures: Vec<KeySetSignature>,
}

/// Why an announcement was refused (the trust held is kept).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServerTrustError {
    #[error("no valid signature by a license key this agent trusts")]
    Untrusted,
    #[error("the announcement was issued at {offered}, before the one held (issued at {held})")]
    Older { offered: i64, held: i64 },
    #[error("the announcement has no current TLS key, or more than one")]
    NoCurrentPin,
    #[error("the announcement has no current CA, or more than one")]
    NoCurrentCa,
    #[error("CA certificate {0} is not one PEM CA certificate")]
    BadCa(usize),
    #[error("the cross-certificate of CA {0} is not one PEM certificate")]
    BadCross(usize),
    #[error(
        "CA {0} is new to this agent and not cross-signed by a CA it trusts (announced without \
         a cross-certificate, or with one no trusted CA signed)"
    )]
    UnvouchedCa(usize),
    #[error("accepting it would leave no {0} to trust")]
    NothingLeft(&'static str),
}

/// The DER of the single certificate in `pem`.
fn single_der(pem: &str) -> Option<Vec<u8>> {
    let (rest, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let only = rest.iter().all(u8::is_ascii_whitespace);
    (only && parsed.label == "CERTIFICATE").then_some(parsed.contents)
}

/// Hex SHA-256 of a certificate's DER: how a CA is named in [`AgentTrust`].
pub fn fingerprint(der: &[u8]) -> String {
    hex(&Sha256::digest(der))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A parsed CA certificate: its DER, and whether it is a CA.
fn ca_der(pem: &str) -> Option<Vec<u8>> {
    let der = single_der(pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    cert.is_ca().then_some(der)
}

/// Whether `cross` (DER) carries `ca`'s (DER) subject and key and is signed by `issuer` (DER).
fn cross_signed(cross: &[u8], ca: &[u8], issuer: &[u8]) -> bool {
    let parse = |der| {
        x509_parser::parse_x509_certificate(der)
            .ok()
            .map(|(_, c)| c)
    };
    let (Some(cross), Some(ca), Some(issuer)) = (parse(cross), parse(ca), parse(issuer)) else {
        return false;
    };
    cross.subject().as_raw() == ca.subject().as_raw()
        && cross.public_key().raw == ca.public_key().raw
        && cross.issuer().as_raw() == issuer.subject().as_raw()
        && cross.verify_signature(Some(issuer.public_key())).is_ok()
}

impl ServerTrust {
    /// The bytes the signatures cover.
    pub fn signed_bytes(pins: &[AnnouncedPin], cas: &[AnnouncedCa], issued_at: i64) -> Vec<u8> {
        let mut m = DOMAIN.to_vec();
        // Struct fields serialize in declaration order: the form is canonical.
        m.extend_from_slice(
            &serde_json::to_vec(&(pins, cas, issued_at)).expect("announcements serialize"),
        );
        m
    }

    /// Server side: the announcement signed by each of `signers`.
    pub fn sign(
        pins: Vec<AnnouncedPin>,
        cas: Vec<AnnouncedCa>,
        issued_at: i64,
        signers: &[&ed25519_dalek::SigningKey],
    ) -> Self {
        let signatures = sign_with(&Self::signed_bytes(&pins, &cas, issued_at), signers);
        Self {
            pins,
            cas,
            issued_at,
            signatures,
        }
    }

    /// Hex SHA-256 of the signed bytes: what `GET /api/v1/secret-status` announces
    /// (`server_trust`), so an agent fetches the announcement only when it changed.
    pub fn digest_of(pins: &[AnnouncedPin], cas: &[AnnouncedCa], issued_at: i64) -> String {
        hex(&Sha256::digest(Self::signed_bytes(pins, cas, issued_at)))
    }

    pub fn digest(&self) -> String {
        Self::digest_of(&self.pins, &self.cas, self.issued_at)
    }
}

/// The server keys and CAs an agent trusts (`state_dir/server-trust.json`). Public material
/// only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTrust {
    /// The pin this trust started from (enrollment's): a configuration that names another
    /// one was re-enrolled or edited, and starts over from it.
    #[serde(default)]
    enrolled_pin: Option<CertPin>,
    /// Pins the server's key may match.
    pins: Vec<CertPin>,
    /// Pins seen retired: never trusted again.
    retired_pins: Vec<CertPin>,
    /// CA certificates the server's chain may lead to, PEM.
    cas: Vec<String>,
    /// Fingerprints of CAs seen retired.
    retired_cas: Vec<String>,
    /// `issued_at` and digest of the last accepted announcement.
    issued_at: Option<i64>,
    digest: Option<String>,
}

impl AgentTrust {
    /// What enrollment gave: the pin and the CA certificate(s) in `ca_pem`.
    pub fn enrolled(pin: CertPin, ca_pem: &str) -> Result<Self, ServerTrustError> {
        let cas = pem_blocks(ca_pem);
        if cas.is_empty() || cas.iter().any(|c| ca_der(c).is_none()) {
            return Err(ServerTrustError::BadCa(0));
        }
        Ok(Self {
            enrolled_pin: Some(pin),
            pins: vec![pin],
            retired_pins: Vec::new(),
            cas,
            retired_cas: Vec::new(),
            issued_at: None,
            digest: None,
        })
    }

    /// The pin this trust started from.
    pub fn enrolled_pin(&self) -> Option<CertPin> {
        self.enrolled_pin
    }

    pub fn pins(&self) -> &[CertPin] {
        &self.pins
    }

    pub fn retired_pins(&self) -> &[CertPin] {
        &self.retired_pins
    }

    /// The trusted CA certificates, PEM.
    pub fn cas(&self) -> &[String] {
        &self.cas
    }

    /// The trusted CA certificates, DER.
    pub fn ca_ders(&self) -> Vec<Vec<u8>> {
        self.cas.iter().filter_map(|c| single_der(c)).collect()
    }

    /// Digest of the last accepted announcement (`None` while only enrollment's trust is held).
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// Accepts `announced` when `license_keys` vouch for it and it is not older than the last
    /// accepted: its current and next pins and its current and previous CAs become the trusted
    /// ones (less anything seen retired). On refusal nothing changes.
    pub fn accept(
        &mut self,
        announced: &ServerTrust,
        license_keys: &TrustedKeys,
    ) -> Result<(), ServerTrustError> {
        if let Some(held) = self.issued_at {
            if announced.issued_at < held {
                return Err(ServerTrustError::Older {
                    offered: announced.issued_at,
                    held,
                });
            }
        }
        let bytes = ServerTrust::signed_bytes(&announced.pins, &announced.cas, announced.issued_at);
        if !license_keys.vouches(&bytes, &announced.signatures) {
            return Err(ServerTrustError::Untrusted);
        }
        let count = |state| announced.pins.iter().filter(|p| p.state == state).count();
        if count(PinState::Current) != 1 {
            return Err(ServerTrustError::NoCurrentPin);
        }
        if announced
            .cas
            .iter()
            .filter(|c| c.state == CaState::Current)
            .count()
            != 1
        {
            return Err(ServerTrustError::NoCurrentCa);
        }

        let mut retired_pins = self.retired_pins.clone();
        for p in &announced.pins {
            if p.state == PinState::Retired && !retired_pins.contains(&p.pin) {
                retired_pins.push(p.pin);
            }
        }
        let pins: Vec<CertPin> = announced
            .pins
            .iter()
            .filter(|p| p.state != PinState::Retired && !retired_pins.contains(&p.pin))
            .map(|p| p.pin)
            .collect();

        let held: Vec<Vec<u8>> = self.ca_ders();
        let mut retired_cas = self.retired_cas.clone();
        let mut cas = Vec::new();
        for (i, ca) in announced.cas.iter().enumerate() {
            let der = ca_der(&ca.certificate).ok_or(ServerTrustError::BadCa(i))?;
            let print = fingerprint(&der);
            if ca.state == CaState::Retired {
                if !retired_cas.contains(&print) {
                    retired_cas.push(print);
                }
                continue;
            }
            if retired_cas.contains(&print) {
                continue;
            }
            if !held.contains(&der) {
                let cross = ca
                    .cross_certificate
                    .as_deref()
                    .ok_or(ServerTrustError::UnvouchedCa(i))?;
                let cross = single_der(cross).ok_or(ServerTrustError::BadCross(i))?;
                if !held.iter().any(|issuer| cross_signed(&cross, &der, issuer)) {
                    return Err(ServerTrustError::UnvouchedCa(i));
                }
            }
            cas.push(ca.certificate.trim().to_string() + "\n");
        }
        // Retirement announced in this very set applies to CAs listed before it too.
        cas.retain(|pem| single_der(pem).is_some_and(|d| !retired_cas.contains(&fingerprint(&d))));
        if pins.is_empty() {
            return Err(ServerTrustError::NothingLeft("server key"));
        }
        if cas.is_empty() {
            return Err(ServerTrustError::NothingLeft("CA"));
        }
        *self = Self {
            enrolled_pin: self.enrolled_pin,
            pins,
            retired_pins,
            cas,
            retired_cas,
            issued_at: Some(announced.issued_at),
            digest: Some(announced.digest()),
        };
        Ok(())
    }
}

/// The PEM blocks of `text`, each ending in a newline.
fn pem_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("-----BEGIN ") {
            current.clear();
        }
        current.push_str(line);
        current.push('\n');
        if line.starts_with("-----END ") {
            blocks.push(std::mem::take(&mut current));
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    struct Ca {
        params: CertificateParams,
        key: KeyPair,
        pem: String,
    }

    fn ca(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let pem = params.clone().self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    /// `new`'s name and key, signed by `old`.
    fn cross(new: &Ca, old: &Ca) -> String {
        let issuer = old.params.clone().self_signed(&old.key).unwrap();
        new.params
            .clone()
            .signed_by(&new.key, &issuer, &old.key)
            .unwrap()
            .pem()
    }

    fn license_key(n: u8) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[n; 32])
    }

    fn pin(n: u8) -> CertPin {
        CertPin::of_spki_der(&[n])
    }

    fn ann(
        pins: &[(CertPin, PinState)],
        cas: Vec<AnnouncedCa>,
        at: i64,
        by: &ed25519_dalek::SigningKey,
    ) -> ServerTrust {
        ServerTrust::sign(
            pins.iter()
                .map(|(p, s)| AnnouncedPin::new(*p, *s))
                .collect(),
            cas,
            at,
            &[by],
        )
    }

    #[test]
    fn tls_key_rollover_accepts_next_then_refuses_the_old_pin() {
        let (old_ca, lk) = (ca("old"), license_key(1));
        let keys = TrustedKeys::pinned(lk.verifying_key());
        let mut trust = AgentTrust::enrolled(pin(1), &old_ca.pem).unwrap();
        let cas = || vec![AnnouncedCa::current(&old_ca.pem)];

        let staged = ann(
            &[(pin(1), PinState::Current), (pin(2), PinState::Next)],
            cas(),
            10,
            &lk,
        );
        trust.accept(&staged, &keys).unwrap();
        assert_eq!(trust.pins(), &[pin(1), pin(2)]);
        assert_eq!(trust.digest(), Some(staged.digest().as_str()));

        let switched = ann(
            &[(pin(1), PinState::Retired), (pin(2), PinState::Current)],
            cas(),
            20,
            &lk,
        );
        trust.accept(&switched, &keys).unwrap();
        assert_eq!(trust.pins(), &[pin(2)]);
        // Sticky: a later announcement calling the old pin current again does not revive it.
        let revived = ann(
            &[(pin(1), PinState::Next), (pin(2), PinState::Current)],
            cas(),
            30,
            &lk,
        );
        trust.accept(&revived, &keys).unwrap();
        assert_eq!(trust.pins(), &[pin(2)]);
        // Older than held: refused; nothing changes.
        assert_eq!(
            trust.accept(&staged, &keys),
            Err(ServerTrustError::Older {
                offered: 10,
                held: 30
            })
        );
    }

    #[test]
    fn refuses_unsigned_tampered_and_empty_announcements() {
        let (c, lk) = (ca("c"), license_key(1));
        let keys = TrustedKeys::pinned(lk.verifying_key());
        let mut trust = AgentTrust::enrolled(pin(1), &c.pem).unwrap();
        let before = trust.clone();
        let cas = || vec![AnnouncedCa::current(&c.pem)];
        let by_stranger = ann(&[(pin(9), PinState::Current)], cas(), 10, &license_key(2));
        assert_eq!(
            trust.accept(&by_stranger, &keys),
            Err(ServerTrustError::Untrusted)
        );
        let mut tampered = ann(&[(pin(1), PinState::Current)], cas(), 10, &lk);
        tampered.pins[0].pin = pin(9);
        assert_eq!(
            trust.accept(&tampered, &keys),
            Err(ServerTrustError::Untrusted)
        );
        let two_current = ann(
            &[(pin(1), PinState::Current), (pin(2), PinState::Current)],
            cas(),
            10,
            &lk,
        );
        assert_eq!(
            trust.accept(&two_current, &keys),
            Err(ServerTrustError::NoCurrentPin)
        );
        let no_ca = ann(&[(pin(1), PinState::Current)], vec![], 10, &lk);
        assert_eq!(
            trust.accept(&no_ca, &keys),
            Err(ServerTrustError::NoCurrentCa)
        );
        let garbage_ca = ann(
            &[(pin(1), PinState::Current)],
            vec![AnnouncedCa::current("not a certificate")],
            10,
            &lk,
        );
        assert_eq!(
            trust.accept(&garbage_ca, &keys),
            Err(ServerTrustError::BadCa(0))
        );
        assert_eq!(trust, before);
    }

    #[test]
    fn ca_rollover_needs_a_cross_signature_by_a_held_ca() {
        let (old, new, rogue, lk) = (ca("old"), ca("new"), ca("rogue"), license_key(1));
        let keys = TrustedKeys::pinned(lk.verifying_key());
        let mut trust = AgentTrust::enrolled(pin(1), &old.pem).unwrap();
        let pins = [(pin(1), PinState::Current)];
        let with_cross = |cross: Option<String>| {
            vec![
                AnnouncedCa {
                    certificate: new.pem.clone(),
                    cross_certificate: cross,
                    state: CaState::Current,
                },
                AnnouncedCa {
                    certificate: old.pem.clone(),
                    cross_certificate: None,
                    state: CaState::Previous,
                },
            ]
        };
        // No cross-certificate, or one signed by a CA the agent does not hold, or one for
        // another CA: refused.
        for (cross, err) in [
            (None, ServerTrustError::UnvouchedCa(0)),
            (Some(cross(&new, &rogue)), ServerTrustError::UnvouchedCa(0)),
            (Some(cross(&rogue, &old)), ServerTrustError::UnvouchedCa(0)),
        ] {
            let a = ann(&pins, with_cross(cross), 10, &lk);
            assert_eq!(trust.accept(&a, &keys), Err(err));
        }
        let rolled = ann(&pins, with_cross(Some(cross(&new, &old))), 10, &lk);
        trust.accept(&rolled, &keys).unwrap();
        assert_eq!(trust.cas().len(), 2);

        // The old CA retired: dropped, and never taken back.
        let retired = ann(
            &pins,
            vec![
                AnnouncedCa::current(&new.pem),
                AnnouncedCa {
                    certificate: old.pem.clone(),
                    cross_certificate: None,
                    state: CaState::Retired,
                },
            ],
            20,
            &lk,
        );
        trust.accept(&retired, &keys).unwrap();
        assert_eq!(trust.cas(), &[new.pem.trim().to_string() + "\n"]);
        let back = ann(&pins, with_cross(None), 30, &lk);
        trust.accept(&back, &keys).unwrap();
        assert_eq!(trust.cas().len(), 1, "the retired CA stays out");

        // Round trip through the stored form.
        let json = serde_json::to_string(&trust).unwrap();
        assert_eq!(serde_json::from_str::<AgentTrust>(&json).unwrap(), trust);
    }

    #[test]
    fn retiring_every_pin_or_ca_is_refused() {
        let (c, lk) = (ca("c"), license_key(1));
        let keys = TrustedKeys::pinned(lk.verifying_key());
        let mut trust = AgentTrust::enrolled(pin(1), &c.pem).unwrap();
        let switched = ann(
            &[(pin(1), PinState::Retired), (pin(2), PinState::Current)],
            vec![AnnouncedCa::current(&c.pem)],
            10,
            &lk,
        );
        trust.accept(&switched, &keys).unwrap();
        // pin 2 seen retired now, and pin 1 offered as current: nothing left.
        let back = ann(
            &[(pin(2), PinState::Retired), (pin(1), PinState::Current)],
            vec![AnnouncedCa::current(&c.pem)],
            20,
            &lk,
        );
        assert_eq!(
            trust.accept(&back, &keys),
            Err(ServerTrustError::NothingLeft("server key"))
        );
    }
}
