/* Minimal HTTP/1.1 response builder in C - the roadmap's version.
 *
 * Two bugs to fix (see README.md):
 *  - the reason phrase is always "OK", whatever the status;
 *  - write() may write fewer bytes than asked, or fail with EINTR, and the result is ignored.
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "send_json.h"

int send_json(int fd, int status, const char *body) {
    char header[512];
    int  body_len = (int)strlen(body);
    snprintf(header, sizeof(header),
        "HTTP/1.1 %d OK\r\n"
        "Content-Type: application/json\r\n"
        "Content-Length: %d\r\n"
        "Connection: close\r\n"
        "\r\n",
        status, body_len);
    write(fd, header, strlen(header));
    write(fd, body,   body_len);
    return 0;
}
