/* The test's gate, preloaded into the learner's server (LD_PRELOAD) by
 * test_graceful_shutdown.py: it holds ONE chosen step of ONE request until the test opens
 * the FIFO named by SHUTDOWN_TEST_GATE, so an interleaving that is a microsecond-wide race
 * in real life (SIGTERM between accept() and the worker's first line; the drain looking at
 * the counter between its decrement and the answer) is arranged, not hoped for.
 *
 *   SHUTDOWN_TEST_HOLD=worker  the first thread created starts only when the gate opens
 *   SHUTDOWN_TEST_HOLD=done    the first "DONE ..." sent (send or write) waits for the gate
 *
 * When it holds, it prints "[test-gate] holding <what>" on stderr first.
 *
 *   SHUTDOWN_TEST_HOLD=signal  no gate: once a thread has accepted a connection, its next
 *                              call that waits for one (poll, ppoll, select, pselect,
 *                              epoll_wait, epoll_pwait, accept, accept4, sigsuspend,
 *                              pause) sends the process SIGTERM on entry, before the real
 *                              call: the signal lands after the accept loop has looked at
 *                              its flag and before the wait has begun, the window a
 *                              check-then-wait loop loses the signal in. It prints
 *                              "[test-gate] SIGTERM before <call>" first.
 *
 *   SHUTDOWN_TEST_HOLD=nothread  no gate: once a thread has accepted a connection, its
 *                              next pthread_create() fails with EAGAIN (once), without
 *                              creating a thread: what a process at its thread limit
 *                              (RLIMIT_NPROC, memory for stacks) gets. It prints
 *                              "[test-gate] pthread_create fails with EAGAIN" first.
 *
 *   SHUTDOWN_TEST_HOLD=ready   no gate: the first fflush(stdout), the one that sends
 *                              "listening on <port>", sends the process SIGTERM right
 *                              after it (see the end of this file).
 *
 *   SHUTDOWN_TEST_HOLD=nofile  no gate: once a connection has been accepted, the process's
 *                              RLIMIT_NOFILE (soft) is lowered to its lowest free
 *                              descriptor, so that every descriptor it may open is in use:
 *                              the next accept() fails with EMFILE, for real, until some
 *                              descriptor is closed (the first request's, when it ends).
 *                              It prints "[test-gate] RLIMIT_NOFILE <n>: no descriptor
 *                              free" first, "[test-gate] accept fails with EMFILE" at the
 *                              first failure, and, at the first accept() that succeeds
 *                              after failing, "[test-gate] accept failed with EMFILE <k>
 *                              times". */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static atomic_int used = 0;

static int holding(const char *mode) {
    const char *want = getenv("SHUTDOWN_TEST_HOLD");
    return want != NULL && strcmp(want, mode) == 0 && getenv("SHUTDOWN_TEST_GATE") != NULL;
}

static void hold(const char *what) {
    if (atomic_fetch_add(&used, 1) != 0) return;
    char msg[64];
    int n = snprintf(msg, sizeof msg, "[test-gate] holding %s\n", what);
    if (n > 0) syscall(SYS_write, 2, msg, (size_t)n);
    int fd;
    do { /* blocks until the test opens the FIFO for writing */
        fd = (int)syscall(SYS_openat, AT_FDCWD, getenv("SHUTDOWN_TEST_GATE"), O_RDONLY);
    } while (fd < 0 && errno == EINTR);
    if (fd >= 0) {
        char c;
        while (syscall(SYS_read, fd, &c, 1) < 0 && errno == EINTR) {
        }
        syscall(SYS_close, fd);
    }
}

static int is_done(const void *buf, size_t len) {
    return len >= 5 && memcmp(buf, "DONE ", 5) == 0;
}

ssize_t send(int fd, const void *buf, size_t len, int flags) {
    static ssize_t (*real)(int, const void *, size_t, int);
    if (!real) real = (ssize_t (*)(int, const void *, size_t, int))dlsym(RTLD_NEXT, "send");
    if (holding("done") && is_done(buf, len)) hold("DONE");
    return real(fd, buf, len, flags);
}

