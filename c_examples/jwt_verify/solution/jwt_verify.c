/* HS256 JWT verification with OpenSSL: base64url, HMAC-SHA256, constant-time compare. */
#include <limits.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "jwt_verify.h"

/* The value of one base64url character, -1 for anything else (including bytes >= 0x80:
 * the argument is an unsigned char's value, never a negative char). */
static int b64url_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '-') return 62;
    if (c == '_') return 63;
    return -1;
}

int base64url_decode(const char *in, size_t in_len, unsigned char *out, size_t out_cap,
                     size_t *out_len)
{
    if (in_len % 4 == 1)
        return -1;                      /* 6 bits cannot make a byte */
    size_t need = in_len / 4 * 3 + (in_len % 4 ? in_len % 4 - 1 : 0);
    if (need > out_cap)
        return -1;                      /* checked before a single byte is written */
    unsigned int acc = 0;
    int bits = 0;
    size_t n = 0;
    for (size_t i = 0; i < in_len; i++) {
        int v = b64url_value((unsigned char)in[i]);
        if (v < 0)
            return -1;
        acc = (acc << 6) | (unsigned int)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[n++] = (unsigned char)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    *out_len = n;
    return 0;
}

int jwt_verify_hs256(const char *signing_input, size_t input_len,
                     const unsigned char *sig, size_t sig_len,
                     const unsigned char *secret, size_t secret_len)
{
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int digest_len = 0;

    if (secret_len > INT_MAX)
        return 0;
    if (HMAC(EVP_sha256(), secret, (int)secret_len,
             (const unsigned char *)signing_input, input_len, digest, &digest_len) == NULL)
        return 0;
    if (sig_len != digest_len)          /* a shorter signature is not a prefix match */
        return 0;
    /* CRYPTO_memcmp looks at every byte whatever differs: no early exit to time. */
    return CRYPTO_memcmp(digest, sig, digest_len) == 0;
}

int jwt_verify_token(const char *token, size_t token_len,
                     const unsigned char *secret, size_t secret_len)
{
    const char *end = token + token_len;
    const char *first = memchr(token, '.', token_len);
    if (first == NULL || first == token)
        return 0;
    const char *second = memchr(first + 1, '.', (size_t)(end - (first + 1)));
    if (second == NULL || second == first + 1)
        return 0;
    if (memchr(second + 1, '.', (size_t)(end - (second + 1))) != NULL)
        return 0;                       /* more than three segments */

    unsigned char sig[EVP_MAX_MD_SIZE];
    size_t sig_len = 0;
    if (base64url_decode(second + 1, (size_t)(end - (second + 1)), sig, sizeof sig,
                         &sig_len) != 0)
        return 0;
    return jwt_verify_hs256(token, (size_t)(second - token), sig, sig_len,
                            secret, secret_len);
}
