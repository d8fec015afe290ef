/* ph0.7: linked into the accept_loop_short_writes build with -Wl,--wrap=send,... so that
 * every send()/sendto()/write() the learner's server.c makes on a socket writes at most
 * half of what it was asked (rounded up): the short write a real send() returns when a
 * signal interrupts it after some bytes went out, when SO_SNDTIMEO expires, or when a
 * non-blocking socket's buffer fills. A server that ignores the count loses the rest. */
#include <stddef.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

ssize_t __real_send(int fd, const void *buf, size_t len, int flags);
ssize_t __real_sendto(int fd, const void *buf, size_t len, int flags,
                      const struct sockaddr *addr, socklen_t addrlen);
ssize_t __real_write(int fd, const void *buf, size_t len);
ssize_t __wrap_send(int fd, const void *buf, size_t len, int flags);
ssize_t __wrap_sendto(int fd, const void *buf, size_t len, int flags,
                      const struct sockaddr *addr, socklen_t addrlen);
ssize_t __wrap_write(int fd, const void *buf, size_t len);

static size_t cut(int fd, size_t len) {
    int type;
    socklen_t size = sizeof type;
    if (len < 2 || getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &size) != 0) {
        return len; /* not a socket (stdout, a file): left alone */
    }
    return (len + 1) / 2;
}

ssize_t __wrap_send(int fd, const void *buf, size_t len, int flags) {
    return __real_send(fd, buf, cut(fd, len), flags);
}

ssize_t __wrap_sendto(int fd, const void *buf, size_t len, int flags,
                      const struct sockaddr *addr, socklen_t addrlen) {
    return __real_sendto(fd, buf, cut(fd, len), flags, addr, addrlen);
}

ssize_t __wrap_write(int fd, const void *buf, size_t len) {
    return __real_write(fd, buf, cut(fd, len));
}