ssize_t write(int fd, const void *buf, size_t len) {
    static ssize_t (*real)(int, const void *, size_t);
    if (!real) real = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    if (holding("done") && is_done(buf, len)) hold("DONE");
    return real(fd, buf, len);
}

struct start {
    void *(*fn)(void *);
    void *arg;
};

static void *held_start(void *p) {
    struct start s = *(struct start *)p;
    free(p);
    hold("worker");
    return s.fn(s.arg);
}

static int refuse_thread(void); /* SHUTDOWN_TEST_HOLD=nothread, below */

int pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*fn)(void *), void *arg) {
    static int (*real)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);
    if (!real)
        real = (int (*)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *))dlsym(
            RTLD_NEXT, "pthread_create");
    if (refuse_thread()) return EAGAIN;
    if (holding("worker") && atomic_load(&used) == 0) {
        struct start *s = malloc(sizeof *s);
        if (s != NULL) {
            s->fn = fn;
            s->arg = arg;
            int rc = real(t, a, held_start, s);
            if (rc != 0) free(s);
            return rc;
        }
    }
    return real(t, a, fn, arg);
}

/* ---- SHUTDOWN_TEST_HOLD=signal: SIGTERM between the flag check and the wait ---------- */

static atomic_long accepted_by = 0; /* the thread that accepted first (its tid), 0 before */
static atomic_int signalled = 0;

static void signal_before(const char *call) {
    long tid = syscall(SYS_gettid);
    if (!holding("signal") || atomic_load(&accepted_by) != tid) return;
    if (atomic_fetch_add(&signalled, 1) != 0) return;
    char msg[64];
    int n = snprintf(msg, sizeof msg, "[test-gate] SIGTERM before %s\n", call);
    if (n > 0) syscall(SYS_write, 2, msg, (size_t)n);
    syscall(SYS_kill, getpid(), SIGTERM);
}

static void no_descriptor_left(int fd, int err); /* SHUTDOWN_TEST_HOLD=nofile, below */

static void note_accept(int fd) {
    int err = errno;
    long none = 0;
    if (fd >= 0 && (holding("signal") || holding("nothread")))
        atomic_compare_exchange_strong(&accepted_by, &none, (long)syscall(SYS_gettid));
    no_descriptor_left(fd, err);
    errno = err;
}

/* ---- SHUTDOWN_TEST_HOLD=nofile: accept() at the descriptor limit ----------------------- */

static atomic_int limited = 0;
static atomic_long emfile_failures = 0;
static atomic_int told = 0;

static void no_descriptor_left(int fd, int err) {
    if (!holding("nofile")) return;
    char msg[96];
    if (fd < 0) {
        if (err == EMFILE && atomic_fetch_add(&emfile_failures, 1) == 0 &&
            atomic_fetch_add(&told, 1) == 0) {
            static const char first[] = "[test-gate] accept fails with EMFILE\n";
            syscall(SYS_write, 2, first, sizeof first - 1);
        }
        return;
    }
    if (atomic_fetch_add(&limited, 1) == 0) { /* the first connection: no descriptor left */
        int lowest = 0;
        while (fcntl(lowest, F_GETFD) != -1) lowest++;
        struct rlimit lim;
        if (getrlimit(RLIMIT_NOFILE, &lim) == 0) {
            lim.rlim_cur = (rlim_t)lowest;
            if (setrlimit(RLIMIT_NOFILE, &lim) == 0) {
                int n = snprintf(msg, sizeof msg,
                                 "[test-gate] RLIMIT_NOFILE %d: no descriptor free\n", lowest);
                if (n > 0) syscall(SYS_write, 2, msg, (size_t)n);
            }
        }
        return;
    }
    long failed = atomic_exchange(&emfile_failures, 0);
    if (failed > 0) {
        int n = snprintf(msg, sizeof msg, "[test-gate] accept failed with EMFILE %ld times\n",
                         failed);
        if (n > 0) syscall(SYS_write, 2, msg, (size_t)n);
    }
}

