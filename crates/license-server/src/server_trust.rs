//! The server's TLS key and CA rollovers, and what agents are told of them (DESIGN.md §4b,
//! docs/OPERATIONS.md "Rolling the TLS key over" and "Rolling the CA over").
//!
//! `ca.pem`/`ca.key` are always the current CA and `server.pem`/`server.key` the key served
//! now; `server-trust.json` (0600) holds the rest of the story:
//!
//! - the *next* TLS key (`admin keys rotate-tls`), announced to agents ahead of the switch so
//!   they accept either key, and the pins switched away from (`admin keys switch-tls`), which
//!   agents refuse from then on;
//! - the *previous* CA (`admin keys rotate-ca`), still trusted for machine certificates it
//!   issued until `admin keys retire-ca`, and the cross-certificate of the current CA signed by
//!   it, which `server.pem` carries after the leaf so that agents that trust only the previous
//!   CA still verify the server; the CAs retired.
//!
//! Every multi-file step is journaled: the step is written to `server-trust.json` first
//! (`tls_switch_from`, `ca_switch`), then the key and certificate files are replaced one by one
//! (each atomically), then the journal entry is cleared. [`finish`] completes an interrupted
//! step and is run by every process that loads the data directory, so a crash at any point
//! leaves a directory that the next start completes (tests abort the process at each step
//! with `LICENSE_SERVER_TEST_CRASH_AT`: `rollover.journaled`, `rollover.half_written`,
//! `rollover.files_written`). [`finish`] also makes `server.pem` agree with the keys: issued
//! by the current CA, for `server.key`, followed by the cross-certificate while there is one.
//!
//! The announcement agents fetch (`GET /api/v1/server-trust`, [`Announcement`]) is computed
//! from these files when the server starts; it is signed per request by the license keys.
//! Serving processes read the files at start: after a rollover step, restart them (replicas
//! with their own data directory get a copy of the files first).

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use license_protocol::pin::CertPin;
use license_protocol::server_trust::{AnnouncedCa, AnnouncedPin, CaState, PinState, ServerTrust};
use rcgen::KeyPair;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::datadir::{pem_first_der, DataDir};
use crate::key_files;
use crate::pki::{self, CertificateAuthority, PkiError};
use crate::service::keys::test_crash;

/// File name inside the data directory.
pub const FILE_NAME: &str = "server-trust.json";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RolloverError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Malformed { path: String, message: String },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(
        "a next TLS key ({0}) is already announced: switch to it with `admin keys switch-tls` \
         once agents have learned it"
    )]
    AlreadyStaged(CertPin),
    #[error(
        "no next TLS key is announced: run `admin keys rotate-tls` first and let agents learn it"
    )]
    NothingStaged,
    #[error(
        "the previous CA (serial {0}) is still trusted: retire it with `admin keys retire-ca` \
         before rolling the CA over again"
    )]
    PreviousCaTrusted(String),
    #[error("there is no previous CA to retire")]
    NoPreviousCa,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RolloverError + '_ {
    move |source| RolloverError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A private key in PEM: zeroized on drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivatePem(Zeroizing<String>);

impl std::fmt::Debug for PrivatePem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivatePem(..)")
    }
}

impl Serialize for PrivatePem {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PrivatePem {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self(Zeroizing::new(String::deserialize(d)?)))
    }
}

/// A CA being made current (journal of `rotate-ca`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagedCa {
    pub cert_pem: String,
    pub key_pem: PrivatePem,
}

/// `server-trust.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollovers {
    /// Unix seconds of the last step: the announcement's `issued_at`.
    #[serde(default)]
    pub issued_at: i64,
    /// The TLS key announced ahead of the switch.
    #[serde(default)]
    pub next_tls_key: Option<PrivatePem>,
    /// Journal: a switch to `next_tls_key` away from this pin has begun.
    #[serde(default)]
    pub tls_switch_from: Option<CertPin>,
    /// Pins switched away from.
    #[serde(default)]
    pub retired_pins: Vec<CertPin>,
    /// The CA rolled over from, PEM.
    #[serde(default)]
    pub previous_ca: Option<String>,
    /// The current CA signed by the previous one, PEM.
    #[serde(default)]
    pub cross_certificate: Option<String>,
    /// Journal: a rollover to this CA has begun.
    #[serde(default)]
    pub ca_switch: Option<StagedCa>,
    /// CAs retired, PEM.
    #[serde(default)]
    pub retired_cas: Vec<String>,
}

