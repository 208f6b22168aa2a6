/*
 * validate.c - asks the License Secret Agent whether a license token is valid, through
 * liblicense_client's C ABI (include/license_client.h).
 *
 * Usage: validate SOCKET TOKEN
 * (on Windows, SOCKET is the agent's pipe name, e.g. \\.\pipe\license-agent).
 * Prints "valid features=a,b expires_at=<RFC 3339|never>" and exits 0 when the license is valid,
 * prints "invalid reason=<code>" and exits 1 when it is not, and prints "error: <message>" on
 * stderr and exits 2 when there is no verdict (agent unreachable, timeout, bad answer).
 *
 * Build: cc validate.c -I../../include -L<dir of liblicense_client.so> -llicense_client
 * Windows (mingw-w64): x86_64-w64-mingw32-gcc validate.c -I../../include
 *   -L<dir of liblicense_client.dll.a> -llicense_client -o validate.exe, and license_client.dll
 *   beside validate.exe (scripts/windows/build.sh does this into target/windows/dist).
 */
#include <stdio.h>

#include "license_client.h"

static int fail(const char *what) {
    const char *message = lsa_last_error();
    fprintf(stderr, "error: %s: %s\n", what, message ? message : "unknown error");
    return 2;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s SOCKET TOKEN\n", argc > 0 ? argv[0] : "validate");
        return 2;
    }

    lsa_client *client = lsa_client_connect(argv[1]);
    if (client == NULL) {
        return fail("connect");
    }

    lsa_validation *validation = NULL;
    int rc = lsa_validate_license(client, argv[2], &validation);
    if (rc != LSA_OK) {
        int status = fail("validate");
        lsa_client_free(client);
        return status;
    }

    int status;
    if (lsa_validation_is_valid(validation)) {
        printf("valid features=");
        size_t count = lsa_validation_feature_count(validation);
        for (size_t i = 0; i < count; i++) {
            printf("%s%s", i > 0 ? "," : "", lsa_validation_feature(validation, i));
        }
        const char *expires_at = lsa_validation_expires_at(validation);
        printf(" expires_at=%s\n", expires_at ? expires_at : "never");
        status = 0;
    } else {
        printf("invalid reason=%s\n", lsa_validation_reason(validation));
        status = 1;
    }

    lsa_validation_free(validation);
    lsa_client_free(client);
    return status;
}
