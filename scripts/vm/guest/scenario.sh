#!/bin/sh
# The guest's side of the VM tests (crates/license-agent/tests/vm.rs, scripts/vm/power-cuts.sh):
# run as root by lsa-guest from the host's share, in a freshly booted Debian 12 with systemd,
# AppArmor and a TPM. The host writes `params` (PHASE, PUBLIC_URL, CURL_PIN, TOKEN) next to this
# script and reads back what it prints: one `ok NAME` per check that held, `FAIL NAME: why` per
# check that did not, `info NAME: value` for figures. Files the host needs go to the share.
#
# Phases:
#   install      the seed's one-liner, then a day of work under the real sandbox (below)
#   reboot       after a clean reboot with the TPM kept: secrets and licenses still valid
#   tpm-cleared  after a boot with a cleared TPM: the agent recovers by itself
#   after-cut    after a power cut: old or new secret, never neither; audit chain; validations
#   cut          busy (rotations) until the host cuts the power
#   (reboot, then) releases the host publishes: one installed by the path unit and the update
#                step, then a broken one rolled back (phase_update, in the reboot's boot)
set -u
share=/mnt/host
. "$share/params"
keep=/root/lsa                 # on the guest's disk: what later boots compare with
mkdir -p "$keep"
fails=0
ok() { echo "ok $1"; }
fail() { echo "FAIL $1: $2"; fails=$((fails + 1)); }
info() { echo "info $1: $2"; }
# check NAME COMMAND...: ok when the command succeeds.
check() {
  name="$1"; shift
  if out="$("$@" 2>&1)"; then ok "$name"; else fail "$name" "$(printf '%s' "$out" | tail -n 5 | tr '\n' ' ')"; fi
}
# wait_for SECONDS NAME COMMAND...: polls the command every second until it succeeds.
wait_for() {
  secs="$1" name="$2"; shift 2
  i=0
  while [ "$i" -lt "$secs" ]; do
    if "$@" >/dev/null 2>&1; then ok "$name"; return 0; fi
    sleep 1; i=$((i + 1))
  done
  fail "$name" "not within ${secs}s: $*"
  return 1
}
cli() { license-agent-cli "$@"; }
agent_pid() { systemctl show -p MainPID --value license-agent; }
prop() { systemctl show -p "$1" --value license-agent; }
status_field() { cli status --json | tr ',{}' '\n\n\n' | sed -n "s/^\"$1\":\"\{0,1\}\([^\"]*\)\"\{0,1\}$/\1/p" | head -n 1; }
newest_version() { cli status --json | grep -o '"version":[0-9]*' | sed 's/.*://' | sort -n | tail -n 1; }
cert_serial() { cli status --json | grep -o '"serial":"[^"]*"' | sed 's/.*:"//; s/"//'; }
# validate AS_USER TOKEN_FILE: the POS application's C program through liblicense_client.
validate() { runuser -u "$1" -- /usr/local/bin/pos-validate /run/license-agent/agent.sock "$(cat "$2")"; }
is_valid() { validate "$1" "$2" | grep -q '^valid '; }
# AppArmor's reports on the license-agent profile in this boot: from the journal (journald reads
# the kernel's audit records) and the kernel log (where they go without it).
denials() {
  { journalctl -b -o cat --no-pager 2>/dev/null; dmesg 2>/dev/null; } \
    | grep -E 'apparmor="(DENIED|ALLOWED)"' | grep 'profile="license-agent"' | sort -u || true
}
contains() { printf '%s' "$1" | grep -qi -- "$2"; }
# refused NAME USER COMMAND...: the command, run as USER, is refused ("Permission denied").
refused() {
  name="$1" who="$2"; shift 2
  out="$(setpriv --reuid="$who" --regid="$who" --init-groups "$@" 2>&1)"
  check "$name" contains "$out" 'permission denied'
}
# The license's current token (copied where the POS user reads it) validates.
current_token_validates() { install -m 0644 "$(token_of "$1")" "$keep/current.token" && is_valid pos "$keep/current.token"; }
fails() { ! "$@" >/dev/null 2>&1; }
# in_its_sandbox COMMAND...: as the agent's user, in the agent's mount namespace (its unit's view).
in_its_sandbox() { nsenter -t "$(agent_pid)" -m -- setpriv --reuid=license-agent --regid=license-agent --init-groups "$@"; }
newer_than() { [ "$(newest_version)" -gt "$1" ]; }
cert_is_not() { [ "$(cert_serial)" != "$1" ]; }
restarted_since() { [ "$(prop NRestarts)" -gt "$1" ] && active; }
no_capabilities() { ! grep -E '^Cap(Eff|Prm|Bnd):' "/proc/$1/status" | grep -vq ':[[:space:]]*0\{16\}$'; }
active() { [ "$(systemctl is-active license-agent)" = active ]; }
token_of() { echo "/var/lib/license-agent/tokens/$1.token"; }
# A copy of the license's current token that the POS user can read (as a POS application keeps it).
keep_token() {
  install -m 0644 "$(token_of "$1")" "$keep/$2"
}

