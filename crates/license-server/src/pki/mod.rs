//! The server's internal certificate authority: one client certificate per machine,
//! `CN = client_id:machine_id` (seed 004), plus the server's own TLS certificate.
//!
//! Machines preferably send a CSR for a key they generated (in the TPM where there is one) so
//! that the server never sees their private key; the seed's mode, where the server generates
//! the key and returns it once, stays available. The CSR is used for its public key and its
//! proof of possession only: subject, extensions and validity are always set by the server.
//!
//! The server's TLS certificate is renewed with the key it already has
//! ([`CertificateAuthority::renew_server_certificate`]), so the SPKI pin agents hold stays valid.

use std::net::IpAddr;

use rand::RngCore as _;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateSigningRequestParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use crate::clock::Timestamp;
use license_protocol::identity::MachineIdentity;

/// Clock skew tolerated between the server and a freshly enrolled machine.
const NOT_BEFORE_BACKDATE_SECS: i64 = 300;
/// Lifetime of the CA certificate.
const CA_VALIDITY_DAYS: i64 = 20 * 365;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    #[error("CSR is not a valid PEM PKCS#10 request with a supported key and a valid signature")]
    InvalidCsr,
    #[error("CSR is larger than {0} bytes")]
    CsrTooLarge(usize),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("stored CA material is unusable: {0}")]
    BadCaMaterial(String),
    #[error("certificate is unusable: {0}")]
    BadCertificate(String),
}

/// The validity window of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: Timestamp,
    pub not_after: Timestamp,
}

impl Validity {
    /// The point at 2/3 of the lifetime, when the certificate is due for renewal.
    pub fn renew_at(&self) -> Timestamp {
        let life = self.not_after.0.saturating_sub(self.not_before.0).max(0);
        self.not_before.plus_secs(life / 3 * 2)
    }
}

fn parse_der(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, PkiError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))
}

/// The validity window of a DER certificate.
pub fn validity_of(der: &[u8]) -> Result<Validity, PkiError> {
    let cert = parse_der(der)?;
    Ok(Validity {
        not_before: Timestamp(cert.validity().not_before.timestamp()),
        not_after: Timestamp(cert.validity().not_after.timestamp()),
    })
}

/// Lowercase hex of a DER certificate's serial, as stored.
pub fn serial_of(der: &[u8]) -> Result<String, PkiError> {
    Ok(hex::encode(parse_der(der)?.raw_serial()))
}

/// The raw public key (the SubjectPublicKeyInfo's bit string) of the first certificate in
/// `pem`, comparable with [`MachineCsr::public_key_raw`].
pub fn public_key_raw_of_pem(pem: &str) -> Result<Vec<u8>, PkiError> {
    let der = crate::datadir::pem_first_der(pem)
        .ok_or_else(|| PkiError::BadCertificate("no PEM certificate".into()))?;
    public_key_raw_of_der(&der)
}

/// The SubjectPublicKeyInfo (DER) of the first certificate in `pem`.
pub fn spki_der_of_pem(pem: &str) -> Result<Vec<u8>, PkiError> {
    let der = crate::datadir::pem_first_der(pem)
        .ok_or_else(|| PkiError::BadCertificate("no PEM certificate".into()))?;
    Ok(parse_der(&der)?.public_key().raw.to_vec())
}

/// The raw public key of a DER certificate.
pub fn public_key_raw_of_der(der: &[u8]) -> Result<Vec<u8>, PkiError> {
    let cert = parse_der(der)?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// Whether the CA certificate `ca_der` signed the certificate `der` (name and signature).
pub fn signed_by(der: &[u8], ca_der: &[u8]) -> bool {
    let (Ok(cert), Ok(ca)) = (parse_der(der), parse_der(ca_der)) else {
        return false;
    };
    cert.issuer().as_raw() == ca.subject().as_raw()
        && cert.verify_signature(Some(ca.public_key())).is_ok()
}

/// A certificate just issued.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    pub pem: String,
    pub der: Vec<u8>,
    /// Lowercase hex of the DER serial number, as stored and as parsed back from requests.
    pub serial: String,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
}

/// A parsed, signature-checked CSR: only its public key is used.
pub struct MachineCsr(CertificateSigningRequestParams);

impl std::fmt::Debug for MachineCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MachineCsr")
    }
}

impl MachineCsr {
    /// Parses a PEM CSR and checks its self-signature (proof that the sender holds the key).
    pub fn parse_pem(pem: &str) -> Result<Self, PkiError> {
        if pem.len() > license_protocol::enroll::MAX_CSR_LEN {
            return Err(PkiError::CsrTooLarge(license_protocol::enroll::MAX_CSR_LEN));
        }
        CertificateSigningRequestParams::from_pem(pem)
            .map(Self)
            .map_err(|_| PkiError::InvalidCsr)
    }

    /// The requested public key, raw (the SubjectPublicKeyInfo's bit string).
    pub fn public_key_raw(&self) -> &[u8] {
        rcgen::PublicKeyData::der_bytes(&self.0.public_key)
    }
}

