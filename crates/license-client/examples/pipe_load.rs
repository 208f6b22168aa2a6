//! `pipe_load PATH TOKEN CLIENTS REQUESTS`: CLIENTS threads, each on one persistent connection
//! through [`license_client::Client`], validate TOKEN REQUESTS times (a fresh nonce each), then
//! print one line: `validations=N seconds=S per_second=R valid=V`. The Windows benchmark
//! (`crates/license-agent/benches/windows_pipe.rs`) runs it under wine against the agent's pipe
//! and against `pipe_echo` in the same run; it works on a Unix socket as well.

use std::process::ExitCode;
use std::time::Instant;

use license_client::{Client, ClientConfig};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path, token, clients, requests] = args.as_slice() else {
        eprintln!("usage: pipe_load PATH TOKEN CLIENTS REQUESTS");
        return ExitCode::from(2);
    };
    let (Ok(clients), Ok(requests)) = (clients.parse::<usize>(), requests.parse::<usize>()) else {
        eprintln!("pipe_load: CLIENTS and REQUESTS are numbers");
        return ExitCode::from(2);
    };
    let start = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (path, token) = (path.clone(), token.clone());
            std::thread::spawn(move || -> Result<usize, String> {
                let mut client =
                    Client::connect_with(&ClientConfig::new(&path)).map_err(|e| e.to_string())?;
                let mut valid = 0;
                for _ in 0..requests {
                    let v = client.validate_license(&token).map_err(|e| e.to_string())?;
                    valid += usize::from(v.valid);
                }
                Ok(valid)
            })
        })
        .collect();
    let mut valid = 0;
    for worker in workers {
        match worker.join() {
            Ok(Ok(n)) => valid += n,
            Ok(Err(e)) => {
                eprintln!("pipe_load: {e}");
                return ExitCode::from(1);
            }
            Err(_) => return ExitCode::from(1),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let total = clients * requests;
    println!(
        "validations={total} seconds={seconds:.3} per_second={:.0} valid={valid}",
        total as f64 / seconds
    );
    ExitCode::SUCCESS
}
