/*
 * license_client.h - C ABI of liblicense_client (crates/license-client/src/ffi.rs).
 *
 * Lets a POS application ask the local License Secret Agent whether a license token is valid,
 * over the agent's Unix socket (protocol: docs/PROTOCOL.md). Link with -llicense_client.
 *
 * Windows: the "socket" is the agent's named pipe, and every socket_path argument is a pipe name
 * in UTF-8, like \\.\pipe\license-agent ("\\\\.\\pipe\\license-agent" in C source; NULL means
 * that one). The library is license_client.dll; with mingw-w64 link against its import library
 * liblicense_client.dll.a (-llicense_client) and ship the DLL beside the executable
 * (docs/PROTOCOL.md, "Windows: the named pipe and the DLL").
 *
 * Ownership:
 *   - lsa_client_connect() returns a client owned by the caller; free it with lsa_client_free().
 *   - lsa_validate_license() stores in *out a validation owned by the caller; free it with
 *     lsa_validation_free().
 *   - Every const char* returned by an lsa_validation_* accessor is borrowed from its
 *     validation: valid until lsa_validation_free() of that validation, never to be freed or
 *     modified by the caller.
 *   - lsa_last_error() returns a string owned by the library, valid until the next call into
 *     the library on the same thread.
 *   - Strings passed in (socket path, token, key) are only read during the call.
 *
 * Threads: a client carries one request at a time; do not use one lsa_client from two threads
 * at once (use one client per thread, or a lock). Validations are read-only and may be read
 * from any thread.
 *
 * Every function accepts NULL for any pointer argument without crashing (NULL-safe). A Rust
 * panic never crosses into C: it becomes LSA_ERR_INTERNAL or a NULL return.
 *
 * A result other than LSA_OK means there is no verdict: treat the license as not validated.
 */
#ifndef LICENSE_CLIENT_H
#define LICENSE_CLIENT_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Return codes of lsa_validate_license(). */
#define LSA_OK 0                     /* the agent answered; the verdict is in *out */
#define LSA_ERR_INVALID_ARGUMENT (-1) /* a required pointer was NULL, or the token is not UTF-8 */
#define LSA_ERR_CONNECT (-2)          /* the agent's socket could not be reached */
#define LSA_ERR_IO (-3)               /* reading from or writing to the socket failed */
#define LSA_ERR_TIMEOUT (-4)          /* the agent did not answer within the timeout */
#define LSA_ERR_CLOSED (-5)           /* connection closed (by the agent or after an error): reconnect */
#define LSA_ERR_MALFORMED (-6)        /* the agent's answer is not a well-formed answer */
#define LSA_ERR_FRAME_TOO_LARGE (-7)  /* answer (or request) over the 64 KiB frame limit */
#define LSA_ERR_NONCE_MISMATCH (-8)   /* the answer does not echo this request's nonce */
#define LSA_ERR_INTERNAL (-99)        /* a bug in the library (caught panic) */

/* An open connection to the agent. Opaque. */
typedef struct lsa_client lsa_client;

/* One verdict on a license token. Opaque; read it with the lsa_validation_* accessors. */
typedef struct lsa_validation lsa_validation;

/* The message of the last failed call on this thread, or NULL if none failed yet. */
const char *lsa_last_error(void);

/* Connects to the agent's socket; NULL socket_path means "/run/license-agent/agent.sock"
 * (Windows: the pipe \\.\pipe\license-agent; a socket_path there is a pipe name in UTF-8).
 * Read and write timeouts are 5 s; on Windows a busy pipe is waited for at most as long.
 * Returns NULL on failure (see lsa_last_error()). */
lsa_client *lsa_client_connect(const char *socket_path);

/* Like lsa_client_connect() with read and write timeouts of timeout_ms milliseconds
 * (0 means the default 5 s). */
lsa_client *lsa_client_connect_timeout(const char *socket_path, unsigned int timeout_ms);

/* Asks the agent whether license_token (the base64 token as issued) is valid now, with a fresh
 * nonce that the answer must echo.
 * Returns LSA_OK when the agent answered, valid or not, and stores the verdict in *out (free it
 * with lsa_validation_free()). Otherwise returns a negative LSA_ERR_* code, sets *out to NULL
 * (when out is not NULL) and records a message for lsa_last_error(); after LSA_ERR_TIMEOUT,
 * LSA_ERR_CLOSED, LSA_ERR_IO, LSA_ERR_MALFORMED, LSA_ERR_FRAME_TOO_LARGE or
 * LSA_ERR_NONCE_MISMATCH the client is closed: free it and connect again. */
int lsa_validate_license(lsa_client *client, const char *license_token, lsa_validation **out);

/* 1 when the license is valid, 0 when not (or v is NULL). */
int lsa_validation_is_valid(const lsa_validation *v);

/* The reason code of a refusal (e.g. "revoked", see docs/PROTOCOL.md); NULL when valid or v is NULL. */
const char *lsa_validation_reason(const lsa_validation *v);

/* The expiry of the license (RFC 3339); NULL when it does not expire, is not valid, or v is NULL. */
const char *lsa_validation_expires_at(const lsa_validation *v);

/* How many features the license grants (0 when not valid or v is NULL). */
size_t lsa_validation_feature_count(const lsa_validation *v);

/* Feature i, from 0; NULL when i >= lsa_validation_feature_count(v) or v is NULL. */
const char *lsa_validation_feature(const lsa_validation *v, size_t i);

/* The metadata value under key; NULL when absent, or when v or key is NULL. */
const char *lsa_validation_metadata(const lsa_validation *v, const char *key);

/* Frees a validation and every string borrowed from it. NULL is a no-op. */
void lsa_validation_free(lsa_validation *v);

/* Closes the connection and frees the client. NULL is a no-op. */
void lsa_client_free(lsa_client *client);

#ifdef __cplusplus
}
#endif

#endif /* LICENSE_CLIENT_H */
