/* ph1.c harness - a tiny HTTP/1.1 server that answers every request with the learner's
 * send_json(), so a real HTTP client can judge what comes out.
 *
 *   send_json_server          listens on 127.0.0.1:<free port>, prints "PORT <n>" on stdout
 *   GET /<status>?bytes=<n>   answers send_json(fd, status, <a JSON body of exactly n bytes>)
 *   GET /quit                 answers 200 and exits 0 (so the sanitizers check for leaks)
 *
 * After each response it prints "SENT <status> <return value of send_json>" on stdout.
 *
 * The kernel rarely writes a short count on loopback, so the harness makes it happen, the
 * same way every run: it is linked with -Wl,--wrap=write,--wrap=send,--wrap=writev, and on
 * the client socket each call writes at most a few bytes to a few KiB, and every third call
 * fails with EINTR before writing anything - as a signal arriving mid-write would do.
 * SEND_JSON_SHORT_WRITES=0 in the environment turns that off (plain kernel writes).
 *
 *   GET /<status>?bytes=<n>&errno=<e>   the same, but the next interrupted call of this
 *       response fails with errno <e> instead of EINTR (EAGAIN: a non-blocking socket's send
 *       buffer is full, or SO_SNDTIMEO expired), once: send_json() must give up, return -1.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "send_json.h"

#define MAX_BODY (8u << 20)

static int client_fd = -1;          /* the socket whose writes are made partial */
static int short_writes = 1;        /* 0: leave the writes alone */
static unsigned long write_calls;
static int fail_errno;              /* the errno of the next failing call (0: EINTR) */

ssize_t __real_write(int fd, const void *buf, size_t count);
ssize_t __real_send(int fd, const void *buf, size_t count, int flags);
ssize_t __real_writev(int fd, const struct iovec *iov, int iovcnt);

/* How much this call may write: 0 means "interrupted, nothing written". */
static size_t allowance(void) {
    static const size_t sizes[] = {1, 13, 512, 4096, 7, 1500};
    unsigned long call = write_calls++;
    if (call % 3 == 2)
        return 0;
    return sizes[call % (sizeof(sizes) / sizeof(sizes[0]))];
}

/* The errno of a failing call: EINTR, or once the one the request asked for. */
static int failure(void) {
    int e = fail_errno ? fail_errno : EINTR;
    fail_errno = 0;
    return e;
}

ssize_t __wrap_write(int fd, const void *buf, size_t count) {
    if (fd != client_fd || count == 0)
        return __real_write(fd, buf, count);
    size_t allowed = allowance();
    if (allowed == 0) {
        errno = failure();
        return -1;
    }
    return __real_write(fd, buf, count < allowed ? count : allowed);
}

ssize_t __wrap_send(int fd, const void *buf, size_t count, int flags) {
    if (fd != client_fd || count == 0)
        return __real_send(fd, buf, count, flags);
    size_t allowed = allowance();
    if (allowed == 0) {
        errno = failure();
        return -1;
    }
    return __real_send(fd, buf, count < allowed ? count : allowed, flags);
}

ssize_t __wrap_writev(int fd, const struct iovec *iov, int iovcnt) {
    if (fd != client_fd || iovcnt <= 0)
        return __real_writev(fd, iov, iovcnt);
    size_t allowed = allowance();
    if (allowed == 0) {
        errno = failure();
        return -1;
    }
    struct iovec part[64];  /* the first `allowed` bytes of the vector */
    int n = 0;
    for (int i = 0; i < iovcnt && n < 64 && allowed > 0; i++) {
        size_t take = iov[i].iov_len < allowed ? iov[i].iov_len : allowed;
        if (take == 0)
            continue;
        part[n].iov_base = iov[i].iov_base;
        part[n].iov_len = take;
        allowed -= take;
        n++;
    }
    return n ? __real_writev(fd, part, n) : 0;
}

/* Read the request head (up to the blank line) into buf; return its length or -1. */
static ssize_t read_head(int fd, char *buf, size_t cap) {
    size_t used = 0;
    while (used + 1 < cap) {
        ssize_t n = read(fd, buf + used, cap - 1 - used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        used += (size_t)n;
        buf[used] = '\0';
        if (strstr(buf, "\r\n\r\n"))
            return (ssize_t)used;
    }
    return -1;
}

/* A JSON document of exactly `size` bytes (at least the fixed part). */
static char *make_body(int status, size_t size) {
    char prefix[64];
    int plen = snprintf(prefix, sizeof(prefix), "{\"status\":%d,\"pad\":\"", status);
    size_t fixed = (size_t)plen + 2;
    if (size < fixed)
        size = fixed;
    char *body = malloc(size + 1);
    if (!body)
        return NULL;
    memcpy(body, prefix, (size_t)plen);
    for (size_t i = (size_t)plen; i < size - 2; i++)
        body[i] = (char)('a' + i % 26);
    memcpy(body + size - 2, "\"}", 2);
    body[size] = '\0';
    return body;
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);  /* a vanished client must be an error code, not a death */
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *mode = getenv("SEND_JSON_SHORT_WRITES");
    short_writes = !(mode && strcmp(mode, "0") == 0);

    int srv = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    socklen_t len = sizeof(addr);
    if (srv < 0 || bind(srv, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
        listen(srv, 16) < 0 || getsockname(srv, (struct sockaddr *)&addr, &len) < 0) {
        perror("send_json_server: listen");
        return 1;
    }
    printf("PORT %d\n", ntohs(addr.sin_port));

    char head[8192];
    for (int running = 1; running;) {
        int fd = accept(srv, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            perror("send_json_server: accept");
            return 1;
        }
        int status = 400;
        unsigned long size = 0;
        head[0] = '\0';
        if (read_head(fd, head, sizeof(head)) > 0) {
            if (strncmp(head, "GET /quit ", 10) == 0) {
                status = 200;
                running = 0;
            } else if (sscanf(head, "GET /%d?bytes=%lu ", &status, &size) < 1 ||
                       status < 100 || status > 599 || size > MAX_BODY) {
                status = 400;
                size = 0;
            }
        }
        const char *asked = strstr(head, "&errno=");
        fail_errno = asked ? atoi(asked + 7) : 0;
        char *body = make_body(status, size);
        if (!body) {
            close(fd);
            return 1;
        }
        client_fd = short_writes ? fd : -1;
        int rc = send_json(fd, status, body);
        client_fd = -1;
        printf("SENT %d %d\n", status, rc);
        free(body);
        close(fd);
    }
    close(srv);
    return 0;
}
