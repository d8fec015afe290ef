/* epoll edge-triggered event loop skeleton (Linux) - from the roadmap.
 *
 * Complete it into an echo server that serves every connection from this one thread:
 *
 *   TODO 1  handle_client: with EPOLLET, read until read() fails with EAGAIN, and echo
 *           every byte back; read() == 0 means the peer closed: close(fd);
 *   TODO 2  the listening socket: make it non-blocking and accept until EAGAIN (one
 *           event can stand for many queued connections); check every return value;
 *   TODO 3  send() may write less than asked or fail with EAGAIN: keep what is left and
 *           send it when the socket is writable again (EPOLLOUT).
 *
 * main() prints "listening on <port>": the verification reads it. Built with -Wall -Wextra
 * -Werror, AddressSanitizer and UndefinedBehaviorSanitizer.
 */
#include <sys/epoll.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <fcntl.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>

#define MAX_EVENTS 128

static void set_nonblocking(int fd) {
    int flags = fcntl(fd, F_GETFL, 0);
    fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

static void run_event_loop(int listen_fd) {
    int epfd = epoll_create1(EPOLL_CLOEXEC);

    struct epoll_event ev;
    ev.events  = EPOLLIN;
    ev.data.fd = listen_fd;
    epoll_ctl(epfd, EPOLL_CTL_ADD, listen_fd, &ev);

    struct epoll_event events[MAX_EVENTS];

    while (1) {
        int n = epoll_wait(epfd, events, MAX_EVENTS, -1 /* block forever */);

        for (int i = 0; i < n; i++) {
            if (events[i].data.fd == listen_fd) {
                /* New connection */
                int client = accept(listen_fd, NULL, NULL);
                set_nonblocking(client);

                ev.events  = EPOLLIN | EPOLLET;  /* edge-triggered */
                ev.data.fd = client;
                epoll_ctl(epfd, EPOLL_CTL_ADD, client, &ev);
            } else {
                /* Data available — handle_client(events[i].data.fd) */
                /* With ET: must read until EAGAIN */
            }
        }
    }
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    int srv = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bind(srv, (struct sockaddr *)&addr, sizeof addr);
    listen(srv, SOMAXCONN);
    socklen_t len = sizeof addr;
    getsockname(srv, (struct sockaddr *)&addr, &len);
    printf("listening on %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    run_event_loop(srv);
    return 0;
}
