/* Harness for the ph3.c example: verifies HS256 JWTs, one per line of stdin.
 *
 *   jwt_verify <secret as hex>  < tokens
 *
 * Prints VALID or INVALID for each line (exit 0); usage errors exit 2. Each token is
 * handed to jwt_verify_token() in a heap block of exactly its length, without a NUL:
 * AddressSanitizer reports any read past its end.
 *
 *   jwt_verify --decode  < lines of "<out_cap>:<base64url>"
 *
 * Calls base64url_decode() on each input with an output block of exactly out_cap bytes
 * (heap: a write past it is a report) and prints "OK:<hex of the result>" or "ERROR". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jwt_verify.h"

static int hex_value(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* A copy of line[0 .. len) in a heap block of exactly len bytes, without a NUL. */
static char *exact_copy(const char *line, size_t len)
{
    char *copy = malloc(len ? len : 1);
    if (copy != NULL) memcpy(copy, line, len);
    return copy;
}

/* The next line of stdin into *line (grown as needed), its length without the newline in
 * *len. Returns 0 at the end of input. */
static int next_line(char **line, size_t *cap, size_t *len)
{
    ssize_t got = getline(line, cap, stdin);
    if (got == -1) return 0;
    *len = (size_t)got;
    if (*len > 0 && (*line)[*len - 1] == '\n') (*len)--;
    return 1;
}

static int decode_lines(void)
{
    char *line = NULL;
    size_t cap = 0, len = 0;
    while (next_line(&line, &cap, &len)) {
        char *colon = memchr(line, ':', len);
        if (colon == NULL) break;
        size_t out_cap = strtoul(line, NULL, 10);
        size_t in_len = len - (size_t)(colon + 1 - line);
        char *in = exact_copy(colon + 1, in_len);
        unsigned char *out = malloc(out_cap ? out_cap : 1);
        size_t out_len = 0;
        int rc = (in == NULL || out == NULL) ? -2
                 : base64url_decode(in, in_len, out, out_cap, &out_len);
        if (rc == 0) {
            printf("OK:");
            for (size_t i = 0; i < out_len && i < out_cap; i++) printf("%02x", out[i]);
            printf("\n");
        } else {
            printf("ERROR\n");
        }
        free(in);
        free(out);
    }
    free(line);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "--decode") == 0) {
        setvbuf(stdout, NULL, _IOLBF, 0);
        return decode_lines();
    }
    if (argc != 2 || strlen(argv[1]) % 2 != 0) {
        fprintf(stderr, "usage: %s <secret as hex> < tokens\n", argv[0]);
        return 2;
    }
    size_t secret_len = strlen(argv[1]) / 2;
    unsigned char *secret = malloc(secret_len ? secret_len : 1);
    if (secret == NULL) return 2;
    for (size_t i = 0; i < secret_len; i++) {
        int hi = hex_value(argv[1][2 * i]), lo = hex_value(argv[1][2 * i + 1]);
        if (hi < 0 || lo < 0) {
            fprintf(stderr, "the secret is not hex\n");
            free(secret);
            return 2;
        }
        secret[i] = (unsigned char)(hi * 16 + lo);
    }

    setvbuf(stdout, NULL, _IOLBF, 0);   /* a verdict per line, even if a sanitizer aborts */
    char *line = NULL;
    size_t cap = 0, len = 0;
    while (next_line(&line, &cap, &len)) {
        char *token = exact_copy(line, len);   /* exactly the token, no terminator */
        if (token == NULL) break;
        int ok = jwt_verify_token(token, len, secret, secret_len);
        free(token);
        printf("%s\n", ok == 1 ? "VALID" : "INVALID");
    }
    free(line);
    free(secret);
    return 0;
}
