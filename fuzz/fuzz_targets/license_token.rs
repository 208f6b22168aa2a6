//! Fuzz target: license tokens (`license_protocol::token`), as the agent reads them.
//!
//! The input is tried two ways. As a token: `decode` and `open` (against a fixed machine,
//! secret and key) never panic, and a decoded header is the bytes it came from. As the JSON
//! claims of a token: claims that parse are sealed by the server's code and must open to the
//! same claims, under format v2 and v1.
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_protocol::identity::MachineId;
use license_protocol::secret::Secret;
use license_protocol::token::{self, Candidates, LicenseClaims, TokenError, FORMAT_V2};

fuzz_target!(|data: &[u8]| {
    let machine = MachineId(uuid_of(b"fuzz-machine-id!"));
    let secret = Secret::from_bytes([9; 32]);
    let server = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let keys = |_| Ok::<_, TokenError>(Candidates::from(vec![server.verifying_key()]));

    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok((header, bytes)) = token::decode(text) {
            assert_eq!(&bytes[..3], b"LSA");
            let v2 = bytes[3] == FORMAT_V2;
            assert_eq!(header.key_id.is_some(), v2);
            let at = if v2 { 12 } else { 4 };
            assert_eq!(&bytes[at..at + 16], header.machine_id.0.as_bytes());
        }
        let _ = token::open(text, &machine, |_| Some(secret.clone()), keys);
    }

    if let Ok(mut claims) = serde_json::from_slice::<LicenseClaims>(data) {
        claims.machine_id = machine;
        for seal in [token::seal, token::seal_v1] {
            let sealed = seal(&claims, &secret, 3, &server);
            let opened = token::open(
                &sealed,
                &machine,
                |v| (v == 3).then(|| secret.clone()),
                keys,
            );
            match opened {
                Ok(back) => assert_eq!(back, claims),
                // Claims too large for a token are refused whole, never cut.
                Err(TokenError::Malformed) => {
                    assert!(sealed.len() > token::MAX_TOKEN_LEN * 4 / 3 + 4)
                }
                Err(e) => panic!("a sealed token does not open: {e}"),
            }
        }
    }
});

fn uuid_of(bytes: &[u8; 16]) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*bytes)
}
