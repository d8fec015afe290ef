/* ph0.7: linked into the accept_loop_thread_refused build with -Wl,--wrap=pthread_create
 * so that the server meets what a process at its thread limit meets (RLIMIT_NPROC, a
 * cgroup's pids.max, memory for stacks): every other pthread_create() made by a thread
 * that has accepted a connection - the 1st, 3rd, 5th... - fails with EAGAIN and starts no
 * thread (threads made before any accept(), a signal thread, start as usual). The connection the server accepted for
 * that thread is then its own to deal with: closed at once (the client sees its end, and
 * may retry), or served some other way - never left open with nobody reading it.
 * Each refusal is reported on stderr ("thread_refused: pthread_create refused (EAGAIN)")
 * so that the test knows it happened. */
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int __real_accept(int fd, struct sockaddr *addr, socklen_t *len);
int __real_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags);
int __wrap_accept(int fd, struct sockaddr *addr, socklen_t *len);
int __wrap_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags);

int __real_pthread_create(pthread_t *thread, const pthread_attr_t *attr,
                          void *(*start)(void *), void *arg);
int __wrap_pthread_create(pthread_t *thread, const pthread_attr_t *attr,
                          void *(*start)(void *), void *arg);

static _Thread_local int accepted_here = 0; /* this thread has accepted a connection */
static int calls = 0;                       /* pthread_create() calls of such threads */

int __wrap_accept(int fd, struct sockaddr *addr, socklen_t *len) {
    int conn = __real_accept(fd, addr, len);
    if (conn >= 0) accepted_here = 1;
    return conn;
}

int __wrap_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    int conn = __real_accept4(fd, addr, len, flags);
    if (conn >= 0) accepted_here = 1;
    return conn;
}

int __wrap_pthread_create(pthread_t *thread, const pthread_attr_t *attr,
                          void *(*start)(void *), void *arg) {
    if (accepted_here && __atomic_fetch_add(&calls, 1, __ATOMIC_SEQ_CST) % 2 == 0) {
        static const char line[] = "thread_refused: pthread_create refused (EAGAIN)\n";
        ssize_t ignored = write(STDERR_FILENO, line, sizeof line - 1);
        (void)ignored;
        return EAGAIN;
    }
    return __real_pthread_create(thread, attr, start, arg);
}
