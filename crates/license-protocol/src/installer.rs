//! The Windows installer's trailer: what the server appends to the agent's `.exe` so that the
//! one file a till's administrator runs knows where to enroll and with which one-time token.
//!
//! ```text
//! installer.exe = stub (license-agent.exe, unchanged) ‖ payload ‖ sha256(payload) ‖ len ‖ version ‖ magic
//!   payload   UTF-8 JSON {"server": "https://…", "pin": "sha256:…", "token": "lit_…"},
//!             right-padded with spaces so the whole trailer is a multiple of 8 bytes
//!   sha256    32 bytes, the SHA-256 of the payload bytes as stored (padding included)
//!   len       u32, little-endian: the payload's length in bytes (at most 16 KiB)
//!   version   u16, little-endian: 1
//!   magic     8 bytes: "LSA-INST"
//! ```
//!
//! The trailer is found from the end of the file, so it can sit at the very end of a signed
//! file's certificate table (see [`append`]): signing covers the stub, not the trailer, and one
//! signed stub serves every token. No certificate or key is ever inside: the stub generates the
//! machine key on the till and the token is single-use and short-lived.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::enroll::InstallToken;
use crate::pin::CertPin;

/// The last 8 bytes of an installer.
pub const MAGIC: [u8; 8] = *b"LSA-INST";
/// The one format version this code writes and reads.
pub const VERSION: u16 = 1;
/// The largest payload accepted: a token, a URL and a pin fit in far less.
pub const MAX_PAYLOAD: usize = 16 * 1024;
/// Bytes after the payload: checksum, length, version, magic.
const FOOTER: usize = 32 + 4 + 2 + MAGIC.len();
/// PE's certificate table entries are 8-byte aligned; so is every trailer.
const ALIGN: usize = 8;

/// What the installer needs to enroll: the server (its public listener), its pin, the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallerPayload {
    /// `https://host[:port]` of the server's public listener.
    pub server: String,
    /// The server certificate's key pin (`sha256:<base64>`).
    pub pin: CertPin,
    /// The one-time install token.
    pub token: InstallToken,
}

impl fmt::Debug for InstallerPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstallerPayload")
            .field("server", &self.server)
            .field("pin", &self.pin)
            .field("token", &self.token)
            .finish()
    }
}

/// Why a file holds no usable trailer. The messages are shown to the person running the
/// installer, so they say what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrailerError {
    #[error("this file carries no install token (download the installer from the license server, `admin token create --windows-installer`)")]
    Missing,
    #[error("installer trailer version {0} is not supported by this agent (version 1 is)")]
    UnsupportedVersion(u16),
    #[error("the installer's install token is damaged (length {0} out of bounds): download the installer again")]
    BadLength(u32),
    #[error("the installer's install token is damaged (checksum mismatch): download the installer again")]
    Checksum,
    #[error("the installer's install token is damaged ({0}): download the installer again")]
    BadPayload(String),
    #[error("the server URL {0:?} is not an https:// URL")]
    BadServer(String),
}

impl InstallerPayload {
    fn check(self) -> Result<Self, TrailerError> {
        let rest = self
            .server
            .strip_prefix("https://")
            .ok_or_else(|| TrailerError::BadServer(self.server.clone()))?;
        if rest.is_empty()
            || rest.len() > 255
            || !rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]/".contains(&b))
        {
            return Err(TrailerError::BadServer(self.server.clone()));
        }
        Ok(self)
    }

    /// The trailer bytes to append to a stub (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        // Infallible: every field serializes to a JSON string.
        let mut payload = serde_json::to_vec(self).unwrap_or_default();
        while !(payload.len() + FOOTER).is_multiple_of(ALIGN) {
            payload.push(b' ');
        }
        let mut out = Vec::with_capacity(payload.len() + FOOTER);
        out.extend_from_slice(&payload);
        out.extend_from_slice(&Sha256::digest(&payload));
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&MAGIC);
        out
    }
}

/// An installer split in two: the stub (the agent's own bytes) and what its trailer says.
#[derive(Debug)]
pub struct Installer<'a> {
    pub stub: &'a [u8],
    pub payload: InstallerPayload,
}

/// Reads the trailer at the end of `file`.
pub fn read(file: &[u8]) -> Result<Installer<'_>, TrailerError> {
    let footer_at = file
        .len()
        .checked_sub(FOOTER)
        .ok_or(TrailerError::Missing)?;
    let (head, footer) = file.split_at(footer_at);
    let (sum, footer) = footer.split_at(32);
    let (len, footer) = footer.split_at(4);
    let (version, magic) = footer.split_at(2);
    if magic != MAGIC {
        return Err(TrailerError::Missing);
    }
    let version = u16::from_le_bytes([version[0], version[1]]);
    if version != VERSION {
        return Err(TrailerError::UnsupportedVersion(version));
    }
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
    let size = usize::try_from(len).unwrap_or(usize::MAX);
    if size == 0 || size > MAX_PAYLOAD || size > head.len() {
        return Err(TrailerError::BadLength(len));
    }
    let (stub, payload) = head.split_at(head.len() - size);
    if Sha256::digest(payload).as_slice() != sum {
        return Err(TrailerError::Checksum);
    }
    let payload: InstallerPayload =
        serde_json::from_slice(payload).map_err(|e| TrailerError::BadPayload(json_reason(&e)))?;
    Ok(Installer {
        stub,
        payload: payload.check()?,
    })
}

