# ph2.c: libpq + hiredis cache-aside (c_examples/pg_cache). The learner writes pg_cache.c;
# the harness main.c and the interface pg_cache.h live here.
PG_CACHE_DIR := $(CURDIR)/pg_cache
PG_CACHE_PGINC := $(shell pg_config --includedir 2>/dev/null || echo /usr/include/postgresql)

TARGETS += pg_cache
pg_cache: SRC ?= $(PG_CACHE_DIR)/solution
pg_cache:
	mkdir -p $(OUT)
	$(CC) $(CFLAGS) $(WARN) $(SAN) -I$(PG_CACHE_DIR) -I$(PG_CACHE_PGINC) \
		-o $(OUT)/pg_cache $(PG_CACHE_DIR)/main.c $(SRC)/pg_cache.c -lpq -lhiredis
