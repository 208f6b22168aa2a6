//! `pipe_probe PIPE TOKEN NONCE [COUNT]`: sends COUNT (default 1) validation requests for TOKEN
//! with the same NONCE, each on its own connection to the agent's validation socket (a named
//! pipe on Windows, a Unix socket elsewhere), and prints each answer as one JSON line (or
//! `closed` when the agent closed without answering). The Windows tests use it to replay a
//! nonce through the real pipe; the client library never reuses one.

use std::io::{Read, Write};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, pipe, token, nonce, rest @ ..] = args.as_slice() else {
        eprintln!("usage: pipe_probe PIPE TOKEN NONCE [COUNT]");
        std::process::exit(2);
    };
    let count: usize = rest.first().and_then(|c| c.parse().ok()).unwrap_or(1);
    let request =
        format!(r#"{{"op":"validate_license","license_token":"{token}","nonce":"{nonce}"}}"#);
    for _ in 0..count {
        let mut stream = connect(pipe)?;
        let mut frame = (request.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(request.as_bytes());
        let _ = stream.write_all(&frame);
        let mut header = [0u8; 4];
        if stream.read_exact(&mut header).is_err() {
            println!("closed");
            continue;
        }
        let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
        stream.read_exact(&mut body)?;
        println!("{}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

#[cfg(windows)]
fn connect(pipe: &str) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(pipe)
}

#[cfg(unix)]
fn connect(pipe: &str) -> std::io::Result<std::os::unix::net::UnixStream> {
    std::os::unix::net::UnixStream::connect(pipe)
}
