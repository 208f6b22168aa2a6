//! The C ABI for real: compiles `examples/c/validate.c` and `tests/c/abi_check.c` with the
//! system C compiler against `include/license_client.h` and the `liblicense_client.so` built for
//! this test run, then runs them against the fake agent.
//!
//! The shared library is the one cargo builds next to this test binary (the lib target's
//! `cdylib`); if it is missing the tests fail, they never skip.

// The fake agent (tests/common) listens on a Unix socket; the pipe transport has its own
// tests (src/transport/windows.rs) and the Windows C example tests/windows_c_example.rs.
#![cfg(unix)]
// Helpers outside #[test] functions: a panic is the failure report here too.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::FakeAgent;

/// The directory holding the `liblicense_client.so` of this build.
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/c_abi-<hash>: cargo writes the lib target's artifacts to the same
    // deps directory; target/<profile> holds a copy only after a plain `cargo build`.
    let deps = exe.parent().unwrap().to_path_buf();
    let candidates = [deps.clone(), deps.parent().unwrap().to_path_buf()];
    for dir in &candidates {
        if dir.join("liblicense_client.so").is_file() {
            return dir.clone();
        }
    }
    panic!(
        "liblicense_client.so not found in {} nor {}: the cdylib of the lib target was not built \
         (is `cdylib` still in crates/license-client/Cargo.toml's crate-type?)",
        candidates[0].display(),
        candidates[1].display()
    );
}

/// Compiles `source` (relative to the crate) into `out_dir`, warnings as errors.
fn compile(source: &str, out_dir: &Path) -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = library_dir();
    let name = Path::new(source).file_stem().unwrap();
    let binary = out_dir.join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let output = Command::new(&cc)
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg(crate_dir.join(source))
        .arg(format!("-I{}", crate_dir.join("include").display()))
        .arg(format!("-L{}", lib.display()))
        .arg("-llicense_client")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-o")
        .arg(&binary)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(
        output.status.success(),
        "compiling {source} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    binary
}

fn run(binary: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(binary)
        .args(args)
        // `cargo test` puts target/<profile> on LD_LIBRARY_PATH, which wins over the rpath: a
        // stale library from an older `cargo build` there would be loaded instead of this one.
        .env("LD_LIBRARY_PATH", library_dir())
        .output()
        .unwrap();
    (
        status.code(),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

#[test]
fn the_c_example_prints_the_verdict_and_exits_with_its_code() {
    let agent = FakeAgent::start();
    let tmp = tempfile::tempdir().unwrap();
    let validate = compile("examples/c/validate.c", tmp.path());
    let socket = agent.socket().to_str().unwrap();

    let (code, stdout, stderr) = run(&validate, &[socket, "good"]);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(
        stdout,
        "valid features=pos,loyalty expires_at=2030-01-01T00:00:00Z\n"
    );

    let (code, stdout, _) = run(&validate, &[socket, "perpetual"]);
    assert_eq!(code, Some(0));
    assert_eq!(stdout, "valid features=pos expires_at=never\n");

    let (code, stdout, stderr) = run(&validate, &[socket, "revoked"]);
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert_eq!(stdout, "invalid reason=revoked\n");

    let (code, stdout, stderr) = run(&validate, &[socket, "wrong-nonce"]);
    assert_eq!(code, Some(2));
    assert_eq!(stdout, "");
    assert!(stderr.starts_with("error: validate: "), "{stderr}");
    assert!(stderr.contains("nonce"), "{stderr}");

    let missing = tmp.path().join("missing.sock");
    let (code, stdout, stderr) = run(&validate, &[missing.to_str().unwrap(), "good"]);
    assert_eq!(code, Some(2));
    assert_eq!(stdout, "");
    assert!(stderr.starts_with("error: connect: "), "{stderr}");
    assert!(stderr.contains("missing.sock"), "{stderr}");

    let refusing = FakeAgent::start_refusing();
    let (code, stdout, stderr) = run(&validate, &[refusing.socket().to_str().unwrap(), "good"]);
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert_eq!(stdout, "invalid reason=not_authorized\n");

    let (code, _, stderr) = run(&validate, &[socket]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("usage"), "{stderr}");
}

#[test]
fn every_c_function_behaves_as_the_header_says() {
    let agent = FakeAgent::start();
    let tmp = tempfile::tempdir().unwrap();
    let check = compile("tests/c/abi_check.c", tmp.path());
    let missing = tmp.path().join("missing.sock");
    let (code, stdout, stderr) = run(
        &check,
        &[agent.socket().to_str().unwrap(), missing.to_str().unwrap()],
    );
    assert_eq!(
        (code, stdout.as_str()),
        (Some(0), "ok\n"),
        "abi_check failed (a code of None is a signal, e.g. SIGPIPE):\n{stderr}"
    );
}

#[test]
fn the_header_declares_exactly_the_exported_functions() {
    let header = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("include/license_client.h"),
    )
    .unwrap();
    let ffi =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ffi.rs")).unwrap();
    let declared = names_before_paren(&header);
    let exported: Vec<String> = ffi
        .split("extern \"C\" fn ")
        .skip(1)
        .map(|rest| rest.split('(').next().unwrap().trim().to_string())
        .collect();
    let mut declared_sorted = declared.clone();
    declared_sorted.sort();
    let mut exported_sorted = exported.clone();
    exported_sorted.sort();
    assert_eq!(declared_sorted, exported_sorted);
    // The error codes agree too.
    for line in header.lines().filter(|l| l.starts_with("#define LSA_")) {
        let mut words = line.split_whitespace().skip(1);
        let (name, value) = (words.next().unwrap(), words.next().unwrap());
        let value = value.trim_matches(|c| c == '(' || c == ')');
        let rust = format!("pub const {name}: c_int = {value};");
        assert!(ffi.contains(&rust), "src/ffi.rs lacks `{rust}`");
    }
}

/// `lsa_*` identifiers directly followed by `(` in the header's declarations.
fn names_before_paren(header: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in header
        .lines()
        .filter(|l| !l.trim_start().starts_with(['/', '*', '#']))
    {
        let segments: Vec<&str> = line.split('(').collect();
        for segment in &segments[..segments.len() - 1] {
            let ident: String = segment
                .chars()
                .rev()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            if ident.starts_with("lsa_") {
                names.push(ident);
            }
        }
    }
    names
}
