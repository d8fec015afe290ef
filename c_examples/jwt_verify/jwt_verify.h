/* The interface between the harness (main.c) and your code (jwt_verify.c).
 * This file is fixed: the harness is compiled against it. */
#ifndef JWT_VERIFY_H
#define JWT_VERIFY_H

#include <stddef.h>

/* Decode base64url (alphabet A-Z a-z 0-9 - _, no '=' padding) from in[0 .. in_len).
 * Writes at most out_cap bytes to out and sets *out_len. Returns 0 on success, -1 when a
 * character is outside the alphabet, in_len % 4 == 1, or the result would not fit. */
int base64url_decode(const char *in, size_t in_len, unsigned char *out, size_t out_cap,
                     size_t *out_len);

/* 1 when sig (sig_len bytes) is HMAC-SHA256(secret, signing_input[0 .. input_len)),
 * 0 otherwise. The comparison takes the same time wherever the bytes differ. */
int jwt_verify_hs256(const char *signing_input, size_t input_len,
                     const unsigned char *sig, size_t sig_len,
                     const unsigned char *secret, size_t secret_len);

/* 1 when token[0 .. token_len) is header.payload.signature (exactly two dots, no empty
 * header or payload) whose base64url signature is the HS256 signature of
 * "header.payload"; 0 otherwise. The token is NOT NUL-terminated: never read
 * token[token_len] or beyond. */
int jwt_verify_token(const char *token, size_t token_len,
                     const unsigned char *secret, size_t secret_len);

#endif
