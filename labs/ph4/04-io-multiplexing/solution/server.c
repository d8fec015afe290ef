/* The roadmap's epoll skeleton, completed: an edge-triggered echo server on one thread.
 *
 * With EPOLLET, epoll_wait reports a descriptor once per CHANGE (new bytes arrived, a new
 * connection queued), not while it stays ready. So every event must be drained: accept
 * until EAGAIN, read until EAGAIN. Anything left unread raises no new event: the peer waits
 * forever. Descriptors are non-blocking, so "until EAGAIN" never blocks the only thread.
 *
 * Bytes that cannot be written yet (the peer's window is full) wait in a per-connection
 * buffer and go out on EPOLLOUT (also edge-triggered: registered once, fires when the
 * socket becomes writable again).
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_EVENTS 128

struct conn {
    char *out;        /* bytes read and not yet echoed */
    size_t len, cap;  /* out[0 .. len) pending */
    int eof;          /* the peer closed its side: close once out is flushed */
};

static struct conn *conns;
static size_t nconns;

static int set_nonblocking(int fd) {
    int flags = fcntl(fd, F_GETFL, 0);
    return flags < 0 ? -1 : fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

static struct conn *conn_of(int fd) {
    if ((size_t)fd >= nconns) {
        size_t n = nconns ? nconns : 1024;
        while (n <= (size_t)fd) n *= 2;
        struct conn *grown = realloc(conns, n * sizeof *grown);
        if (grown == NULL) { perror("realloc"); exit(1); }
        memset(grown + nconns, 0, (n - nconns) * sizeof *grown);
        conns = grown, nconns = n;
    }
    return &conns[fd];
}

/* Out of descriptors (accept4: EMFILE), the queued connections stay queued, and the
 * level-triggered listener would report them again at once: epoll_wait, accept4, EMFILE,
 * a busy loop. So the listener is not watched until a descriptor is freed. */
static int paused_listener = -1;

static void watch_listener(int epfd, int listen_fd, unsigned events) {
    struct epoll_event ev = {.events = events, .data.fd = listen_fd};
    epoll_ctl(epfd, EPOLL_CTL_MOD, listen_fd, &ev);
    paused_listener = events ? -1 : listen_fd;
}

static void drop(int epfd, int fd) {
    struct conn *c = conn_of(fd);
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    free(c->out);
    memset(c, 0, sizeof *c);
    if (paused_listener >= 0) watch_listener(epfd, paused_listener, EPOLLIN); /* room again */
}

/* Write what is pending until done or EAGAIN. Returns -1 when the connection broke. */
static int flush(int fd, struct conn *c) {
    size_t off = 0;
    while (off < c->len) {
        ssize_t n = send(fd, c->out + off, c->len - off, MSG_NOSIGNAL);
        if (n > 0) { off += (size_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break; /* EPOLLOUT later */
        return -1;
    }
    if (off > 0) {
        memmove(c->out, c->out + off, c->len - off);
        c->len -= off;
    }
    return 0;
}

static int append(struct conn *c, const char *data, size_t n) {
    if (c->len + n > c->cap) {
        size_t cap = c->cap ? c->cap : 65536;
        while (cap < c->len + n) cap *= 2;
        char *grown = realloc(c->out, cap);
        if (grown == NULL) return -1;
        c->out = grown, c->cap = cap;
    }
    memcpy(c->out + c->len, data, n);
    c->len += n;
    return 0;
}

static void on_client(int epfd, int fd, unsigned events) {
    struct conn *c = conn_of(fd);
    char buf[16384];
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        for (;;) { /* edge-triggered: read until EAGAIN */
            ssize_t n = recv(fd, buf, sizeof buf, 0);
            if (n > 0) {
                if (append(c, buf, (size_t)n) < 0) { drop(epfd, fd); return; }
                continue;
            }
            if (n == 0) { c->eof = 1; break; }
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            drop(epfd, fd);
            return;
        }
    }
    if (flush(fd, c) < 0 || (c->eof && c->len == 0)) drop(epfd, fd);
}

static void on_listener(int epfd, int listen_fd) {
    for (;;) { /* accept until EAGAIN: one event may stand for many queued connections */
        int client = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (client < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                watch_listener(epfd, listen_fd, 0); /* until drop() frees a descriptor */
            else if (errno != EAGAIN && errno != EWOULDBLOCK)
                perror("accept4");
            return;
        }
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.fd = client};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, client, &ev) < 0) { perror("epoll_ctl"); close(client); continue; }
        conn_of(client);
    }
}

static void run_event_loop(int listen_fd) {
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) { perror("epoll_create1"); exit(1); }
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = listen_fd};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, listen_fd, &ev) < 0) { perror("epoll_ctl"); exit(1); }
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(epfd, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            exit(1);
        }
        for (int i = 0; i < n; i++) {
            if (events[i].data.fd == listen_fd) on_listener(epfd, listen_fd);
            else on_client(epfd, events[i].data.fd, events[i].events);
        }
    }
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    signal(SIGPIPE, SIG_IGN);
    int srv = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (srv < 0) { perror("socket"); return 1; }
    int one = 1;
    setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(srv, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("bind"); return 1; }
    if (listen(srv, SOMAXCONN) < 0) { perror("listen"); return 1; }
    if (set_nonblocking(srv) < 0) { perror("fcntl"); return 1; }
    socklen_t len = sizeof addr;
    getsockname(srv, (struct sockaddr *)&addr, &len);
    printf("listening on %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    run_event_loop(srv);
    return 0;
}
