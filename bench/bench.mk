# bench/bench.mk: `make bench`, included by the last line of the Makefile.
#   make bench          build, name the peers that are missing, measure
#                       (bench/run.sh), write bench/results/ and BENCHMARKS.md
#   make bench-build    build/bench/loadgen, tls_loadgen, ref_server, lua_host only
#   make bench-report   BENCHMARKS.md again from bench/results/raw.tsv
# Never part of `make test`. Settings: BENCH_SECONDS, BENCH_REPEATS,
# BENCH_QUICK=1, BENCH_WORKERS, BENCH_DISPATCH, BENCH_IDLE_CONNS, BENCH_ONLY,
# BENCH_IR_SECONDS, BENCH_IR_HANDLERS, BENCH_KV_HANDLER, BENCH_KV_N16,
# BENCH_KV_N1, BENCH_PROXY_HANDLER, BENCH_TLS_KEY, BENCH_TLS_IDLE_CONNS,
# BENCH_TLS_BULK_BYTES, BENCH_TLS_TICKETS (bench/run.sh).

BENCH_BUILD    ?= build/bench
# The peers and tools, all optional: `make deps BENCH=yes` installs them.
# openssl (the command): the TLS scenarios' throwaway certificate.
BENCH_PACKAGES := lua-luv wrk nginx libnginx-mod-http-lua libnginx-mod-stream haproxy gnuplot-nox curl openssl
# Used by the echo-ir and proxy-ir (callgrind), kv (redis-server) and
# redis-pool (redis-server, lua-resty-redis) scenarios; already among the
# Makefile's TEST_PACKAGES, so plain `make deps` installs them.
BENCH_TEST_TOOLS := valgrind redis-server redis-tools lua-nginx-redis
BENCH_CFLAGS   := -std=gnu11 -O2 -g -Wall -Wextra -Werror -pthread

.PHONY: bench bench-build bench-deps bench-report

bench: bench-deps build bench-build
	bash bench/run.sh

bench-build: $(BENCH_BUILD)/loadgen $(BENCH_BUILD)/tls_loadgen $(BENCH_BUILD)/ref_server $(BENCH_BUILD)/lua_host

$(BENCH_BUILD)/loadgen: bench/loadgen.c bench/bench.mk
	@mkdir -p $(dir $@)
	$(CC) $(BENCH_CFLAGS) -o $@ $< -pthread

# The TLS scenarios' client (OpenSSL's libssl-dev, which multiloop builds on).
$(BENCH_BUILD)/tls_loadgen: bench/tls_loadgen.c bench/bench.mk
	@mkdir -p $(dir $@)
	$(CC) $(BENCH_CFLAGS) -o $@ $< -lssl -lcrypto

# lua5.4 with the VM's symbols, for profiles (bench/lua_host.c).
$(BENCH_BUILD)/lua_host: bench/lua_host.c bench/bench.mk | check-deps
	@mkdir -p $(dir $@)
	$(CC) $(BENCH_CFLAGS) -I/usr/include/lua5.4 -o $@ $< \
	  $(shell pkg-config --variable=libdir lua5.4)/liblua5.4.a -lm -ldl -rdynamic

$(BENCH_BUILD)/ref_server: bench/ref_server.c bench/bench.mk | check-deps
	@mkdir -p $(dir $@)
	$(CC) $(BENCH_CFLAGS) $(shell pkg-config --cflags libuv) -o $@ $< \
	  $(shell pkg-config --libs libuv) -pthread

# Never installs (only `make deps` does): names the peers that are missing,
# which bench/run.sh then skips, and the command that installs them.
bench-deps:
	@missing=""; for p in $(BENCH_PACKAGES) $(BENCH_TEST_TOOLS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "bench: not installed:$$missing (what needs them is skipped; 'make deps BENCH=yes' installs them)"; \
	fi

bench-report:
	$(LUA) bench/report.lua
