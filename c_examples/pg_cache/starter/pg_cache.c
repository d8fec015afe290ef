/* PostgreSQL via libpq + Redis cache-aside via hiredis: the roadmap's code, to complete.
 * See README.md and pg_cache.h for what each function must do. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pg_cache.h"

/* PostgreSQL via libpq - parameterized query (prevents SQL injection) */
int fetch_user(PGconn *conn, const char *user_id, struct user *out)
{
    const char *params[1] = { user_id };
    PGresult *res = PQexecParams(conn,
        "SELECT id, name, email FROM users WHERE id = $1",
        1,    /* nParams */
        NULL, /* paramTypes  (let server infer) */
        params, NULL, NULL,
        0     /* result format: text */
    );
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) > 0) {
        printf("id=%-6s  name=%-20s  email=%s\n",
            PQgetvalue(res, 0, 0),
            PQgetvalue(res, 0, 1),
            PQgetvalue(res, 0, 2));
    }
    PQclear(res);
    (void)out;   /* TODO: fill *out; return 1 (found), 0 (no row), -1 (error) */
    return 0;
}

char *user_to_json(const struct user *u)
{
    (void)u;     /* TODO: {"id":..,"name":"..","email":".."}, strings escaped, malloc'd */
    return NULL;
}

/* Redis cache-aside via hiredis */
char *get_user_cached(redisContext *rc, PGconn *pg, const char *user_id, int *hit)
{
    char key[64];
    snprintf(key, sizeof(key), "user:%s", user_id);

    redisReply *r = redisCommand(rc, "GET %s", key);
    if (r && r->type == REDIS_REPLY_STRING) {
        char *json = strdup(r->str);   /* cache HIT */
        freeReplyObject(r);
        *hit = 1;
        return json;
    }
    freeReplyObject(r);

    /* cache MISS - query DB, then SET with 5-min TTL */
    /* fetch_user(pg, user_id) -> serialize to JSON ->  */
    /* redisCommand(rc, "SET %s %s EX 300", key, json_val) */
    (void)pg;
    return NULL;
}
