# ph7.12 graceful-shutdown: the roadmap's SIGTERM handler with an atomic flag and an
# in-flight counter, completed into a server that drains (labs/ph7/12-graceful-shutdown).
# Built with the sanitizers so the verification also catches memory errors and leaks.
TARGETS += graceful_shutdown
graceful_shutdown: SRC ?= $(LABS)/ph7/12-graceful-shutdown/solution
graceful_shutdown:
	mkdir -p $(OUT)
	$(CC) $(CFLAGS) $(WARN) $(SAN) -pthread -o $(OUT)/graceful_server $(SRC)/server.c
