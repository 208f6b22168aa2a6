#!/usr/bin/env bash
# License Secret Agent installer for Linux, served by license-server at /install.sh.
#
#   curl -fsSL -k --pinnedpubkey '@CURL_PIN@' @PUBLIC_URL@/install.sh | sudo bash -s -- TOKEN
#
# `-k` skips the public CA check because the server's certificate comes from its own CA;
# `--pinnedpubkey` makes curl refuse any server whose key is not the pinned one, which is a
# stronger check. Every later request (binary download, enrollment) is pinned the same way.
#
# With `--refresh-network` instead of a token it only rewrites the unit from the installed
# config: run it again when the server's addresses (or the alert webhook's, or the DNS servers)
# change, since the unit lets the agent reach those addresses and no others.
#
# When the server publishes the Debian package (downloads/stable/license-agent-linux-ARCH.deb)
# it installs that (apt-get, which also brings the TPM libraries; extracted under a prefix),
# else the bare binary (downloads/stable/license-agent-linux-ARCH).
#
# `--package-files DIR` writes the unit (without the network restriction, which needs the
# installed config) and the AppArmor profile under DIR, for the Debian package
# (scripts/package.sh), and exits.
#
# Environment:
#   LICENSE_AGENT_PREFIX       install under this directory instead of / (tests, images);
#                              users and systemd are then left alone.
#   LICENSE_AGENT_HARDWARE_ID  override the detected hardware id.
#   LICENSE_AGENT_IP_ALLOW     more addresses or prefixes the agent may reach (systemd's
#                              IPAddressAllow= syntax, space-separated), e.g. a DHCP network
#                              whose DNS servers change.
set -euo pipefail

SERVER_URL='@PUBLIC_URL@'
SERVER_PIN='@SERVER_PIN@'
CURL_PIN='@CURL_PIN@'
PREFIX="${LICENSE_AGENT_PREFIX:-}"

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

REFRESH_NETWORK=false
PACKAGE_FILES=""
if [ "${1:-}" = --package-files ]; then
  PACKAGE_FILES="${2:?usage: install.sh --package-files DIR}"
elif [ "${1:-}" = --refresh-network ]; then
  REFRESH_NETWORK=true
  shift
fi
# The token as the seed's one-liner gives it, or from LICENSE_AGENT_TOKEN (which keeps it out
# of this shell's command line, visible in `ps`).
TOKEN="${1:-${LICENSE_AGENT_TOKEN:-}}"
if [ -z "$PACKAGE_FILES" ] && ! $REFRESH_NETWORK && [ -z "$TOKEN" ]; then
  echo "usage: install.sh TOKEN (or LICENSE_AGENT_TOKEN=… in the environment), or install.sh --refresh-network" >&2
  exit 2
fi
[ "$(uname -s)" = Linux ] || die "only Linux is supported"
case "$(uname -m)" in
  x86_64|amd64) ARCH=amd64 ;;
  aarch64|arm64) ARCH=arm64 ;;
  armv7l|armhf) ARCH=armv7 ;;
  *) die "unsupported architecture $(uname -m)" ;;
esac
if [ -z "$PREFIX" ] && [ -z "$PACKAGE_FILES" ] && [ "$(id -u)" -ne 0 ]; then
  die "run as root (… | sudo bash -s -- TOKEN) or set LICENSE_AGENT_PREFIX"
fi

BIN_DIR="$PREFIX/usr/bin"
ETC_DIR="$PREFIX/etc/license-agent"
STATE_DIR="$PREFIX/var/lib/license-agent"
LOG_DIR="$PREFIX/var/log/license-agent"
UNIT_DIR="$PREFIX/etc/systemd/system"

# The host of a URL from config.toml: `https://name:8444/…` → name, `https://[2001:db8::1]:8444` →
# 2001:db8::1.
url_host() {
  local rest="${1#*://}"
  rest="${rest%%/*}"
  rest="${rest##*@}"
  case "$rest" in
    \[*) rest="${rest#[}"; printf '%s\n' "${rest%%]*}" ;;
    *) printf '%s\n' "${rest%%:*}" ;;
  esac
}

