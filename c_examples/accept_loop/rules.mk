# ph0.7 accept-loop: the roadmap's TCP server skeleton, completed by the learner
# (labs/ph0/07-accept-loop). One source file, built with the sanitizers so that the
# verification also catches memory errors, leaks and undefined behaviour.
TARGETS += accept_loop
accept_loop: SRC ?= $(LABS)/ph0/07-accept-loop/solution
accept_loop:
	mkdir -p $(OUT)
	$(CC) $(CFLAGS) $(WARN) $(SAN) -pthread -o $(OUT)/accept_loop $(SRC)/server.c
