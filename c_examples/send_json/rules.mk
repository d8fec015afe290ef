# ph1.c send_json: the learner's send_json.c linked into a fixed HTTP server harness.
# --wrap makes the learner's write()/send()/writev() calls on the client socket go through
# the harness, which turns them into short writes and EINTRs, the same way every run.
TARGETS += send_json
send_json: SRC ?= $(CURDIR)/send_json/solution
send_json:
	mkdir -p $(OUT)
	$(CC) $(CFLAGS) $(WARN) $(SAN) -I$(CURDIR)/send_json \
		-Wl,--wrap=write -Wl,--wrap=send -Wl,--wrap=writev \
		-o $(OUT)/send_json_server $(CURDIR)/send_json/harness.c $(SRC)/send_json.c
