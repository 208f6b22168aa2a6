#!/usr/bin/env bash
# Builds and runs every fuzz target in fuzz/ for a bounded time each (docs/SECURITY.md,
# "Fuzzing"); fails on the first crash, leak, timeout or failed assertion, and prints the
# executions per target.
#
#   scripts/fuzz.sh [SECONDS]        each target SECONDS (default $LSA_FUZZ_SECONDS or 20)
#   scripts/fuzz.sh --cmin           minimize the committed seed corpora (fuzz/corpus/*)
#   LSA_FUZZ_TARGETS="csr tpm_blob" scripts/fuzz.sh 60    some targets only
#   LSA_FUZZ_DEV=1 scripts/fuzz.sh 8                     unoptimized build (CI smoke run)
#
# Runs on a copy of the committed corpus (so a run never grows fuzz/corpus); a crash leaves
# its input in fuzz/artifacts/<target>/ (replay: cargo +nightly fuzz run <target> <file>).
# Needs a nightly toolchain (rustup) and cargo-fuzz, installed here when missing. On a shared
# build machine, LSA_BUILD_LOCK=/tmp/lsa-build.lock makes each heavy step (install, build, one
# target's run) wait for that lock (flock) and release it after, so a long run lets others
# build between targets; unset (as in scripts/test.sh), nothing is locked here, so a caller
# that already holds the lock does not wait for itself.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

cmin=false
if [ "${1:-}" = "--cmin" ]; then
  cmin=true
  shift
fi
seconds="${1:-${LSA_FUZZ_SECONDS:-20}}"
case "$seconds" in '' | *[!0-9]*) echo "seconds must be a whole number: $seconds" >&2; exit 2 ;; esac

locked() { if [ -n "${LSA_BUILD_LOCK:-}" ]; then flock "$LSA_BUILD_LOCK" "$@"; else "$@"; fi; }

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "==> installing the nightly toolchain (rustup)"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz (cargo install --locked)"
  locked cargo install cargo-fuzz --locked
fi

targets="${LSA_FUZZ_TARGETS:-$(cargo +nightly fuzz list)}"
echo "==> building the fuzz targets"
# fuzz/Cargo.lock is committed, as the workspace's is: refuse to run with one out of date
# (cargo fuzz has no --locked of its own).
cargo +nightly metadata --locked --format-version 1 >/dev/null
# LSA_FUZZ_DEV=1 (scripts/test.sh): unoptimized, still instrumented and sanitized — a third of
# the build time on a machine without a cached build, fewer executions per second.
profile=()
if [ "${LSA_FUZZ_DEV:-}" = 1 ]; then profile=(--dev); fi
locked cargo +nightly fuzz build "${profile[@]}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
status=0
summary=()
for target in $targets; do
  mkdir -p "corpus/$target"
  if $cmin; then
    echo "==> minimizing corpus/$target"
    locked cargo +nightly fuzz cmin "${profile[@]}" "$target" "corpus/$target" -- -rss_limit_mb=2048
    continue
  fi
  rm -rf "${work:?}/$target"
  cp -r "corpus/$target" "$work/$target"
  echo "==> $target for ${seconds}s"
  log="$work/$target.log"
  # -max_len 65540: a whole IPC frame and more than any body the targets bound themselves.
  # -timeout: one input taking 10 s is a finding (e.g. an unbounded PBKDF2 count).
  if locked cargo +nightly fuzz run "${profile[@]}" "$target" "$work/$target" -- \
      -max_total_time="$seconds" -max_len=65540 -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result=FAILED
    status=1
    tail -n 60 "$log" >&2
  fi
  runs="$(awk '/stat::number_of_executed_units:/ { print $2 }' "$log" | tail -n 1)"
  summary+=("$(printf '%-20s %12s executions  %s' "$target" "${runs:-?}" "$result")")
done
if ! $cmin; then
  echo
  echo "fuzz targets, ${seconds}s each:"
  printf '  %s\n' "${summary[@]}"
fi
exit "$status"
