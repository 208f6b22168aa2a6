#!/usr/bin/env bash
# Builds the Windows side (x86_64-pc-windows-gnu, release) and gathers what ships into
# $CARGO_TARGET_DIR/dist (target/windows/dist unless LSA_WINDOWS_TARGET_DIR says otherwise):
#
#   license-agent       license-agent.exe
#   license-agent-cli   license-agent-cli.exe
#   license-client      license_client.dll, its import library liblicense_client.dll.a,
#                       license_client.h, validate.exe (examples/c/validate.c linked with mingw
#                       against the DLL) and pipe_echo.exe (examples/pipe_echo.rs, the stand-in
#                       agent for benchmarks and tests)
#
#   scripts/windows/build.sh [PACKAGE...]    default: all three
#
# One cargo invocation for every package, so the standard library is built once per run.
# Executables and the DLL are stripped in dist/ (the unstripped ones stay under target/).
# Runs at low priority with 2 jobs (CARGO_BUILD_JOBS overrides).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"
renice -n 10 -p $$ >/dev/null

all=(license-agent license-agent-cli license-client)
packages=("$@")
[ ${#packages[@]} -gt 0 ] || packages=("${all[@]}")
for p in "${packages[@]}"; do
  case " ${all[*]} " in
    *" $p "*) ;;
    *) echo "build.sh: unknown package '$p' (one of: ${all[*]})" >&2; exit 2 ;;
  esac
done
wants() { case " ${packages[*]} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

args=()
for p in "${packages[@]}"; do args+=(-p "$p"); done
# The executables, and license-client's library (the DLL) and example; `--lib` only names
# license-client, since cargo refuses it when no selected package has a library.
targets=(--bins)
wants license-client && targets+=(--lib --example pipe_echo --example pipe_load)
# The wine tests replay a nonce through the real pipe with it.
wants license-agent && targets+=(--example pipe_probe)

# LSA_WINDOWS_PROFILE=dev: unoptimized, quicker to build (what the test suite runs).
profile="${LSA_WINDOWS_PROFILE:-release}"
case "$profile" in
  release) profile_dir=release ;;
  dev) profile_dir=debug ;;
  *) echo "build.sh: LSA_WINDOWS_PROFILE is release or dev, not '$profile'" >&2; exit 2 ;;
esac

cd "$root"
lsa_windows_cargo build --profile "$profile" -j "${CARGO_BUILD_JOBS:-2}" "${args[@]}" "${targets[@]}"

out="$CARGO_TARGET_DIR/$LSA_WINDOWS_TARGET/$profile_dir"
dist="$CARGO_TARGET_DIR/dist"
mkdir -p "$dist"
strip=x86_64-w64-mingw32-strip

# Copies $1 into dist/, stripped when $2 is "strip"; a missing artefact fails the build.
ship() {
  local from="$1" name
  name="$(basename "$from")"
  [ -f "$from" ] || { echo "build.sh: $from was not built" >&2; exit 1; }
  if [ "${2:-}" = strip ]; then
    "$strip" -o "$dist/$name" "$from"
  else
    cp "$from" "$dist/$name"
  fi
  echo "  $dist/$name"
}

echo "build.sh: artefacts in $dist:"
wants license-agent && ship "$out/license-agent.exe" strip
wants license-agent && ship "$out/examples/pipe_probe.exe" strip
wants license-agent-cli && ship "$out/license-agent-cli.exe" strip
if wants license-client; then
  ship "$out/license_client.dll" strip
  ship "$out/liblicense_client.dll.a"
  ship "$root/crates/license-client/include/license_client.h"
  ship "$out/examples/pipe_echo.exe" strip
  ship "$out/examples/pipe_load.exe" strip
  # The C example against the DLL, as a POS application would link it (see docs/PROTOCOL.md).
  x86_64-w64-mingw32-gcc -std=c99 -Wall -Wextra -Werror -pedantic -O2 \
    "$root/crates/license-client/examples/c/validate.c" -I"$dist" -L"$dist" -llicense_client \
    -o "$dist/validate.exe"
  "$strip" "$dist/validate.exe"
  echo "  $dist/validate.exe"
fi