impl Rollovers {
    /// The file's contents, or none of it yet.
    pub fn load(dir: &DataDir) -> Result<Self, RolloverError> {
        let path = dir.root().join(FILE_NAME);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| RolloverError::Malformed {
                path: path.display().to_string(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn save(&self, dir: &DataDir) -> Result<(), RolloverError> {
        let text = Zeroizing::new(serde_json::to_vec_pretty(self).expect("rollovers serialize"));
        key_files::replace(dir.root(), FILE_NAME, &text, 0o600)
            .map_err(|(path, e)| io_err(&path)(e))
    }

    fn touch(&mut self, now: i64) {
        self.issued_at = now.max(self.issued_at + 1);
    }

    /// The pin of the next TLS key, if one is announced.
    pub fn next_pin(&self) -> Result<Option<CertPin>, RolloverError> {
        self.next_tls_key
            .as_ref()
            .map(|k| pin_of_key(&k.0))
            .transpose()
    }
}

/// The SPKI pin of a PEM private key.
fn pin_of_key(pem: &str) -> Result<CertPin, RolloverError> {
    let key =
        KeyPair::from_pem(pem).map_err(|e| PkiError::BadCertificate(format!("TLS key: {e}")))?;
    Ok(CertPin::of_spki_der(&key.public_key_der()))
}

fn read(path: &Path) -> Result<Zeroizing<String>, RolloverError> {
    std::fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(io_err(path))
}

fn write(dir: &DataDir, path: &Path, text: &str, mode: u32) -> Result<(), RolloverError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("data directory file names are UTF-8");
    key_files::replace(dir.root(), name, text.as_bytes(), mode)
        .map_err(|(path, e)| io_err(&path)(e))
}

/// PEM of one DER certificate.
fn der_to_pem(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// `admin keys rotate-tls`: a new TLS key, announced as next. Returns its pin.
pub fn stage_tls(dir: &DataDir, now: i64) -> Result<CertPin, RolloverError> {
    let mut r = Rollovers::load(dir)?;
    if let Some(pin) = r.next_pin()? {
        return Err(RolloverError::AlreadyStaged(pin));
    }
    let key = KeyPair::generate().map_err(PkiError::from)?;
    let pin = CertPin::of_spki_der(&key.public_key_der());
    r.next_tls_key = Some(PrivatePem(Zeroizing::new(key.serialize_pem())));
    r.touch(now);
    r.save(dir)?;
    Ok(pin)
}

/// `admin keys switch-tls`: the next key is served from the next start on, with a fresh
/// certificate; the old pin is announced retired. Returns (old pin, new pin).
pub fn switch_tls(
    dir: &DataDir,
    validity_days: u32,
    now: i64,
) -> Result<(CertPin, CertPin), RolloverError> {
    let mut r = Rollovers::load(dir)?;
    let new = r.next_pin()?.ok_or(RolloverError::NothingStaged)?;
    let old = match r.tls_switch_from {
        Some(old) => old, // an interrupted switch, run again
        None => served_pin(dir)?,
    };
    r.tls_switch_from = Some(old);
    r.touch(now);
    r.save(dir)?;
    test_crash("rollover.journaled");
    finish(dir, validity_days)?;
    Ok((old, new))
}

/// What `rotate-ca` did.
#[derive(Debug, Clone)]
pub struct CaRollover {
    pub previous_serial: String,
    pub current_serial: String,
}

/// `admin keys rotate-ca`: a new CA becomes current (machine certificates move to it at their
/// next renewal; the server's certificate at once, followed by the cross-certificate); the
/// current one becomes previous, still trusted.
pub fn rotate_ca(dir: &DataDir, validity_days: u32, now: i64) -> Result<CaRollover, RolloverError> {
    let mut r = Rollovers::load(dir)?;
    if r.ca_switch.is_none() {
        if let Some(previous) = &r.previous_ca {
            return Err(RolloverError::PreviousCaTrusted(serial_of_pem(previous)?));
        }
        let current = CertificateAuthority::load(&read(&dir.ca_cert())?, &read(&dir.ca_key())?)?;
        let next = CertificateAuthority::generate(&format!(
            "License Secret Agent CA {}",
            crate::datadir::short_random()
        ))?;
        r.cross_certificate = Some(current.cross_sign(&next)?);
        r.previous_ca = Some(current.cert_pem().to_string());
        r.ca_switch = Some(StagedCa {
            cert_pem: next.cert_pem().to_string(),
            key_pem: PrivatePem(next.key_pem()),
        });
        r.touch(now);
        r.save(dir)?;
        test_crash("rollover.journaled");
    }
    let staged = r.ca_switch.as_ref().map(|s| s.cert_pem.clone());
    finish(dir, validity_days)?;
    Ok(CaRollover {
        previous_serial: serial_of_pem(r.previous_ca.as_deref().unwrap_or_default())?,
        current_serial: serial_of_pem(staged.as_deref().unwrap_or_default())?,
    })
}

/// `admin keys retire-ca`: the previous CA is no longer trusted; `server.pem` drops the
/// cross-certificate. Returns the retired CA's serial. (Whether certificates still need it is
/// the caller's check: `service::keys::retire_ca`.)
pub fn retire_ca(dir: &DataDir, validity_days: u32, now: i64) -> Result<String, RolloverError> {
    let mut r = Rollovers::load(dir)?;
    let previous = r.previous_ca.take().ok_or(RolloverError::NoPreviousCa)?;
    let serial = serial_of_pem(&previous)?;
    r.retired_cas.push(previous);
    r.cross_certificate = None;
    r.touch(now);
    r.save(dir)?;
    finish(dir, validity_days)?;
    Ok(serial)
}

/// The pin of the key `server.pem` is for.
pub fn served_pin(dir: &DataDir) -> Result<CertPin, RolloverError> {
    let served = read(&dir.server_cert())?;
    let der = pem_first_der(&served)
        .ok_or_else(|| PkiError::BadCertificate("server.pem holds no certificate".into()))?;
    Ok(CertPin::of_certificate_der(&der).map_err(|e| PkiError::BadCertificate(e.to_string()))?)
}

/// Lowercase hex serial of the first certificate in `ca.pem`.
pub fn ca_serial(dir: &DataDir) -> Result<String, RolloverError> {
    serial_of_pem(&read(&dir.ca_cert())?)
}

/// Lowercase hex serial of the first certificate in `pem`.
pub fn serial_of_pem(pem: &str) -> Result<String, RolloverError> {
    let der =
        pem_first_der(pem).ok_or_else(|| PkiError::BadCertificate("no PEM certificate".into()))?;
    Ok(pki::serial_of(&der)?)
}

/// Completes an interrupted rollover step, then makes `server.pem` agree with the keys (see
/// the module docs). Idempotent; writes nothing when everything already agrees.
pub fn finish(dir: &DataDir, validity_days: u32) -> Result<(), RolloverError> {
    let mut r = Rollovers::load(dir)?;
    let mut journal_done = false;
    if let Some(staged) = r.ca_switch.take() {
        if read(&dir.ca_cert())?.trim() != staged.cert_pem.trim() {
            write(dir, &dir.ca_key(), &staged.key_pem.0, 0o600)?;
            test_crash("rollover.half_written");
            write(dir, &dir.ca_cert(), &staged.cert_pem, 0o644)?;
        }
        journal_done = true;
    }
    if let Some(from) = r.tls_switch_from.take() {
        let next = r
            .next_tls_key
            .take()
            .ok_or_else(|| RolloverError::Malformed {
                path: dir.root().join(FILE_NAME).display().to_string(),
                message: "a TLS switch is journaled without a next key".into(),
            })?;
        if *read(&dir.server_key())? != *next.0 {
            write(dir, &dir.server_key(), &next.0, 0o600)?;
            test_crash("rollover.half_written");
        }
        if !r.retired_pins.contains(&from) {
            r.retired_pins.push(from);
        }
        journal_done = true;
    }
    ensure_server_chain(dir, &r, validity_days)?;
    if journal_done {
        test_crash("rollover.files_written");
        r.save(dir)?;
    }
    Ok(())
}

/// Rewrites `server.pem` unless its leaf is for `server.key` and issued by the current CA and
/// the cross-certificate (if any) follows it; the leaf is re-issued only when it must be.
fn ensure_server_chain(
    dir: &DataDir,
    r: &Rollovers,
    validity_days: u32,
) -> Result<(), RolloverError> {
    let ca = CertificateAuthority::load(&read(&dir.ca_cert())?, &read(&dir.ca_key())?)?;
    let key_pem = read(&dir.server_key())?;
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| PkiError::BadCertificate(format!("server key: {e}")))?;
    let served = read(&dir.server_cert())?;
    let leaf = pem_first_der(&served)
        .ok_or_else(|| PkiError::BadCertificate("server.pem holds no certificate".into()))?;
    let leaf_pem = if pki::public_key_raw_of_der(&leaf)? == key.public_key_raw() && ca.signed(&leaf)
    {
        der_to_pem(&leaf)
    } else {
        ca.reissue_server_certificate(&leaf, &key, time::Duration::days(validity_days.into()))?
            .pem
    };
    let chain = with_cross(&leaf_pem, r.cross_certificate.as_deref());
    if normalized(&chain) != normalized(&served) {
        write(dir, &dir.server_cert(), &chain, 0o644)?;
    }
    Ok(())
}

/// `leaf` followed by the cross-certificate, if any: what `server.pem` holds.
pub fn with_cross(leaf: &str, cross: Option<&str>) -> String {
    let mut chain = leaf.trim_end().to_string();
    chain.push('\n');
    if let Some(cross) = cross {
        chain.push_str(cross.trim_end());
        chain.push('\n');
    }
    chain
}

/// The DER certificates of a PEM text, to compare chains whatever their line breaks.
fn normalized(pem: &str) -> Vec<Vec<u8>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .filter_map(Result::ok)
        .map(|c| c.to_vec())
        .collect()
}

/// What agents are told (`GET /api/v1/server-trust`), computed at start; signed per request.
#[derive(Debug, Clone)]
pub struct Announcement {
    pub pins: Vec<AnnouncedPin>,
    pub cas: Vec<AnnouncedCa>,
    pub issued_at: i64,
    /// [`ServerTrust::digest`], announced in every secret status.
    pub digest: String,
    /// The previous CA, still trusted for machine certificates.
    pub previous_ca: Option<String>,
    /// Follows the leaf in `server.pem` (renewals keep it there).
    pub cross_certificate: Option<String>,
}

impl Announcement {
    /// From the data directory as [`finish`] left it; `served_pin` is the pin of `server.pem`.
    pub fn load(dir: &DataDir, served_pin: CertPin, ca_pem: &str) -> Result<Self, RolloverError> {
        let r = Rollovers::load(dir)?;
        let mut pins = vec![AnnouncedPin::new(served_pin, PinState::Current)];
        if let Some(next) = r.next_pin()? {
            pins.push(AnnouncedPin::new(next, PinState::Next));
        }
        pins.extend(
            r.retired_pins
                .iter()
                .filter(|p| **p != served_pin)
                .map(|p| AnnouncedPin::new(*p, PinState::Retired)),
        );
        let mut cas = vec![AnnouncedCa {
            certificate: ca_pem.to_string(),
            cross_certificate: r.cross_certificate.clone(),
            state: CaState::Current,
        }];
        if let Some(previous) = &r.previous_ca {
            cas.push(AnnouncedCa {
                certificate: previous.clone(),
                cross_certificate: None,
                state: CaState::Previous,
            });
        }
        cas.extend(r.retired_cas.iter().map(|c| AnnouncedCa {
            certificate: c.clone(),
            cross_certificate: None,
            state: CaState::Retired,
        }));
        Ok(Self {
            digest: ServerTrust::digest_of(&pins, &cas, r.issued_at),
            pins,
            cas,
            issued_at: r.issued_at,
            previous_ca: r.previous_ca,
            cross_certificate: r.cross_certificate,
        })
    }

