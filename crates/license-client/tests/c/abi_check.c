/*
 * abi_check.c - exercises every function of license_client.h against the fake agent of
 * tests/common: NULL safety, accessors, several requests per connection, error codes, and a
 * write to a connection the agent closed (must be LSA_ERR_CLOSED, not a SIGPIPE death: SIGPIPE
 * keeps its default disposition here, as in most C programs).
 *
 * Usage: abi_check SOCKET MISSING_SOCKET. Prints "ok" and exits 0, or names the failed check and
 * exits 1.
 */
#include <stdio.h>
#include <string.h>

#include "license_client.h"

static int failures = 0;

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "abi_check.c:%d: failed: %s\n", __LINE__, #cond); \
            failures++;                                                    \
        }                                                                  \
    } while (0)

static int str_eq(const char *a, const char *b) { return a != NULL && b != NULL && strcmp(a, b) == 0; }

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: abi_check SOCKET MISSING_SOCKET\n");
        return 2;
    }
    const char *socket = argv[1];

    /* NULL safety of every function. */
    lsa_validation *out = (lsa_validation *)&failures; /* garbage that must be overwritten */
    CHECK(lsa_validate_license(NULL, "good", &out) == LSA_ERR_INVALID_ARGUMENT);
    CHECK(out == NULL);
    CHECK(lsa_validate_license(NULL, NULL, NULL) == LSA_ERR_INVALID_ARGUMENT);
    CHECK(lsa_last_error() != NULL);
    CHECK(lsa_validation_is_valid(NULL) == 0);
    CHECK(lsa_validation_reason(NULL) == NULL);
    CHECK(lsa_validation_expires_at(NULL) == NULL);
    CHECK(lsa_validation_feature_count(NULL) == 0);
    CHECK(lsa_validation_feature(NULL, 0) == NULL);
    CHECK(lsa_validation_metadata(NULL, "site") == NULL);
    lsa_validation_free(NULL);
    lsa_client_free(NULL);

    /* A missing socket: NULL and a message naming it. */
    CHECK(lsa_client_connect(argv[2]) == NULL);
    CHECK(lsa_last_error() != NULL && strstr(lsa_last_error(), argv[2]) != NULL);

    lsa_client *client = lsa_client_connect_timeout(socket, 2000);
    CHECK(client != NULL);
    if (client == NULL) {
        fprintf(stderr, "connect: %s\n", lsa_last_error());
        return 1;
    }
    CHECK(lsa_validate_license(client, NULL, &out) == LSA_ERR_INVALID_ARGUMENT);
    CHECK(lsa_validate_license(client, "good", NULL) == LSA_ERR_INVALID_ARGUMENT);

    /* Several requests on one connection. */
    for (int round = 0; round < 3; round++) {
        lsa_validation *v = NULL;
        CHECK(lsa_validate_license(client, "good", &v) == LSA_OK);
        CHECK(lsa_validation_is_valid(v) == 1);
        CHECK(lsa_validation_reason(v) == NULL);
        CHECK(str_eq(lsa_validation_expires_at(v), "2030-01-01T00:00:00Z"));
        CHECK(lsa_validation_feature_count(v) == 2);
        CHECK(str_eq(lsa_validation_feature(v, 0), "pos"));
        CHECK(str_eq(lsa_validation_feature(v, 1), "loyalty"));
        CHECK(lsa_validation_feature(v, 2) == NULL);
        CHECK(lsa_validation_feature(v, (size_t)-1) == NULL);
        CHECK(str_eq(lsa_validation_metadata(v, "site"), "Lyon 3"));
        CHECK(str_eq(lsa_validation_metadata(v, "tier"), "gold"));
        CHECK(lsa_validation_metadata(v, "nope") == NULL);
        CHECK(lsa_validation_metadata(v, NULL) == NULL);
        lsa_validation_free(v);

        CHECK(lsa_validate_license(client, "revoked", &v) == LSA_OK);
        CHECK(lsa_validation_is_valid(v) == 0);
        CHECK(str_eq(lsa_validation_reason(v), "revoked"));
        CHECK(lsa_validation_expires_at(v) == NULL);
        CHECK(lsa_validation_feature_count(v) == 0);
        CHECK(lsa_validation_feature(v, 0) == NULL);
        lsa_validation_free(v);

        CHECK(lsa_validate_license(client, "perpetual", &v) == LSA_OK);
        CHECK(lsa_validation_is_valid(v) == 1);
        CHECK(lsa_validation_expires_at(v) == NULL);
        lsa_validation_free(v);
    }
    lsa_client_free(client);

    /* Error codes, each on a fresh connection; after one, the client is closed. */
    struct { const char *token; int code; } errors[] = {
        {"wrong-nonce", LSA_ERR_NONCE_MISMATCH},
        {"oversized", LSA_ERR_FRAME_TOO_LARGE},
        {"close-mid-frame", LSA_ERR_CLOSED},
        {"garbage", LSA_ERR_MALFORMED},
    };
    for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++) {
        client = lsa_client_connect(socket);
        CHECK(client != NULL);
        out = NULL;
        int rc = lsa_validate_license(client, errors[i].token, &out);
        if (rc != errors[i].code) {
            fprintf(stderr, "%s: got %d, want %d\n", errors[i].token, rc, errors[i].code);
            failures++;
        }
        CHECK(out == NULL);
        CHECK(lsa_last_error() != NULL);
        CHECK(lsa_validate_license(client, "good", &out) == LSA_ERR_CLOSED);
        lsa_client_free(client);
    }

    /* The agent closes this connection after answering; a second connection is answered only
     * once that close happened, so the next write on the first one hits a closed peer. */
    lsa_client *closing = lsa_client_connect(socket);
    lsa_client *witness = lsa_client_connect(socket);
    CHECK(closing != NULL && witness != NULL);
    lsa_validation *v = NULL;
    CHECK(lsa_validate_license(closing, "close-after-answer", &v) == LSA_OK);
    lsa_validation_free(v);
    CHECK(lsa_validate_license(witness, "after-close", &v) == LSA_OK);
    lsa_validation_free(v);
    CHECK(lsa_validate_license(closing, "good", &v) == LSA_ERR_CLOSED);
    lsa_client_free(closing);
    lsa_client_free(witness);

    if (failures > 0) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
