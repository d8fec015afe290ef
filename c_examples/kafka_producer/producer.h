/* ph5.c: the interface between the harness (main.c) and the learner's producer.c. */
#ifndef KAFKA_PRODUCER_H
#define KAFKA_PRODUCER_H

#include <stddef.h>

/* What the delivery reports said, one count per message. */
struct delivery_counts {
    size_t delivered; /* the broker acknowledged it */
    size_t failed;    /* rejected, timed out, or never handed to the client */
};

/* Produce count keyed messages (keys[i], values[i]) to topic on the brokers, wait until every
 * message has a delivery report, fill *counts. Returns 0 when every message was delivered,
 * -1 otherwise; every error is reported on stderr. */
int produce_events(const char *brokers, const char *topic, const char *const *keys,
                   const char *const *values, size_t count, struct delivery_counts *counts);

#endif