# The POS application: the C example of license-client, built on the host, installed as a POS
# vendor would (its library beside it). Users: pos (allowed), intruder (in the socket's group
# but not allowed), outsider (not in the group), ops (may read status, not act).
install_pos_app() {
  install -m 0755 "$share/pos-validate" /usr/local/bin/pos-validate
  install -m 0644 "$share/liblicense_client.so" /usr/local/lib/liblicense_client.so
  ldconfig
  id pos >/dev/null 2>&1 || useradd -m -G license-clients pos
  id intruder >/dev/null 2>&1 || useradd -m -G license-clients intruder
  id outsider >/dev/null 2>&1 || useradd -m outsider
  id ops >/dev/null 2>&1 || useradd -m ops
}

# ---- checks shared by the phases -------------------------------------------------------------

check_running() {
  wait_for 60 "$1: agent active (Type=notify: READY reached)" active
  info "$1: status text" "$(prop StatusText)"
  check "$1: confined by AppArmor in enforce mode" \
    sh -c "grep -qx 'license-agent (enforce)' /proc/$(agent_pid)/attr/current"
}

check_audit() {
  if out="$(cli audit verify 2>&1)"; then ok "$1: audit chain verifies"; else
    fail "$1: audit chain verifies" "$(printf '%s' "$out" | tail -n 3 | tr '\n' ' ')"
  fi
  info "$1: audit verify" "$(printf '%s' "$out" | tail -n 1)"
}

check_no_denials() {
  d="$(denials)"
  if [ -z "$d" ]; then ok "$1: no AppArmor denial"; else fail "$1: no AppArmor denial" "$(printf '%s' "$d" | head -n 5 | tr '\n' ' ')"; fi
}

# ---- install: the one-liner and a day of work --------------------------------------------------

