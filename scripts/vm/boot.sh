#!/usr/bin/env bash
# Boots the guest image scripts/vm/image.sh built, under QEMU's TCG (no KVM here), with
#   - a TPM 2.0 (tpm-tis) from swtpm whose state lives in --tpm-state DIR (kept across boots;
#     a new DIR is a new, cleared TPM),
#   - a locked-down user network: the guest reaches nothing but 10.0.2.100:GUEST_PORT for each
#     --forward GUEST_PORT:HOST_PORT (a connection there is a new connection to the host's
#     127.0.0.1:HOST_PORT),
#   - the directory --share DIR as 9p tag host0 (the guest runs DIR/run.sh, see guest/lsa-guest),
# and waits until the guest powers off (exit 0) or --timeout seconds pass (exit 124). The serial
# console goes to stdout; QEMU's pid to --pidfile (kill -9 it for a power cut).
#
#   boot.sh --disk IMAGE [--snapshot] [--share DIR] [--tpm-state DIR] [--forward G:H]...
#           [--timeout SECS] [--pidfile FILE] [--uuid UUID] [--vm-dir DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
vm_dir="$here/../../target/vm"
disk="" uuid="" snapshot=off share="" tpm_state="" timeout=600 pidfile="" forwards=()
while [ $# -gt 0 ]; do
  case "$1" in
    --disk) disk="$2"; shift 2 ;;
    --snapshot) snapshot=on; shift ;;
    --persistent) snapshot=off; shift ;;
    --share) share="$2"; shift 2 ;;
    --tpm-state) tpm_state="$2"; shift 2 ;;
    --forward) forwards+=("$2"); shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --pidfile) pidfile="$2"; shift 2 ;;
    --uuid) uuid="$2"; shift 2 ;;
    --vm-dir) vm_dir="$2"; shift 2 ;;
    *) echo "boot.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$disk" ] || { echo "boot.sh: --disk IMAGE is required" >&2; exit 2; }
qemu="$vm_dir/qemu/usr/bin/qemu-system-x86_64"
[ -x "$qemu" ] || { echo "boot.sh: $qemu missing: run scripts/vm/image.sh" >&2; exit 2; }
case "$disk" in *.qcow2) format=qcow2 ;; *) format=raw ;; esac

run_dir="$(mktemp -d)"
swtpm_pid=""
cleanup() {
  [ -n "$swtpm_pid" ] && kill "$swtpm_pid" 2>/dev/null || true
  rm -rf "$run_dir"
}
trap cleanup EXIT

args=(
  -L "$vm_dir/qemu/usr/share/qemu" -L "$vm_dir/qemu/usr/share/seabios"
  -machine q35 -accel tcg,thread=multi -cpu max -smp 2 -m 1024
  -nodefaults -display none -no-reboot -serial stdio -monitor none
  -kernel "$vm_dir/vmlinuz" -initrd "$vm_dir/initrd.img"
  -append "root=/dev/vda rw console=ttyS0 panic=-1 net.ifnames=0 apparmor=1 security=apparmor systemd.show_status=0 loglevel=4"
  -drive "file=$disk,format=$format,if=virtio,cache=unsafe,snapshot=$snapshot"
  -object rng-random,filename=/dev/urandom,id=rng0 -device virtio-rng-pci,rng=rng0
)
netdev="user,id=net0,restrict=on"
for fwd in "${forwards[@]}"; do
  guest_port="${fwd%%:*}" host_port="${fwd##*:}"
  # One socat per guest connection (a tcp: chardev would carry a single connection).
  netdev+=",guestfwd=tcp:10.0.2.100:$guest_port-cmd:socat - TCP:127.0.0.1:$host_port"
done
args+=(-netdev "$netdev" -device virtio-net-pci,netdev=net0)
if [ -n "$share" ]; then
  args+=(-virtfs "local,path=$share,mount_tag=host0,security_model=none,id=host0")
fi
if [ -n "$tpm_state" ]; then
  mkdir -p "$tpm_state"
  swtpm socket --tpm2 --tpmstate "dir=$tpm_state" --ctrl "type=unixio,path=$run_dir/swtpm.sock" \
    --terminate >"$run_dir/swtpm.log" 2>&1 &
  swtpm_pid=$!
  for _ in $(seq 1 50); do [ -S "$run_dir/swtpm.sock" ] && break; sleep 0.1; done
  args+=(-chardev "socket,id=chrtpm,path=$run_dir/swtpm.sock" -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-tis,tpmdev=tpm0)
fi
[ -n "$pidfile" ] && args+=(-pidfile "$pidfile")
# The SMBIOS system UUID: the machine's hardware id (/sys/class/dmi/id/product_uuid).
[ -n "$uuid" ] && args+=(-uuid "$uuid")

status=0
timeout --kill-after=5 "$timeout" "$qemu" "${args[@]}" </dev/null || status=$?
exit "$status"