/// What went wrong in a payload, without quoting it (serde's messages can quote values).
fn json_reason(e: &serde_json::Error) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "not JSON",
        serde_json::error::Category::Data => "a field is missing or invalid",
    };
    format!("{kind} at column {}", e.column())
}

/// Why a stub cannot take a trailer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    #[error("the stub is not a Windows executable (no MZ/PE header)")]
    NotPe,
    #[error("the stub already carries a trailer: give the agent's plain license-agent.exe")]
    AlreadyTagged,
    #[error("the stub's certificate table does not end the file, so a trailer cannot join it")]
    CertificateTableNotLast,
}

/// Appends `payload`'s trailer to `stub`, a Windows PE file.
///
/// An unsigned stub simply gets the trailer at its end. A signed one (Authenticode) has its
/// certificate table last; the trailer then joins that table: the table's size in the PE's
/// data directory grows by the trailer's length (8-byte aligned, as the table's entries are),
/// so the file stays one well-formed signed PE and the signature still verifies, because
/// Authenticode's digest leaves out the certificate table and its directory entry. This is the
/// way "tagged" installers carry per-download data. Windows accepts it unless the
/// `EnableCertPaddingCheck` policy is set on the till; see docs/WINDOWS.md.
pub fn append(stub: &[u8], payload: &InstallerPayload) -> Result<Vec<u8>, AppendError> {
    if read(stub).is_ok() {
        return Err(AppendError::AlreadyTagged);
    }
    let security = security_directory(stub)?;
    let trailer = payload.encode();
    let mut out = Vec::with_capacity(stub.len() + trailer.len() + ALIGN);
    out.extend_from_slice(stub);
    if let Some(dir) = security {
        if dir.size != 0 {
            let end = dir.offset as usize + dir.size as usize;
            if end != stub.len() {
                return Err(AppendError::CertificateTableNotLast);
            }
            while !out.len().is_multiple_of(ALIGN) {
                out.push(0);
            }
            out.extend_from_slice(&trailer);
            let grown = u32::try_from(out.len() - dir.offset as usize)
                .map_err(|_| AppendError::CertificateTableNotLast)?;
            out[dir.entry + 4..dir.entry + 8].copy_from_slice(&grown.to_le_bytes());
            return Ok(out);
        }
    }
    out.extend_from_slice(&trailer);
    Ok(out)
}

/// The PE's certificate table entry (data directory 4): where it points and where the entry is.
struct SecurityDirectory {
    /// File offset of the entry's 8 bytes (offset, size).
    entry: usize,
    offset: u32,
    size: u32,
}