# What the agent may reach (seed §2.1, "no network except to the license server"): the
# addresses of the hosts in the installed config — the server's agent and public URLs, and the
# alert webhook's when one is set — resolved now, plus, when one of them is a name and not an
# address, the DNS servers of /etc/resolv.conf (the agent resolves the name at each
# connection), plus LICENSE_AGENT_IP_ALLOW. Sorted, space-separated. Fails when a host does not
# resolve: a unit without its server's addresses would cut the agent off.
agent_ip_allow() {
  local config="$1" url host resolved names=false addresses=()
  while IFS= read -r url; do
    host="$(url_host "$url")"
    [ -n "$host" ] || die "no host in $url ($config)"
    case "$host" in
      *:*) addresses+=("$host"); continue ;;     # an IPv6 address
      *[!0-9.]*) ;;                              # a name
      *) addresses+=("$host"); continue ;;       # an IPv4 address
    esac
    names=true
    resolved="$(getent ahosts "$host" | awk '{ print $1 }' | sort -u)" || true
    [ -n "$resolved" ] || die "cannot resolve $host (from $config): the agent's unit needs its addresses"
    addresses+=($resolved)
  done < <(sed -n 's/^[[:space:]]*\(url\|public_url\|webhook_url\)[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\2/p' "$config")
  [ "${#addresses[@]}" -gt 0 ] || die "no server URL in $config"
  if $names; then
    addresses+=($(awk '$1 == "nameserver" { sub(/%.*/, "", $2); print $2 }' /etc/resolv.conf 2>/dev/null))
  fi
  addresses+=(${LICENSE_AGENT_IP_ALLOW:-})
  printf '%s\n' "${addresses[@]}" | sort -u | paste -sd ' ' -
}

# The systemd unit at path $2, with the network restricted to the addresses $1 (none given:
# not restricted, for the package's unit; install.sh's own unit overrides it).
write_unit() {
  local ip_allow="$1" path="$2" network
  if [ -n "$ip_allow" ]; then
    network="# No network but the license server (with the DNS servers its name needs) and the alert
# webhook: the addresses install.sh resolved from config.toml. When they change, run
# install.sh --refresh-network again (docs/OPERATIONS.md).
IPAddressDeny=any
IPAddressAllow=$ip_allow"
  else
    network="# The network is restricted to the license server's addresses by the unit install.sh writes
# to /etc/systemd/system once the machine is enrolled (docs/OPERATIONS.md)."
  fi
  mkdir -p "$(dirname "$path")"
  cat > "$path" <<UNIT
[Unit]
Description=License Secret Agent
Documentation=man:license-agent-cli(1)
After=network-online.target
Wants=network-online.target
# Installed by the package before the machine is enrolled: nothing to run until then.
ConditionPathExists=/etc/license-agent/config.toml

[Service]
Type=notify
User=license-agent
Group=license-agent
SupplementaryGroups=tss license-clients
ExecStart=/usr/bin/license-agent run --config /etc/license-agent/config.toml
ExecReload=/bin/kill -HUP \$MAINPID
Restart=on-failure
RestartSec=5s
WatchdogSec=30s
TimeoutStopSec=20s
# The TSS library's own error lines for expected failures (e.g. a tampered blob) stay out of the journal.
Environment=TSS2_LOG=all+NONE
LimitCORE=0
# Validations answer the till within milliseconds even while the POS application (or anything
# else) keeps the CPU busy: a larger CPU and I/O share than ordinary services, and a higher
# priority within its cgroup.
Nice=-5
CPUWeight=1000
IOWeight=1000
# Each secret sits in a page of its own locked in RAM.
LimitMEMLOCK=8M
NoNewPrivileges=true
CapabilityBoundingSet=
AmbientCapabilities=
PrivateMounts=true
ProtectProc=invisible
ProcSubset=pid
RemoveIPC=true
PrivateTmp=true
ProtectSystem=strict
ProtectHome=true
# /etc/license-agent too: recovery and renewal rewrite the key, certificate and recovery token.
ReadWritePaths=/etc/license-agent /var/lib/license-agent /var/log/license-agent /run/license-agent
RuntimeDirectory=license-agent
RuntimeDirectoryMode=0755
DevicePolicy=closed
DeviceAllow=/dev/tpmrm0 rw
ProtectKernelTunables=true
ProtectKernelModules=true
ProtectKernelLogs=true
ProtectControlGroups=true
ProtectClock=true
ProtectHostname=true
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
$network
RestrictNamespaces=true
RestrictRealtime=true
RestrictSUIDSGID=true
LockPersonality=true
MemoryDenyWriteExecute=true
SystemCallArchitectures=native
# Checked by crates/license-agent/tests/systemd.rs against every syscall the agent makes.
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
# …but for chown(2): the agent gives its validation socket the POS applications' group
# (ipc.socket_group), one of its own groups (no CAP_CHOWN: no other change is possible).
SystemCallFilter=chown fchownat
SystemCallErrorNumber=EPERM
UMask=0077

[Install]
WantedBy=multi-user.target
UNIT
}

