# bench/bench.mk: `make bench`, included by the last line of the Makefile.
#   make bench          build, install the peers that are missing, measure
#                       (bench/run.sh), write bench/results/ and BENCHMARKS.md
#   make bench-build    build/bench/loadgen and build/bench/ref_server only
#   make bench-report   BENCHMARKS.md again from bench/results/raw.tsv
# Never part of `make test`. Settings: BENCH_SECONDS, BENCH_REPEATS,
# BENCH_QUICK=1, BENCH_WORKERS, BENCH_DISPATCH, BENCH_IDLE_CONNS (bench/run.sh).

BENCH_BUILD    ?= build/bench
# The peers and tools: installed by `make bench` only when one is missing.
BENCH_PACKAGES := lua-luv wrk nginx libnginx-mod-http-lua gnuplot-nox curl
BENCH_CFLAGS   := -std=gnu11 -O2 -g -Wall -Wextra -Werror -pthread

.PHONY: bench bench-build bench-deps bench-report

bench: bench-deps build bench-build
	bash bench/run.sh

bench-build: $(BENCH_BUILD)/loadgen $(BENCH_BUILD)/ref_server

$(BENCH_BUILD)/loadgen: bench/loadgen.c bench/bench.mk
	@mkdir -p $(dir $@)
	$(CC) $(BENCH_CFLAGS) -o $@ $< -pthread

$(BENCH_BUILD)/ref_server: bench/ref_server.c bench/bench.mk | check-deps
	@mkdir -p $(dir $@)
	$(CC) $(BENCH_CFLAGS) $(shell pkg-config --cflags libuv) -o $@ $< \
	  $(shell pkg-config --libs libuv) -pthread

bench-deps:
	@missing=""; for p in $(BENCH_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "bench: installing:$$missing"; \
	  $(SUDO) apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing \
	    || echo "bench: could not install:$$missing (those peers will be skipped)"; \
	fi

bench-report:
	$(LUA) bench/report.lua
