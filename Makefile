# multiloop: build, run, test, install.
#   make          build build/multiloop/core.so
#   make run      build and serve examples/echo_handler.lua on 127.0.0.1:7000
#                 with the multiloop command (bin/multiloop)
#   make test     run the specs (prints "N passed, N failed" last)
#   make lint     luacheck, cppcheck and gcc -fanalyzer, all clean
#   make deps     install the Debian packages the project needs that are missing
#   make install  copy the module and the Lua files to LIBDIR and LUADIR, and
#                 the multiloop command to BINDIR (none when BINDIR is empty)
# Only `deps`, `run` and `test` install packages, and `run` and `test` only
# the ones that are missing. Every other goal (the build, `lint`, `asan`,
# `tsan`, `valgrind`, `bench`) stops at once, naming what is missing.
# CHECK_DEPS=no skips the check (`luarocks make` sets it, see the rockspec).

LUA      ?= lua5.4
# Debian packages: what the build needs, and what the specs, the sanitizer
# runs and `make lint` need on top (the examples' specs drive them with
# redis-cli and redis-benchmark from redis-tools, ab from apache2-utils, and
# curl; packaging_spec runs `luarocks make` and `luarocks test`, offline in
# a network namespace made with iproute2; activation_spec starts a server
# under systemd-socket-activate, from systemd; metrics_spec reads
# server:metrics() with the Prometheus client's own parser,
# python3-prometheus-client; the TLS and PROXY specs use lua-sec, openssl and
# haproxy). LINT_PACKAGES is the part of TEST_PACKAGES that `make lint` uses.
BUILD_PACKAGES ?= gcc libc6-dev lua5.4 liblua5.4-dev libuv1-dev libssl-dev pkg-config
LINT_PACKAGES  ?= lua-check cppcheck
TEST_PACKAGES  ?= lua-busted lua-socket lua-sec openssl haproxy redis-tools redis-server lua-nginx-redis apache2-utils curl \
                  valgrind luarocks iproute2 systemd python3-prometheus-client $(LINT_PACKAGES)
SUDO     := $(if $(filter 0,$(shell id -u)),,sudo)
CHECK_DEPS ?= yes

# Under these goals a missing package is installed; under any other, named.
ON_MISSING := $(if $(filter deps run test,$(MAKECMDGOALS)),install,fail)

# $(call need,PACKAGES): a recipe line that checks the Debian packages are
# installed and, when some are not, installs them (ON_MISSING=install) or
# stops naming them. Machines without dpkg are not checked.
APT_INSTALL = $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
define need
@if [ "$(CHECK_DEPS)" != no ] && command -v dpkg-query >/dev/null 2>&1; then \
  missing() { for p in $(1); do \
    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || printf ' %s' $$p; \
  done; }; \
  m=$$(missing); \
  if [ -n "$$m" ] && [ "$(ON_MISSING)" = install ]; then \
    echo "multiloop: installing missing Debian packages:$$m"; \
    $(SUDO) apt-get update -q && $(APT_INSTALL) $$m; \
    m=$$(missing); \
  fi; \
  if [ -n "$$m" ]; then \
    echo "multiloop: missing Debian packages:$$m; run 'make deps'" >&2; exit 1; \
  fi; \
fi
endef

