/* WRONG, kept to prove the verification catches it:
 * the handler echoes one recv() worth of data and closes, so longer streams are
 * cut short.
 */
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t running = 1;

static void on_term(int sig) {
    (void)sig;
    running = 0;
}

static void *handle(void *arg) {
    int fd = *(int *)arg;
    free(arg);
    char buf[4096];
    ssize_t n;
    if ((n = recv(fd, buf, sizeof buf, 0)) > 0) {
        ssize_t off = 0;
        while (off < n) {
            ssize_t w = send(fd, buf + off, (size_t)(n - off), MSG_NOSIGNAL);
            if (w <= 0) goto done;
            off += w;
        }
    }
done:
    close(fd);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    int port = atoi(argv[1]);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term; /* no SA_RESTART: accept() returns EINTR */
    sigaction(SIGTERM, &sa, NULL);

    int srv = socket(AF_INET, SOCK_STREAM, 0);
    int opt = 1;
    setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &opt, sizeof(opt));

    struct sockaddr_in addr;
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    addr.sin_addr.s_addr = INADDR_ANY;
    if (bind(srv, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        perror("bind");
        return 1;
    }
    if (listen(srv, SOMAXCONN) < 0) {
        perror("listen");
        return 1;
    }
    socklen_t len = sizeof addr;
    getsockname(srv, (struct sockaddr *)&addr, &len);
    printf("listening on %d\n", ntohs(addr.sin_port));
    fflush(stdout);

    while (running) {
        int client = accept(srv, NULL, NULL);
        if (client < 0) {
            if (errno != EINTR) perror("accept");
            continue;
        }
        int *arg = malloc(sizeof *arg);
        *arg = client;
        pthread_t t;
        pthread_create(&t, NULL, handle, arg);
        pthread_detach(t);
    }
    close(srv);
    return 0;
}