    /// Signed by `signers` (the license keys held).
    pub fn sign(&self, signers: &[&ed25519_dalek::SigningKey]) -> ServerTrust {
        ServerTrust::sign(self.pins.clone(), self.cas.clone(), self.issued_at, signers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;

    fn init() -> (tempfile::TempDir, DataDir) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("data"));
        dir.init(
            &ServerConfig::new("localhost".into()),
            &["localhost".into()],
            &["127.0.0.1".parse().unwrap()],
        )
        .unwrap();
        (tmp, dir)
    }

    fn served(dir: &DataDir) -> (CertPin, usize) {
        let pem = std::fs::read_to_string(dir.server_cert()).unwrap();
        let der = pem_first_der(&pem).unwrap();
        (
            CertPin::of_certificate_der(&der).unwrap(),
            normalized(&pem).len(),
        )
    }

    #[test]
    fn tls_switch_serves_the_announced_key_and_retires_the_old_pin() {
        let (_tmp, dir) = init();
        let (old, _) = served(&dir);
        assert!(matches!(
            switch_tls(&dir, 30, 1),
            Err(RolloverError::NothingStaged)
        ));
        let next = stage_tls(&dir, 10).unwrap();
        assert!(matches!(
            stage_tls(&dir, 11),
            Err(RolloverError::AlreadyStaged(p)) if p == next
        ));
        let a = Announcement::load(&dir, old, "").unwrap();
        assert_eq!(a.pins[1], AnnouncedPin::new(next, PinState::Next));
        assert_eq!(switch_tls(&dir, 30, 20).unwrap(), (old, next));
        assert_eq!(served(&dir).0, next);
        dir.load_keys().unwrap();
        let a = Announcement::load(&dir, next, "").unwrap();
        assert_eq!(
            a.pins,
            vec![
                AnnouncedPin::new(next, PinState::Current),
                AnnouncedPin::new(old, PinState::Retired)
            ]
        );
        assert!(a.issued_at >= 20);
    }

