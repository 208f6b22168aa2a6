//! `pipe_echo PATH`: a stand-in agent that says "valid" to every request, echoing its nonce,
//! on a named pipe (Windows) or a Unix socket.
//!
//! It exists to measure and check the client side alone: the C example (`examples/c/validate.c`)
//! or any client can be pointed at it, with no agent, TPM or secret behind it. It answers every
//! well-formed `validate_license` request with a fixed valid license (features `pos,loyalty`,
//! expiry 2030-01-01T00:00:00Z), any other frame with the protocol's refusal, serves each
//! connection on its own thread, and prints `listening on PATH` once clients can connect.
//! It checks nothing about who connects: never run it where a real agent is expected.
//!
//! ```text
//! cargo run --example pipe_echo -- /tmp/echo.sock          # Linux
//! pipe_echo.exe \\.\pipe\license-agent-echo                # Windows (scripts/windows/build.sh)
//! ```

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use license_client::transport::{Listener, Stream};
use license_ipc::ipc::{self, Request, Response, ValidAnswer};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(path), None) = (args.next(), args.next()) else {
        eprintln!("usage: pipe_echo PATH   (a pipe name like \\\\.\\pipe\\NAME on Windows)");
        return ExitCode::from(2);
    };
    let path = PathBuf::from(path);
    let mut listener = match Listener::bind(&path) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("pipe_echo: cannot listen on {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    println!("listening on {}", path.display());
    let _ = io::stdout().flush();
    loop {
        match listener.accept() {
            Ok(stream) => {
                std::thread::spawn(move || serve(stream));
            }
            Err(e) => eprintln!("pipe_echo: accept: {e}"),
        }
    }
}

/// Answers each request of one connection until the client closes it.
fn serve(mut stream: Stream) {
    loop {
        let mut header = [0u8; 4];
        if stream.read_exact(&mut header).is_err() {
            return;
        }
        let Ok(len) = ipc::frame_len(header) else {
            return;
        };
        let mut payload = vec![0u8; len];
        if stream.read_exact(&mut payload).is_err() {
            return;
        }
        let answer = match ipc::parse_request(&payload) {
            Ok(Request::ValidateLicense { nonce, .. }) => Response::Valid(ValidAnswer {
                valid: true,
                expires_at: Some("2030-01-01T00:00:00Z".into()),
                features: vec!["pos".into(), "loyalty".into()],
                metadata: Default::default(),
                nonce: nonce.to_string(),
            }),
            Err((e, nonce)) => Response::invalid(e.reason(), nonce),
        };
        let Ok(body) = serde_json::to_vec(&answer) else {
            return;
        };
        if stream.write_all(&ipc::encode_frame(&body)).is_err() {
            return;
        }
    }
}
