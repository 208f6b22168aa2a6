# Sourced by the Windows build scripts: Debian's Rust (with the standard library's source, for
# -Zbuild-std) before rustup's, the mingw-w64 linker, and the target directory.
# ../../docs/WINDOWS.md says why each is needed.
# shellcheck shell=bash
export LSA_WINDOWS_TARGET=x86_64-pc-windows-gnu
export PATH="/usr/bin:$PATH"
# Debian's stable 1.96 accepts -Zbuild-std with this; its std source matches the compiler.
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_AR=x86_64-w64-mingw32-ar
# Windows unit tests run under wine (scripts/windows/wine-run).
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/wine-run"
# Its own target directory: std is rebuilt for the target, and the host build stays untouched.
export CARGO_TARGET_DIR="${LSA_WINDOWS_TARGET_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/target/windows}"
lsa_windows_cargo() {
  local sub="$1"; shift
  nice -n 10 cargo "$sub" --target "$LSA_WINDOWS_TARGET" -Zbuild-std=std,panic_abort --locked "$@"
}
