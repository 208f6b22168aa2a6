#!/usr/bin/env bash
# Soak test: a real license-server (SQLite) and a real enrolled license-agent under a steady
# load for SOAK_SECONDS (default 60), in a temporary directory. Resident memory (VmRSS) and open
# descriptors of both processes are sampled once the warm-up is over and again at the end, each
# time with the load generator stopped and its connections closed; the run fails when either
# grew by more than SOAK_MAX_GROWTH_PCT (default 5) percent, or when a validation was not
# answered `valid`.
#
# The load, all of it on 127.0.0.1 or Unix sockets:
#   - SOAK_CLIENTS (2) threads validating the machine's license at SOAK_RATE (200) validations
#     per second in all, through the agent's validation socket with the client library's C ABI
#     (liblicense_client.so, from Python's ctypes), each reconnecting every 50 validations and
#     re-reading the token the agent keeps, so tokens of every secret version are validated;
#   - the agent polling the server every second (secret status, licenses) and rotating its
#     secret every SOAK_ROTATION_SECS (5) seconds (server: secrets valid 10 s, then 20 s of
#     grace, so old versions are destroyed as the run goes);
#   - `license-agent-cli status` every 2 s and `license-agent-cli rotate` every 10 s on the
#     management socket.
# The agent's replay window keeps every validation nonce for `ipc.replay_window` (600 s by
# default): it is set to SOAK_REPLAY_WINDOW (10) seconds here, so that it is full once the
# warm-up is over and what the samples compare is the steady state, not the window filling.
# Each sample is the median of five, 0.2 s apart (the agent's once-a-second poll opens a
# connection now and then).
#
# Environment: SOAK_SECONDS (60), SOAK_WARMUP_SECONDS (20), SOAK_RATE, SOAK_CLIENTS,
# SOAK_ROTATION_SECS, SOAK_REPLAY_WINDOW, SOAK_MAX_GROWTH_PCT; SOAK_PROFILE=debug to use the debug binaries of
# `cargo build` instead of building in release; SOAK_DIR to keep the directory (logs).
# Takes SOAK_WARMUP_SECONDS + SOAK_SECONDS + about 15 s after the build: 93 s by default.
set -euo pipefail
cd "$(dirname "$0")/.."

SOAK_SECONDS="${SOAK_SECONDS:-60}"
WARMUP="${SOAK_WARMUP_SECONDS:-20}"
RATE="${SOAK_RATE:-200}"
CLIENTS="${SOAK_CLIENTS:-2}"
ROTATION="${SOAK_ROTATION_SECS:-5}"
REPLAY_WINDOW="${SOAK_REPLAY_WINDOW:-10}"
MAX_GROWTH="${SOAK_MAX_GROWTH_PCT:-5}"
PROFILE="${SOAK_PROFILE:-release}"

say() { printf '==> %s\n' "$*"; }
die() { printf 'soak.sh: %s\n' "$*" >&2; exit 1; }

case "$PROFILE" in
  release) say "building (release)"; cargo build --release --locked -p license-server -p license-agent -p license-agent-cli -p license-client ;;
  debug) say "building (debug)"; cargo build --locked -p license-server -p license-agent -p license-agent-cli -p license-client ;;
  *) die "SOAK_PROFILE is release or debug" ;;
esac
BIN="$PWD/target/$PROFILE"
SERVER="$BIN/license-server"
AGENT="$BIN/license-agent"
CLI="$BIN/license-agent-cli"
LIB="$BIN/liblicense_client.so"

