/* ph5.c harness: kafka_producer BROKERS TOPIC KEY=VALUE... (fixed; the learner writes
 * producer.c). Prints "delivered=N failed=M"; exit 0 when all were delivered, 1 when some
 * failed, 2 on a usage error. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "producer.h"

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s BROKERS TOPIC KEY=VALUE...\n", argv[0]);
        return 2;
    }
    size_t count = (size_t)(argc - 3);
    const char **keys = calloc(count, sizeof *keys);
    const char **values = calloc(count, sizeof *values);
    char **copies = calloc(count, sizeof *copies);
    if (!keys || !values || !copies) {
        fprintf(stderr, "out of memory\n");
        return 2;
    }
    for (size_t i = 0; i < count; i++) {
        copies[i] = strdup(argv[i + 3]);
        char *eq = copies[i] ? strchr(copies[i], '=') : NULL;
        if (!eq) {
            fprintf(stderr, "argument %zu is not KEY=VALUE: %s\n", i + 1, argv[i + 3]);
            return 2;
        }
        *eq = '\0';
        keys[i] = copies[i];
        values[i] = eq + 1;
    }
    struct delivery_counts counts = {0, 0};
    int rc = produce_events(argv[1], argv[2], keys, values, count, &counts);
    printf("delivered=%zu failed=%zu\n", counts.delivered, counts.failed);
    for (size_t i = 0; i < count; i++)
        free(copies[i]);
    free(copies);
    free(keys);
    free(values);
    return (rc == 0 && counts.failed == 0 && counts.delivered == count) ? 0 : 1;
}