/* ---- SHUTDOWN_TEST_HOLD=nothread: the first thread for a connection cannot be made ----- */

static atomic_int refused_once = 0;

static int refuse_thread(void) {
    if (!holding("nothread") || atomic_load(&accepted_by) != syscall(SYS_gettid)) return 0;
    if (atomic_fetch_add(&refused_once, 1) != 0) return 0;
    static const char msg[] = "[test-gate] pthread_create fails with EAGAIN\n";
    syscall(SYS_write, 2, msg, sizeof msg - 1);
    return 1;
}

/* the next definition of the function being wrapped (the sanitizers' or libc's) */
#define REAL(name) \
    static __typeof__(name) *real; \
    if (!real) real = (__typeof__(name) *)dlsym(RTLD_NEXT, #name)

/* what glibc calls for poll/ppoll under _FORTIFY_SOURCE */
int __poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t size);
int __ppoll_chk(struct pollfd *fds, nfds_t n, const struct timespec *t, const sigset_t *mask,
                size_t size);

int accept(int fd, struct sockaddr *addr, socklen_t *len) {
    REAL(accept);
    signal_before("accept");
    int client = real(fd, addr, len);
    note_accept(client);
    return client;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    REAL(accept4);
    signal_before("accept4");
    int client = real(fd, addr, len, flags);
    note_accept(client);
    return client;
}

int poll(struct pollfd *fds, nfds_t n, int timeout) {
    REAL(poll);
    signal_before("poll");
    return real(fds, n, timeout);
}

int __poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t size) {
    REAL(__poll_chk);
    signal_before("poll");
    return real(fds, n, timeout, size);
}

int ppoll(struct pollfd *fds, nfds_t n, const struct timespec *t, const sigset_t *mask) {
    REAL(ppoll);
    signal_before("ppoll");
    return real(fds, n, t, mask);
}

int __ppoll_chk(struct pollfd *fds, nfds_t n, const struct timespec *t, const sigset_t *mask,
                size_t size) {
    REAL(__ppoll_chk);
    signal_before("ppoll");
    return real(fds, n, t, mask, size);
}

int select(int n, fd_set *r, fd_set *w, fd_set *e, struct timeval *t) {
    REAL(select);
    signal_before("select");
    return real(n, r, w, e, t);
}

int pselect(int n, fd_set *r, fd_set *w, fd_set *e, const struct timespec *t,
            const sigset_t *mask) {
    REAL(pselect);
    signal_before("pselect");
    return real(n, r, w, e, t, mask);
}

int epoll_wait(int fd, struct epoll_event *events, int max, int timeout) {
    REAL(epoll_wait);
    signal_before("epoll_wait");
    return real(fd, events, max, timeout);
}

int epoll_pwait(int fd, struct epoll_event *events, int max, int timeout,
                const sigset_t *mask) {
    REAL(epoll_pwait);
    signal_before("epoll_pwait");
    return real(fd, events, max, timeout, mask);
}

int sigsuspend(const sigset_t *mask) {
    REAL(sigsuspend);
    signal_before("sigsuspend");
    return real(mask);
}

int pause(void) {
    REAL(pause);
    signal_before("pause");
    return real();
}

/* ---- SHUTDOWN_TEST_HOLD=ready: SIGTERM the moment the server says it is ready --------- *
 * The first fflush(stdout) (the one that sends "listening on <port>" down the pipe) sends
 * the process SIGTERM right after the real flush, before the next line of main() runs: a
 * supervisor may stop a process at any moment once it is up, the first one too. It prints
 * "[test-gate] SIGTERM after fflush" first. */

static atomic_int readied = 0;

int fflush(FILE *stream) {
    REAL(fflush);
    int rc = real(stream);
    if (stream == stdout && holding("ready") && atomic_fetch_add(&readied, 1) == 0) {
        static const char msg[] = "[test-gate] SIGTERM after fflush\n";
        syscall(SYS_write, 2, msg, sizeof msg - 1);
        syscall(SYS_kill, getpid(), SIGTERM);
    }
    return rc;
}
