#!/usr/bin/env bash
# The long power-cut run of the VM test (docs/SECURITY.md, "A real machine"): the guest is
# installed with the one-liner, then QEMU is killed N times (default 50) at a random moment
# while the agent rotates back to back (renewals and license fetches run on their own), and
# each following boot checks that the agent has the old or the new secret, never neither, that
# its tokens validate and that the audit chain verifies or names what the cut truncated.
#
#   scripts/vm/power-cuts.sh [N]      (as root; scripts/vm/image.sh builds the guest when needed)
#
# Prints each cut's delay and the after-cut checks, and a summary line. About 40 s per cut here.
set -euo pipefail
cd "$(dirname "$0")/../.."
cuts="${1:-50}"
log="target/vm/power-cuts.log"
mkdir -p target/vm
cargo build --workspace --bins --locked --quiet
LSA_VM_POWER_CUTS="$cuts" cargo test --workspace --locked --test vm -- --nocapture 2>&1 | tee "$log"
status="${PIPESTATUS[0]}"
tried="$(sed -n 's/^power cuts tried: //p' "$log")"
echo
echo "power cuts: ${tried:-0} tried of $cuts; after each: $(grep -c '^ok a secret survived the cut' "$log") with a secret, $(grep -c '^FAIL' "$log") failed checks; audit: $(grep -c '^ok audit chain verifies or names the truncation' "$log") verified or named the truncation"
exit "$status"
