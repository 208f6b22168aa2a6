/* Test-only stand-in for Windows' bcryptprimitives.dll, which wine 8.0 lacks.
 *
 * Rust's standard library (1.78 and later) takes its random numbers from
 * bcryptprimitives!ProcessPrng on x86_64-pc-windows-gnu; every Rust program fails to start under
 * a wine without it. This DLL exports ProcessPrng on top of advapi32's RtlGenRandom
 * (SystemFunction036), which wine has. It is installed only into the test wine prefixes
 * (scripts/windows/wine-run); a real Windows 10 or later has the real DLL, and nothing of this
 * ships. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length) {
    while (length > 0) {
        ULONG chunk = length > 0x10000000 ? 0x10000000 : (ULONG)length;
        if (!SystemFunction036(data, chunk)) {
            return FALSE;
        }
        data += chunk;
        length -= chunk;
    }
    return TRUE;
}
