#!/usr/bin/env bash
# Sets up and runs the whole test suite: the README's test command, and what .ci/run calls.
#
# On a fresh Debian/Ubuntu machine it installs what the tests need (as root, with apt-get):
# a C toolchain, curl (install.sh tests), sqlite3, python3 and setpriv (the agent tests read
# the server database and run a client as another user), the TPM stack (libtss2-dev to build,
# swtpm and swtpm-tools for the TPM tests, tpm2-tools), promtool, strace and systemd-analyze (the
# unit's syscall filter and exposure), apparmor_parser, faketime (the lifetime tests move real
# processes' clocks with libfaketime), python3-venv (schemathesis, below), chromium with nodejs
# and npm (the dashboard's browser test), dpkg-dev, binutils and lintian (the Debian packages,
# built by scripts/package.sh with cargo-deb, installed here when missing), and PostgreSQL
# (server and psql). Tests that use
# PostgreSQL create their own database on 127.0.0.1:5432 and drop it afterwards; when no
# PostgreSQL answers there, this script installs and starts one and lets loopback connect
# as `postgres` without a password (trust), as on the project's CI machines.
# Override the server with LSA_TEST_POSTGRES=postgres://user@host:port.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step says how long the run has taken so far (CI's budget is 45 minutes).
say() { printf '\n==> [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
# The tools this run needs from crates.io (cargo-deny, cargo-deb, cargo-fuzz), compiled when
# missing with a quick release profile: cargo-deny's own (fat LTO, one codegen unit) took
# 4 min 45 s on two cores; the tools run seconds here, however optimized.
install_tool() {
  command -v "$1" >/dev/null && return
  say "installing $1 (cargo install --locked, quick release profile)"
  CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    CARGO_PROFILE_RELEASE_OPT_LEVEL=1 cargo install "$1" --locked
}
# Where a C toolchain (the linker) is already there, they compile in the background from here,
# beside the packages' download and installation below; each step that uses one waits for them
# (`wait_tools`) and installs it itself should the background job have failed.
tools_log="$(mktemp)"
tools_job=""
if command -v cc >/dev/null; then
  (for tool in cargo-deny cargo-deb cargo-fuzz; do install_tool "$tool"; done) >"$tools_log" 2>&1 &
  tools_job=$!
fi
wait_tools() {
  [ -n "$tools_job" ] || return 0
  say "waiting for the tools compiling in the background"
  wait "$tools_job" || tail -n 30 "$tools_log"
  tools_job=""
}

packages=()
command -v cc >/dev/null || packages+=(build-essential)
command -v curl >/dev/null || packages+=(curl)
command -v psql >/dev/null || packages+=(postgresql-client)
command -v sqlite3 >/dev/null || packages+=(sqlite3)
command -v setpriv >/dev/null || packages+=(util-linux)
[ -x /usr/bin/python3 ] || packages+=(python3)
# A virtualenv for schemathesis (Debian ships venv's bootstrap separately).
if command -v dpkg >/dev/null && ! dpkg -s python3-venv >/dev/null 2>&1; then packages+=(python3-venv); fi
# TPM: headers to build against the system TSS, swtpm for the TPM tests, tpm2-tools for debugging.
pkg-config --exists tss2-esys tss2-tctildr 2>/dev/null || packages+=(libtss2-dev)
command -v swtpm >/dev/null || packages+=(swtpm)
command -v swtpm_setup >/dev/null || packages+=(swtpm-tools)
command -v tpm2_startup >/dev/null || packages+=(tpm2-tools)
command -v pkg-config >/dev/null || packages+=(pkg-config)
# promtool (from Debian's prometheus) checks the agent's metrics file.
command -v promtool >/dev/null || packages+=(prometheus)
# The systemd unit's syscall filter is checked against the agent's syscalls seen by strace.
command -v strace >/dev/null || packages+=(strace)
command -v systemd-analyze >/dev/null || packages+=(systemd)
command -v pgrep >/dev/null || packages+=(procps)
# AppArmor's parser checks the profile install.sh writes.
[ -x /usr/sbin/apparmor_parser ] || [ -x /sbin/apparmor_parser ] || packages+=(apparmor)
command -v faketime >/dev/null || packages+=(faketime)
# The handshake bench's smoke pass (cargo test --benches) measures nginx beside the server, with
# openssl s_time (the openssl package, a dependency of ca-certificates).
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || packages+=(nginx-light)
# The Debian packages: built by cargo-deb (dpkg-shlibdeps from dpkg-dev for their
# dependencies, objcopy and readelf from binutils for the split debug info), checked by lintian.
command -v dpkg-shlibdeps >/dev/null || packages+=(dpkg-dev)
command -v readelf >/dev/null || packages+=(binutils)
command -v lintian >/dev/null || packages+=(lintian)
# The dashboard's browser test drives Debian's chromium with playwright-core from npm (the test
# runs `npm ci` itself). Only when npm is missing: nodesource's nodejs ships its own npm and
# conflicts with Debian's npm package.
[ -x /usr/bin/chromium ] || packages+=(chromium)
# The Windows build and its tests under wine (docs/WINDOWS.md): Debian's Rust 1.96 with the
# standard library's source (-Zbuild-std for x86_64-pc-windows-gnu), mingw-w64, wine 8.
[ -x /usr/bin/rustc ] || packages+=(rustc-web)
[ -x /usr/bin/cargo ] || packages+=(cargo-web)
[ -d /usr/lib/rustlib/src/rust/library ] || packages+=(rust-web-src)
command -v x86_64-w64-mingw32-gcc >/dev/null || packages+=(mingw-w64)
[ -x /usr/lib/wine/wine64 ] || packages+=(wine64 wine)
command -v npm >/dev/null || packages+=(nodejs npm)
# The fleet simulator's test and benchmark put HAProxy (TCP, TLS passthrough) before two replicas.
command -v haproxy >/dev/null || packages+=(haproxy)
postgres_ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
installed_postgres=false
if [ -z "${LSA_TEST_POSTGRES:-}" ] && ! { command -v pg_isready >/dev/null && postgres_ready; }; then
  if ! ls -d /etc/postgresql/*/main >/dev/null 2>&1; then
    packages+=(postgresql)
    installed_postgres=true
  fi
fi
if [ "${#packages[@]}" -gt 0 ]; then
  say "installing ${packages[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

if [ -z "${LSA_TEST_POSTGRES:-}" ] && ! postgres_ready; then
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  if $installed_postgres; then
    say "allowing loopback connections as postgres without a password (test machine)"
    hba="/etc/postgresql/$version/main/pg_hba.conf"
    as_root sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
  fi
  say "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 30); do postgres_ready && break; sleep 1; done
  postgres_ready || { echo "PostgreSQL does not answer on 127.0.0.1:5432" >&2; exit 1; }
fi

# The VM test (crates/license-agent/tests/vm.rs) boots a Debian 12 guest that
# scripts/vm/image.sh builds with debootstrap (and fetches QEMU 7.2 for): once per run, never
# reused from an earlier one. Built in the background from here, beside the builds (mostly
# downloads and unpacking: four of the VM test's eleven minutes when it built the image itself);
# the tests wait for it. Should it fail, the VM test builds it again and says why.
rm -f target/vm/.done
mkdir -p target/vm
say "building the VM test's guest image in the background (scripts/vm/image.sh, log in target/vm/image.log)"
scripts/vm/image.sh target/vm >target/vm/image.log 2>&1 &
vm_image=$!

# schemathesis (PyPI) holds the server's OpenAPI document to what it answers
# (crates/license-server/tests/openapi_conformance.rs, which installs it itself when this did
# not); it lives in a virtualenv under the target directory, at the version pinned there.
requirements=crates/license-server/tests/schemathesis.requirements.txt
venv="${CARGO_TARGET_DIR:-target}/tmp/schemathesis-venv"
if ! "$venv/bin/pip" freeze 2>/dev/null | grep -qxF -f "$requirements"; then
  say "installing $(cat "$requirements") into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --requirement "$requirements"
fi

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
# cargo-deny checks the dependency tree against deny.toml (licenses, banned and duplicate
# crates, crates.io as the only source).
wait_tools
install_tool cargo-deny
say "cargo deny check licenses bans sources"
cargo deny --locked check licenses bans sources
# Advisories need the RustSec database, a git repository this machine may not reach: checked
# only against a copy already on the machine, never fetched here.
advisory_db="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
if [ -n "$(ls -A "$advisory_db" 2>/dev/null)" ]; then
  say "cargo deny check advisories (the RustSec copy in $advisory_db, not fetched)"
  cargo deny --locked --offline check advisories
else
  say "no RustSec database in $advisory_db: advisories not checked (\`cargo deny fetch db\` where the network allows)"
fi
say "cargo doc (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
install_tool cargo-deb
# The packages the tests check and install, as they ship: the release build is the longest step
# of this run (12 min on two cores). Built at opt-level 1 it took 5.5 min, but the agent then
# weighs 12.7 MB, over the 12 MiB the packages test holds it to.
say "Debian packages (scripts/package.sh: release build, cargo-deb, -dbgsym packages)"
scripts/package.sh
# The Windows binaries the wine tests run (crates/license-agent/tests/windows.rs and
# crates/license-client/tests/windows_c_example.rs): built once here, std included, with the
# dev profile (quicker to build; the tests run them, nothing ships from this run).
say "Windows binaries (scripts/windows/build.sh, dev profile)"
export LSA_WINDOWS_PROFILE=dev
scripts/windows/build.sh
say "waiting for the VM guest image"
wait "$vm_image" || { tail -n 30 target/vm/image.log; say "the guest image failed to build in the background: the VM test builds it again"; }
# `cargo test --workspace` builds every package's binaries before it runs a test: the
# integration tests that run another package's (license-agent, license-server) find them.
say "cargo test (unit and integration: real server, agent, TLS, SQLite and PostgreSQL)"
log="$(mktemp)"
beside_log="$(mktemp)"
trap 'rm -f "$log" "$beside_log" "$tools_log"' EXIT
status=0
# The tests that drive an emulator — the VM test (about six minutes, its guest booting and
# working under QEMU), then the two wine tests (about three) — run one after the other beside
# the others rather than after them: their binaries are started directly, each from its
# package's directory as cargo would, once everything is built; the run below skips them.
beside=(vm:a_real_debian_machine_with_systemd_apparmor_and_a_tpm
  windows:a_windows_till_installs_enrolls_and_validates_under_wine
  windows_c_example:the_c_example_validates_against_the_pipe_echo_agent_under_wine)
cargo test --workspace --locked --no-run --message-format=json-render-diagnostics >"$beside_log"
skips=()
beside_runs=()
for entry in "${beside[@]}"; do
  target="${entry%%:*}" name="${entry#*:}"
  # "<package directory> <executable>" of the test target named $target.
  found="$(TARGET="$target" python3 -c 'import json, os, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == os.environ["TARGET"] \
            and m["target"]["kind"] == ["test"] and m.get("executable"):
        print(os.path.dirname(m["manifest_path"]), m["executable"])' "$beside_log")"
  [ -n "$found" ] || { echo "the $target test's binary was not built" >&2; exit 1; }
  skips+=(--skip "$name")
  beside_runs+=("$found $name")
done
say "beside the others, one after the other: ${beside[*]%%:*} tests"
(failed=0
for run in "${beside_runs[@]}"; do
  read -r dir bin name <<<"$run"
  (cd "$dir" && "$bin" --exact "$name") || failed=1
done
exit "$failed") >"$beside_log" 2>&1 &
beside_job=$!
cargo test --workspace --locked --no-fail-fast -- "${skips[@]}" 2>&1 | tee "$log" || status=$?
say "waiting for the tests run beside the others"
wait "$beside_job" || status=$?
tee -a "$log" <"$beside_log"
say "the secret-lifecycle end-to-end suite again, every agent on its own swtpm (TPM backend)"
# --workspace, not -p: the same features as the run above, so nothing is rebuilt.
LSA_TEST_TPM=1 cargo test --workspace --locked --test lifecycle 2>&1 | tee -a "$log" || status=$?
say "the Windows unit tests under wine (license-client, license-agent)"
(source scripts/windows/env.sh && lsa_windows_cargo test -j 2 -p license-client --lib \
  && lsa_windows_cargo test -j 2 -p license-agent --lib) 2>&1 | tee -a "$log" || status=$?

# ---- Fuzzing (docs/SECURITY.md, "Fuzzing") ------------------------------------------------
# Every fuzz target in fuzz/ for a short bounded time (LSA_FUZZ_SECONDS each, 5 by default):
# any crash or failed assertion fails the run. fuzz.sh installs nightly and cargo-fuzz when
# missing; its instrumented build is cached in fuzz/target.
install_tool cargo-fuzz
say "fuzz targets, ${LSA_FUZZ_SECONDS:-5} s each (scripts/fuzz.sh)"
LSA_FUZZ_DEV=1 scripts/fuzz.sh "${LSA_FUZZ_SECONDS:-5}" || status=$?
# ---- end of fuzzing --------------------------------------------------------------------------

# One closing line with the totals over every test binary and doc-test run.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
