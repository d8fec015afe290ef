/* Graceful shutdown: the roadmap's SIGTERM handler with an atomic flag, completed.
 *
 *   graceful_server PORT [DRAIN_MS]   (PORT 0 = any free port; DRAIN_MS default 10000)
 *
 * Each connection carries one slow request: the client sends "BEGIN <id>\n", the server
 * answers "STARTED <id>\n"; when the client sends "END\n" the server answers
 * "DONE <id>\n" and closes. On SIGTERM (or SIGINT) the server
 *   1. stops accepting: it closes the listening socket, so new connections are refused;
 *   2. drains: it waits until every request in flight has been answered;
 *   3. exits 0, at the latest DRAIN_MS after the signal (requests still running then are
 *      cut: the supervisor's SIGKILL would come next anyway).
 */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static atomic_int in_flight = 0;
static atomic_bool shutdown_req = false;

static void handle_sigterm(int sig) {
    (void)sig;
    atomic_store(&shutdown_req, true); /* async-signal-safe: a lock-free atomic store */
}

static void request_begin(void) { atomic_fetch_add(&in_flight, 1); }
static void request_end(void) { atomic_fetch_sub(&in_flight, 1); }

static int send_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Read one '\n'-terminated line into buf (without the '\n'); -1 on EOF or error. */
static int read_line(int fd, char *buf, size_t size) {
    size_t used = 0;
    while (used + 1 < size) {
        char c;
        ssize_t n = recv(fd, &c, 1, 0);
        if (n == 0) return -1;
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (c == '\n') {
            buf[used] = '\0';
            return 0;
        }
        buf[used++] = c;
    }
    return -1;
}

static void *serve_request(void *arg) {
    int fd = (int)(intptr_t)arg;
    char line[128], reply[160];
    if (read_line(fd, line, sizeof line) == 0 && strncmp(line, "BEGIN ", 6) == 0) {
        const char *id = line + 6;
        snprintf(reply, sizeof reply, "STARTED %s\n", id);
        char end[16];
        if (send_all(fd, reply, strlen(reply)) == 0 && read_line(fd, end, sizeof end) == 0 &&
            strcmp(end, "END") == 0) {
            snprintf(reply, sizeof reply, "DONE %s\n", id);
            send_all(fd, reply, strlen(reply));
        }
    }
    close(fd);
    request_end(); /* after the answer is out and the socket closed */
    return NULL;
}

static int parse_number(const char *text, long max) {
    char *end = NULL;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < 0 || value > max) return -1;
    return (int)value;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3 || parse_number(argv[1], 65535) < 0 ||
        (argc == 3 && parse_number(argv[2], 3600000) < 0)) {
        fprintf(stderr, "usage: %s PORT [DRAIN_MS]\n", argv[0]);
        return 2;
    }
    int port = parse_number(argv[1], 65535);
    int drain_ms = argc == 3 ? parse_number(argv[2], 3600000) : 10000;

    /* SIGTERM/SIGINT stay blocked everywhere except inside ppoll() in this thread: no
     * worker swallows the signal, and none can land between the flag check and the
     * wait. No SA_RESTART: the wait returns EINTR and the loop sees the flag. */
    sigset_t stop_signals, wait_mask;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop_signals, &wait_mask);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handle_sigterm;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int srv = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (srv < 0) {
        perror("socket");
        return 1;
    }
    int opt = 1;
    if (setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &opt, sizeof opt) < 0) {
        perror("setsockopt");
        return 1;
    }
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(srv, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(srv, SOMAXCONN) < 0) {
        perror("bind/listen");
        return 1;
    }
    socklen_t addr_len = sizeof addr;
    getsockname(srv, (struct sockaddr *)&addr, &addr_len);
    printf("listening on %d\n", ntohs(addr.sin_port));
    fflush(stdout);

    pthread_attr_t detached;
    pthread_attr_init(&detached);
    pthread_attr_setdetachstate(&detached, PTHREAD_CREATE_DETACHED);

    long backoff_ms = 0; /* after accept() ran out of descriptors: 5 ms, doubling to 1 s */
    while (!atomic_load(&shutdown_req)) {
        struct pollfd pfd = {.fd = srv, .events = POLLIN};
        if (ppoll(&pfd, 1, NULL, &wait_mask) < 0) {
            if (errno == EINTR) continue; /* the signal: the loop condition decides */
            perror("ppoll");
            break;
        }
        int client = accept4(srv, NULL, NULL, SOCK_CLOEXEC);
        if (client < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* Out of descriptors (or kernel memory): the connection stays in the
                 * backlog, so ppoll() says "readable" again at once and retrying at once
                 * spins a core until some request closes its socket. Back off, as Go's
                 * http.Server does (5 ms, doubling up to 1 s), in a wait the stop signal
                 * still ends (ppoll with the same mask, no descriptors). */
                backoff_ms = backoff_ms == 0 ? 5 : (backoff_ms >= 500 ? 1000 : backoff_ms * 2);
                struct timespec pause = {.tv_sec = backoff_ms / 1000,
                                         .tv_nsec = backoff_ms % 1000 * 1000000L};
                if (ppoll(NULL, 0, &pause, &wait_mask) < 0 && errno != EINTR) perror("ppoll");
            }
            continue; /* EAGAIN, ECONNABORTED: the next connection, if any */
        }
        backoff_ms = 0;
        request_begin(); /* counted before the thread exists: nothing slips past drain */
        pthread_t tid;
        if (pthread_create(&tid, &detached, serve_request, (void *)(intptr_t)client) != 0) {
            close(client);
            request_end();
        }
    }

    /* 1. Stop accepting: with the listening socket closed, connect() gets RST (refused)
     *    instead of sitting in a backlog nobody will ever accept from. */
    close(srv);
    pthread_attr_destroy(&detached);

    /* 2. Drain, bounded by the deadline. */
    fprintf(stderr, "[shutdown] draining %d in-flight requests\n", atomic_load(&in_flight));
    double deadline = now_ms() + drain_ms;
    while (atomic_load(&in_flight) > 0 && now_ms() < deadline) usleep(5000);
    int left = atomic_load(&in_flight);
    if (left > 0) fprintf(stderr, "[shutdown] deadline: %d requests cut\n", left);

    /* 3. Pools closed, deregistered: a real server would do it here. */
    fprintf(stderr, "[shutdown] clean exit\n");
    return 0;
}
