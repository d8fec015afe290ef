# ph4.4 io-multiplexing: the roadmap's epoll skeleton completed into an edge-triggered echo
# server on one thread (labs/ph4/04-io-multiplexing). One source file, the learner's.
# AddressSanitizer/UBSan catch buffer handling mistakes (they start no threads of their own).
TARGETS += epoll_echo
epoll_echo: SRC ?= $(LABS)/ph4/04-io-multiplexing/solution
epoll_echo:
	mkdir -p $(OUT)
	$(CC) $(CFLAGS) $(WARN) $(SAN) -pthread -o $(OUT)/epoll_echo $(SRC)/server.c
