//! A fake license agent for the client tests: the real framing and request parser of
//! `license_ipc::ipc` on a Unix socket in a temp dir, with verdicts chosen by token so that
//! one agent can also misbehave on demand.
//!
//! Tokens: `good` (valid, features `pos,loyalty`, expiry, metadata), `perpetual` (valid, no
//! expiry), `revoked` (invalid `revoked`), `wrong-nonce` (valid, but another nonce),
//! `wrong-nonce-invalid` (invalid, another nonce), `lying-flag` (a valid-shaped answer saying
//! `"valid": false`), `oversized` (a header announcing 64 KiB + 1 and nothing after),
//! `max-frame` (a valid answer of exactly 64 KiB), `close-mid-frame` (a header for 100 bytes,
//! 10 bytes, close), `close` (close without answering), `silent` (never answer), `garbage`
//! (a frame of non-JSON), `empty-frame` (a zero-length frame), `close-after-answer` (answer
//! `good`, then close), `after-close` (answer `good` once every `close-after-answer` connection
//! is closed). Anything else: invalid `malformed`. A nonce seen before: invalid `replayed_nonce`.

// Each test binary uses its own subset; helpers panic on setup failures like the tests do.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use license_ipc::ipc::{self, Reason, Request, Response, ValidAnswer, MAX_FRAME_LEN};
use license_ipc::Nonce;

#[derive(Default)]
struct Shared {
    nonces: Mutex<Vec<String>>,
    /// `close-after-answer` connections closed so far, and their waiters.
    closed: Mutex<usize>,
    closed_cv: Condvar,
}

pub struct FakeAgent {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    shared: Arc<Shared>,
}

impl FakeAgent {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let shared = Arc::new(Shared::default());
        let for_thread = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let shared = for_thread.clone();
                std::thread::spawn(move || serve(conn, &shared));
            }
        });
        Self {
            _dir: dir,
            socket,
            shared,
        }
    }

    /// An agent that refuses every peer as the real one refuses a uid/gid outside its
    /// whitelist: a `not_authorized` answer (no nonce) right after accept, then a close.
    pub fn start_refusing() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let _ = send(&mut conn, &Response::invalid(Reason::NotAuthorized, None));
            }
        });
        Self {
            _dir: dir,
            socket,
            shared: Arc::default(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Every nonce received in a well-formed request, in order.
    pub fn nonces(&self) -> Vec<String> {
        self.shared.nonces.lock().unwrap().clone()
    }
}

fn serve(mut conn: UnixStream, shared: &Shared) {
    loop {
        let mut header = [0u8; 4];
        if conn.read_exact(&mut header).is_err() {
            return;
        }
        let len = match ipc::frame_len(header) {
            Ok(len) => len,
            Err(_) => {
                let _ = send(&mut conn, &Response::invalid(Reason::FrameTooLarge, None));
                return;
            }
        };
        let mut payload = vec![0u8; len];
        if conn.read_exact(&mut payload).is_err() {
            return;
        }
        let (token, nonce) = match ipc::parse_request(&payload) {
            Ok(Request::ValidateLicense {
                license_token,
                nonce,
            }) => (license_token, nonce.to_string()),
            Err((e, nonce)) => {
                let _ = send(&mut conn, &Response::invalid(e.reason(), nonce));
                continue;
            }
        };
        let replayed = {
            let mut seen = shared.nonces.lock().unwrap();
            let replayed = seen.contains(&nonce);
            seen.push(nonce.clone());
            replayed
        };
        if replayed {
            let _ = send(
                &mut conn,
                &Response::invalid(Reason::ReplayedNonce, Some(nonce)),
            );
            continue;
        }
        let written = match token.as_str() {
            "good" => send(&mut conn, &good(nonce)),
            "perpetual" => send(
                &mut conn,
                &Response::Valid(ValidAnswer {
                    valid: true,
                    expires_at: None,
                    features: vec!["pos".into()],
                    metadata: BTreeMap::new(),
                    nonce,
                }),
            ),
            "revoked" => send(&mut conn, &Response::invalid(Reason::Revoked, Some(nonce))),
            "wrong-nonce" => send(&mut conn, &good(Nonce::random().to_string())),
            "wrong-nonce-invalid" => send(
                &mut conn,
                &Response::invalid(Reason::Revoked, Some(Nonce::random().to_string())),
            ),
            "lying-flag" => {
                let Response::Valid(mut answer) = good(nonce) else {
                    unreachable!()
                };
                answer.valid = false;
                send(&mut conn, &Response::Valid(answer))
            }
            "oversized" => conn.write_all(&((MAX_FRAME_LEN + 1) as u32).to_be_bytes()),
            "max-frame" => {
                let Response::Valid(mut answer) = good(nonce) else {
                    unreachable!()
                };
                answer.metadata.insert("pad".into(), String::new());
                let base = serde_json::to_vec(&answer).unwrap().len();
                answer
                    .metadata
                    .insert("pad".into(), "x".repeat(MAX_FRAME_LEN - base));
                let body = serde_json::to_vec(&answer).unwrap();
                assert_eq!(body.len(), MAX_FRAME_LEN);
                conn.write_all(&ipc::encode_frame(&body))
            }
            "close-mid-frame" => {
                let _ = conn.write_all(&100u32.to_be_bytes());
                let _ = conn.write_all(&[b'{'; 10]);
                return;
            }
            "close" => return,
            "silent" => Ok(()),
            "garbage" => conn.write_all(&ipc::encode_frame(b"not json")),
            "empty-frame" => conn.write_all(&[0, 0, 0, 0]),
            "close-after-answer" => {
                let _ = send(&mut conn, &good(nonce));
                drop(conn);
                *shared.closed.lock().unwrap() += 1;
                shared.closed_cv.notify_all();
                return;
            }
            "after-close" => {
                let closed = shared.closed.lock().unwrap();
                drop(shared.closed_cv.wait_while(closed, |n| *n == 0).unwrap());
                send(&mut conn, &good(nonce))
            }
            _ => send(
                &mut conn,
                &Response::invalid(Reason::Malformed, Some(nonce)),
            ),
        };
        if written.is_err() {
            return;
        }
    }
}

fn good(nonce: String) -> Response {
    Response::Valid(ValidAnswer {
        valid: true,
        expires_at: Some("2030-01-01T00:00:00Z".into()),
        features: vec!["pos".into(), "loyalty".into()],
        metadata: BTreeMap::from([
            ("site".into(), "Lyon 3".into()),
            ("tier".into(), "gold".into()),
        ]),
        nonce,
    })
}

fn send(conn: &mut UnixStream, answer: &Response) -> std::io::Result<()> {
    conn.write_all(&ipc::encode_frame(&serde_json::to_vec(answer).unwrap()))
}

/// Distinct values in `v`.
pub fn distinct(v: &[String]) -> usize {
    v.iter().collect::<HashSet<_>>().len()
}
