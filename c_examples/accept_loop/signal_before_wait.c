/* ph0.7: linked into the accept_loop_signal_before_wait build with -Wl,--wrap=accept,...
 * so that a supervisor's SIGTERM arrives at the worst moment for an accept loop: once a
 * thread has accepted a connection, the next call it makes that may wait for the next
 * one (accept, accept4, poll, ppoll, select, pselect, epoll_wait, epoll_pwait, and the
 * __poll_chk/__ppoll_chk that _FORTIFY_SOURCE turns poll/ppoll into) first sends
 * SIGTERM to the process (kill(getpid()), as a supervisor does), then goes on into the
 * call. That is the window between the loop's check of its stop flag and its going to
 * sleep: a handler that only sets the flag runs there, and a plain accept() (or poll())
 * then sleeps on until the next client. A server that keeps the signal blocked outside
 * its wait (ppoll/pselect with a mask), or wakes its wait from the handler (a self-pipe,
 * signalfd, a sigwait thread that shuts the socket down), stops at once.
 * It happens once per process, and is reported on stderr ("signal_before_wait: SIGTERM
 * sent before <call>()") so that the test knows the signal went out. */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

int __real_accept(int fd, struct sockaddr *addr, socklen_t *len);
int __real_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags);
int __real_poll(struct pollfd *fds, nfds_t n, int timeout);
int __real_ppoll(struct pollfd *fds, nfds_t n, const struct timespec *timeout,
                 const sigset_t *mask);
int __real_select(int n, fd_set *r, fd_set *w, fd_set *e, struct timeval *timeout);
int __real_pselect(int n, fd_set *r, fd_set *w, fd_set *e, const struct timespec *timeout,
                   const sigset_t *mask);
int __real_epoll_wait(int epfd, struct epoll_event *events, int max, int timeout);
int __real_epoll_pwait(int epfd, struct epoll_event *events, int max, int timeout,
                       const sigset_t *mask);
int __real___poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t size);
int __real___ppoll_chk(struct pollfd *fds, nfds_t n, const struct timespec *timeout,
                       const sigset_t *mask, size_t size);
int __wrap___poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t size);
int __wrap___ppoll_chk(struct pollfd *fds, nfds_t n, const struct timespec *timeout,
                       const sigset_t *mask, size_t size);
int __wrap_accept(int fd, struct sockaddr *addr, socklen_t *len);
int __wrap_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags);
int __wrap_poll(struct pollfd *fds, nfds_t n, int timeout);
int __wrap_ppoll(struct pollfd *fds, nfds_t n, const struct timespec *timeout,
                 const sigset_t *mask);
int __wrap_select(int n, fd_set *r, fd_set *w, fd_set *e, struct timeval *timeout);
int __wrap_pselect(int n, fd_set *r, fd_set *w, fd_set *e, const struct timespec *timeout,
                   const sigset_t *mask);
int __wrap_epoll_wait(int epfd, struct epoll_event *events, int max, int timeout);
int __wrap_epoll_pwait(int epfd, struct epoll_event *events, int max, int timeout,
                       const sigset_t *mask);

static _Thread_local int accepted_here = 0; /* this thread has accepted a connection */
static volatile sig_atomic_t sent = 0;      /* once per process */

static void signal_before(const char *call) {
    if (!accepted_here || sent) return;
    sent = 1;
    char line[96];
    int n = snprintf(line, sizeof line, "signal_before_wait: SIGTERM sent before %s()\n", call);
    if (n > 0) {
        ssize_t unused = write(STDERR_FILENO, line, strlen(line));
        (void)unused;
    }
    kill(getpid(), SIGTERM);
}

static int noted(int fd) {
    if (fd >= 0) accepted_here = 1;
    return fd;
}

int __wrap_accept(int fd, struct sockaddr *addr, socklen_t *len) {
    signal_before("accept");
    return noted(__real_accept(fd, addr, len));
}

int __wrap_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    signal_before("accept4");
    return noted(__real_accept4(fd, addr, len, flags));
}

int __wrap_poll(struct pollfd *fds, nfds_t n, int timeout) {
    signal_before("poll");
    return __real_poll(fds, n, timeout);
}

int __wrap_ppoll(struct pollfd *fds, nfds_t n, const struct timespec *timeout,
                 const sigset_t *mask) {
    signal_before("ppoll");
    return __real_ppoll(fds, n, timeout, mask);
}

int __wrap___poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t size) {
    signal_before("poll");
    return __real___poll_chk(fds, n, timeout, size);
}

int __wrap___ppoll_chk(struct pollfd *fds, nfds_t n, const struct timespec *timeout,
                       const sigset_t *mask, size_t size) {
    signal_before("ppoll");
    return __real___ppoll_chk(fds, n, timeout, mask, size);
}

int __wrap_select(int n, fd_set *r, fd_set *w, fd_set *e, struct timeval *timeout) {
    signal_before("select");
    return __real_select(n, r, w, e, timeout);
}

int __wrap_pselect(int n, fd_set *r, fd_set *w, fd_set *e, const struct timespec *timeout,
                   const sigset_t *mask) {
    signal_before("pselect");
    return __real_pselect(n, r, w, e, timeout, mask);
}

int __wrap_epoll_wait(int epfd, struct epoll_event *events, int max, int timeout) {
    signal_before("epoll_wait");
    return __real_epoll_wait(epfd, events, max, timeout);
}

int __wrap_epoll_pwait(int epfd, struct epoll_event *events, int max, int timeout,
                       const sigset_t *mask) {
    signal_before("epoll_pwait");
    return __real_epoll_pwait(epfd, events, max, timeout, mask);
}
