//! The Debian packages (issue 11, item 4) as `scripts/package.sh` builds them into
//! `target/debian/` (`scripts/test.sh` runs it before the tests; this test runs it when the
//! packages are missing): their metadata and contents (`dpkg-deb --info/--contents`),
//! `lintian` clean (the overrides shipped in the packages carry their reasons), binaries
//! stripped with their debug info in the -dbgsym packages, the agent under 12 MB, the server's
//! unit rated by `systemd-analyze security`, and install.sh installing the agent from the
//! package a server publishes.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Db, TestServer};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// What `scripts/package.sh` built: the .deb of `name` (built first when missing).
fn package(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debian");
    let path = dir.join(format!("{name}_0.1.0-1_amd64.deb"));
    if !path.exists() {
        eprintln!("{} missing: running scripts/package.sh", path.display());
        let built = Command::new("bash")
            .arg(format!("{ROOT}/scripts/package.sh"))
            .status()
            .expect("bash");
        assert!(built.success(), "scripts/package.sh failed");
    }
    assert!(path.exists(), "{} not built", path.display());
    path
}

fn dbgsym(name: &str) -> PathBuf {
    package(name).with_file_name(format!("{name}-dbgsym_0.1.0-1_amd64.ddeb"))
}

fn run(command: &mut Command) -> String {
    let out: Output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn extract(deb: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir.path()));
    dir
}

/// The GNU build id of an ELF file (`readelf -n`).
fn build_id(binary: &Path) -> String {
    let notes = run(Command::new("readelf").arg("-n").arg(binary));
    notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("no build id in {}", binary.display()))
        .to_string()
}

/// Whether an ELF file has DWARF debug info.
fn has_debug_info(binary: &Path) -> bool {
    run(Command::new("readelf").arg("-S").arg(binary)).contains(".debug_info")
}

/// Each binary of `name` is stripped, and its debug info is in the -dbgsym package under its
/// build id.
fn assert_debug_info_split(name: &str, binaries: &[&str]) {
    let files = extract(&package(name));
    let debug = extract(&dbgsym(name));
    for binary in binaries {
        let path = files.path().join("usr/bin").join(binary);
        assert!(!has_debug_info(&path), "{binary} not stripped");
        let id = build_id(&path);
        let split = debug.path().join(format!(
            "usr/lib/debug/.build-id/{}/{}.debug",
            &id[..2],
            &id[2..]
        ));
        assert!(split.exists(), "{} missing", split.display());
        assert!(
            has_debug_info(&split),
            "{} holds no debug info",
            split.display()
        );
    }
}

#[test]
fn both_packages_have_their_files_metadata_and_scripts() {
    let agent = package("license-agent");
    let info = run(Command::new("dpkg-deb").arg("--info").arg(&agent));
    for needle in [
        "Package: license-agent",
        "Version: 0.1.0-1",
        "Architecture: amd64",
        "libtss2-esys",
        "adduser",
        "postinst",
        "postrm",
    ] {
        assert!(info.contains(needle), "{needle} not in:\n{info}");
    }
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&agent));
    for path in [
        "./usr/bin/license-agent",
        "./usr/bin/license-agent-cli",
        "./usr/lib/systemd/system/license-agent.service",
        "./usr/lib/systemd/system/license-agent-update.path",
        "./usr/lib/systemd/system/license-agent-update.service",
        "./usr/lib/license-agent/license-agent-update",
        "./etc/apparmor.d/usr.bin.license-agent",
        "./usr/share/man/man1/license-agent-cli.1.gz",
        "./usr/share/doc/license-agent/copyright",
    ] {
        assert!(contents.contains(path), "{path} not in:\n{contents}");
    }
    // The unit and profile are install.sh's (the network restriction comes from install.sh
    // once the machine is enrolled).
    let files = extract(&agent);
    let ours = tempfile::tempdir().unwrap();
    run(Command::new("bash")
        .arg(format!("{ROOT}/packaging/install.sh"))
        .arg("--package-files")
        .arg(ours.path()));
    for file in [
        "usr/lib/systemd/system/license-agent.service",
        "usr/lib/systemd/system/license-agent-update.path",
        "usr/lib/systemd/system/license-agent-update.service",
        "etc/apparmor.d/usr.bin.license-agent",
    ] {
        let written = file.replace("usr/lib/", "lib/");
        assert_eq!(
            std::fs::read_to_string(files.path().join(file)).unwrap(),
            std::fs::read_to_string(ours.path().join(written)).unwrap(),
            "{file}"
        );
    }
    // The profile is the administrator's to tune: a conffile, kept across upgrades.
    let control = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb")
        .arg("--control")
        .arg(&agent)
        .arg(control.path()));
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).unwrap();
    assert!(
        conffiles.contains("/etc/apparmor.d/usr.bin.license-agent"),
        "{conffiles}"
    );

    let server = package("license-server");
    let info = run(Command::new("dpkg-deb").arg("--info").arg(&server));
    assert!(info.contains("Package: license-server") && info.contains("adduser"));
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&server));
    for path in [
        "./usr/bin/license-server",
        "./usr/lib/systemd/system/license-server.service",
        "./usr/share/doc/license-server/examples/server.example.toml",
    ] {
        assert!(contents.contains(path), "{path} not in:\n{contents}");
    }
    // The server's postinst makes its user and a data directory only it can read.
    let control = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb")
        .arg("--control")
        .arg(&server)
        .arg(control.path()));
    let postinst = std::fs::read_to_string(control.path().join("postinst")).unwrap();
    assert!(
        postinst.contains("adduser --system --group")
            && postinst.contains("chmod 0700 /var/lib/license-server"),
        "{postinst}"
    );
    // … and the shell checks every maintainer script.
    for script in ["postinst", "postrm", "prerm"] {
        run(Command::new("sh")
            .arg("-n")
            .arg(control.path().join(script)));
    }
}

