/* ph1.c - the interface the harness calls. */
#ifndef SEND_JSON_H
#define SEND_JSON_H

/* Write a complete HTTP/1.1 response with a JSON body to fd:
 *   HTTP/1.1 <status> <reason phrase matching status>
 *   Content-Type: application/json
 *   Content-Length: <strlen(body)>
 *   Connection: close
 * Returns 0 once every byte is written, -1 (errno set) if the connection failed. */
int send_json(int fd, int status, const char *body);

#endif