phase_install() {
  echo "== the seed's one-liner, as root, no prefix"
  if bash -o pipefail -c "curl -fsSL -k --pinnedpubkey '$CURL_PIN' $PUBLIC_URL/install.sh | sudo bash -s -- $TOKEN" \
    >"$share/install.out" 2>&1; then ok "one-liner installs"; else
    fail "one-liner installs" "$(tail -n 5 "$share/install.out" | tr '\n' ' ')"
    journalctl -u license-agent -n 40 -o cat --no-pager
    denials
    return
  fi
  check "a TPM is present: install.sh chose it" grep -q "a TPM is present" "$share/install.out"
  check "installed from the package the server publishes" grep -q "installing the license-agent package" "$share/install.out"
  check "user license-agent exists" id license-agent
  check "group license-clients exists" getent group license-clients
  # The seed's owners and modes (docs/OPERATIONS.md: the agent owns its config, it renews it).
  for spec in \
    "/etc/license-agent 700 license-agent:license-agent" \
    "/etc/license-agent/config.toml 600 license-agent:license-agent" \
    "/etc/license-agent/client.key 600 license-agent:license-agent" \
    "/etc/license-agent/client.pem 600 license-agent:license-agent" \
    "/var/lib/license-agent 700 license-agent:license-agent" \
    "/usr/bin/license-agent 755 root:root" \
    "/usr/bin/license-agent-cli 755 root:root"; do
    set -- $spec
    check "mode and owner of $1 ($2 $3)" test "$(stat -c '%a %U:%G' "$1")" = "$2 $3"
  done
  check "the machine key is in the TPM (no PEM private key on disk)" sh -c '! grep -q "PRIVATE KEY" /etc/license-agent/client.key'
  check "config uses the kernel's TPM resource manager" grep -q 'tcti = "device:/dev/tpmrm0"' /etc/license-agent/config.toml
  check "unit enabled" systemctl is-enabled license-agent
  check_running install
  if ! active; then
    journalctl -u license-agent -n 30 --no-pager
    denials
    return
  fi
  check "store is the TPM" test "$(status_field store)" = tpm
  check "Type=notify" test "$(prop Type)" = notify
  check "profile loaded in enforce mode" grep -qx 'license-agent (enforce)' /sys/kernel/security/apparmor/profiles
  info "secret version after enrollment" "$(newest_version)"

  echo "== the POS application and the people around the till"
  install_pos_app
  machine="$(cli status --json | grep -o '"machine_id":"[^"]*"' | sed 's/.*:"//; s/"//')"
  info "machine" "$machine"
  echo "$machine" >"$share/machine_id.tmp" && mv "$share/machine_id.tmp" "$share/machine_id"
  sed -i '/^\[ipc\]/,/^\[/ s/^allowed_uids = .*/allowed_uids = ['"$(id -u pos)"']/' /etc/license-agent/config.toml
  sed -i '/^\[management\]/,/^\[/ s/^allowed_uids = .*/allowed_uids = [0, '"$(id -u ops)"']/' /etc/license-agent/config.toml
  sed -i 's/^rotation_interval = .*/rotation_interval = 40/; s/^poll_interval = .*/poll_interval = 10/; s/^health_deadline = .*/health_deadline = 60/' /etc/license-agent/config.toml
  grep -q '^poll_interval' /etc/license-agent/config.toml \
    || sed -i 's/^rotation_interval = 40$/&\npoll_interval = 10/' /etc/license-agent/config.toml
  pid_before="$(agent_pid)"
  check "SIGHUP reload (systemctl reload)" systemctl reload license-agent
  wait_for 20 "reload audited" grep -q 'agent.reload' /var/log/license-agent/audit.log
  check "reload kept the process" test "$(agent_pid)" = "$pid_before"

  echo "== licenses fetched from the server"
  wait_for 120 "the host issued a license" test -s "$share/license_id"
  license="$(cat "$share/license_id")"
  wait_for 60 "the agent fetched its token" test -s "$(token_of "$license")"
  keep_token "$license" first.token
  check "pos validates (SO_PEERCRED allowed uid)" is_valid pos "$keep/first.token"
  out="$(validate intruder "$keep/first.token" 2>&1)"
  info "intruder" "$out"
  check "intruder (group member, not allowed) refused" contains "$out" 'not_authorized\|not authorized\|refused'
  check "intruder not told the license is valid" sh -c "! printf '%s' \"\$1\" | grep -q '^valid '" - "$out"
  out="$(validate outsider "$keep/first.token" 2>&1)"
  info "outsider" "$out"
  check "outsider (not in the socket's group) cannot connect" contains "$out" 'permission denied' 

  echo "== management as an allowed and a refused user"
  check "root: status" cli status
  check "ops: status" runuser -u ops -- license-agent-cli status
  runuser -u ops -- license-agent-cli rotate >/dev/null 2>&1; rc=$?
  check "ops: rotate refused (exit 3)" test "$rc" = 3
  out="$(runuser -u pos -- license-agent-cli status 2>&1)"; rc=$?
  info "pos: status" "exit $rc: $out"
  check "pos: status refused (exit 3)" test "$rc" = 3

  echo "== rotations: forced, then by the agent's own schedule"
  v0="$(newest_version)"
  check "root: rotate" cli rotate
  v1="$(newest_version)"
  check "forced rotation made a new version ($v0 -> $v1)" test "$v1" -gt "$v0"
  wait_for 90 "a scheduled rotation (rotation_interval 40 s)" newer_than "$v1"
  check "the first token still validates (grace)" is_valid pos "$keep/first.token"
  wait_for 60 "the re-issued token validates" current_token_validates "$license"

  echo "== certificate renewal (the host's server makes short certificates)"
  serial0="$(cert_serial)"
  check "a certificate serial" test -n "$serial0"
  info "certificate" "$serial0 renews at $(cli status --json | grep -o '"renews_at":"[^"]*"')"
  wait_for 240 "certificate renewed by itself" cert_is_not "$serial0"
  check "renewed certificate file mode 600" test "$(stat -c '%a %U' /etc/license-agent/client.pem)" = "600 license-agent"

  echo "== the sandbox's claims on the live process"
  pid="$(agent_pid)"
  check "no capabilities (CapEff, CapPrm, CapBnd all zero)" no_capabilities "$pid"
  check "no new privileges" grep -q '^NoNewPrivs:[[:space:]]*1' "/proc/$pid/status"
  check "seccomp filter on" grep -q '^Seccomp:[[:space:]]*2' "/proc/$pid/status"
  check "cannot write /usr (ProtectSystem=strict)" fails in_its_sandbox touch /usr/lib/lsa-probe
  check "cannot write /etc outside its directory" fails in_its_sandbox touch /etc/lsa-probe
  check "cannot see /home (ProtectHome)" fails nsenter -t "$pid" -m -- ls /home/pos
  check "can write its state directory" in_its_sandbox sh -c 'touch /var/lib/license-agent/.probe && rm /var/lib/license-agent/.probe'
  sa="$(systemd-analyze security license-agent.service 2>&1 | tail -n 1)"
  info "systemd-analyze security" "$sa"
  level="$(printf '%s' "$sa" | sed -n 's/.*license-agent.service: \([0-9.]*\).*/\1/p')"
  check "exposure $level <= 2.0" awk -v l="$level" 'BEGIN { exit !(l != "" && l <= 2.0) }'

  echo "== nobody else reads its memory or its files"
  # A mapped address of the agent (its heap), so that a refused read is refused for access,
  # not because nothing is there.
  heap="$(awk '/\[heap\]/ { split($1, a, "-"); print a[1]; exit }' "/proc/$pid/maps")"
  info "agent heap at" "$heap"
  check "root can read that address (the probe is meaningful)" sh -c "dd if=/proc/$pid/mem bs=1 count=16 skip=\$((0x$heap)) iflag=skip_bytes 2>/dev/null | od -An | grep -q ."
  for who in pos intruder ops; do
    refused "$who cannot read the agent's memory" "$who" \
      dd "if=/proc/$pid/mem" bs=1 count=16 "skip=$((0x$heap))" iflag=skip_bytes
  done
  refused "pos cannot read /proc/PID/maps" pos cat "/proc/$pid/maps"
  refused "pos cannot read /proc/PID/environ" pos cat "/proc/$pid/environ"
  refused "not dumpable: even its own uid cannot read /proc/PID/maps" license-agent cat "/proc/$pid/maps"
  refused "pos cannot list the state directory" pos ls /var/lib/license-agent
  refused "pos cannot read the machine key" pos cat /etc/license-agent/client.key
  refused "pos cannot read the audit log" pos cat /var/log/license-agent/audit.log

  echo "== watchdog: a hung agent is killed and restarted by systemd"
  restarts0="$(prop NRestarts)"
  kill -STOP "$pid"
  wait_for 75 "watchdog restarted the agent" restarted_since "$restarts0"
  check "journal names the watchdog" sh -c "journalctl -u license-agent --no-pager | grep -qi watchdog"
  check "validates after the restart" is_valid pos "$keep/current.token"

  echo "== systemctl stop drains and exits cleanly"
  check "stop" systemctl stop license-agent
  check "stopped with success" test "$(prop Result)" = success
  info "last agent lines" "$(journalctl -u license-agent -n 3 -o cat --no-pager | tr '\n' '|')"
  check "start again" systemctl start license-agent
  check_running install-end
  check_audit install
  check_no_denials install
  # The profile bites: the agent's binary asked to read a file outside its paths is refused by
  # AppArmor (root's permissions would allow it), and the denial is where the checks above look.
  printf '[server]\n' >/root/lsa-probe.toml
  out="$(license-agent check-config --config /root/lsa-probe.toml 2>&1)"
  info "confined read outside its paths" "$out"
  check "a read outside its paths is denied" contains "$out" 'permission denied'
  check "and the denial is logged" sh -c "journalctl -b -o cat --no-pager | grep 'apparmor=\"DENIED\"' | grep 'profile=\"license-agent\"' | grep -q lsa-probe.toml"
  newest_version >"$keep/version"
  cert_serial >"$keep/serial"
}

# ---- later boots --------------------------------------------------------------------------------

phase_reboot() {
  check_running reboot
  cert_serial >"$keep/serial"
  check "a certificate after reboot (renewed meanwhile or not)" test -n "$(cert_serial)"
  check "same secrets after reboot" test "$(newest_version)" -ge "$(cat "$keep/version")"
  check "the token from before the reboot validates" is_valid pos "$keep/current.token"
  check_audit reboot
  check_no_denials reboot
  # The host publishes its first release once the reboot's checks are done (phase_update).
  echo "rebooted" >"$share/rebooted.tmp" && mv "$share/rebooted.tmp" "$share/rebooted"
}

phase_tpm_cleared() {
  # The sealed secrets and the TPM-resident machine key are gone: the agent must notice,
  # recover with its recovery token, re-key and fetch its licenses again by itself.
  license="$(cat "$share/license_id")"
  wait_for 120 "agent active after the TPM was cleared" active
  wait_for 120 "recovered: a secret held again" newer_than 0
  wait_for 60 "store is the TPM again" sh -c "license-agent-cli status --json | grep -q '\"store\":\"tpm\"'"
  info "status text" "$(prop StatusText)"
  wait_for 90 "a token re-issued after recovery validates" current_token_validates "$license"
  check "recovery audited (machine.recover, success)" sh -c "grep 'machine.recover' /var/log/license-agent/audit.log | grep -q success"
  check "a new machine certificate (the old key died with the TPM)" test "$(cert_serial)" != "$(cat "$keep/serial")"
  check_audit tpm-cleared
  check_no_denials tpm-cleared
  newest_version >"$keep/version"
}

phase_cut() {
  check_running cut
  newest_version >"$keep/version-before-cut"
  install -m 0644 "$(token_of "$(cat "$share/license_id")")" "$keep/current.token"
  echo "cut window open" >"$share/cut-window"
  sync
  # Rotations back to back until the power goes; renewals and fetches happen on their own.
  while :; do license-agent-cli rotate >/dev/null 2>&1; done
}

phase_after_cut() {
  check_running after-cut
  v="$(newest_version)"
  info "secret version (before the cut: $(cat "$keep/version-before-cut"))" "$v"
  check "a secret survived the cut (old or new, never neither)" test -n "$v"
  check "not older than before the cut" test "${v:-0}" -ge "$(cat "$keep/version-before-cut")"
  # The token kept before the cut is under a version in grace at worst: it must validate, or be
  # refused only as expired/unknown when its version is gone, never answer wrongly.
  if out="$(validate pos "$keep/current.token" 2>&1)"; then ok "token from before the cut validates"; else
    case "$out" in *invalid*) info "token from before the cut" "$out" ;; *) fail "token from before the cut" "$out" ;; esac
  fi
  license="$(cat "$share/license_id")"
  wait_for 90 "the current token validates" current_token_validates "$license"
  out="$(cli audit verify 2>&1)"; rc=$?
  info "audit verify" "$(printf '%s' "$out" | tail -n 2 | tr '\n' ' ')"
  # A cut may truncate the last line; verify must then say so exactly, not report tampering.
  if [ "$rc" = 0 ] || printf '%s' "$out" | grep -qi 'truncat'; then ok "audit chain verifies or names the truncation"; else
    fail "audit chain verifies or names the truncation" "$(printf '%s' "$out" | tail -n 3 | tr '\n' ' ')"
  fi
  check_no_denials after-cut
}

