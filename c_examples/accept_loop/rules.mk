# ph0.7 accept-loop: the roadmap's TCP server skeleton, completed by the learner
# (labs/ph0/07-accept-loop). One source file, built with the sanitizers so that the
# verification also catches memory errors, leaks and undefined behaviour.
# accept_loop_short_writes is the same server with send(), sendto() and write() on a
# socket wrapped (ld --wrap) to write at most half of what they are asked: the short
# writes a real send() may return, made certain.
# accept_loop_signal_before_wait is the same server with the calls that wait for a client
# wrapped (signal_before_wait.c): once a connection has been accepted, SIGTERM is sent
# right before the loop goes back to wait for the next one - the window a stop flag
# checked before a plain accept() misses.
# accept_loop_thread_refused is the same server with pthread_create wrapped
# (thread_refused.c): every other call made by a thread that has accepted a connection fails
# with EAGAIN, as at a process's thread limit.
ACCEPT_LOOP_DIR  := $(CURDIR)/accept_loop
ACCEPT_LOOP_WRAP := -Wl,--wrap=send,--wrap=sendto,--wrap=write
ACCEPT_LOOP_WAITS := -Wl,--wrap=accept,--wrap=accept4,--wrap=poll,--wrap=ppoll,--wrap=select \
	-Wl,--wrap=pselect,--wrap=epoll_wait,--wrap=epoll_pwait,--wrap=__poll_chk,--wrap=__ppoll_chk
ACCEPT_LOOP_THREADS := -Wl,--wrap=pthread_create,--wrap=accept,--wrap=accept4

TARGETS += accept_loop
accept_loop: SRC ?= $(LABS)/ph0/07-accept-loop/solution
accept_loop:
	mkdir -p $(OUT)
	$(CC) $(CFLAGS) $(WARN) $(SAN) -pthread -o $(OUT)/accept_loop $(SRC)/server.c
	$(CC) $(CFLAGS) $(WARN) $(SAN) -pthread $(ACCEPT_LOOP_WRAP) \
		-o $(OUT)/accept_loop_short_writes $(SRC)/server.c $(ACCEPT_LOOP_DIR)/short_writes.c
	$(CC) $(CFLAGS) $(WARN) $(SAN) -pthread $(ACCEPT_LOOP_WAITS) \
		-o $(OUT)/accept_loop_signal_before_wait $(SRC)/server.c \
		$(ACCEPT_LOOP_DIR)/signal_before_wait.c
	$(CC) $(CFLAGS) $(WARN) $(SAN) -pthread $(ACCEPT_LOOP_THREADS) \
		-o $(OUT)/accept_loop_thread_refused $(SRC)/server.c \
		$(ACCEPT_LOOP_DIR)/thread_refused.c
