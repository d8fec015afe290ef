/* Kafka producer using librdkafka (C client) - the roadmap's code, as given.
 *
 * It compiles and sends messages, but: it builds a whole client per message, leaves the
 * partitioner at librdkafka's default (not where Java clients put a key), checks no error,
 * and its delivery callback only prints. produce_events() below wraps it and simply claims
 * every message was delivered. Make it honest: see README.md.
 */
#include <librdkafka/rdkafka.h>
#include <string.h>
#include <stdio.h>

#include "producer.h"

static void delivery_cb(rd_kafka_t *rk, const rd_kafka_message_t *msg,
                         void *opaque) {
    (void)rk; (void)opaque;
    if (msg->err)
        fprintf(stderr, "Delivery failed: %s\n",
                rd_kafka_err2str(msg->err));
}

void produce_event(const char *brokers, const char *topic,
                   const char *key,    const char *value) {
    char errstr[512];

    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "bootstrap.servers", brokers,
                      errstr, sizeof(errstr));
    rd_kafka_conf_set_dr_msg_cb(conf, delivery_cb);

    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf,
                                  errstr, sizeof(errstr));
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);

retry:
    if (rd_kafka_produce(rkt,
            RD_KAFKA_PARTITION_UA,    /* auto-select partition by key hash */
            RD_KAFKA_MSG_F_COPY,      /* copy payload into rdkafka */
            (void *)value, strlen(value),
            key, strlen(key),
            NULL) == -1) {
        if (rd_kafka_last_error() == RD_KAFKA_RESP_ERR__QUEUE_FULL) {
            rd_kafka_poll(rk, 100);   /* drain delivery queue */
            goto retry;
        }
    }

    rd_kafka_flush(rk, 10000);        /* wait up to 10s for delivery */
    rd_kafka_topic_destroy(rkt);
    rd_kafka_destroy(rk);
}

int produce_events(const char *brokers, const char *topic, const char *const *keys,
                   const char *const *values, size_t count, struct delivery_counts *counts) {
    for (size_t i = 0; i < count; i++)
        produce_event(brokers, topic, keys[i], values[i]);
    counts->delivered = count; /* TODO: count what the delivery reports said */
    counts->failed = 0;
    return 0;
}
