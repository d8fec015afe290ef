/* HS256 JWT verification with OpenSSL: base64url, HMAC-SHA256, constant-time compare.
 * The roadmap's code, to complete: see README.md and jwt_verify.h. */
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "jwt_verify.h"

/* Compare two byte arrays in constant time to prevent timing attacks
 * (TODO: OpenSSL has one the compiler cannot turn into an early exit: CRYPTO_memcmp) */
static int const_time_cmp(const unsigned char *a, const unsigned char *b, size_t len)
{
    unsigned char diff = 0;
    for (size_t i = 0; i < len; i++)
        diff |= a[i] ^ b[i];
    return diff == 0;
}

int base64url_decode(const char *in, size_t in_len, unsigned char *out, size_t out_cap,
                     size_t *out_len)
{
    /* TODO: the alphabet A-Z a-z 0-9 - _, no padding; refuse anything else, a length
     * that is 1 mod 4, and a result larger than out_cap. */
    (void)in; (void)in_len; (void)out; (void)out_cap;
    *out_len = 0;
    return -1;
}

/* Verify HS256: signing_input = "base64url(hdr).base64url(payload)" */
int jwt_verify_hs256(const char *signing_input, size_t input_len,
                     const unsigned char *sig, size_t sig_len,
                     const unsigned char *secret, size_t secret_len)
{
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int  digest_len = 0;

    HMAC(EVP_sha256(),
         secret,   (int)secret_len,
         (const unsigned char *)signing_input, input_len,
         digest,  &digest_len);

    if (digest_len != sig_len) return 0;
    return const_time_cmp(digest, sig, digest_len);
}

int jwt_verify_token(const char *token, size_t token_len,
                     const unsigned char *secret, size_t secret_len)
{
    /* TODO: split at the two dots (within token_len: there is no NUL), decode the
     * signature with base64url_decode, verify "header.payload" with jwt_verify_hs256. */
    (void)token; (void)token_len; (void)secret; (void)secret_len;
    return 0;
}
