# ph3.c: HS256 JWT verification with OpenSSL (c_examples/jwt_verify). The learner writes
# jwt_verify.c; the harness main.c and the interface jwt_verify.h live here. The learner's
# object is kept beside the binary: the test reads its symbol imports (nm) to see which
# comparison it calls.
JWT_VERIFY_DIR := $(CURDIR)/jwt_verify

TARGETS += jwt_verify
jwt_verify: SRC ?= $(JWT_VERIFY_DIR)/solution
jwt_verify:
	mkdir -p $(OUT)
	$(CC) $(CFLAGS) $(WARN) $(SAN) -I$(JWT_VERIFY_DIR) -c -o $(OUT)/jwt_verify.o \
		$(SRC)/jwt_verify.c
	$(CC) $(CFLAGS) $(WARN) $(SAN) -I$(JWT_VERIFY_DIR) -o $(OUT)/jwt_verify \
		$(JWT_VERIFY_DIR)/main.c $(OUT)/jwt_verify.o -lcrypto