phase_update() {
  # The host publishes 0.1.1 (this very binary with its version bytes changed) to everyone.
  check_running update
  license="$(cat "$share/license_id")"
  check "update: the step's units are installed" sh -c 'systemctl is-enabled license-agent-update.path && test -x /usr/lib/license-agent/license-agent-update'
  sha256sum /usr/bin/license-agent | cut -d' ' -f1 >"$keep/binary-before-update"
  wait_for 240 "update: 0.1.1 installed by the path unit and the update step" sh -c 'test "$(license-agent-cli status --json | grep -o "\"agent_version\":\"[^\"]*\"")" = "\"agent_version\":\"0.1.1\""'
  # The agent answers as 0.1.1 once the step's health check may pass; the step then finishes
  # (its own copy refreshed, the staging directory cleared) before the unit goes inactive.
  wait_for 60 "update: the update step finished" sh -c 'test "$(systemctl show -p ActiveState --value license-agent-update.service)" = inactive && test ! -e /var/lib/license-agent/updates/ready'
  check "update: license-agent-update.service succeeded" test "$(systemctl show -p Result --value license-agent-update.service)" = success
  info "update: the step's log" "$(journalctl -u license-agent-update.service -o cat --no-pager | tail -n 8 | tr '\n' '|')"
  check "update: the previous binary kept" test "$(sha256sum /var/lib/license-agent-update/previous | cut -d' ' -f1)" = "$(cat "$keep/binary-before-update")"
  check "update: the step's own copy refreshed" cmp /usr/bin/license-agent /usr/lib/license-agent/license-agent-update
  check "update: the step's directory is root's only" test "$(stat -c '%a %U' /var/lib/license-agent-update)" = "700 root"
  check_running update-0.1.1
  wait_for 60 "update: every step audited, outcome success" sh -c 'grep "\"update.result\"" /var/log/license-agent/audit.log | grep -q success'
  for step in verify stop backup swap start health; do
    check "update: update.$step audited" grep -q "\"update.$step\"" /var/log/license-agent/audit.log
  done
  wait_for 60 "update: the token validates after the update" current_token_validates "$license"
  echo "updated" >"$share/updated.tmp" && mv "$share/updated.tmp" "$share/updated"

  # Now the host publishes 0.1.2, a binary that fails at start: rolled back by itself.
  wait_for 240 "update: the broken 0.1.2 rolled back" sh -c 'license-agent-cli status --json | grep -q "\"outcome\":\"failed\""'
  check "update: 0.1.1 runs again" test "$(status_field agent_version)" = 0.1.1
  wait_for 30 "update: the step reported the failure (unit failed)" sh -c 'test "$(systemctl show -p ActiveState --value license-agent-update.service)" = failed'
  info "update: the step's log" "$(journalctl -u license-agent-update.service -o cat --no-pager | tail -n 10 | tr '\n' '|')"
  check_running update-rollback
  wait_for 60 "update: the token validates after the rollback" current_token_validates "$license"
  check "update: no update staged any more" test ! -e /var/lib/license-agent/updates/ready
  check_audit update
  check_no_denials update
  wait_for 60 "update: the failure reported (the rollout halts)" sh -c 'license-agent-cli status --json | grep -q "\"reason\":\"start_failed\"\|\"reason\":\"health_check_failed\""'
  echo "rolled back" >"$share/rolled-back.tmp" && mv "$share/rolled-back.tmp" "$share/rolled-back"
}

case "$PHASE" in
  install) phase_install ;;
  reboot) phase_reboot; phase_update ;;
  tpm-cleared) phase_tpm_cleared ;;
  cut) phase_cut ;;
  after-cut) phase_after_cut ;;
  *) fail phase "unknown phase $PHASE" ;;
esac
echo "failures: $fails"
journalctl -u license-agent -o short-monotonic --no-pager >"$share/agent.journal" 2>&1
journalctl -k -o short-monotonic --no-pager >"$share/kernel.log" 2>&1
[ "$fails" -eq 0 ]
