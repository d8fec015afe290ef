# ph4.3 lock-free-cas: a Treiber stack with ABA protection (labs/ph4/03-lock-free-cas).
# The learner writes stack.c; the interface stack.h and the driver driver.c live here.
# Built with ThreadSanitizer: a data race in the stack is a report on stderr.
LOCK_FREE_DIR := $(CURDIR)/lock_free_stack
# every compare-and-swap and exchange (ThreadSanitizer's instrumentation calls these) goes
# through the driver's wrappers, so a scenario can run "another thread" right before the
# learner's CAS, or right after the CAS (or exchange) that publishes the head
LOCK_FREE_WRAP := $(foreach f,$(foreach b,64 128,$(foreach k,strong weak val,\
	__tsan_atomic$(b)_compare_exchange_$(k)) __tsan_atomic$(b)_exchange),-Wl,--wrap=$(f))

TARGETS += lock_free_stack
lock_free_stack: SRC ?= $(LABS)/ph4/03-lock-free-cas/solution
lock_free_stack:
	mkdir -p $(OUT)
	$(CC) $(CFLAGS) $(WARN) -fsanitize=thread -fno-omit-frame-pointer -pthread \
		$(LOCK_FREE_WRAP) -I$(LOCK_FREE_DIR) -o $(OUT)/lock_free_stack $(LOCK_FREE_DIR)/driver.c $(SRC)/stack.c
