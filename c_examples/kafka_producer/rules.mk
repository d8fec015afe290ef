# ph5.c kafka_producer: the roadmap's librdkafka producer, completed. The learner writes
# producer.c; the harness main.c and the interface producer.h live here.
# The system librdkafka (Debian's librdkafka-dev 2.0.2) speaks to Kafka 4.x: it negotiates
# ApiVersions and uses Metadata v4 / Produce v7, which Kafka 4 still accepts.
KAFKA_PRODUCER_DIR := $(CURDIR)/kafka_producer

# The Makefile includes the rules.mk files before it defines `all`, so without this the first
# target parsed here (this one, alphabetically) would become what a bare `make` builds.

TARGETS += kafka_producer
kafka_producer: SRC ?= $(KAFKA_PRODUCER_DIR)/solution
kafka_producer:
	mkdir -p $(OUT)
	$(CC) $(CFLAGS) $(WARN) $(SAN) -I$(KAFKA_PRODUCER_DIR) \
		-o $(OUT)/kafka_producer $(KAFKA_PRODUCER_DIR)/main.c $(SRC)/producer.c -lrdkafka
