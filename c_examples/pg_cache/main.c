/* Harness for the ph2.c example: connects to Postgres and Redis, asks get_user_cached()
 * for one user and prints what it got.
 *
 *   REDIS_USERNAME=... REDIS_PASSWORD=... \
 *   pg_cache <conninfo> <redis_host> <redis_port> <redis_db> <user_id>
 *
 * Prints "HIT <json>" or "MISS <json>" (exit 0), "NOT FOUND" (exit 1); errors go to
 * stderr (exit 2). */
#include <stdio.h>
#include <stdlib.h>

#include "pg_cache.h"

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: %s <conninfo> <redis_host> <redis_port> <redis_db> <user_id>\n",
                argv[0]);
        return 2;
    }
    const char *conninfo = argv[1], *host = argv[2], *user_id = argv[5];
    int port = atoi(argv[3]), db = atoi(argv[4]);

    PGconn *pg = PQconnectdb(conninfo);
    if (PQstatus(pg) != CONNECTION_OK) {
        fprintf(stderr, "postgres: %s", PQerrorMessage(pg));
        PQfinish(pg);
        return 2;
    }
    redisContext *rc = redisConnect(host, port);
    if (rc == NULL || rc->err) {
        fprintf(stderr, "redis: %s\n", rc ? rc->errstr : "cannot allocate a context");
        redisFree(rc);
        PQfinish(pg);
        return 2;
    }
    /* The server asks every client for a password: the lab's user and its password come
     * in the environment (REDIS_USERNAME, REDIS_PASSWORD), never on the command line. */
    const char *user = getenv("REDIS_USERNAME"), *password = getenv("REDIS_PASSWORD");
    if (password != NULL && *password != '\0') {
        redisReply *authed = user != NULL && *user != '\0'
            ? redisCommand(rc, "AUTH %s %s", user, password)
            : redisCommand(rc, "AUTH %s", password);
        int accepted = authed != NULL && authed->type == REDIS_REPLY_STATUS;
        freeReplyObject(authed);
        if (!accepted) {
            fprintf(stderr, "redis: AUTH failed\n");
            redisFree(rc);
            PQfinish(pg);
            return 2;
        }
    }
    redisReply *selected = redisCommand(rc, "SELECT %d", db);
    int ok = selected != NULL && selected->type == REDIS_REPLY_STATUS;
    freeReplyObject(selected);
    if (!ok) {
        fprintf(stderr, "redis: SELECT %d failed\n", db);
        redisFree(rc);
        PQfinish(pg);
        return 2;
    }

    int hit = -1;
    char *json = get_user_cached(rc, pg, user_id, &hit);
    int status;
    if (json != NULL) {
        printf("%s %s\n", hit ? "HIT" : "MISS", json);
        status = 0;
    } else {
        printf("NOT FOUND\n");
        status = 1;
    }
    free(json);
    redisFree(rc);
    PQfinish(pg);
    return status;
}