WORK="${SOAK_DIR:-$(mktemp -d)}"
mkdir -p "$WORK"
[ -e "$WORK/server" ] && die "$WORK/server exists; pick another SOAK_DIR"
DATA="$WORK/server"
POS="$WORK/pos"
SERVER_PID=""
AGENT_PID=""
cleanup() {
  for pid in $AGENT_PID $SERVER_PID; do kill "$pid" 2>/dev/null || true; done
  for pid in $AGENT_PID $SERVER_PID; do wait "$pid" 2>/dev/null || true; done
  [ -n "${SOAK_DIR:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

say "server: init and serve on 127.0.0.1 (SQLite; log $DATA/serve.log)"
"$SERVER" init --data-dir "$DATA" --dns-name localhost --ip 127.0.0.1 >/dev/null
"$SERVER" serve --data-dir "$DATA" --json \
  --public-listen 127.0.0.1:0 --agent-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  --secret-validity-secs 10 --secret-grace-secs 20 >"$WORK/server.out" 2>"$DATA/serve.log" &
SERVER_PID=$!
for _ in $(seq 1 100); do [ -s "$WORK/server.out" ] && break; sleep 0.1; done
# A field of the first JSON value on stdin (the ready line, or an admin command's answer).
json() { python3 -c 'import json, sys; print(json.JSONDecoder().raw_decode(sys.stdin.read().lstrip())[0][sys.argv[1]])' "$1"; }
PUBLIC_URL="$(json public_url <"$WORK/server.out")" || die "the server did not start: $(cat "$DATA/serve.log")"
PIN="$(json server_pin <"$WORK/server.out")"

say "agent: enroll (key generated locally) and configure short intervals"
admin() { "$SERVER" admin --data-dir "$DATA" --json "$@"; }
CLIENT_ID="$(admin client create --name "Soak" | json id)"
# The install token goes from one process to the next through the environment, never printed.
INSTALL_TOKEN="$(admin token create --client "$CLIENT_ID" | json token)"
LICENSE_AGENT_TOKEN="$INSTALL_TOKEN" "$AGENT" enroll --server "$PUBLIC_URL" --server-pin "$PIN" \
  --hardware-id soak-pos-1 --config "$POS/config.toml" --state-dir "$POS/state" \
  --log-dir "$POS/log" --json >"$WORK/enroll.json"
unset INSTALL_TOKEN
MACHINE_ID="$(json machine_id <"$WORK/enroll.json")"
SOCKET="$POS/agent.sock"
MGMT="$POS/mgmt.sock"
python3 - "$POS/config.toml" "$SOCKET" "$MGMT" "$(id -u)" "$ROTATION" "$REPLAY_WINDOW" <<'PY'
import re, sys
path, socket, mgmt, uid, rotation, replay_window = sys.argv[1:]
text = open(path).read()
def set_key(section, key, value):
    global text
    pattern = re.compile(r"(^\[%s\]\n(?:(?!\[).*\n)*?)%s = .*\n" % (re.escape(section), key), re.M)
    if pattern.search(text):
        text = pattern.sub(lambda m: "%s%s = %s\n" % (m.group(1), key, value), text, count=1)
    else:
        text = re.sub(r"^\[%s\]\n" % re.escape(section), lambda m: "%s%s = %s\n" % (m.group(0), key, value), text, count=1, flags=re.M)
set_key("agent", "rotation_interval", rotation)
set_key("agent", "grace_period", str(4 * int(rotation)))
set_key("agent", "poll_interval", "1")
set_key("ipc", "socket", '"%s"' % socket)
set_key("ipc", "allowed_uids", "[%s]" % uid)
set_key("ipc", "replay_window", replay_window)
set_key("management", "socket", '"%s"' % mgmt)
set_key("management", "admin_uids", "[%s]" % uid)
open(path, "w").write(text)
PY
"$AGENT" check-config --config "$POS/config.toml" >/dev/null

LICENSE_ID="$(admin license issue --machine "$MACHINE_ID" --features pos.sale --expires-in 30d | json id)"
"$AGENT" run --config "$POS/config.toml" >"$POS/run.out" 2>"$POS/run.log" &
AGENT_PID=$!
TOKEN_FILE="$POS/state/tokens/$LICENSE_ID.token"
for _ in $(seq 1 300); do [ -s "$TOKEN_FILE" ] && [ -S "$SOCKET" ] && break; sleep 0.1; done
[ -s "$TOKEN_FILE" ] || die "the agent has no token after 30 s: $(tail -n 20 "$POS/run.log")"

# One load phase of $1 seconds; prints one JSON line of counts.
load() {
  python3 - "$LIB" "$SOCKET" "$TOKEN_FILE" "$CLI" "$MGMT" "$1" "$RATE" "$CLIENTS" <<'PY'
import ctypes, json, subprocess, sys, threading, time
lib_path, socket, token_file, cli, mgmt, seconds, rate, clients = sys.argv[1:]
seconds, rate, clients = float(seconds), float(rate), int(clients)
lib = ctypes.CDLL(lib_path)
P = ctypes.c_void_p
lib.lsa_client_connect_timeout.argtypes = [ctypes.c_char_p, ctypes.c_uint]
lib.lsa_client_connect_timeout.restype = P
lib.lsa_validate_license.argtypes = [P, ctypes.c_char_p, ctypes.POINTER(P)]
lib.lsa_validation_is_valid.argtypes = [P]
lib.lsa_validation_reason.argtypes = [P]
lib.lsa_validation_reason.restype = ctypes.c_char_p
lib.lsa_validation_free.argtypes = [P]
lib.lsa_client_free.argtypes = [P]
lib.lsa_last_error.restype = ctypes.c_char_p
end = time.monotonic() + seconds
lock = threading.Lock()
counts = {"valid": 0, "invalid": {}, "errors": {}, "latency_ms": [], "mgmt_failures": 0,
          "status": 0, "rotate": 0}

def note(kind, key=None, latency=None):
    with lock:
        if key is None:
            counts[kind] += 1
        else:
            counts[kind][key] = counts[kind].get(key, 0) + 1
        if latency is not None:
            counts["latency_ms"].append(latency)

def validator():
    interval = clients / rate
    next_at = time.monotonic()
    client, used = None, 0
    while time.monotonic() < end:
        if client is None or used >= 50:
            if client:
                lib.lsa_client_free(client)
            client, used = lib.lsa_client_connect_timeout(socket.encode(), 5000), 0
            if not client:
                note("errors", "connect: " + (lib.lsa_last_error() or b"").decode())
                time.sleep(0.1)
                continue
            token = open(token_file).read().strip().encode()
        out = P()
        start = time.monotonic()
        code = lib.lsa_validate_license(client, token, ctypes.byref(out))
        latency = (time.monotonic() - start) * 1000
        used += 1
        if code != 0:
            note("errors", "code %d" % code)
            lib.lsa_client_free(client)
            client = None
        elif lib.lsa_validation_is_valid(out):
            note("valid", latency=latency)
        else:
            note("invalid", (lib.lsa_validation_reason(out) or b"").decode())
        lib.lsa_validation_free(out)
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    if client:
        lib.lsa_client_free(client)

def manager():
    tick = 0
    while time.monotonic() < end:
        op = "rotate" if tick % 5 == 4 else "status"
        done = subprocess.run([cli, "--socket", mgmt, "--timeout", "30", op],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        note("mgmt_failures" if done.returncode else op)
        tick += 1
        time.sleep(2)

threads = [threading.Thread(target=validator) for _ in range(clients)]
threads.append(threading.Thread(target=manager))
for t in threads:
    t.start()
for t in threads:
    t.join()
lat = sorted(counts.pop("latency_ms")) or [0.0]
counts["p50_ms"] = round(lat[len(lat) // 2], 2)
counts["p99_ms"] = round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2)
counts["seconds"] = seconds
print(json.dumps(counts))
PY
}

# "RSS_KB FDS" of a process: the median of five samples, 0.2 s apart.
sample() {
  local rss=() fds=()
  for _ in 1 2 3 4 5; do
    rss+=("$(awk '/^VmRSS:/ { print $2 }' "/proc/$1/status")")
    fds+=("$(find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)")
    sleep 0.2
  done
  printf '%s %s\n' "$(printf '%s\n' "${rss[@]}" | sort -n | sed -n 3p)" \
    "$(printf '%s\n' "${fds[@]}" | sort -n | sed -n 3p)"
}

# During the soak, every 60 s: elapsed time, RSS and descriptors of both (one sample, under
# load), printed at the end to tell a plateau from a steady climb.
trace() {
  local elapsed=0 s a
  while sleep 60; do
    elapsed=$((elapsed + 60))
    s="$(awk '/^VmRSS:/ { print $2 }' "/proc/$SERVER_PID/status") kB $(find "/proc/$SERVER_PID/fd" -mindepth 1 -maxdepth 1 | wc -l) fds"
    a="$(awk '/^VmRSS:/ { print $2 }' "/proc/$AGENT_PID/status") kB $(find "/proc/$AGENT_PID/fd" -mindepth 1 -maxdepth 1 | wc -l) fds"
    printf '    %6s s   server %-20s agent %s\n' "$elapsed" "$s" "$a"
  done
}

# Checks a phase's counts: every validation valid, no client or management error.
check_phase() {
  python3 - "$1" "$2" <<'PY'
import json, sys
name, line = sys.argv[1:]
c = json.loads(line)
total = c["valid"] + sum(c["invalid"].values()) + sum(c["errors"].values())
print("    %s: %d validations (%.0f/s), %d valid, refused %s, errors %s, p50 %.2f ms, p99 %.2f ms; "
      "management: %d status, %d rotate, %d failed"
      % (name, total, total / c["seconds"], c["valid"], c["invalid"] or "none", c["errors"] or "none",
         c["p50_ms"], c["p99_ms"], c["status"], c["rotate"], c["mgmt_failures"]))
sys.exit(0 if total > 0 and c["valid"] == total and c["mgmt_failures"] == 0 else 1)
PY
}

say "warm-up: ${WARMUP} s of load"
WARM="$(load "$WARMUP")"
check_phase warm-up "$WARM" || die "validations failed during the warm-up (logs: SOAK_DIR=… keeps them)"
sleep 2
read -r S_RSS0 S_FD0 < <(sample "$SERVER_PID")
read -r A_RSS0 A_FD0 < <(sample "$AGENT_PID")
V0="$("$CLI" --socket "$MGMT" --json status | python3 -c 'import json, sys; s = json.load(sys.stdin); print(max([v.get("version", 0) for v in s.get("secrets", [])] or [0]))' 2>/dev/null || echo '?')"

say "soak: ${SOAK_SECONDS} s of load"
trace >"$WORK/trace" 2>/dev/null &
TRACE_PID=$!
SOAK="$(load "$SOAK_SECONDS")"
kill "$TRACE_PID" 2>/dev/null || true
wait "$TRACE_PID" 2>/dev/null || true
if [ -s "$WORK/trace" ]; then
  say "every minute of the soak, under load"
  cat "$WORK/trace"
fi
PHASE_OK=true
check_phase soak "$SOAK" || PHASE_OK=false
sleep 2
read -r S_RSS1 S_FD1 < <(sample "$SERVER_PID")
read -r A_RSS1 A_FD1 < <(sample "$AGENT_PID")
V1="$("$CLI" --socket "$MGMT" --json status | python3 -c 'import json, sys; s = json.load(sys.stdin); print(max([v.get("version", 0) for v in s.get("secrets", [])] or [0]))' 2>/dev/null || echo '?')"
kill -0 "$SERVER_PID" && kill -0 "$AGENT_PID" || die "a process died during the soak"

say "resources after the warm-up and after ${SOAK_SECONDS} s (load stopped, 2 s later); secret v$V0 → v$V1"
GROWTH_OK=true
row() {
  local what="$1" start="$2" end="$3"
  if ! awk -v w="$what" -v s="$start" -v e="$end" -v max="$MAX_GROWTH" 'BEGIN {
        g = (e - s) * 100 / s
        printf "    %-12s %10d %10d  %+6.1f%%\n", w, s, e, g
        exit (g > max) }'; then
    GROWTH_OK=false
  fi
}
printf '    %-12s %10s %10s  %7s\n' "" start end growth
row "server RSS kB" "$S_RSS0" "$S_RSS1"
row "server fds" "$S_FD0" "$S_FD1"
row "agent RSS kB" "$A_RSS0" "$A_RSS1"
row "agent fds" "$A_FD0" "$A_FD1"

$PHASE_OK || die "validations or management requests failed during the soak"
$GROWTH_OK || die "growth above ${MAX_GROWTH}%"
say "soak passed: ${SOAK_SECONDS} s, growth within ${MAX_GROWTH}%"
