/* ph1.c WRONG (retry_on_any_error): retries every failed write().
 *
 * When the client has gone, write() fails with EPIPE or ECONNRESET forever: the loop never
 * ends and the server stops serving anyone.
 *
 * Two things the roadmap's version gets wrong:
 *  - the reason phrase: "HTTP/1.1 404 OK" is a contradiction; the phrase must match the code;
 *  - write(): on a socket it may write only part of the buffer (the send buffer is full, a
 *    signal arrived after some bytes went out) or fail with EINTR before writing anything.
 *    Every caller of write() on a socket needs a loop.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "send_json.h"

static const char *reason_phrase(int status) {
    switch (status) {
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default:  break;
    }
    /* An unknown code still gets a phrase for its class (RFC 9110 section 15). */
    switch (status / 100) {
    case 1:  return "Informational";
    case 2:  return "Success";
    case 3:  return "Redirection";
    case 4:  return "Client Error";
    default: return "Server Error";
    }
}

/* Write all len bytes, however many calls it takes. */
static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0)
            continue;              /* WRONG: EPIPE will not go away by retrying */
        buf += n;                  /* a partial write: go on from where it stopped */
        len -= (size_t)n;
    }
    return 0;
}

int send_json(int fd, int status, const char *body) {
    char header[256];
    size_t body_len = strlen(body);
    int header_len = snprintf(header, sizeof(header),
        "HTTP/1.1 %d %s\r\n"
        "Content-Type: application/json\r\n"
        "Content-Length: %zu\r\n"
        "Connection: close\r\n"
        "\r\n",
        status, reason_phrase(status), body_len);
    if (header_len < 0 || (size_t)header_len >= sizeof(header)) {
        errno = EOVERFLOW;
        return -1;
    }
    if (write_all(fd, header, (size_t)header_len) < 0)
        return -1;
    return write_all(fd, body, body_len);
}