/// Where the machine's public key comes from.
#[derive(Debug)]
pub enum MachineKey<'a> {
    Csr(&'a MachineCsr),
    /// Generated by the server (seed mode); the caller returns it to the machine once.
    ServerGenerated(&'a KeyPair),
}

/// The CA: its certificate and signing key.
pub struct CertificateAuthority {
    cert: Certificate,
    key: KeyPair,
    cert_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

fn random_serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    // Positive and without a leading zero byte, so the DER INTEGER is exactly these 16 bytes
    // and the hex we store is the hex a parser reads back.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    (SerialNumber::from_slice(&bytes), hex::encode(bytes))
}

fn window(validity: Duration) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(OffsetDateTime::now_utc());
    // Short test lifetimes are backdated by a tenth of their life at most, so that 2/3 of the
    // life (when agents renew) still lies ahead.
    let backdate = NOT_BEFORE_BACKDATE_SECS.min(validity.whole_seconds() / 10);
    (now - Duration::seconds(backdate), now + validity)
}

/// Parameters of a server TLS certificate.
fn server_params(
    cn: &str,
    dns_names: &[String],
    ips: &[IpAddr],
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Ok(params)
}

impl CertificateAuthority {
    /// A new CA with a fresh P-256 key.
    pub fn generate(name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "License Secret Agent");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        (params.not_before, params.not_after) = window(Duration::days(CA_VALIDITY_DAYS));
        params.serial_number = Some(random_serial().0);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(Self {
            cert,
            key,
            cert_pem,
        })
    }

    /// Loads the CA written by `license-server init`.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| PkiError::BadCaMaterial(format!("CA key: {e}")))?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)
            .map_err(|e| PkiError::BadCaMaterial(format!("CA certificate: {e}")))?;
        let der = crate::datadir::pem_first_der(cert_pem)
            .ok_or_else(|| PkiError::BadCaMaterial("CA certificate: no PEM certificate".into()))?;
        if public_key_raw_of_der(&der)? != key.public_key_raw() {
            return Err(PkiError::BadCaMaterial(
                "ca.pem and ca.key do not belong together".into(),
            ));
        }
        // Re-signing the parsed parameters gives an issuer with the same name and key; the
        // certificate handed to machines is always the original `cert_pem`.
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert,
            key,
            cert_pem: cert_pem.to_string(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key in PEM, for `init` to write (0600). Zeroized on drop.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.key.serialize_pem())
    }

    /// `next`'s name and key signed by this CA: the cross-certificate through which machines
    /// that trust only this CA verify chains under `next` (`server_trust`).
    pub fn cross_sign(&self, next: &CertificateAuthority) -> Result<String, PkiError> {
        let mut params = next.cert.params().clone();
        params.serial_number = Some(random_serial().0);
        Ok(params.signed_by(&next.key, &self.cert, &self.key)?.pem())
    }

    /// Whether this CA signed the DER certificate `der`.
    pub fn signed(&self, der: &[u8]) -> bool {
        signed_by(der, self.cert.der())
    }

    /// The server's TLS certificate (a new P-256 key), valid for the given names and addresses.
    pub fn issue_server_certificate(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<(IssuedCertificate, KeyPair), PkiError> {
        let key = KeyPair::generate()?;
        let cn = dns_names.first().map_or("license-server", String::as_str);
        let params = server_params(cn, dns_names, ips)?;
        let issued = self.sign(params, &key, validity)?;
        Ok((issued, key))
    }

    /// A fresh server TLS certificate for the same key, name and addresses as `current_der`:
    /// the SPKI pin agents hold does not change.
    pub fn renew_server_certificate(
        &self,
        current_der: &[u8],
        key_pem: &str,
        validity: Duration,
    ) -> Result<IssuedCertificate, PkiError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| PkiError::BadCertificate(format!("server key: {e}")))?;
        if public_key_raw_of_der(current_der)? != key.public_key_raw() {
            return Err(PkiError::BadCertificate(
                "server.pem and server.key do not belong together".into(),
            ));
        }
        self.reissue_server_certificate(current_der, &key, validity)
    }

    /// A server TLS certificate for `key` with the name and addresses of `template_der` (the
    /// certificate served so far, maybe for another key: a TLS key switch).
    pub fn reissue_server_certificate(
        &self,
        template_der: &[u8],
        key: &KeyPair,
        validity: Duration,
    ) -> Result<IssuedCertificate, PkiError> {
        use x509_parser::extensions::GeneralName;
        let current = parse_der(template_der)?;
        let cn = current
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or("license-server")
            .to_string();
        let (mut dns_names, mut ips) = (Vec::new(), Vec::new());
        if let Ok(Some(san)) = current.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => dns_names.push((*dns).to_string()),
                    GeneralName::IPAddress(bytes) => {
                        if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                            ips.push(IpAddr::from(v4));
                        } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                            ips.push(IpAddr::from(v6));
                        }
                    }
                    _ => {}
                }
            }
        }
        let params = server_params(&cn, &dns_names, &ips)?;
        self.sign(params, key, validity)
    }

    /// A machine's client certificate, `CN = client_id:machine_id`, client-auth only.
    pub fn issue_machine_certificate(
        &self,
        identity: &MachineIdentity,
        key: MachineKey<'_>,
        validity: Duration,
    ) -> Result<IssuedCertificate, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.to_string());
        dn.push(DnType::OrganizationName, "License Secret Agent machine");
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        match key {
            MachineKey::Csr(csr) => self.sign(params, &csr.0.public_key, validity),
            MachineKey::ServerGenerated(pair) => self.sign(params, pair, validity),
        }
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        validity: Duration,
    ) -> Result<IssuedCertificate, PkiError> {
        let (serial_number, serial) = random_serial();
        params.serial_number = Some(serial_number);
        params.use_authority_key_identifier_extension = true;
        (params.not_before, params.not_after) = window(validity);
        let expires_at = Timestamp(params.not_after.unix_timestamp());
        let cert = params.signed_by(public_key, &self.cert, &self.key)?;
        Ok(IssuedCertificate {
            pem: cert.pem(),
            der: cert.der().to_vec(),
            serial,
            issued_at: Timestamp::now(),
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    fn identity() -> MachineIdentity {
        "550e8400-e29b-41d4-a716-446655440000:6ba7b810-9dad-11d1-80b4-00c04fd430c8"
            .parse()
            .unwrap()
    }

    #[test]
    fn machine_certificate_from_csr_chains_to_reloaded_ca() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let reloaded = CertificateAuthority::load(ca.cert_pem(), &ca.key_pem()).unwrap();

        let machine_key = KeyPair::generate().unwrap();
        let csr_pem = CertificateParams::default()
            .serialize_request(&machine_key)
            .unwrap()
            .pem()
            .unwrap();
        let csr = MachineCsr::parse_pem(&csr_pem).unwrap();
        let issued = reloaded
            .issue_machine_certificate(&identity(), MachineKey::Csr(&csr), Duration::days(1))
            .unwrap();

        let (_, cert) = parse_x509_certificate(&issued.der).unwrap();
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap();
        assert_eq!(cn, identity().to_string());
        assert_eq!(hex::encode(cert.raw_serial()), issued.serial);
        assert_eq!(cert.public_key().raw, machine_key.public_key_der());
        let ca_der = ::pem::parse(ca.cert_pem()).unwrap();
        let (_, ca_cert) = parse_x509_certificate(ca_der.contents()).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    }

    #[test]
    fn server_certificate_renews_with_same_key_names_and_pin() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let ips = ["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        let (first, key) = ca
            .issue_server_certificate(&["localhost".into()], &ips, Duration::days(30))
            .unwrap();
        let renewed = ca
            .renew_server_certificate(&first.der, &key.serialize_pem(), Duration::days(90))
            .unwrap();
        assert_ne!(renewed.serial, first.serial);
        let pin = |der: &[u8]| license_protocol::pin::CertPin::of_certificate_der(der).unwrap();
        assert_eq!(pin(&renewed.der), pin(&first.der));
        let (_, cert) = parse_x509_certificate(&renewed.der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 3);
        let v = validity_of(&renewed.der).unwrap();
        assert_eq!(
            v.not_after.0 - v.not_before.0,
            90 * 86_400 + NOT_BEFORE_BACKDATE_SECS
        );
        assert!(v.renew_at() > v.not_before && v.renew_at() < v.not_after);
        // Another key than the certificate's is refused.
        let other = KeyPair::generate().unwrap();
        assert!(ca
            .renew_server_certificate(&first.der, &other.serialize_pem(), Duration::days(1))
            .is_err());
    }

    #[test]
    fn refuses_garbage_and_oversized_csrs() {
        assert!(matches!(
            MachineCsr::parse_pem("garbage"),
            Err(PkiError::InvalidCsr)
        ));
        let huge = "A".repeat(license_protocol::enroll::MAX_CSR_LEN + 1);
        assert!(matches!(
            MachineCsr::parse_pem(&huge),
            Err(PkiError::CsrTooLarge(_))
        ));
    }
}

#[cfg(test)]
mod robustness {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Untrusted CSR text never panics the parser, and garbage is refused.
        #[test]
        fn csr_parser_refuses_garbage(body in proptest::collection::vec(any::<u8>(), 0..600)) {
            use base64::Engine as _;
            let pem = format!(
                "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
                base64::engine::general_purpose::STANDARD.encode(&body)
            );
            prop_assert!(MachineCsr::parse_pem(&pem).is_err());
        }
    }

    #[test]
    fn peer_certificate_parser_never_panics() {
        for len in 0..64 {
            let _ = crate::http::listener::PeerCertificate::parse(&vec![0x30; len]);
        }
    }
}
