/* PostgreSQL via libpq (parameterized query) + Redis cache-aside via hiredis. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pg_cache.h"

/* The user id travels as a parameter ($1), never inside the SQL text: whatever it
 * contains ("1; DROP TABLE users", "' OR '1'='1") it is only ever a value compared with
 * id - at worst one the server cannot read as an integer, which is an error, not code. */
int fetch_user(PGconn *conn, const char *user_id, struct user *out)
{
    const char *params[1] = { user_id };
    PGresult *res = PQexecParams(conn,
        "SELECT id, name, email FROM users WHERE id = $1",
        1,       /* nParams */
        NULL,    /* paramTypes: let the server infer (integer, from id) */
        params,
        NULL,    /* paramLengths: text parameters are NUL-terminated */
        NULL,    /* paramFormats: all text */
        0);      /* result format: text */
    int found;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "fetch_user: %s", PQerrorMessage(conn));
        found = -1;
    } else if (PQntuples(res) == 0) {
        found = 0;
    } else {
        /* snprintf truncates safely if a value is longer than the buffer */
        snprintf(out->id, sizeof(out->id), "%s", PQgetvalue(res, 0, 0));
        snprintf(out->name, sizeof(out->name), "%s", PQgetvalue(res, 0, 1));
        snprintf(out->email, sizeof(out->email), "%s", PQgetvalue(res, 0, 2));
        found = 1;
    }
    PQclear(res);
    return found;
}

/* Append s to buf as a JSON string (with quotes). buf must have room for 6*strlen(s)+3:
 * the worst case is every byte a control character, written as \u00XX. */
static char *json_string(char *buf, const char *s)
{
    *buf++ = '"';
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') {
            *buf++ = '\\';
            *buf++ = (char)*p;
        } else if (*p < 0x20) {
            buf += sprintf(buf, "\\u%04x", *p);
        } else {
            *buf++ = (char)*p;   /* UTF-8 bytes pass through unchanged */
        }
    }
    *buf++ = '"';
    *buf = '\0';
    return buf;
}

char *user_to_json(const struct user *u)
{
    size_t size = strlen(u->id) + 6 * (strlen(u->name) + strlen(u->email)) + 64;
    char *json = malloc(size);
    if (json == NULL)
        return NULL;
    /* id is an integer column: its text form is a valid JSON number */
    char *end = json + sprintf(json, "{\"id\":%s,\"name\":", u->id);
    end = json_string(end, u->name);
    end += sprintf(end, ",\"email\":");
    end = json_string(end, u->email);
    strcpy(end, "}");
    return json;
}

char *get_user_cached(redisContext *rc, PGconn *pg, const char *user_id, int *hit)
{
    char key[64];
    if (snprintf(key, sizeof(key), "user:%s", user_id) >= (int)sizeof(key)) {
        /* a truncated key could name another user's entry: refuse instead */
        fprintf(stderr, "get_user_cached: user id too long\n");
        return NULL;
    }

    /* %s in a hiredis format is one binary-safe argument: spaces or CRLF in the key
     * cannot turn into extra arguments or commands. */
    redisReply *r = redisCommand(rc, "GET %s", key);
    if (r == NULL || r->type == REDIS_REPLY_ERROR)  /* the cache failed: ask the database */
        fprintf(stderr, "redis GET: %s\n", r ? r->str : rc->errstr);
    else if (r->type == REDIS_REPLY_STRING) {       /* cache HIT */
        char *json = strdup(r->str);
        freeReplyObject(r);
        *hit = 1;
        return json;
    }
    freeReplyObject(r);                             /* NULL-safe */

    /* cache MISS: query the database, serialize, SET with a 5-minute TTL */
    struct user u;
    if (fetch_user(pg, user_id, &u) != 1)
        return NULL;                /* no such user, or an error: nothing to cache */
    char *json = user_to_json(&u);
    if (json == NULL)
        return NULL;
    r = redisCommand(rc, "SET %s %s EX %d", key, json, CACHE_TTL_SECONDS);
    if (r == NULL || r->type == REDIS_REPLY_ERROR)
        fprintf(stderr, "redis SET: %s\n", r ? r->str : rc->errstr);  /* still serve it */
    freeReplyObject(r);
    *hit = 0;
    return json;
}
