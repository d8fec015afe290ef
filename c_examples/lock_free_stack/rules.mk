# ph4.3 lock-free-cas: a Treiber stack with ABA protection (labs/ph4/03-lock-free-cas).
# The learner writes stack.c; the interface stack.h and the driver driver.c live here.
# Built with ThreadSanitizer: a data race in the stack is a report on stderr.
LOCK_FREE_DIR := $(CURDIR)/lock_free_stack

TARGETS += lock_free_stack
lock_free_stack: SRC ?= $(LABS)/ph4/03-lock-free-cas/solution
lock_free_stack:
	mkdir -p $(OUT)
	$(CC) $(CFLAGS) $(WARN) -fsanitize=thread -fno-omit-frame-pointer -pthread \
		-I$(LOCK_FREE_DIR) -o $(OUT)/lock_free_stack $(LOCK_FREE_DIR)/driver.c $(SRC)/stack.c
