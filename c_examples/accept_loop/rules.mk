# ph0.7 accept-loop: the roadmap's TCP server skeleton, completed by the learner
# (labs/ph0/07-accept-loop). One source file, built with the sanitizers so that the
# verification also catches memory errors, leaks and undefined behaviour.
# accept_loop_short_writes is the same server with send(), sendto() and write() on a
# socket wrapped (ld --wrap) to write at most half of what they are asked: the short
# writes a real send() may return, made certain.
ACCEPT_LOOP_DIR  := $(CURDIR)/accept_loop
ACCEPT_LOOP_WRAP := -Wl,--wrap=send,--wrap=sendto,--wrap=write

TARGETS += accept_loop
accept_loop: SRC ?= $(LABS)/ph0/07-accept-loop/solution
accept_loop:
	mkdir -p $(OUT)
	$(CC) $(CFLAGS) $(WARN) $(SAN) -pthread -o $(OUT)/accept_loop $(SRC)/server.c
	$(CC) $(CFLAGS) $(WARN) $(SAN) -pthread $(ACCEPT_LOOP_WRAP) \
		-o $(OUT)/accept_loop_short_writes $(SRC)/server.c $(ACCEPT_LOOP_DIR)/short_writes.c
