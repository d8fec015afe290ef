/* Harness for the ph3.c example: verifies HS256 JWTs, one per line of stdin.
 *
 *   jwt_verify <secret as hex>  < tokens
 *
 * Prints VALID or INVALID for each line (exit 0); usage errors exit 2. Each token is
 * handed to jwt_verify_token() in a heap block of exactly its length, without a NUL:
 * AddressSanitizer reports any read past its end. */
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

int main(int argc, char **argv)
{
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
    size_t cap = 0;
    ssize_t got;
    while ((got = getline(&line, &cap, stdin)) != -1) {
        size_t len = (size_t)got;
        if (len > 0 && line[len - 1] == '\n') len--;
        char *token = malloc(len ? len : 1);   /* exactly the token, no terminator */
        if (token == NULL) break;
        memcpy(token, line, len);
        int ok = jwt_verify_token(token, len, secret, secret_len);
        free(token);
        printf("%s\n", ok == 1 ? "VALID" : "INVALID");
    }
    free(line);
    free(secret);
    return 0;
}