    #[test]
    fn an_interrupted_tls_switch_is_finished_by_the_next_load() {
        let (_tmp, dir) = init();
        let (old, _) = served(&dir);
        let next = stage_tls(&dir, 10).unwrap();
        // The journal written and the key replaced, then the power went: server.pem is still
        // the old key's, which no TLS stack would serve with the new key.
        let mut r = Rollovers::load(&dir).unwrap();
        r.tls_switch_from = Some(old);
        r.save(&dir).unwrap();
        let key = r.next_tls_key.clone().unwrap();
        write(&dir, &dir.server_key(), &key.0, 0o600).unwrap();
        dir.load_keys().unwrap();
        assert_eq!(served(&dir).0, next);
        let r = Rollovers::load(&dir).unwrap();
        assert!(r.tls_switch_from.is_none() && r.next_tls_key.is_none());
        assert_eq!(r.retired_pins, vec![old]);
    }

    #[test]
    fn ca_rollover_cross_signs_reissues_the_server_certificate_and_retires() {
        let (_tmp, dir) = init();
        let (pin, _) = served(&dir);
        let old_ca = std::fs::read_to_string(dir.ca_cert()).unwrap();
        let rolled = rotate_ca(&dir, 30, 10).unwrap();
        assert_ne!(rolled.previous_serial, rolled.current_serial);
        let keys = dir.load_keys().unwrap();
        assert_ne!(keys.ca.cert_pem(), old_ca);
        // Same key (the pin holds), leaf by the new CA, cross-certificate after it.
        assert_eq!(served(&dir), (pin, 2));
        let leaf = pem_first_der(&std::fs::read_to_string(dir.server_cert()).unwrap()).unwrap();
        assert!(keys.ca.signed(&leaf));
        assert!(matches!(
            rotate_ca(&dir, 30, 11),
            Err(RolloverError::PreviousCaTrusted(s)) if s == rolled.previous_serial
        ));
        let a = Announcement::load(&dir, pin, keys.ca.cert_pem()).unwrap();
        assert_eq!(a.cas.len(), 2);
        assert!(a.cas[0].cross_certificate.is_some());
        assert_eq!(a.cas[1].state, CaState::Previous);

        assert_eq!(retire_ca(&dir, 30, 20).unwrap(), rolled.previous_serial);
        assert_eq!(served(&dir), (pin, 1));
        let a = Announcement::load(&dir, pin, keys.ca.cert_pem()).unwrap();
        assert_eq!(a.cas[1].state, CaState::Retired);
        assert!(matches!(
            retire_ca(&dir, 30, 21),
            Err(RolloverError::NoPreviousCa)
        ));
    }

