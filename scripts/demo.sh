#!/usr/bin/env bash
# Sets up and runs the system on this machine, in a temporary directory, printing each step:
# a license server on its embedded SQLite, a client and a one-time install token, a POS agent
# enrolled by the real `curl … /install.sh | bash -s -- TOKEN` one-liner (under a prefix
# instead of /, so nothing outside the temp directory changes) and running; a license issued,
# validated by a C program through the client library, a rotation forced with the old token
# still valid in grace and the re-issued one valid, then revocations.
#
# Ports: LSA_DEMO_PORT_BASE (default 18443) → public, +1 agent (mTLS), +2 admin.
# Keep the directory with LSA_DEMO_DIR=/some/dir (otherwise a fresh mktemp -d).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

command -v curl >/dev/null || { say "installing curl"; apt-get update -qq && apt-get install -y -qq curl >/dev/null; }
command -v cc >/dev/null || { say "installing a C toolchain"; apt-get update -qq && apt-get install -y -qq build-essential >/dev/null; }
pkg-config --exists tss2-esys tss2-tctildr 2>/dev/null || { say "installing the TPM software stack headers"; apt-get update -qq && apt-get install -y -qq libtss2-dev pkg-config >/dev/null; }

say "building license-server and license-agent (release)"
cargo build --release --locked -p license-server -p license-agent -p license-agent-cli
BIN="$PWD/target/release"
SERVER="$BIN/license-server"

WORK="${LSA_DEMO_DIR:-$(mktemp -d)}"
mkdir -p "$WORK"
BASE="${LSA_DEMO_PORT_BASE:-18443}"
DATA="$WORK/server"
[ -e "$DATA" ] && { echo "$DATA exists; pick another LSA_DEMO_DIR" >&2; exit 1; }

say "initializing the server (CA, TLS certificate, signing key, master key, SQLite)"
run "$SERVER" init --data-dir "$DATA" --dns-name localhost --ip 127.0.0.1 \
  --public-listen "127.0.0.1:$BASE" --agent-listen "127.0.0.1:$((BASE + 1))" --admin-listen "127.0.0.1:$((BASE + 2))"

say "publishing the agent binary under downloads/stable/"
case "$(uname -m)" in x86_64) ARCH=amd64 ;; aarch64) ARCH=arm64 ;; *) ARCH=armv7 ;; esac
mkdir -p "$DATA/downloads/stable"
cp "$BIN/license-agent" "$DATA/downloads/stable/license-agent-linux-$ARCH"

say "starting the server (log: $WORK/server.log)"
"$SERVER" serve --data-dir "$DATA" >"$WORK/server.out" 2>"$WORK/server.log" &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true; wait $SERVER_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do grep -q ready "$WORK/server.out" 2>/dev/null && break; sleep 0.2; done
cat "$WORK/server.out"

