/* ph5.c harness: kafka_producer BROKERS TOPIC KEY=VALUE... (fixed; the learner writes
 * producer.c), or kafka_producer BROKERS TOPIC - to read the KEY=VALUE pairs from stdin, one
 * per line (a burst larger than a command line holds). Prints "delivered=N failed=M"; exit 0
 * when all were delivered, 1 when some failed, 2 on a usage error. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "producer.h"

/* The KEY=VALUE texts, each a copy of its own (split in place at the '='). */
struct pairs {
    char **items;
    size_t count, cap;
};

static int push(struct pairs *p, const char *text) {
    if (p->count == p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 64;
        char **grown = realloc(p->items, cap * sizeof *grown);
        if (!grown)
            return -1;
        p->items = grown;
        p->cap = cap;
    }
    char *copy = strdup(text);
    if (!copy)
        return -1;
    p->items[p->count++] = copy;
    return 0;
}

static void release(struct pairs *p) {
    for (size_t i = 0; i < p->count; i++)
        free(p->items[i]);
    free(p->items);
}

static int read_lines(struct pairs *p, FILE *in) {
    char *line = NULL;
    size_t size = 0;
    ssize_t len;
    int rc = 0;
    while (rc == 0 && (len = getline(&line, &size, in)) >= 0) {
        if (len > 0 && line[len - 1] == '\n')
            line[--len] = '\0';
        if (len > 0)
            rc = push(p, line);
    }
    free(line);
    return rc;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s BROKERS TOPIC KEY=VALUE... (or - : read them from stdin)\n",
                argv[0]);
        return 2;
    }
    struct pairs pairs = {NULL, 0, 0};
    int failed = 0;
    if (argc == 4 && strcmp(argv[3], "-") == 0)
        failed = read_lines(&pairs, stdin);
    else
        for (int i = 3; i < argc && !failed; i++)
            failed = push(&pairs, argv[i]);
    size_t count = pairs.count;
    const char **keys = calloc(count ? count : 1, sizeof *keys);
    const char **values = calloc(count ? count : 1, sizeof *values);
    if (failed || !keys || !values) {
        fprintf(stderr, "out of memory\n");
        release(&pairs);
        free(keys);
        free(values);
        return 2;
    }
    for (size_t i = 0; i < count; i++) {
        char *eq = strchr(pairs.items[i], '=');
        if (!eq) {
            fprintf(stderr, "argument %zu is not KEY=VALUE: %s\n", i + 1, pairs.items[i]);
            release(&pairs);
            free(keys);
            free(values);
            return 2;
        }
        *eq = '\0';
        keys[i] = pairs.items[i];
        values[i] = eq + 1;
    }
    struct delivery_counts counts = {0, 0};
    int rc = produce_events(argv[1], argv[2], keys, values, count, &counts);
    printf("delivered=%zu failed=%zu\n", counts.delivered, counts.failed);
    release(&pairs);
    free(keys);
    free(values);
    return (rc == 0 && counts.failed == 0 && counts.delivered == count) ? 0 : 1;
}
