/* Thread-per-connection TCP echo server: the roadmap's accept-loop skeleton, completed.
 *
 *   accept_loop PORT        (PORT 0 lets the kernel choose; the port is printed)
 *
 * The main thread owns the listening socket and does nothing but accept(); every
 * accepted connection gets its own thread that echoes bytes back until the client
 * closes. SIGTERM (or SIGINT) stops the accept loop and the process exits with 0.
 */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t stop_requested = 0;

static void on_stop_signal(int sig) {
    (void)sig;
    stop_requested = 1; /* only async-signal-safe work here: set a flag, nothing else */
}

/* send() until every byte is out: a single call may write only part of the buffer. */
static int send_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL); /* no SIGPIPE if the peer left */
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* One thread per connection: echo until the client closes (recv() returns 0). */
static void *echo_connection(void *arg) {
    int fd = (int)(intptr_t)arg;
    char buf[16384];
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n == 0) break; /* orderly shutdown by the client */
        if (n < 0) {
            if (errno == EINTR) continue;
            break; /* reset or error: nothing left to echo to */
        }
        if (send_all(fd, buf, (size_t)n) < 0) break;
    }
    close(fd);
    return NULL;
}

static int parse_port(const char *text) {
    char *end = NULL;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < 0 || value > 65535) return -1;
    return (int)value;
}

int main(int argc, char **argv) {
    if (argc != 2 || parse_port(argv[1]) < 0) {
        fprintf(stderr, "usage: %s PORT   (0-65535; 0 = any free port)\n", argv[0]);
        return 2;
    }
    int port = parse_port(argv[1]);

    /* Block SIGTERM/SIGINT in this thread, and so in every thread it creates: they can
     * then only be delivered inside ppoll() below, which unblocks them atomically while
     * it waits. No worker thread swallows the signal, and no signal can slip in between
     * checking the flag and going back to sleep. */
    sigset_t stop_signals, wait_mask;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    pthread_sigmask(SIG_BLOCK, &stop_signals, &wait_mask);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int srv = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (srv < 0) {
        perror("socket");
        return 1;
    }
    /* Without SO_REUSEADDR, bind() fails with EADDRINUSE while connections of the
     * previous run still sit in TIME_WAIT on this port: no quick restart. */
    int opt = 1;
    if (setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &opt, sizeof opt) < 0) {
        perror("setsockopt(SO_REUSEADDR)");
        return 1;
    }
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(srv, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("bind");
        return 1;
    }
    if (listen(srv, SOMAXCONN) < 0) { /* SOMAXCONN = the kernel's backlog limit */
        perror("listen");
        return 1;
    }
    socklen_t addr_len = sizeof addr;
    getsockname(srv, (struct sockaddr *)&addr, &addr_len);
    printf("listening on %d\n", ntohs(addr.sin_port));
    fflush(stdout); /* stdout is a pipe, not a terminal: flush or nobody sees it */

    pthread_attr_t detached;
    pthread_attr_init(&detached);
    pthread_attr_setdetachstate(&detached, PTHREAD_CREATE_DETACHED); /* no join needed */

    while (!stop_requested) {
        struct pollfd pfd = {.fd = srv, .events = POLLIN};
        if (ppoll(&pfd, 1, NULL, &wait_mask) < 0) {
            if (errno == EINTR) continue; /* a signal: the loop condition decides */
            perror("ppoll");
            break;
        }
        int client = accept(srv, NULL, NULL); /* a blocking socket, unlike srv */
        if (client < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED ||
                errno == EINTR)
                continue; /* the client gave up between ppoll() and accept() */
            perror("accept");
            /* e.g. EMFILE: keep serving the connections we have. The connection stays
             * queued and ppoll() would report it again at once - a busy loop - so wait a
             * little for a connection thread to free a descriptor (a signal still ends
             * the wait), then try again. */
            struct timespec backoff = {.tv_sec = 0, .tv_nsec = 50 * 1000 * 1000};
            ppoll(NULL, 0, &backoff, &wait_mask);
            continue;
        }
        pthread_t tid;
        /* Pass the descriptor by value: a pointer to `client` would be overwritten by
         * the next accept() before the new thread has read it. */
        int rc = pthread_create(&tid, &detached, echo_connection, (void *)(intptr_t)client);
        if (rc != 0) {
            fprintf(stderr, "pthread_create: %s\n", strerror(rc));
            close(client);
        }
    }

    /* Stop accepting; connections still open are closed by the kernel at exit. */
    pthread_attr_destroy(&detached);
    close(srv);
    printf("stopped\n");
    return 0;
}