fn security_directory(pe: &[u8]) -> Result<Option<SecurityDirectory>, AppendError> {
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_le_bytes(pe.get(at..at + 2)?.try_into().ok()?))
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(pe.get(at..at + 4)?.try_into().ok()?))
    };
    if pe.get(..2) != Some(b"MZ") {
        return Err(AppendError::NotPe);
    }
    let pe_at = u32_at(0x3c).ok_or(AppendError::NotPe)? as usize;
    if pe.get(pe_at..pe_at + 4) != Some(b"PE\0\0") {
        return Err(AppendError::NotPe);
    }
    let optional = pe_at + 24;
    // PE32 keeps 96 bytes before its data directories, PE32+ (64-bit) 112.
    let directories = match u16_at(optional).ok_or(AppendError::NotPe)? {
        0x10b => optional + 96,
        0x20b => optional + 112,
        _ => return Err(AppendError::NotPe),
    };
    let count = u32_at(directories - 4).ok_or(AppendError::NotPe)?;
    if count <= 4 {
        return Ok(None);
    }
    let entry = directories + 4 * 8;
    let offset = u32_at(entry).ok_or(AppendError::NotPe)?;
    let size = u32_at(entry + 4).ok_or(AppendError::NotPe)?;
    Ok(Some(SecurityDirectory {
        entry,
        offset,
        size,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload() -> InstallerPayload {
        InstallerPayload {
            server: "https://licenses.example:8443".into(),
            pin: CertPin::of_spki_der(b"spki"),
            token: InstallToken::try_from("lit_abcdef".to_string()).unwrap(),
        }
    }

    /// A minimal PE32+ header: MZ, e_lfanew, PE signature, file header, optional header magic
    /// and 16 data directories (all empty unless given).
    fn pe(security: Option<(u32, u32)>, body: usize) -> Vec<u8> {
        let mut f = vec![0u8; 0x200 + body];
        f[..2].copy_from_slice(b"MZ");
        f[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        f[0x80..0x84].copy_from_slice(b"PE\0\0");
        let optional = 0x80 + 24;
        f[optional..optional + 2].copy_from_slice(&0x20bu16.to_le_bytes());
        f[optional + 108..optional + 112].copy_from_slice(&16u32.to_le_bytes());
        if let Some((offset, size)) = security {
            let entry = optional + 112 + 32;
            f[entry..entry + 4].copy_from_slice(&offset.to_le_bytes());
            f[entry + 4..entry + 8].copy_from_slice(&size.to_le_bytes());
        }
        f
    }

    #[test]
    fn round_trips_and_keeps_the_stub_whole() {
        let stub = pe(None, 100);
        let file = append(&stub, &payload()).unwrap();
        assert_eq!((file.len() - stub.len()) % ALIGN, 0);
        let read = read(&file).unwrap();
        assert_eq!(read.stub, &stub[..]);
        assert_eq!(read.payload, payload());
        assert!(!format!("{:?}", read.payload).contains("lit_abcdef"));
    }

    #[test]
    fn a_signed_stub_keeps_its_table_last_and_covering_the_trailer() {
        // A certificate table of 24 bytes at the end of a 0x200 + 0x18 file.
        let stub = pe(Some((0x200, 0x18)), 0x18);
        let file = append(&stub, &payload()).unwrap();
        let dir = security_directory(&file).unwrap().unwrap();
        assert_eq!(dir.offset, 0x200);
        assert_eq!(dir.offset as usize + dir.size as usize, file.len());
        // Only the directory's size changed in the stub's bytes.
        let mut same = file[..stub.len()].to_vec();
        same[dir.entry + 4..dir.entry + 8].copy_from_slice(&0x18u32.to_le_bytes());
        assert_eq!(same, stub);
        assert_eq!(read(&file).unwrap().payload, payload());
    }

    #[test]
    fn refuses_what_it_cannot_tag() {
        assert_eq!(
            append(b"not a pe", &payload()).unwrap_err(),
            AppendError::NotPe
        );
        let stub = pe(Some((0x100, 0x10)), 0);
        assert_eq!(
            append(&stub, &payload()).unwrap_err(),
            AppendError::CertificateTableNotLast
        );
        let tagged = append(&pe(None, 0), &payload()).unwrap();
        assert_eq!(
            append(&tagged, &payload()).unwrap_err(),
            AppendError::AlreadyTagged
        );
    }

    #[test]
    fn refuses_damaged_trailers_with_a_message() {
        let file = append(&pe(None, 10), &payload()).unwrap();
        assert_eq!(read(&pe(None, 10)).unwrap_err(), TrailerError::Missing);
        assert_eq!(read(b"").unwrap_err(), TrailerError::Missing);

        let mut flipped = file.clone();
        let at = file.len() - FOOTER - 5;
        flipped[at] ^= 1;
        assert_eq!(read(&flipped).unwrap_err(), TrailerError::Checksum);

        let mut version = file.clone();
        let at = file.len() - MAGIC.len() - 2;
        version[at] = 9;
        assert_eq!(
            read(&version).unwrap_err(),
            TrailerError::UnsupportedVersion(9)
        );

        let mut long = file.clone();
        let at = file.len() - MAGIC.len() - 6;
        long[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read(&long), Err(TrailerError::BadLength(_))));

        let mut plain = payload();
        plain.server = "http://licenses.example".into();
        let file = append(&pe(None, 0), &plain).unwrap();
        assert!(matches!(read(&file), Err(TrailerError::BadServer(_))));
    }

    #[test]
    fn messages_never_carry_the_token() {
        let mut bad = payload().encode();
        bad[0] = b'x';
        let mut file = pe(None, 0);
        let sum_at = bad.len() - FOOTER;
        let len = u32::from_le_bytes(bad[sum_at + 32..sum_at + 36].try_into().unwrap()) as usize;
        let digest = Sha256::digest(&bad[..len]);
        bad[sum_at..sum_at + 32].copy_from_slice(&digest);
        file.extend_from_slice(&bad);
        let err = read(&file).unwrap_err();
        assert!(matches!(err, TrailerError::BadPayload(_)), "{err:?}");
        assert!(!err.to_string().contains("lit_abcdef"), "{err}");
    }
}

#[cfg(test)]
mod robustness {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = read(&bytes);
        }

        #[test]
        fn reader_never_panics_on_a_footer(body in proptest::collection::vec(any::<u8>(), 0..200), len in any::<u32>()) {
            let mut f = body;
            f.extend_from_slice(&[0u8; 32]);
            f.extend_from_slice(&len.to_le_bytes());
            f.extend_from_slice(&VERSION.to_le_bytes());
            f.extend_from_slice(&MAGIC);
            let _ = read(&f);
        }
    }
}
