/* The test's gate, preloaded into the learner's server (LD_PRELOAD) by
 * test_graceful_shutdown.py: it holds ONE chosen step of ONE request until the test opens
 * the FIFO named by SHUTDOWN_TEST_GATE, so an interleaving that is a microsecond-wide race
 * in real life (SIGTERM between accept() and the worker's first line; the drain looking at
 * the counter between its decrement and the answer) is arranged, not hoped for.
 *
 *   SHUTDOWN_TEST_HOLD=worker  the first thread created starts only when the gate opens
 *   SHUTDOWN_TEST_HOLD=done    the first "DONE ..." sent (send or write) waits for the gate
 *
 * When it holds, it prints "[test-gate] holding <what>" on stderr first. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

int pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*fn)(void *), void *arg) {
    static int (*real)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);
    if (!real)
        real = (int (*)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *))dlsym(
            RTLD_NEXT, "pthread_create");
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