SRC      := $(wildcard src/*.c)
HDR      := $(wildcard src/*.h)
BUILD    ?= build
MODULE   := $(BUILD)/multiloop/core.so

# Where the headers and libraries are (luarocks passes its own); recursively
# expanded, so pkg-config runs after `deps` has installed it.
LUA_INCDIR   ?= $(patsubst -I%,%,$(filter -I%,$(shell pkg-config --cflags lua5.4)))
LIBUV_INCDIR ?= $(shell pkg-config --variable=includedir libuv)
LIBUV_LIBDIR ?= $(shell pkg-config --variable=libdir libuv)
LIBFLAG      ?= -shared
# OpenSSL 3 (libssl-dev): the TLS transport (src/tls.c).
OPENSSL_INCDIR ?= /usr/include
OPENSSL_LIBDIR ?= $(shell pkg-config --variable=libdir openssl 2>/dev/null)
OPENSSL_LIBS   ?= $(if $(OPENSSL_LIBDIR),-L$(OPENSSL_LIBDIR)) -lssl -lcrypto
# Where `make install` puts the module (luarocks passes its tree's).
LIBDIR       ?= /usr/local/lib/lua/5.4
LUADIR       ?= /usr/local/share/lua/5.4
# Where it puts the command; luarocks passes it empty and installs the
# command itself (the rockspec's build.install.bin), with a wrapper that
# sets its tree's paths.
BINDIR       ?= /usr/local/bin

OPTFLAGS ?= -O2 -g
WERROR   ?= -Werror
WARNINGS  := -Wall -Wextra -Wshadow -Wmissing-prototypes -Wstrict-prototypes \
             -Wwrite-strings -Wcast-qual -Wundef $(WERROR)
# Only luaopen_multiloop_core is exported; everything else stays hidden.
CFLAGS_ALL = -std=gnu11 -fPIC -pthread -fvisibility=hidden $(WARNINGS) $(OPTFLAGS) \
             -I$(LUA_INCDIR) -I$(LIBUV_INCDIR) $(if $(filter-out /usr/include,$(OPENSSL_INCDIR)),-I$(OPENSSL_INCDIR)) $(CFLAGS)
LIBS_ALL   = -L$(LIBUV_LIBDIR) -luv $(OPENSSL_LIBS) -pthread $(LIBS)

# The spec environment: our Lua modules first, then the build output.
export LUA_PATH  := ./lua/?.lua;./lua/?/init.lua;./?.lua;./?/init.lua;;
export LUA_CPATH := ./$(BUILD)/?.so;;

.PHONY: all build run test deps check-deps check-test-deps check-lint-deps lint install clean

all: build
build: $(MODULE)

$(MODULE): $(SRC) $(HDR) Makefile | check-deps
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) $(LIBFLAG) -o $@ $(SRC) $(LIBS_ALL)

check-deps:
	$(call need,$(BUILD_PACKAGES))
check-test-deps:
	$(call need,$(BUILD_PACKAGES) $(TEST_PACKAGES))
check-lint-deps:
	$(call need,$(BUILD_PACKAGES) $(LINT_PACKAGES))

# Whatever is missing of everything (BENCH=yes: the benchmark's peers too);
# nothing to do, and no network, when all is installed.
deps:
	$(call need,$(BUILD_PACKAGES) $(TEST_PACKAGES) $(if $(filter yes,$(BENCH)),$(BENCH_PACKAGES)))

run: check-deps
	@$(MAKE) --no-print-directory build
	$(LUA) bin/multiloop examples/echo_handler.lua --port 7000

# SPECS picks spec files: make test SPECS=spec/stop_spec.lua (also asan, valgrind).
# Each file's stderr (tracebacks the specs provoke, sanitizer reports) goes
# to $(BUILD)/spec-logs/; spec/run.sh prints its tail when the file fails.
SPECS ?= spec/*_spec.lua

test: check-test-deps
	@$(MAKE) --no-print-directory build
	@LUA=$(LUA) SPEC_LOGS=$(BUILD)/spec-logs sh spec/run.sh $(SPECS)

# --- lint -------------------------------------------------------------------
# luacheck reads .luacheckrc. cppcheck sees our headers only, as its manual
# advises: the Lua API comes from its own lua.cfg (which knows luaL_error
# never returns), libc's from posix.cfg; its one suppression is a false
# positive: lua_pushfstring's %I (a lua_Integer) is not printf's %I.
# gcc -fanalyzer compiles each file once more, for its warnings only;
# src/lua_noreturn.h tells it which Lua functions never return.
CPPCHECK = cppcheck -q --std=c11 --enable=warning,performance,portability \
           --error-exitcode=1 --inline-suppr --library=posix --library=lua -Isrc \
           --suppress=missingIncludeSystem --suppress=invalidLengthModifierError
ANALYZER_CC ?= gcc

lint: check-lint-deps
	luacheck -q --no-color lua spec examples bench bin/multiloop
	$(CPPCHECK) $(SRC)
	@for f in $(SRC); do \
	  echo "$(ANALYZER_CC) -fanalyzer $$f"; \
	  $(ANALYZER_CC) $(filter-out $(OPTFLAGS),$(CFLAGS_ALL)) -O0 -Werror -fanalyzer -c -o /dev/null $$f || exit 1; \
	done

install: build
	install -d $(DESTDIR)$(LIBDIR)/multiloop $(DESTDIR)$(LUADIR)/multiloop
	install -m 755 $(MODULE) $(DESTDIR)$(LIBDIR)/multiloop/core.so
	install -m 644 lua/multiloop/*.lua $(DESTDIR)$(LUADIR)/multiloop/
	$(if $(BINDIR),install -d $(DESTDIR)$(BINDIR))
	$(if $(BINDIR),install -m 755 bin/multiloop $(DESTDIR)$(BINDIR)/multiloop)

clean:
	rm -rf $(BUILD)

# --- sanitizers -------------------------------------------------------------
# The module is built with the sanitizer and run under the stock lua5.4, with
# the runtime preloaded (as luv's CI does). Reports fail the run: UBSan aborts,
# ASan's leak check turns the exit status non-zero.
SAN_FLAGS  := -O1 -g -fno-omit-frame-pointer -fno-sanitize-recover=all
ASAN_RT     = $(shell $(CC) -print-file-name=libasan.so) $(shell $(CC) -print-file-name=libubsan.so)

.PHONY: asan valgrind
asan: check-test-deps
	$(MAKE) --no-print-directory BUILD=build-asan \
	  OPTFLAGS="$(SAN_FLAGS) -fsanitize=address,undefined" LIBS="-fsanitize=address,undefined" build
	@LD_PRELOAD="$(ASAN_RT)" LUA_CPATH="./build-asan/?.so;;" SPEC_CPATH="./build-asan/?.so" SANITIZER=asan \
	  ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=86" \
	  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
	  SPEC_LOGS=build-asan/spec-logs LUA=$(LUA) sh spec/run.sh $(SPECS)

# ThreadSanitizer: the specs that exercise threads, with the module built
# under TSan and the runtime preloaded into lua5.4 only (dash crashes under
# it, so tests that start a child server through a shell, tagged #child, are
# left to the other runs), and those tagged #notsan, where gcc 12's TSan
# runtime itself crashes (each says why). Suppressions (spec/tsan.supp) name
# only uninstrumented system code, each with the reason. The TLS specs'
# certificates are made here (spec/fixtures/make_certs.sh), as the specs
# cannot run openssl themselves under TSan, and named in SPEC_CERTS.
TSAN_RT     = $(shell $(CC) -print-file-name=libtsan.so)
TSAN_SPECS ?= spec/lifecycle_spec.lua spec/echo_spec.lua spec/dispatch_spec.lua \
              spec/stop_spec.lua spec/limits_spec.lua spec/shared_spec.lua \
              spec/message_spec.lua spec/timer_spec.lua spec/examples_spec.lua \
              spec/kv_spec.lua spec/unix_spec.lua spec/thread_spec.lua spec/serve_spec.lua \
              spec/serve_hostile_spec.lua spec/outbound_spec.lua spec/outbound_hostile_spec.lua \
              spec/redis_spec.lua spec/proxy_spec.lua spec/proxy_protocol_spec.lua spec/activation_spec.lua \
              spec/metrics_spec.lua spec/tls_spec.lua
# Logs: workers writing records at once, under the log's lock.
TSAN_SPECS += spec/log_spec.lua
# Reload: the main thread's handshake with every worker's new Lua state.
TSAN_SPECS += spec/reload_spec.lua

.PHONY: tsan
tsan: check-test-deps
	$(MAKE) --no-print-directory BUILD=build-tsan \
	  OPTFLAGS="-O1 -g -fno-omit-frame-pointer -fsanitize=thread" LIBS="-fsanitize=thread" build
	@rm -rf build-tsan/certs && mkdir -m 700 build-tsan/certs && sh spec/fixtures/make_certs.sh build-tsan/certs
	@SPEC_CERTS="$(CURDIR)/build-tsan/certs" LUA_CPATH="./build-tsan/?.so;;" SPEC_CPATH="./build-tsan/?.so" BUSTED_ARGS="--exclude-tags=child,notsan" SANITIZER=tsan \
	  SPEC_LOGS=build-tsan/spec-logs TSAN_OPTIONS="halt_on_error=1:exitcode=66:io_sync=2:suppressions=$(CURDIR)/spec/tsan.supp" \
	  LUA="env LD_PRELOAD=$(TSAN_RT) $(LUA)" sh spec/run.sh $(TSAN_SPECS)

# Valgrind memcheck over the specs: any error, or a definite or indirect leak,
# fails the run. Slower than ASan; the #stress spec is left to the other runs.
# --fair-sched=yes: valgrind runs one thread at a time, and without it a
# thread spinning in Lua (the start_timeout specs) starved the main thread
# for over a minute.
VALGRIND = valgrind --quiet --error-exitcode=1 --leak-check=full --fair-sched=yes \
           --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect \
           --trace-children=no --suppressions=$(CURDIR)/spec/valgrind.supp

.PHONY: valgrind
valgrind: check-test-deps
	@$(MAKE) --no-print-directory build
	@SPEC_LOGS=$(BUILD)/spec-logs/valgrind BUSTED_ARGS="--exclude-tags=stress" SANITIZER=valgrind LUA="$(VALGRIND) $(LUA)" sh spec/run.sh $(SPECS)

# `make bench` and friends; optional, so the Makefile works without bench/.
-include bench/bench.mk
