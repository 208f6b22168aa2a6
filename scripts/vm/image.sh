#!/usr/bin/env bash
# Builds the Debian 12 guest the VM tests boot (docs/SECURITY.md "A real machine"): a minimal
# bookworm with systemd, AppArmor, the TPM stack and udev, no agent installed (the test installs it
# with the server's one-liner), and a oneshot unit that runs the test's script from a 9p share and
# powers the guest off. Also fetches the QEMU it boots under (Debian 12's 7.2 system emulator,
# unpacked privately: the machine's qemu-utils 10 conflicts with installing it).
#
#   scripts/vm/image.sh [DIR]        (default: target/vm; needs root for debootstrap and chroot)
#
# DIR gets: qemu/ (the unpacked emulator and its firmware), vmlinuz, initrd.img, debian12.raw
# (a sparse 2 GiB ext4 image, ~700 MiB used). Nothing here is committed or cached across runs:
# a run that finds DIR/debian12.raw complete (DIR/.done) reuses it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../../target/vm}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
say() { printf '==> %s\n' "$*"; }
[ "$(id -u)" -eq 0 ] || { echo "image.sh: run as root (debootstrap, chroot)" >&2; exit 1; }

mirror="${LSA_VM_MIRROR:-$(sed -n 's/^URIs: *\(http[^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)}"
mirror="${mirror:-http://deb.debian.org/debian}"

# ---- QEMU 7.2 from Debian 12, unpacked (docs: ../shared/VM-TEST.md facts) --------------------
if [ ! -x "$out/qemu/usr/bin/qemu-system-x86_64" ]; then
  say "fetching QEMU 7.2 (Debian 12) into $out/qemu"
  needed=(libcapstone4 libfdt1 libpmem1 librdmacm1 libibverbs1 libslirp0 libvdeplug2 swtpm swtpm-tools socat debootstrap e2fsprogs qemu-utils)
  missing=()
  for p in "${needed[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  dl="$(mktemp -d)"
  (cd "$dl" && apt-get download -qq qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu 2>/dev/null)
  rm -rf "$out/qemu"
  for deb in "$dl"/*.deb; do dpkg -x "$deb" "$out/qemu"; done
  rm -rf "$dl"
  "$out/qemu/usr/bin/qemu-system-x86_64" --version | head -n 1
fi

if [ -f "$out/.done" ] && [ -f "$out/debian12.raw" ]; then
  say "guest image $out/debian12.raw already built in this run"
  exit 0
fi
rm -f "$out/.done"

rootfs="$out/rootfs"
rm -rf "$rootfs"
say "debootstrap bookworm (minbase) from $mirror into $rootfs"
# What a POS till of this kind has before the agent: systemd, udev, AppArmor, the TPM stack
# (tpm-udev makes the tss group that owns /dev/tpmrm0), curl, sudo, adduser. No compiler,
# no Python: the test's own programs come in through the share, built on the host.
include=systemd-sysv,udev,linux-image-amd64,initramfs-tools,apparmor,tpm2-tools,tpm-udev,libtss2-esys-3.0.2-0,libtss2-tctildr0,libtss2-tcti-device0,libtss2-mu0,kmod,iproute2,curl,ca-certificates,dbus,sudo,adduser,procps,util-linux,e2fsprogs
debootstrap --variant=minbase --include="$include" bookworm "$rootfs" "$mirror" >"$out/debootstrap.log" 2>&1 \
  || { tail -n 30 "$out/debootstrap.log" >&2; exit 1; }

say "configuring the guest"
echo pos-vm >"$rootfs/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 pos-vm\n' >"$rootfs/etc/hosts"
echo 'nameserver 10.0.2.3' >"$rootfs/etc/resolv.conf"
printf '/dev/vda / ext4 rw,relatime 0 1\n' >"$rootfs/etc/fstab"
# No DHCP client: the address user-mode networking gives, set statically (12 s faster).
install -m 0644 "$here/guest/lsa-net.service" "$rootfs/etc/systemd/system/lsa-net.service"
install -m 0644 "$here/guest/lsa-guest.service" "$rootfs/etc/systemd/system/lsa-guest.service"
install -m 0755 "$here/guest/lsa-guest" "$rootfs/usr/local/sbin/lsa-guest"
mkdir -p "$rootfs/mnt/host"
ln -sf /etc/systemd/system/lsa-net.service "$rootfs/etc/systemd/system/multi-user.target.wants/lsa-net.service"
ln -sf /etc/systemd/system/lsa-guest.service "$rootfs/etc/systemd/system/multi-user.target.wants/lsa-guest.service"
# What slows a TCG boot and nobody needs here (the serial getty also hangs up the console the
# test writes to).
for unit in serial-getty@ttyS0.service getty@tty1.service systemd-logind.service \
  apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer \
  systemd-tmpfiles-clean.timer modprobe@drm.service modprobe@fuse.service modprobe@configfs.service \
  modprobe@efi_pstore.service modprobe@loop.service modprobe@dm_mod.service systemd-networkd.service \
  systemd-timesyncd.service; do
  ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
done
# A small initramfs: only what finds and mounts /dev/vda.
sed -i 's/^MODULES=.*/MODULES=list/' "$rootfs/etc/initramfs-tools/initramfs.conf"
printf 'virtio_pci\nvirtio_blk\next4\ncrc32c_generic\n' >"$rootfs/etc/initramfs-tools/modules"
mount --bind /proc "$rootfs/proc"
trap 'umount "$rootfs/proc" 2>/dev/null || true' EXIT
chroot "$rootfs" update-initramfs -u -k all >/dev/null 2>&1
umount "$rootfs/proc"
trap - EXIT
rm -f "$rootfs/etc/machine-id" && : >"$rootfs/etc/machine-id"   # made at first boot
rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
cp -L "$rootfs/vmlinuz" "$out/vmlinuz"
cp -L "$rootfs/initrd.img" "$out/initrd.img"

say "making the ext4 image (mkfs.ext4 -d, no loop device)"
rm -f "$out/debian12.raw"
mkfs.ext4 -q -L lsa-root -d "$rootfs" "$out/debian12.raw" 2G
rm -rf "$rootfs"

# One boot that keeps its disk: AppArmor compiles its policy cache (12 s) and systemd settles
# once, not at every test boot.
say "warm-up boot (kept: AppArmor's policy cache)"
share="$(mktemp -d)"
printf '#!/bin/sh\necho warm\n# Every test boot makes its own machine id.\n: >/etc/machine-id\n' >"$share/run.sh"
"$here/boot.sh" --disk "$out/debian12.raw" --persistent --share "$share" --timeout 300 --vm-dir "$out" >"$out/warmup.console" 2>&1 \
  || { tail -n 40 "$out/warmup.console" >&2; exit 1; }
grep -q warm "$share/guest.log" || { echo "warm-up boot did not run its script" >&2; tail -n 40 "$out/warmup.console" >&2; exit 1; }
rm -rf "$share"
touch "$out/.done"
say "guest image ready: $out/debian12.raw"