# AppArmor profile, enforced: the agent may touch its own files, the TPM and the network, and
# nothing else. It runs enforcing with no denial through a day of work, reboots, a cleared TPM
# and power cuts in a real Debian 12 guest (crates/license-agent/tests/vm.rs).
write_apparmor_profile() {
  local path="$1"
  [ "$path" = /dev/stdout ] || mkdir -p "$(dirname "$path")"
  cat > "$path" <<'PROFILE'
# License Secret Agent (written by install.sh; docs/OPERATIONS.md)
abi <abi/3.0>,
include <tunables/global>

profile license-agent /usr/bin/license-agent {
  include <abstractions/base>
  include <abstractions/nameservice>
  # The TPM software stack's crypto (OpenSSL) reads its configuration.
  include <abstractions/openssl>

  /usr/bin/license-agent mr,

  # Config, key, certificate and recovery token (rewritten atomically: temp file + rename).
  /etc/license-agent/ r,
  /etc/license-agent/** rwk,
  # State, sealed secrets, tokens, metrics, the TPM lock; audit log; sockets.
  /var/lib/license-agent/ r,
  /var/lib/license-agent/** rwk,
  /var/log/license-agent/ r,
  /var/log/license-agent/** rwk,
  /run/license-agent/ r,
  /run/license-agent/** rw,
  # systemd notify, journald.
  /run/systemd/notify w,

  # Enrollment runs the same binary (install.sh): the hostname and the hardware id.
  @{PROC}/sys/kernel/hostname r,
  /etc/hostname r,
  /sys/devices/virtual/dmi/id/product_uuid r,
  /etc/machine-id r,
  /var/lib/dbus/machine-id r,

  # The TPM, through the kernel resource manager (or directly).
  /dev/tpmrm0 rw,
  /dev/tpm0 rw,

  # Thread and cgroup CPU limits read by the runtime.
  @{PROC}/@{pid}/maps r,
  @{PROC}/@{pid}/cgroup r,
  @{PROC}/@{pid}/mountinfo r,
  /sys/fs/cgroup/** r,

  network inet stream,
  network inet6 stream,
  network unix stream,
  network unix dgram,

  signal (receive) set=(term, hup, int, kill),

  # Nothing else: no capability (the agent, enrollment included, runs as its own user), no
  # ptrace of anyone, no other process's memory; what is not allowed above is refused and
  # logged. The secrets are in this process's memory: no confined process may read or trace
  # it either (unconfined root still can, docs/SECURITY.md).
  audit deny ptrace (readby, tracedby),
}
PROFILE
}

# The update step's units in directory $1 (docs/OPERATIONS.md "Releasing and rolling out"):
# the path unit starts the step when the agent stages a checked release (and at boot while an
# update is unfinished: `ready` stays until the step is done). The step runs as root outside
# the agent's sandbox, from its own copy of the binary (/usr/lib/license-agent/
# license-agent-update): the AppArmor profile confines /usr/bin/license-agent, the daemon.
write_update_units() {
  local dir="$1"
  mkdir -p "$dir"
  cat > "$dir/license-agent-update.path" <<'UNIT'
[Unit]
Description=License Secret Agent: install a release the agent staged
Documentation=man:license-agent-cli(1)

[Path]
PathExists=/var/lib/license-agent/updates/ready
Unit=license-agent-update.service

[Install]
WantedBy=multi-user.target
UNIT
  cat > "$dir/license-agent-update.service" <<'UNIT'
[Unit]
Description=License Secret Agent update step (check, stop, back up, swap, start, health check, roll back)
Documentation=man:license-agent-cli(1)
ConditionPathExists=/etc/license-agent/config.toml

[Service]
Type=oneshot
# Root, outside the agent's sandbox: it replaces /usr/bin/license-agent and restarts the agent.
ExecStart=/usr/lib/license-agent/license-agent-update update apply --config /etc/license-agent/config.toml
TimeoutStartSec=30min
LimitCORE=0
UMask=0077
UNIT
}

if [ -n "$PACKAGE_FILES" ]; then
  write_unit "" "$PACKAGE_FILES/lib/systemd/system/license-agent.service"
  write_update_units "$PACKAGE_FILES/lib/systemd/system"
  write_apparmor_profile "$PACKAGE_FILES/etc/apparmor.d/usr.bin.license-agent"
  exit 0
fi

if $REFRESH_NETWORK; then
  [ -f "$ETC_DIR/config.toml" ] || die "$ETC_DIR/config.toml missing: install (enroll) first"
  IP_ALLOW="$(agent_ip_allow "$ETC_DIR/config.toml")"
  say "rewriting the systemd unit (network: $IP_ALLOW)"
  write_unit "$IP_ALLOW" "$UNIT_DIR/license-agent.service"
  if [ -z "$PREFIX" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl try-restart license-agent.service
  fi
  exit 0
fi

command -v curl >/dev/null || die "curl is required"
mkdir -p "$BIN_DIR" "$ETC_DIR" "$STATE_DIR" "$LOG_DIR" "$UNIT_DIR"
chmod 0700 "$ETC_DIR" "$STATE_DIR"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

fetch() {
  curl -fsS --proto '=https' -k --pinnedpubkey "$CURL_PIN" -o "$2" "$SERVER_URL/downloads/stable/$1"
}
say "downloading license-agent for $ARCH from $SERVER_URL"
if fetch "license-agent-linux-$ARCH.deb" "$tmp/license-agent.deb" 2>/dev/null; then
  if [ -n "$PREFIX" ]; then
    say "extracting the license-agent package under $PREFIX"
    dpkg-deb -x "$tmp/license-agent.deb" "$PREFIX"
  elif command -v apt-get >/dev/null; then
    say "installing the license-agent package (and what it depends on)"
    apt-get install -y -qq "$tmp/license-agent.deb" >/dev/null || die "cannot install the license-agent package"
  else
    dpkg -i "$tmp/license-agent.deb" || die "cannot install the license-agent package"
  fi
else
  fetch "license-agent-linux-$ARCH" "$tmp/license-agent" \
    || die "download failed (is the agent published under downloads/stable/ on the server?)"
  install -m 0755 "$tmp/license-agent" "$BIN_DIR/license-agent"
fi
# The update step's own copy (outside the daemon's AppArmor profile; refreshed by each update).
mkdir -p "$PREFIX/usr/lib/license-agent"
install -m 0755 "$BIN_DIR/license-agent" "$PREFIX/usr/lib/license-agent/license-agent-update"

if [ -z "$PREFIX" ] && ! ldconfig -p 2>/dev/null | grep -q libtss2-esys; then
  say "installing the TPM software stack libraries"
  if command -v apt-get >/dev/null; then
    apt-get install -y -qq libtss2-esys-3.0.2-0 libtss2-tctildr0 >/dev/null || die "cannot install libtss2 (the agent needs it)"
  else
    die "the agent needs the tpm2-tss libraries (libtss2-esys, libtss2-tctildr); install them first"
  fi
fi
TPM_ARGS=""
if [ -z "$PREFIX" ] && [ -e /dev/tpmrm0 ]; then
  TPM_ARGS="--tpm device:/dev/tpmrm0"
  say "a TPM is present: the machine key will be made and kept inside it"
fi

AS_AGENT=()
if [ -z "$PREFIX" ]; then
  # The agent's user, its group on the TPM device, and the group of the POS applications'
  # users (they join it to reach the validation socket, 0660). Enrollment runs as that user:
  # its files are its own from the start, and no root process runs under its AppArmor profile.
  getent group license-clients >/dev/null || groupadd -r license-clients
  id license-agent >/dev/null 2>&1 || useradd -r -s /usr/sbin/nologin -d /var/lib/license-agent license-agent
  if getent group tss >/dev/null; then usermod -a -G tss license-agent; fi
  chown -R license-agent:license-agent "$STATE_DIR" "$LOG_DIR" "$ETC_DIR"
  AS_AGENT=(setpriv --reuid=license-agent --regid=license-agent --init-groups)
  # The board's DMI UUID (survives a reinstall) is readable by root only: read here.
  if [ -z "${LICENSE_AGENT_HARDWARE_ID:-}" ] && [ -r /sys/class/dmi/id/product_uuid ]; then
    LICENSE_AGENT_HARDWARE_ID="$(tr -d '[:space:]' </sys/class/dmi/id/product_uuid)"
  fi
fi

say "enrolling this machine (key generated locally, server pinned)"
# The token goes to the agent through its environment, never its command line.
set -- enroll --server "$SERVER_URL" --server-pin "$SERVER_PIN" \
  --config "$ETC_DIR/config.toml" --state-dir "$STATE_DIR" --log-dir "$LOG_DIR" $TPM_ARGS
if [ -n "${LICENSE_AGENT_HARDWARE_ID:-}" ]; then
  set -- "$@" --hardware-id "$LICENSE_AGENT_HARDWARE_ID"
fi
if [ -z "$PREFIX" ]; then
  set -- "$@" --socket-group license-clients
fi
if [ -e "$ETC_DIR/config.toml" ]; then
  # Re-running the installer: the machine's current key signs the request, which is what lets
  # it take its own machine over again (a wiped machine needs a token bound to it instead).
  say "this machine is enrolled already: enrolling it again, signed by its current key"
  set -- "$@" --force
fi
LICENSE_AGENT_TOKEN="$TOKEN" "${AS_AGENT[@]}" "$BIN_DIR/license-agent" "$@"
unset TOKEN
IP_ALLOW="$(agent_ip_allow "$ETC_DIR/config.toml")"

say "installing systemd units (network: $IP_ALLOW)"
write_unit "$IP_ALLOW" "$UNIT_DIR/license-agent.service"
write_update_units "$UNIT_DIR"

APPARMOR_DIR="$PREFIX/etc/apparmor.d"
if [ ! -f "$APPARMOR_DIR/usr.bin.license-agent" ] || ! write_apparmor_profile /dev/stdout | cmp -s - "$APPARMOR_DIR/usr.bin.license-agent"; then
  write_apparmor_profile "$APPARMOR_DIR/usr.bin.license-agent"
fi
if [ -z "$PREFIX" ] && [ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" = Y ] \
  && command -v apparmor_parser >/dev/null; then
  apparmor_parser -r "$APPARMOR_DIR/usr.bin.license-agent" && say "AppArmor profile loaded (enforce mode)"
fi

if [ -z "$PREFIX" ]; then
  chown -R license-agent:license-agent "$STATE_DIR" "$LOG_DIR" "$ETC_DIR"
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable license-agent.service license-agent-update.path
    systemctl restart license-agent.service
    systemctl start license-agent-update.path
  fi
fi
say "done: $("${AS_AGENT[@]}" "$BIN_DIR/license-agent" check-config --config "$ETC_DIR/config.toml")"