say "creating a client and a one-time install token"
admin() { "$SERVER" admin --data-dir "$DATA" "$@"; }
CLIENT_ID="$(admin --json client create --name "Demo Retail" | sed -n 's/.*"id": "\([^"]*\)".*/\1/p')"
admin client list
admin token create --client "$CLIENT_ID" | tee "$WORK/token.txt"
INSTALL_CMD="$(tail -n 1 "$WORK/token.txt" | sed 's/^ *//; s/| sudo bash/| bash/')"

say "enrolling POS machine 1 with the seed's one-liner (prefix $WORK/pos-1)"
printf '$ %s\n' "$INSTALL_CMD"
LICENSE_AGENT_PREFIX="$WORK/pos-1" LICENSE_AGENT_HARDWARE_ID="demo-pos-1" bash -o pipefail -c "$INSTALL_CMD"
CONFIG="$WORK/pos-1/etc/license-agent/config.toml"
ls -l "$WORK/pos-1/etc/license-agent"

say "the agent asks the server about itself over TLS 1.3 mTLS (server pinned)"
run "$WORK/pos-1/usr/bin/license-agent" server-status --config "$CONFIG"
MACHINE_ID="$(sed -n 's/^id = "\(.*\)"/\1/p' "$CONFIG")"

say "pointing the agent's validation socket into the demo directory, allowing uid $(id -u)"
SOCKET="$WORK/pos-1/run/agent.sock"
sed -i "/^\[ipc\]/,/^\[/ s|^socket = .*|socket = \"$SOCKET\"|; /^\[management\]/,/^\[/ s|^socket = .*|socket = \"$WORK/pos-1/run/mgmt.sock\"|; s|^allowed_uids = \[\]|allowed_uids = [$(id -u)]|; s|^poll_interval = .*|poll_interval = 1|" "$CONFIG"
run "$WORK/pos-1/usr/bin/license-agent" check-config --config "$CONFIG"

say "issuing a license for this machine"
LICENSE_ID="$(admin --json license issue --machine "$MACHINE_ID" --features pos.sale,pos.refund --expires-in 30d --metadata store=demo \
  | sed -n 's/^    "id": "\([^"]*\)".*/\1/p; s/^  "id": "\([^"]*\)".*/\1/p' | head -n 1)"
admin license list

say "starting the agent daemon (log: $WORK/agent.log)"
"$WORK/pos-1/usr/bin/license-agent" run --config "$CONFIG" >"$WORK/agent.out" 2>"$WORK/agent.log" &
AGENT_PID=$!
trap 'kill $AGENT_PID $SERVER_PID 2>/dev/null || true; wait 2>/dev/null || true' EXIT
TOKENS="$WORK/pos-1/var/lib/license-agent/tokens"
for _ in $(seq 1 100); do [ -s "$TOKENS/$LICENSE_ID.token" ] && break; sleep 0.2; done
cat "$WORK/agent.out"
OLD_TOKEN="$(cat "$TOKENS/$LICENSE_ID.token")"
echo "token (base64, encrypted under the machine's secret, signed by the server): ${OLD_TOKEN:0:48}…"

say "building the C example against the client library (C ABI)"
cargo build --release --locked -p license-client
run cc crates/license-client/examples/c/validate.c -Icrates/license-client/include \
  -L"$BIN" -llicense_client -Wl,-rpath,"$BIN" -o "$WORK/validate"

say "a POS application validates its license through the agent"
run "$WORK/validate" "$SOCKET" "$OLD_TOKEN"

say "forcing a secret rotation"
admin machine rotate "$MACHINE_ID" >/dev/null
# Tokens are stable per (license, secret version): a new token means a new version.
for _ in $(seq 1 150); do [ "$(cat "$TOKENS/$LICENSE_ID.token")" != "$OLD_TOKEN" ] && break; sleep 0.2; done
[ "$(cat "$TOKENS/$LICENSE_ID.token")" != "$OLD_TOKEN" ] || { echo "the agent did not rotate" >&2; exit 1; }
NEW_TOKEN="$(cat "$TOKENS/$LICENSE_ID.token")"
admin machine secrets "$MACHINE_ID"
say "the token re-issued under the new version is valid"
run "$WORK/validate" "$SOCKET" "$NEW_TOKEN"
say "the old token is still valid: its secret is in GRACE, rotation never cuts service"
run "$WORK/validate" "$SOCKET" "$OLD_TOKEN"

say "the machine operator's view (management socket, roles by uid) and the audit chain"
run "$BIN/license-agent-cli" --socket "$WORK/pos-1/run/mgmt.sock" status
run "$BIN/license-agent-cli" audit verify --log "$WORK/pos-1/var/log/license-agent/audit.log"

say "revoking the license: the agent learns it at its next poll"
admin license revoke "$LICENSE_ID" >/dev/null
for _ in $(seq 1 50); do "$WORK/validate" "$SOCKET" "$NEW_TOKEN" >/dev/null 2>&1 || break; sleep 0.2; done
"$WORK/validate" "$SOCKET" "$NEW_TOKEN" || true

say "revoking the machine: its next request to the server is refused"
admin machine revoke "$MACHINE_ID" >/dev/null
if "$WORK/pos-1/usr/bin/license-agent" server-status --config "$CONFIG"; then
  echo "unexpected: a revoked machine was served" >&2; exit 1
fi
admin machine restore "$MACHINE_ID" >/dev/null
run "$WORK/pos-1/usr/bin/license-agent" server-status --config "$CONFIG"

say "server audit trail (last entries)"
admin audit list | tail -n 12

say "done; everything is under $WORK (agent and server stopped)"
