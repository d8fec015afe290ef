/* Minimal TCP server skeleton — illustrates accept loop (from the roadmap).
 *
 * Complete it into a thread-per-connection echo server:
 *
 *   TODO 1  take the port from argv[1] ("accept_loop 8080"; 0 = any free port), and
 *           after listen() print "listening on <port>\n" and fflush(stdout)
 *           (getsockname() gives the port the kernel chose for 0);
 *   TODO 2  check the return value of every call (socket, setsockopt, bind, listen);
 *   TODO 3  hand each accepted connection to its own thread (pthread_create) that
 *           echoes every byte back until the client closes, then close()s it;
 *   TODO 4  on SIGTERM, stop the accept loop and return 0 from main().
 *
 * Built with -Wall -Wextra -Werror and AddressSanitizer + UndefinedBehaviorSanitizer.
 */
#include <sys/socket.h>
#include <netinet/in.h>
#include <unistd.h>
#include <string.h>

int main(void) {
    int srv = socket(AF_INET, SOCK_STREAM, 0);

    int opt = 1;
    setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &opt, sizeof(opt));

    struct sockaddr_in addr;
    memset(&addr, 0, sizeof(addr));
    addr.sin_family      = AF_INET;
    addr.sin_port        = htons(8080);
    addr.sin_addr.s_addr = INADDR_ANY;

    bind(srv, (struct sockaddr *)&addr, sizeof(addr));
    listen(srv, SOMAXCONN);   /* SOMAXCONN = OS backlog limit */

    while (1) {
        int client = accept(srv, NULL, NULL);  /* blocks until client connects */
        /* hand off: thread-per-request -> pthread_create()  */
        /*           event loop          -> epoll_ctl(ADD)   */
        close(client);
    }
}