    #[test]
    fn an_interrupted_ca_rollover_is_finished_by_the_next_load() {
        let (_tmp, dir) = init();
        let mut r = Rollovers::load(&dir).unwrap();
        let current = CertificateAuthority::load(
            &std::fs::read_to_string(dir.ca_cert()).unwrap(),
            &std::fs::read_to_string(dir.ca_key()).unwrap(),
        )
        .unwrap();
        let next = CertificateAuthority::generate("next").unwrap();
        r.cross_certificate = Some(current.cross_sign(&next).unwrap());
        r.previous_ca = Some(current.cert_pem().to_string());
        r.ca_switch = Some(StagedCa {
            cert_pem: next.cert_pem().to_string(),
            key_pem: PrivatePem(next.key_pem()),
        });
        r.save(&dir).unwrap();
        // Power cut after the key was written, before ca.pem: the pair does not match.
        write(&dir, &dir.ca_key(), &next.key_pem(), 0o600).unwrap();
        let keys = dir.load_keys().unwrap();
        assert_eq!(keys.ca.cert_pem(), next.cert_pem());
        assert!(Rollovers::load(&dir).unwrap().ca_switch.is_none());
        assert_eq!(served(&dir).1, 2);
    }

    #[test]
    fn debug_never_prints_private_keys() {
        let (_tmp, dir) = init();
        stage_tls(&dir, 1).unwrap();
        let r = Rollovers::load(&dir).unwrap();
        let text = format!("{r:?}");
        assert!(!text.contains("PRIVATE KEY"), "{text}");
    }
}