#[test]
fn lintian_finds_nothing_unexplained() {
    let out = Command::new("lintian")
        .args(["--fail-on", "error,warning", "--no-tag-display-limit"])
        .arg(package("license-agent"))
        .arg(package("license-server"))
        .output()
        .expect("lintian (Debian package lintian) must be installed");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && !report
                .lines()
                .any(|l| l.starts_with("E:") || l.starts_with("W:")),
        "lintian:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn binaries_are_stripped_with_their_debug_info_kept_apart() {
    assert_debug_info_split("license-agent", &["license-agent", "license-agent-cli"]);
    assert_debug_info_split("license-server", &["license-server"]);
    // What every till downloads.
    let files = extract(&package("license-agent"));
    let size = std::fs::metadata(files.path().join("usr/bin/license-agent"))
        .unwrap()
        .len();
    assert!(size < 12 * 1024 * 1024, "the agent is {size} bytes");
}

#[test]
fn the_server_unit_is_rated_low_exposure() {
    let files = extract(&package("license-server"));
    let unit = files
        .path()
        .join("usr/lib/systemd/system/license-server.service");
    let report = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit));
    let level: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for license-server.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    assert!(level <= 2.0, "exposure {level}:\n{report}");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(text.contains("User=license-server") && text.contains("StateDirectoryMode=0700"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_sh_installs_the_package_the_server_publishes() {
    let server = TestServer::start(Db::Sqlite);
    let downloads = server.data_dir().join("downloads/stable");
    std::fs::create_dir_all(&downloads).unwrap();
    std::fs::copy(
        package("license-agent"),
        downloads.join("license-agent-linux-amd64.deb"),
    )
    .unwrap();
    let client = server.new_client("Packaged");
    let token = server.new_token(&client);
    let prefix = server.dir.path().join("root");
    let pin = format!("sha256//{}", server.pin().trim_start_matches("sha256:"));
    let url = format!("{}/install.sh", server.server.public_url);
    let out = Command::new("bash")
        .args([
            "-o",
            "pipefail",
            "-c",
            &format!("curl -fsSL -k --pinnedpubkey '{pin}' {url} | bash -s -- {token}"),
        ])
        .env("LICENSE_AGENT_PREFIX", &prefix)
        .env("LICENSE_AGENT_HARDWARE_ID", "PACKAGED-HW-1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("extracting the license-agent package") && stdout.contains("config OK"),
        "{stdout}"
    );
    // The package's files (the CLI comes only with it), and the enrolled machine.
    assert!(prefix.join("usr/bin/license-agent-cli").exists());
    assert!(!has_debug_info(&prefix.join("usr/bin/license-agent")));
    assert!(prefix.join("etc/license-agent/client.pem").exists());
    let unit =
        std::fs::read_to_string(prefix.join("etc/systemd/system/license-agent.service")).unwrap();
    assert!(
        unit.lines()
            .any(|l| l.starts_with("IPAddressAllow=") && l.contains("127.0.0.1")),
        "{unit}"
    );
    let machines = server.admin_json(&["machine", "list"]);
    assert!(machines.to_string().contains("PACKAGED-HW-1"), "{machines}");
}
