/* The interface between the harness (main.c) and your code (pg_cache.c).
 * This file is fixed: the harness is compiled against it. */
#ifndef PG_CACHE_H
#define PG_CACHE_H

#include <hiredis/hiredis.h>
#include <libpq-fe.h>

#define CACHE_TTL_SECONDS 300

/* One row of users (id, name, email), as text. */
struct user {
    char id[32];
    char name[256];
    char email[256];
};

/* Parameterized SELECT id, name, email FROM users WHERE id = $1.
 * Returns 1 and fills *out when the user exists, 0 when there is no such row,
 * -1 on a database error (the server's message printed on stderr). */
int fetch_user(PGconn *conn, const char *user_id, struct user *out);

/* The user as a JSON object {"id":1,"name":"...","email":"..."} with name and email
 * escaped as JSON strings. Returns a malloc'd string (the caller frees it), NULL on
 * allocation failure. */
char *user_to_json(const struct user *u);

/* Cache-aside. GET user:<user_id> from Redis: on a hit return that JSON and set *hit = 1.
 * On a miss fetch the row from Postgres, SET user:<user_id> <json> EX 300, return the JSON
 * and set *hit = 0. Returns NULL when the user does not exist or on an error.
 * The result is malloc'd: the caller frees it with free(). */
char *get_user_cached(redisContext *rc, PGconn *pg, const char *user_id, int *hit);

#endif
