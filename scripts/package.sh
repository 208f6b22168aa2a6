#!/usr/bin/env bash
# Builds the Debian packages: license-server and license-agent (with license-agent-cli), each
# with a -dbgsym package holding the debug info stripped from its binaries. Needs cargo-deb
# (`cargo install cargo-deb --locked`, done here when missing) and dpkg-dev.
#
#   scripts/package.sh            # → target/debian/*.deb, *.ddeb
#
# The agent's systemd unit and AppArmor profile in the package are the ones install.sh writes
# (`install.sh --package-files`); the unit's network restriction comes from install.sh once the
# machine is enrolled.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }

command -v cargo-deb >/dev/null || { say "installing cargo-deb"; cargo install cargo-deb --locked; }

say "release build: license-server, license-agent, license-agent-cli"
cargo build --release --locked -p license-server -p license-agent -p license-agent-cli --bins

target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target/release/package"
"$target/release/license-agent-cli" man | gzip -9n > "$target/release/package/license-agent-cli.1.gz"

# The packaged unit and profile must be what install.sh writes.
files="$(mktemp -d)"
trap 'rm -rf "$files"' EXIT
bash packaging/install.sh --package-files "$files"
cmp "$files/lib/systemd/system/license-agent.service" packaging/deb/agent/license-agent.service \
  || { echo "packaging/deb/agent/license-agent.service differs from install.sh's: copy it from install.sh --package-files" >&2; exit 1; }
cmp "$files/etc/apparmor.d/usr.bin.license-agent" packaging/deb/agent/usr.bin.license-agent \
  || { echo "packaging/deb/agent/usr.bin.license-agent differs from install.sh's: copy it from install.sh --package-files" >&2; exit 1; }
for unit in license-agent-update.path license-agent-update.service; do
  cmp "$files/lib/systemd/system/$unit" "packaging/deb/agent/$unit" \
    || { echo "packaging/deb/agent/$unit differs from install.sh's: copy it from install.sh --package-files" >&2; exit 1; }
done

mkdir -p "$target/debian"
rm -f "$target"/debian/*.deb "$target"/debian/*.ddeb
for package in license-server license-agent; do
  say "packaging $package"
  cargo deb --no-build --locked --dbgsym --compress-debug-symbols=zlib -p "$package" \
    --output "$target/debian/"
done
ls -l "$target"/debian/
