#!/usr/bin/env bash
# bench/run.sh: the benchmark driver behind `make bench` (bench/bench.mk
# builds build/bench/loadgen and build/bench/ref_server first).
#
# Measures multiloop against a raw-C libuv server with the same threads and
# hand-off (bench/ref_server.c) and against peers (luv, Node.js cluster,
# nginx + Lua), all on 127.0.0.1. The figure of merit is operations per
# second of server CPU (utime + stime of the server's whole process tree from
# /proc/PID/stat over the measured window), and its ratio to the C reference
# measured in the same run. With one worker, the server is pinned to CPU 0
# and the load generator to CPU 1 (taskset); with two, both float.
#
# Scenarios (each with 1 and 2 workers; luv has a single loop: 1 only):
#   echo-p1     64 connections x 64-byte messages, 1 in flight per connection
#   echo-p16    the same, 16 in flight (pipelined)
#   connrate    32 concurrent loops of connect, send 64 B, read back, close
#   http        wrk, 64 connections, keep-alive GET / answered "Hello, world!\n"
#   idle-mem    server RSS growth per idle connection, 10,000 connections
# and, with 2 workers, connrate for multiloop and the reference in the other
# dispatch modes (ipc, queue) beside the default (BENCH_DISPATCH). With 1
# worker only:
#   echo-ir     user-space instructions (callgrind Ir) per echoed message,
#               16 connections x 64 B, 1 and 16 in flight, for each handler
#               of BENCH_IR_HANDLERS and the raw-C reference (needs valgrind)
#   kv          examples/kv.lua against redis-server, redis-benchmark SET and
#               GET at -P 16 and -P 1, requests per server CPU-second (needs
#               redis-server and redis-benchmark)
#   proxy       a TCP proxy in front of the raw-C echo (ref_server, 1 worker,
#               pinned to CPU 1 with the load generator): multiloop's proxy
#               (BENCH_PROXY_HANDLER: worker.tcp() and conn:pipe, 1 worker),
#               HAProxy (nbthread 1, TCP mode) and nginx stream proxy_pass (1
#               worker), each pinned to CPU 0; 64 connections x 64 B at 1 and
#               16 in flight; proxied echoes per second of the proxy's CPU
#   redis-pool  lua-resty-redis (Debian's lua-nginx-redis over multiloop.ngx,
#               bench/redis_pool_handler.lua, 1 worker on CPU 0) GET round
#               trips against a redis-server on CPU 1: one GET per message of
#               the load generator (64 connections x 64 B, 1 in flight),
#               pooled (set_keepalive) and with a new connection each time;
#               GETs per worker CPU-second
#   proxy-ir    callgrind Ir per proxied echo (16 connections x 64 B, 1 and 16
#               in flight, as echo-ir) of multiloop's proxy, and of HAProxy
#               and nginx stream (master_process off) beside it (needs valgrind)
# and the TLS scenarios (issue 16), against nginx with `listen ssl` (the same
# throwaway certificate, made with the openssl CLI in the temp dir; TLS 1.3
# only, TLS_AES_128_GCM_SHA256, X25519, no session tickets or cache on either
# side; the client, build/bench/tls_loadgen, never offers a session):
#   tls-hello      HTTP hello over TLS, wrk keep-alive (64 connections):
#                  examples/http_hello.lua with the tls option against nginx +
#                  Lua (bench/peers/nginx_lua.sh with TLS_CERT/TLS_KEY); 1 and
#                  2 workers
#   tls-handshake  32 loops of connect, full handshake, one GET with
#                  "Connection: close", close (tls_loadgen --mode handshake);
#                  the same two servers, 1 and 2 workers (BENCH_DISPATCH)
#   tls-idle       RSS growth per idle TLS connection (BENCH_TLS_IDLE_CONNS,
#                  2000), one GET answered on each, the same two servers
#   tls-bulk       64 MiB echoes (BENCH_TLS_BULK_BYTES) through TLS, 1 worker
#                  on CPU 0, the client on CPU 1: multiloop's TLS echo
#                  (examples/echo_handler.lua), multiloop's proxy terminating
#                  TLS in front of the raw-C echo (server "ml-proxy",
#                  BENCH_PROXY_HANDLER) and nginx stream with `listen ssl` in
#                  front of the same (bench/peers/nginx_stream.sh; the raw-C
#                  echo on CPU 1); MiB echoed per server CPU-second
#   tls-ir         callgrind Ir per keep-alive TLS request (16 connections)
#                  and per full handshake (8 loops), multiloop against nginx +
#                  Lua (master_process off), 1 worker (needs valgrind)
# A serve-style echo (bench/serve_echo_handler.lua), when that file exists,
# runs as the server "ml-serve" in the echo scenarios and in echo-ir.
#
# Environment: BENCH_SECONDS (5) per measurement, BENCH_REPEATS (3),
# BENCH_IDLE_CONNS (10000), BENCH_WORKERS ("1 2"), BENCH_DISPATCH (reuseport,
# multiloop's default), BENCH_QUICK=1 (1 repeat of 2 s, 2,000 idle
# connections: a smoke run), BENCH_ONLY (the groups to run, of "echo http
# dispatch echo-ir kv proxy proxy-ir redis-pool tls-hello tls-handshake tls-idle tls-bulk tls-ir"; all by default), BENCH_IR_SECONDS (5: the load under
# callgrind, quick or not), BENCH_IR_HANDLERS (NAME=MODULE words, default
# "multiloop=examples.echo_handler ml-serve=bench.serve_echo_handler"),
# BENCH_KV_HANDLER (examples.kv), BENCH_KV_N16 / BENCH_KV_N1 (requests per
# redis-benchmark run at -P 16 / -P 1: 300,000 / 60,000 per BENCH_SECONDS),
# BENCH_PROXY_HANDLER (multiloop's proxy, examples.proxy; given
# config.upstreams = { "127.0.0.1:PORT" }), BENCH_TLS_KEY (the certificate's
# key: ec, a P-256 ECDSA key, the default, or rsa, RSA 2048),
# BENCH_TLS_IDLE_CONNS (2000), BENCH_TLS_BULK_BYTES (67108864: one echo),
# BENCH_TLS_TICKETS (0; 1: both sides send TLS 1.3's two stateless session
# tickets per connection, which the client counts and never uses).
# Peers that are not installed are skipped with a note. Results:
# bench/results/raw.tsv (every measurement), then bench/report.lua writes
# bench/results/latest.txt, the plot and BENCHMARKS.md.
#
# Every process this script starts is recorded by PID and stopped by PID
# (SIGTERM, then SIGKILL after 5 s); each server also stops by itself
# (timeout(1) around it, and the servers' own --max-seconds).
set -u
cd "$(dirname "$0")/.."

B=build/bench
RES=bench/results
if [ "${BENCH_QUICK:-0}" = 1 ]; then
  SECS=${BENCH_SECONDS:-2}; REPEATS=${BENCH_REPEATS:-1}; IDLE=${BENCH_IDLE_CONNS:-2000}
else
  SECS=${BENCH_SECONDS:-5}; REPEATS=${BENCH_REPEATS:-3}; IDLE=${BENCH_IDLE_CONNS:-10000}
fi
WORKERS_LIST=${BENCH_WORKERS:-"1 2"}
ALL_GROUPS="echo http dispatch echo-ir kv proxy proxy-ir redis-pool tls-hello tls-handshake tls-idle tls-bulk tls-ir"
ONLY=${BENCH_ONLY:-$ALL_GROUPS}
for g in $ONLY; do
  case " $ALL_GROUPS " in *" $g "*) ;;
    *) echo "bench: BENCH_ONLY: unknown group '$g' ($ALL_GROUPS)" >&2; exit 2;; esac
done
want() { case " $ONLY " in *" $1 "*) return 0;; esac; return 1; }
IR_SECS=${BENCH_IR_SECONDS:-5}
IR_HANDLERS=${BENCH_IR_HANDLERS:-"multiloop=examples.echo_handler ml-serve=bench.serve_echo_handler"}
KV_HANDLER=${BENCH_KV_HANDLER:-examples.kv}
PROXY_HANDLER=${BENCH_PROXY_HANDLER:-examples.proxy}
DISPATCH=${BENCH_DISPATCH:-reuseport}
TLS_KEYTYPE=${BENCH_TLS_KEY:-ec}
TLS_IDLE=${BENCH_TLS_IDLE_CONNS:-2000}
TLS_BULK=${BENCH_TLS_BULK_BYTES:-67108864}
TLS_SUITE=TLS_AES_128_GCM_SHA256          # the one TLS 1.3 suite both sides allow
TLS_TICKETS=${BENCH_TLS_TICKETS:-0}
LIFE=600                                  # no server instance outlives this (s)
HZ=$(getconf CLK_TCK)
export LUA_PATH="./lua/?.lua;./lua/?/init.lua;./?.lua;./?/init.lua;;"
export LUA_CPATH="./build/?.so;;"

case "$SECS" in ''|*[!0-9]*) echo "bench: BENCH_SECONDS must be a whole number" >&2; exit 2;; esac
case "$IR_SECS" in ''|*[!0-9]*) echo "bench: BENCH_IR_SECONDS must be a whole number" >&2; exit 2;; esac
KV_N16=${BENCH_KV_N16:-$((300000 * SECS))}
KV_N1=${BENCH_KV_N1:-$((60000 * SECS))}
case "$TLS_IDLE$TLS_BULK" in ''|*[!0-9]*) echo "bench: BENCH_TLS_IDLE_CONNS and BENCH_TLS_BULK_BYTES must be whole numbers" >&2; exit 2;; esac
case "$TLS_TICKETS" in 0|1) ;; *) echo "bench: BENCH_TLS_TICKETS must be 0 or 1" >&2; exit 2;; esac
case "$TLS_KEYTYPE" in ec|rsa) ;; *) echo "bench: BENCH_TLS_KEY must be ec or rsa" >&2; exit 2;; esac
case "$KV_N16$KV_N1" in *[!0-9]*) echo "bench: BENCH_KV_N16 and BENCH_KV_N1 must be whole numbers" >&2; exit 2;; esac
[ -x $B/loadgen ] && [ -x $B/ref_server ] || { echo "bench: run 'make bench-build' first" >&2; exit 2; }

# 10,000 idle connections need more than 1024 fds, on both sides.
hard=$(ulimit -Hn)
want=$((IDLE + 1000))
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
  echo "bench: fd limit $hard is below $want: idle-mem uses $((hard - 1000)) connections" >&2
  IDLE=$((hard - 1000))
  want=$hard
fi
ulimit -n "$want"

TMP=$(mktemp -d /tmp/multiloop-bench.XXXXXX)
mkdir -p "$RES"
RAW=$RES/raw.tsv
printf 'repeat\tworkers\tscenario\tserver\tops\tops_per_s\tcpu_s\tops_per_cpu\tp50_us\tp99_us\tp999_us\terrors\tbytes_per_conn\tir_per_op\n' > "$RAW"

SPID=""                                   # the server we started, if any
UPID=""                                   # proxy's upstream or redis-pool's redis, if any
LGPID=""                                  # a background load generator, if any

# --- processes -----------------------------------------------------------

# Stops one process we started, by its PID: SIGTERM, then SIGKILL after 5 s.
stop_pid() {
  local pid=$1 i
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return 0
}

cleanup() {
  stop_pid "$LGPID"; LGPID=""
  stop_pid "$SPID"; SPID=""
  stop_pid "$UPID"; UPID=""
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The PID and every descendant of $1 (nginx and node run several processes).
tree() {
  ps -e -o pid= -o ppid= | awk -v root="$1" '
    { parent[$1] = $2; pids[NR] = $1 }
    END {
      keep[root] = 1; changed = 1
      while (changed) {
        changed = 0
        for (i in pids) { p = pids[i]; if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 } }
      }
      for (p in keep) print p
    }'
}

# CPU ticks (utime + stime) used so far by $1's process tree.
cpu_ticks() {
  local p sum=0 t
  for p in $(tree "$1"); do
    t=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 }')
    sum=$((sum + ${t:-0}))
  done
  echo "$sum"
}

# Resident memory (kB) of $1's process tree.
rss_kb() {
  local p sum=0 k
  for p in $(tree "$1"); do
    k=$(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null)
    sum=$((sum + ${k:-0}))
  done
  echo "$sum"
}

# Picked below the kernel's ephemeral range, where the load generator's own
# client sockets live, so a port that is free now is not taken a moment later.
free_port() {
  local port i low=32768
  read -r low _ < /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
  [ "$low" -gt 12000 ] 2>/dev/null || low=32768
  for i in $(seq 50); do
    port=$((10000 + RANDOM % (low - 10000)))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return; fi
  done
  echo 0
}

# wait_for WORD FILE PID TRIES: prints the value after WORD on FILE's first
# line that starts with it, polling every 50 ms while PID lives, at most
# TRIES times; prints nothing if it never came.
wait_for() {
  local word=$1 file=$2 pid=$3 tries=$4 value="" i
  for i in $(seq "$tries"); do
    value=$(awk -v w="$word" '$1 == w { print $2; exit }' "$file")
    [ -n "$value" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  echo "$value"
}

# launch NAME CMD...: starts a server (pinned when SERVER_PIN is set) that
# prints "LISTENING <port>" within LAUNCH_TRIES x 50 ms (200: 10 s); sets SPID
# and PORT. Returns non-zero on failure.
launch() {
  local name=$1; shift
  : > "$TMP/server.out"
  $SERVER_PIN timeout -k 5 "$LIFE" "$@" > "$TMP/server.out" 2> "$TMP/server.err" &
  SPID=$!
  PORT=$(wait_for LISTENING "$TMP/server.out" "$SPID" "${LAUNCH_TRIES:-200}")
  if [ -z "$PORT" ]; then
    echo "bench: $name did not start:" >&2
    sed 's/^/  /' "$TMP/server.err" >&2
    stop_pid "$SPID"; SPID=""
    return 1
  fi
  sleep 0.2                               # let every worker settle
}

# launch_nginx WORKERS: nginx + Lua in the foreground; sets SPID and PORT.
# nginx takes a port number rather than picking its own, so a port taken
# between free_port and bind() is retried on another port.
launch_nginx() {
  local attempt
  for attempt in 1 2 3; do
    try_launch_nginx "$1" && return 0
  done
  return 1
}

# With TLS_CERT and TLS_KEY set, nginx listens with TLS (the TLS scenarios)
# and is checked over https; NGINX_SINGLE=single and PEER_WRAP are passed on
# (callgrind), LAUNCH_TRIES (100) bounds the wait.
try_launch_nginx() {
  local i scheme=http
  [ -n "${TLS_CERT:-}" ] && scheme=https
  PORT=$(free_port)
  rm -rf "$TMP/nginx"
  $SERVER_PIN timeout -k 5 "$LIFE" sh bench/peers/nginx_lua.sh "$TMP/nginx" "$PORT" "$1" "${NGINX_SINGLE:-}" \
    > "$TMP/server.out" 2> "$TMP/server.err" &
  SPID=$!
  for i in $(seq "${LAUNCH_TRIES:-100}"); do
    curl -sk -o /dev/null --max-time 1 "$scheme://127.0.0.1:$PORT/" && { sleep 0.2; return 0; }
    kill -0 "$SPID" 2>/dev/null || break
    sleep 0.05
  done
  echo "bench: nginx did not start:" >&2
  cat "$TMP/server.err" "$TMP/nginx/logs/error.log" 2>/dev/null | sed 's/^/  /' >&2
  stop_pid "$SPID"; SPID=""
  return 1
}

# launch_peer NAME SCRIPT UPSTREAM_PORT [ARG]: a proxy peer run by a script
# of bench/peers/ that takes DIR PORT UPSTREAM_PORT [ARG] and execs the peer
# in the foreground (pinned when SERVER_PIN is set, PEER_WRAP passed on);
# ready once a connection to PORT succeeds, within LAUNCH_TRIES x 50 ms
# (100: 5 s); sets SPID and PORT. Like nginx it takes a port number, so a
# port taken in between is retried on another.
launch_peer() {
  local name=$1 script=$2 up=$3 attempt i; shift 3
  for attempt in 1 2 3; do
    PORT=$(free_port)
    rm -rf "${TMP:?}/$name"
    $SERVER_PIN timeout -k 5 "$LIFE" sh "$script" "$TMP/$name" "$PORT" "$up" "$@" \
      > "$TMP/server.out" 2> "$TMP/server.err" &
    SPID=$!
    for i in $(seq "${LAUNCH_TRIES:-100}"); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then sleep 0.2; return 0; fi
      kill -0 "$SPID" 2>/dev/null || break
      sleep 0.05
    done
    stop_pid "$SPID"; SPID=""
  done
  echo "bench: $name did not start:" >&2
  cat "$TMP/server.out" "$TMP/server.err" "$TMP/$name/logs/error.log" 2>/dev/null | tail -5 | sed 's/^/  /' >&2
  return 1
}

stop_server() { stop_pid "$SPID"; SPID=""; }

# --- measurements ----------------------------------------------------------

# field NAME FILE: a key=value from the RESULT line.
field() { awk -v k="$1" '/^RESULT/ { for (i = 2; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) print kv[2] } }' "$2"; }

row() {  # repeat workers scenario server ops ops/s cpu_s ops/cpu p50 p99 p999 errors bytes/conn [Ir/op]
  local IFS=$'\t'
  if [ $# -eq 13 ]; then echo "$*"$'\t-' >> "$RAW"; else echo "$*" >> "$RAW"; fi
}

# loadgen_run REPEAT WORKERS SCENARIO SERVER LOADGEN-ARGS...
loadgen_run() {
  local r=$1 w=$2 scen=$3 server=$4 c0 c1 cpu ops; shift 4
  c0=$(cpu_ticks "$SPID")
  $CLIENT_PIN $B/loadgen --port "$PORT" --duration "$SECS" "$@" > "$TMP/lg.out" 2> "$TMP/lg.err"
  c1=$(cpu_ticks "$SPID")
  ops=$(field ops "$TMP/lg.out")
  if [ -z "$ops" ]; then
    echo "bench: $scen/$server: the load generator failed: $(cat "$TMP/lg.err")" >&2
    return
  fi
  cpu=$(awk -v t=$((c1 - c0)) -v hz="$HZ" 'BEGIN { printf "%.2f", t / hz }')
  row "$r" "$w" "$scen" "$server" "$ops" "$(field ops_per_s "$TMP/lg.out")" "$cpu" \
    "$(awk -v o="$ops" -v c="$cpu" 'BEGIN { printf "%.0f", (c > 0 ? o / c : 0) }')" \
    "$(field p50_us "$TMP/lg.out")" "$(field p99_us "$TMP/lg.out")" \
    "$(field p999_us "$TMP/lg.out")" "$(field errors "$TMP/lg.out")" "-"
  printf '  %-10s %-12s w=%s %10s ops/s  %5s cpu-s  %9s ops/cpu-s  errors %s\n' "$scen" "$server" \
    "$w" "$(field ops_per_s "$TMP/lg.out")" "$cpu" "$(tail -1 "$RAW" | cut -f8)" \
    "$(field errors "$TMP/lg.out")"
  [ -s "$TMP/lg.err" ] && sed 's/^/    /' "$TMP/lg.err"
}

# wrk's latency ("812.00us", "1.20ms", "2.00s") in microseconds.
to_us() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000; else if (v ~ /s$/) print n * 1000000; else print "-" }'; }

# wrk_run REPEAT WORKERS SERVER [SCENARIO [SCHEME]]: SCENARIO http, SCHEME
# http unless given (tls-hello: https).
wrk_run() {
  local r=$1 w=$2 server=$3 scen=${4:-http} scheme=${5:-http} c0 c1 cpu reqs errs
  c0=$(cpu_ticks "$SPID")
  $CLIENT_PIN wrk -t1 -c64 -d"${SECS}s" --latency "$scheme://127.0.0.1:$PORT/" > "$TMP/wrk.out" 2>&1
  c1=$(cpu_ticks "$SPID")
  reqs=$(awk '/requests in/ { print $1 }' "$TMP/wrk.out")
  if [ -z "$reqs" ]; then
    echo "bench: $scen/$server: wrk failed: $(cat "$TMP/wrk.out")" >&2
    return
  fi
  errs=$(awk '/Socket errors/ { gsub(",", ""); print $4 + $6 + $8 + $10 } /Non-2xx/ { print $NF }' \
    "$TMP/wrk.out" | awk '{ s += $1 } END { print s + 0 }')
  cpu=$(awk -v t=$((c1 - c0)) -v hz="$HZ" 'BEGIN { printf "%.2f", t / hz }')
  row "$r" "$w" "$scen" "$server" "$reqs" "$(awk '/Requests\/sec/ { print $2 }' "$TMP/wrk.out")" \
    "$cpu" "$(awk -v o="$reqs" -v c="$cpu" 'BEGIN { printf "%.0f", (c > 0 ? o / c : 0) }')" \
    "$(to_us "$(awk '$1 == "50%" { print $2 }' "$TMP/wrk.out")")" \
    "$(to_us "$(awk '$1 == "99%" { print $2 }' "$TMP/wrk.out")")" "-" "$errs" "-"
  printf '  %-10s %-8s w=%s %10s req/s  %5s cpu-s  %9s req/cpu-s  errors %s\n' "$scen" "$server" "$w" \
    "$(awk '/Requests\/sec/ { print $2 }' "$TMP/wrk.out")" "$cpu" "$(tail -1 "$RAW" | cut -f8)" "$errs"
}

# idle_run REPEAT WORKERS SERVER: RSS growth per idle connection.
idle_run() {
  local r=$1 w=$2 server=$3 rss0 rss1 ready
  rss0=$(rss_kb "$SPID")
  $CLIENT_PIN $B/loadgen --port "$PORT" --mode idle --conns "$IDLE" --duration 120 \
    > "$TMP/idle.out" 2> "$TMP/idle.err" &
  LGPID=$!
  ready=$(wait_for READY "$TMP/idle.out" "$LGPID" 1200)
  sleep 0.5                               # let the server finish with the last ones
  rss1=$(rss_kb "$SPID")
  stop_pid "$LGPID"; LGPID=""
  if [ -z "$ready" ] || [ "$ready" -lt 1 ]; then
    echo "bench: idle-mem/$server: no connections were served: $(cat "$TMP/idle.err")" >&2
    return
  fi
  row "$r" "$w" idle-mem "$server" "$ready" - - - - - - "$((IDLE - ready))" \
    "$(( (rss1 - rss0) * 1024 / ready ))"
  printf '  %-10s %-8s w=%s %6s connections  RSS +%s kB  %s bytes/connection\n' idle-mem "$server" \
    "$w" "$ready" "$((rss1 - rss0))" "$(( (rss1 - rss0) * 1024 / ready ))"
  sleep 0.5                               # the server closes 10,000 connections
}

# ir_run REPEAT SERVER CMD...: CMD (a 1-worker echo server printing
# "LISTENING <port>") under callgrind, pinned to CPU 0, counted by ir_count
# as echo-ir-p1 and echo-ir-p16.
ir_run() {
  local r=$1 server=$2; shift 2
  rm -f "$TMP/callgrind.out" "$TMP/callgrind.out".*
  SERVER_PIN="taskset -c 0" LAUNCH_TRIES=1200 launch "$server (callgrind)" \
    valgrind --tool=callgrind --callgrind-out-file="$TMP/callgrind.out" "$@" || return
  ir_count "$r" echo-ir "$server"
}

# ir_count REPEAT PREFIX SERVER: SPID (timeout(1) around valgrind) runs a
# server under callgrind writing $TMP/callgrind.out; for 1 and 16 in flight:
# zero the counters (callgrind_control -z), run the load generator (16
# connections x 64 B, IR_SECS), dump them (callgrind_control -d) and divide
# the dump's Ir (user-space instructions, every thread of the process) by
# the operations the load generator completed; rows PREFIX-p1, PREFIX-p16.
# Stops the server.
ir_count() {
  local r=$1 prefix=$2 server=$3 out=$TMP/callgrind.out vpid depth part=0 ir ops i
  vpid=$(ps -o pid= --ppid "$SPID" | awk 'NR == 1 { print $1 }')   # valgrind, under timeout(1)
  if [ -z "$vpid" ]; then echo "bench: $prefix/$server: no valgrind process under $SPID" >&2; stop_server; return; fi
  for depth in 1 16; do
    callgrind_control -z "$vpid" > "$TMP/cgc.out" 2>&1 ||
      { echo "bench: $prefix/$server: callgrind_control -z failed: $(cat "$TMP/cgc.out")" >&2; break; }
    taskset -c 1 $B/loadgen --port "$PORT" --duration "$IR_SECS" --mode echo --conns 16 --size 64 \
      --depth "$depth" > "$TMP/lg.out" 2> "$TMP/lg.err"
    callgrind_control -d "$vpid" > "$TMP/cgc.out" 2>&1 ||
      { echo "bench: $prefix/$server: callgrind_control -d failed: $(cat "$TMP/cgc.out")" >&2; break; }
    part=$((part + 1))
    ir=""
    for i in $(seq 100); do               # the dump is written by the server's own thread
      ir=$(awk '$1 == "summary:" { print $2 }' "$out.$part" 2>/dev/null)
      [ -n "$ir" ] && break
      sleep 0.1
    done
    ops=$(field ops "$TMP/lg.out")
    if [ -z "$ops" ] || [ -z "$ir" ] || [ "$ops" -lt 1 ]; then
      echo "bench: $prefix-p$depth/$server: no count (ops '${ops}', Ir '${ir}'): $(cat "$TMP/lg.err")" >&2
      continue
    fi
    row "$r" 1 "$prefix-p$depth" "$server" "$ops" "$(field ops_per_s "$TMP/lg.out")" - - \
      "$(field p50_us "$TMP/lg.out")" "$(field p99_us "$TMP/lg.out")" "$(field p999_us "$TMP/lg.out")" \
      "$(field errors "$TMP/lg.out")" - "$(awk -v i="$ir" -v o="$ops" 'BEGIN { printf "%.0f", i / o }')"
    printf '  %-12s %-12s w=1 %10s ops (under callgrind)  %12s Ir  %6s Ir/op  errors %s\n' "$prefix-p$depth" \
      "$server" "$ops" "$ir" "$(tail -1 "$RAW" | cut -f14)" "$(field errors "$TMP/lg.out")"
    [ -s "$TMP/lg.err" ] && sed 's/^/    /' "$TMP/lg.err"
  done
  stop_server
}

# launch_redis: redis-server in the foreground on 127.0.0.1, no persistence
# (pinned when SERVER_PIN is set); sets SPID and PORT. Like nginx it takes a
# port number, so a port taken in between is retried on another.
launch_redis() {
  local attempt i
  for attempt in 1 2 3; do
    PORT=$(free_port)
    mkdir -p "$TMP/redis"
    $SERVER_PIN timeout -k 5 "$LIFE" redis-server --port "$PORT" --bind 127.0.0.1 --save '' \
      --appendonly no --daemonize no --dir "$TMP/redis" > "$TMP/server.out" 2> "$TMP/server.err" &
    SPID=$!
    for i in $(seq 100); do
      [ "$(redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null)" = PONG ] && { sleep 0.2; return 0; }
      kill -0 "$SPID" 2>/dev/null || break
      sleep 0.05
    done
    stop_server
  done
  echo "bench: redis-server did not start:" >&2
  cat "$TMP/server.out" "$TMP/server.err" | tail -5 | sed 's/^/  /' >&2
  return 1
}

# kv_run REPEAT SERVER: redis-benchmark SET then GET, at -P 16 and -P 1, 50
# connections, pinned to CPU 1; requests per second of server CPU.
kv_run() {
  local r=$1 server=$2 p t n c0 c1 cpu line up
  if [ "$(redis-cli -h 127.0.0.1 -p "$PORT" set bench:check 42 2>&1)" != OK ] ||
     [ "$(redis-cli -h 127.0.0.1 -p "$PORT" get bench:check 2>&1)" != 42 ]; then
    echo "bench: kv/$server: SET then GET with redis-cli did not give OK and 42: skipped" >&2
    return
  fi
  for p in 16 1; do
    if [ "$p" = 16 ]; then n=$KV_N16; else n=$KV_N1; fi
    for t in set get; do
      up=$(echo "$t" | tr a-z A-Z)
      c0=$(cpu_ticks "$SPID")
      $CLIENT_PIN redis-benchmark -h 127.0.0.1 -p "$PORT" -c 50 -n "$n" -P "$p" -t "$t" --csv \
        > "$TMP/rb.out" 2> "$TMP/rb.err"
      c1=$(cpu_ticks "$SPID")
      # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
      line=$(grep "^\"$up\"," "$TMP/rb.out" | tr -d '"')
      if [ -z "$line" ]; then
        echo "bench: kv-$t-p$p/$server: redis-benchmark failed: $(cat "$TMP/rb.out" "$TMP/rb.err" | tail -3)" >&2
        continue
      fi
      cpu=$(awk -v t=$((c1 - c0)) -v hz="$HZ" 'BEGIN { printf "%.2f", t / hz }')
      row "$r" 1 "kv-$t-p$p" "$server" "$n" "$(echo "$line" | cut -d, -f2)" "$cpu" \
        "$(awk -v o="$n" -v c="$cpu" 'BEGIN { printf "%.0f", (c > 0 ? o / c : 0) }')" \
        "$(echo "$line" | awk -F, '{ printf "%.0f", $5 * 1000 }')" \
        "$(echo "$line" | awk -F, '{ printf "%.0f", $7 * 1000 }')" - 0 -
      printf '  %-10s %-8s w=1 %10s req/s  %5s cpu-s  %9s req/cpu-s\n' "kv-$t-p$p" "$server" \
        "$(echo "$line" | cut -d, -f2)" "$cpu" "$(tail -1 "$RAW" | cut -f8)"
    done
  done
}

# start_upstream: the proxy scenario's upstream, the raw-C echo with 1
# worker pinned to CPU 1 (beside the load generator: CPU 0 is the proxy's);
# sets UPID and UPORT.
start_upstream() {
  SERVER_PIN="taskset -c 1" launch upstream $B/ref_server --workers 1 --dispatch "$DISPATCH" \
    --max-seconds "$LIFE" || return 1
  UPID=$SPID; UPORT=$PORT; SPID=""
}

stop_upstream() { stop_pid "$UPID"; UPID=""; }

# start_proxy SERVER: one proxy in front of 127.0.0.1:UPORT, pinned when
# SERVER_PIN is set; sets SPID and PORT.
start_proxy() {
  case $1 in
    multiloop) launch multiloop ${PEER_WRAP:-} lua5.4 bench/ml_server.lua "$PROXY_HANDLER" 1 "$DISPATCH" \
                 "upstreams[]=127.0.0.1:$UPORT" ;;
    haproxy) launch_peer haproxy bench/peers/haproxy_tcp.sh "$UPORT" ;;
    nginx-stream) launch_peer nginx-stream bench/peers/nginx_stream.sh "$UPORT" "${NGINX_SINGLE:-}" ;;
  esac
}

# proxy_check SCENARIO SERVER: a short echo through the server (4
# connections, 4 in flight, 1 s); fails, naming what it saw, unless
# something came back and nothing went wrong.
proxy_check() {
  local ops errs
  $CLIENT_PIN $B/loadgen --port "$PORT" --duration 1 --mode echo --conns 4 --size 64 --depth 4 \
    > "$TMP/check.out" 2> "$TMP/check.err"
  ops=$(field ops "$TMP/check.out"); errs=$(field errors "$TMP/check.out")
  if [ -z "$ops" ] || [ "$ops" -lt 1 ] || [ "${errs:-1}" != 0 ]; then
    echo "bench: $1/$2: no clean echo through it (ops '${ops}', errors '${errs}'): skipped" >&2
    cat "$TMP/check.err" "$TMP/server.err" 2>/dev/null | tail -5 | sed 's/^/  /' >&2
    return 1
  fi
}

# --- TLS ---------------------------------------------------------------------

# tls_note SERVER FILE: once per server, what its handshakes negotiated (from
# tls_loadgen's RESULT) into meta.txt, and a warning if a session was
# resumed or a ticket sent: every handshake compared must be a full one.
tls_seen=""
tls_note() {
  local server=$1 out=$2 hs tk rs
  hs=$(field handshakes "$out"); tk=$(field tickets "$out"); rs=$(field resumed "$out")
  if [ "${rs:-0}" != 0 ] || { [ "$TLS_TICKETS" = 0 ] && [ "${tk:-0}" != 0 ]; } ||
     { [ "$TLS_TICKETS" = 1 ] && [ "${tk:-0}" != $((2 * ${hs:-0})) ]; }; then
    echo "bench: note: $server: $rs of $hs handshakes resumed, $tk session tickets sent" \
      "(expected none resumed and $([ "$TLS_TICKETS" = 1 ] && echo 2 per handshake || echo no tickets))" >&2
  fi
  case " $tls_seen " in *" $server "*) return;; esac
  [ "$(field proto "$out")" = - ] && return
  tls_seen="$tls_seen $server"
  echo "tls_seen_${server//-/_}=$(field proto "$out") $(field cipher "$out") $(field group "$out"), tickets $tk in $hs handshakes, resumed $rs" \
    >> "$RES/meta.txt"
}

# tls_run REPEAT WORKERS SCENARIO SERVER TLS_LOADGEN-ARGS...: as loadgen_run,
# with build/bench/tls_loadgen; for --mode bulk the row's ops are MiB echoed.
tls_run() {
  local r=$1 w=$2 scen=$3 server=$4 c0 c1 cpu ops; shift 4
  c0=$(cpu_ticks "$SPID")
  $CLIENT_PIN $B/tls_loadgen --port "$PORT" --duration "$SECS" --ciphersuites "$TLS_SUITE" "$@" \
    > "$TMP/lg.out" 2> "$TMP/lg.err"
  c1=$(cpu_ticks "$SPID")
  ops=$(field ops "$TMP/lg.out")
  if [ -z "$ops" ]; then
    echo "bench: $scen/$server: tls_loadgen failed: $(cat "$TMP/lg.err")" >&2
    return
  fi
  tls_note "$server" "$TMP/lg.out"
  local rate elapsed
  rate=$(field ops_per_s "$TMP/lg.out")
  if [ "$(field mode "$TMP/lg.out")" = bulk ]; then
    ops=$(field mib "$TMP/lg.out"); elapsed=$(field duration "$TMP/lg.out")
    rate=$(awk -v o="$ops" -v e="$elapsed" 'BEGIN { printf "%.1f", (e > 0 ? o / e : 0) }')
  fi
  cpu=$(awk -v t=$((c1 - c0)) -v hz="$HZ" 'BEGIN { printf "%.2f", t / hz }')
  row "$r" "$w" "$scen" "$server" "$ops" "$rate" "$cpu" \
    "$(awk -v o="$ops" -v c="$cpu" 'BEGIN { printf "%.0f", (c > 0 ? o / c : 0) }')" \
    "$(field p50_us "$TMP/lg.out")" "$(field p99_us "$TMP/lg.out")" \
    "$(field p999_us "$TMP/lg.out")" "$(field errors "$TMP/lg.out")" "-"
  printf '  %-13s %-12s w=%s %10s ops/s  %5s cpu-s  %9s ops/cpu-s  errors %s\n' "$scen" "$server" \
    "$w" "$rate" "$cpu" "$(tail -1 "$RAW" | cut -f8)" "$(field errors "$TMP/lg.out")"
  [ -s "$TMP/lg.err" ] && sed 's/^/    /' "$TMP/lg.err"
}

# tls_idle_run REPEAT WORKERS SERVER PROTO: RSS growth per idle TLS
# connection, TLS_IDLE of them, each with one round trip (PROTO http: a GET;
# echo: one byte).
tls_idle_run() {
  local r=$1 w=$2 server=$3 proto=$4 rss0 rss1 ready
  rss0=$(rss_kb "$SPID")
  $CLIENT_PIN $B/tls_loadgen --port "$PORT" --mode idle --idle-proto "$proto" --conns "$TLS_IDLE" \
    --ciphersuites "$TLS_SUITE" --duration 120 > "$TMP/idle.out" 2> "$TMP/idle.err" &
  LGPID=$!
  ready=$(wait_for READY "$TMP/idle.out" "$LGPID" 1200)
  sleep 0.5                               # let the server finish with the last ones
  rss1=$(rss_kb "$SPID")
  stop_pid "$LGPID"; LGPID=""
  if [ -z "$ready" ] || [ "$ready" -lt 1 ]; then
    echo "bench: tls-idle/$server: no connections were served: $(cat "$TMP/idle.err")" >&2
    return
  fi
  tls_note "$server" "$TMP/idle.out"
  row "$r" "$w" tls-idle "$server" "$ready" - - - - - - "$((TLS_IDLE - ready))" \
    "$(( (rss1 - rss0) * 1024 / ready ))"
  printf '  %-13s %-12s w=%s %6s connections  RSS +%s kB  %s bytes/connection\n' tls-idle "$server" \
    "$w" "$ready" "$((rss1 - rss0))" "$(( (rss1 - rss0) * 1024 / ready ))"
  sleep 0.5
}

# tls_check SCENARIO SERVER ARGS...: a short checked run (1 s) of tls_loadgen
# with ARGS; fails, naming what it saw, unless something completed and
# nothing went wrong.
tls_check() {
  local scen=$1 server=$2 ops errs; shift 2
  $CLIENT_PIN $B/tls_loadgen --port "$PORT" --duration 1 --ciphersuites "$TLS_SUITE" "$@" \
    > "$TMP/check.out" 2> "$TMP/check.err"
  ops=$(field ops "$TMP/check.out"); errs=$(field errors "$TMP/check.out")
  if [ -z "$ops" ] || [ "$ops" -lt 1 ] || [ "${errs:-1}" != 0 ]; then
    echo "bench: $scen/$server: no clean TLS exchange with it (ops '${ops}', errors '${errs}'): skipped" >&2
    cat "$TMP/check.err" "$TMP/server.err" 2>/dev/null | tail -5 | sed 's/^/  /' >&2
    return 1
  fi
}

# start_tls SERVER WORKERS KIND: KIND hello (multiloop's examples/http_hello.lua
# or nginx + Lua) or echo (multiloop's examples/echo_handler.lua, multiloop's
# proxy "ml-proxy" or nginx stream, both in front of UPORT), with TLS; sets
# SPID and PORT.
start_tls() {
  local ml_tls=("tls.cert=$TLS_CERT_FILE" "tls.key=$TLS_KEY_FILE" "tls.min_version=TLSv1.3"
    "tls.ciphersuites=$TLS_SUITE" "tls.session_tickets=$([ "$TLS_TICKETS" = 1 ] && echo true || echo false)")
  case $1/$3 in
    multiloop/hello) launch multiloop ${PEER_WRAP:-} lua5.4 bench/ml_server.lua examples.http_hello "$2" \
                       "$DISPATCH" "${ml_tls[@]}" ;;
    nginx-lua/hello) TLS_CERT=$TLS_CERT_FILE TLS_KEY=$TLS_KEY_FILE TLS_CIPHERSUITES=$TLS_SUITE TLS_TICKETS=$NGINX_TICKETS \
                       launch_nginx "$2" ;;
    multiloop/echo) launch multiloop lua5.4 bench/ml_server.lua examples.echo_handler "$2" "$DISPATCH" \
                      "${ml_tls[@]}" ;;
    ml-proxy/echo) launch ml-proxy lua5.4 bench/ml_server.lua "$PROXY_HANDLER" "$2" "$DISPATCH" \
                     "upstreams[]=127.0.0.1:$UPORT" "${ml_tls[@]}" ;;
    nginx-stream/echo) TLS_CERT=$TLS_CERT_FILE TLS_KEY=$TLS_KEY_FILE TLS_CIPHERSUITES=$TLS_SUITE TLS_TICKETS=$NGINX_TICKETS \
                         launch_peer nginx-stream bench/peers/nginx_stream.sh "$UPORT" ;;
  esac
}

# tls_ir_count REPEAT SERVER: SPID runs the server under callgrind (as
# ir_count); counts Ir per keep-alive request (tls-ir-hello, 16 connections,
# their handshakes and first requests done before the counters are zeroed:
# tls_loadgen --wait-go) and per full handshake with its one request
# (tls-ir-handshake, 8 loops).
tls_ir_count() {
  local r=$1 server=$2 out=$TMP/callgrind.out vpid part=0 ir ops i scen args
  vpid=$(ps -o pid= --ppid "$SPID" | awk 'NR == 1 { print $1 }')
  if [ -z "$vpid" ]; then echo "bench: tls-ir/$server: no valgrind process under $SPID" >&2; stop_server; return; fi
  for scen in tls-ir-hello tls-ir-handshake; do
    case $scen in
      tls-ir-hello) args="--mode http --conns 16 --wait-go" ;;
      *) args="--mode handshake --conns 8" ;;
    esac
    if [ "$scen" = tls-ir-hello ]; then
      taskset -c 1 $B/tls_loadgen --port "$PORT" --duration "$IR_SECS" --ciphersuites "$TLS_SUITE" $args \
        > "$TMP/lg.out" 2> "$TMP/lg.err" &
      LGPID=$!
      if [ -z "$(wait_for READY "$TMP/lg.out" "$LGPID" 1200)" ]; then
        echo "bench: $scen/$server: the connections did not get ready: $(cat "$TMP/lg.err")" >&2
        stop_pid "$LGPID"; LGPID=""; continue
      fi
      callgrind_control -z "$vpid" > "$TMP/cgc.out" 2>&1 ||
        { echo "bench: $scen/$server: callgrind_control -z failed: $(cat "$TMP/cgc.out")" >&2; stop_pid "$LGPID"; LGPID=""; break; }
      kill -USR1 "$LGPID"
      wait "$LGPID"; LGPID=""
    else
      callgrind_control -z "$vpid" > "$TMP/cgc.out" 2>&1 ||
        { echo "bench: $scen/$server: callgrind_control -z failed: $(cat "$TMP/cgc.out")" >&2; break; }
      taskset -c 1 $B/tls_loadgen --port "$PORT" --duration "$IR_SECS" --ciphersuites "$TLS_SUITE" $args \
        > "$TMP/lg.out" 2> "$TMP/lg.err"
    fi
    callgrind_control -d "$vpid" > "$TMP/cgc.out" 2>&1 ||
      { echo "bench: $scen/$server: callgrind_control -d failed: $(cat "$TMP/cgc.out")" >&2; break; }
    part=$((part + 1))
    ir=""
    for i in $(seq 100); do
      ir=$(awk '$1 == "summary:" { print $2 }' "$out.$part" 2>/dev/null)
      [ -n "$ir" ] && break
      sleep 0.1
    done
    ops=$(field ops "$TMP/lg.out")
    if [ -z "$ops" ] || [ -z "$ir" ] || [ "$ops" -lt 1 ]; then
      echo "bench: $scen/$server: no count (ops '${ops}', Ir '${ir}'): $(cat "$TMP/lg.err")" >&2
      continue
    fi
    tls_note "$server" "$TMP/lg.out"
    row "$r" 1 "$scen" "$server" "$ops" "$(field ops_per_s "$TMP/lg.out")" - - \
      "$(field p50_us "$TMP/lg.out")" "$(field p99_us "$TMP/lg.out")" "$(field p999_us "$TMP/lg.out")" \
      "$(field errors "$TMP/lg.out")" - "$(awk -v i="$ir" -v o="$ops" 'BEGIN { printf "%.0f", i / o }')"
    printf '  %-16s %-12s w=1 %10s ops (under callgrind)  %12s Ir  %8s Ir/op  errors %s\n' "$scen" \
      "$server" "$ops" "$ir" "$(tail -1 "$RAW" | cut -f14)" "$(field errors "$TMP/lg.out")"
    [ -s "$TMP/lg.err" ] && sed 's/^/    /' "$TMP/lg.err"
  done
  stop_server
}

# --- servers -----------------------------------------------------------------

have_luv=1; have_node=1; have_nginx=1; have_wrk=1
lua5.4 -e 'require "luv"' 2>/dev/null || { have_luv=0; echo "bench: note: lua-luv is missing: the luv peer is skipped"; }
command -v node > /dev/null || { have_node=0; echo "bench: note: node is missing: the Node.js peer is skipped"; }
{ command -v nginx > /dev/null && [ -f /usr/lib/nginx/modules/ngx_http_lua_module.so ]; } ||
  { have_nginx=0; echo "bench: note: nginx or libnginx-mod-http-lua is missing: the nginx + Lua peer is skipped"; }
command -v wrk > /dev/null || { have_wrk=0; echo "bench: note: wrk is missing: the HTTP scenario is skipped"; }
have_serve=1; have_valgrind=1; have_redis=1
if [ ! -f bench/serve_echo_handler.lua ]; then
  have_serve=0
  want echo && echo "bench: note: bench/serve_echo_handler.lua is missing: the serve-style echo (ml-serve) is skipped"
fi
if want echo-ir || want proxy-ir || want tls-ir; then
  { command -v valgrind > /dev/null && command -v callgrind_control > /dev/null; } ||
    { have_valgrind=0; echo "bench: note: valgrind is missing: echo-ir, proxy-ir and tls-ir (callgrind Ir per op) are skipped"; }
fi
have_haproxy=1; have_nginx_stream=1; have_proxy_handler=1
if want proxy || want proxy-ir || want tls-bulk; then
  command -v haproxy > /dev/null ||
    { have_haproxy=0; echo "bench: note: haproxy is missing: the HAProxy proxy peer is skipped"; }
  { command -v nginx > /dev/null && [ -f /usr/lib/nginx/modules/ngx_stream_module.so ]; } ||
    { have_nginx_stream=0; echo "bench: note: nginx or libnginx-mod-stream is missing: the nginx stream proxy peer is skipped"; }
  [ -f "$(echo "$PROXY_HANDLER" | tr . /).lua" ] ||
    { have_proxy_handler=0; echo "bench: note: $(echo "$PROXY_HANDLER" | tr . /).lua is missing: multiloop's proxy is skipped"; }
fi
have_resty_redis=1
if want redis-pool; then
  if ! { command -v redis-server > /dev/null && command -v redis-cli > /dev/null; }; then
    have_resty_redis=0; echo "bench: note: redis-server or redis-cli is missing: redis-pool is skipped"
  elif [ ! -f /usr/share/lua/5.1/nginx/redis.lua ]; then
    have_resty_redis=0; echo "bench: note: lua-nginx-redis (lua-resty-redis) is missing: redis-pool is skipped"
  elif [ ! -f lua/multiloop/ngx.lua ]; then
    have_resty_redis=0; echo "bench: note: lua/multiloop/ngx.lua is missing: redis-pool is skipped"
  fi
fi
if want kv; then
  { command -v redis-server > /dev/null && command -v redis-benchmark > /dev/null && command -v redis-cli > /dev/null; } ||
    { have_redis=0; echo "bench: note: redis-server, redis-benchmark or redis-cli is missing: the kv scenario is skipped"; }
fi

# The TLS scenarios' throwaway certificate (BENCH_TLS_KEY: P-256 ECDSA or
# RSA 2048), made here with the openssl CLI, for localhost and 127.0.0.1.
have_tls=0
if want tls-hello || want tls-handshake || want tls-idle || want tls-bulk || want tls-ir; then
  have_tls=1
  mkdir -p "$TMP/tls"
  TLS_CERT_FILE=$TMP/tls/cert.pem; TLS_KEY_FILE=$TMP/tls/key.pem
  case $TLS_KEYTYPE in
    ec) newkey="-newkey ec -pkeyopt ec_paramgen_curve:P-256" ;;
    rsa) newkey="-newkey rsa:2048" ;;
  esac
  if [ ! -x $B/tls_loadgen ]; then
    have_tls=0; echo "bench: note: $B/tls_loadgen is missing ('make bench-build'): the TLS scenarios are skipped"
  elif ! command -v openssl > /dev/null; then
    have_tls=0; echo "bench: note: the openssl command is missing: the TLS scenarios are skipped"
  elif ! openssl req -x509 $newkey -nodes -subj /CN=localhost \
         -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -days 2 \
         -keyout "$TLS_KEY_FILE" -out "$TLS_CERT_FILE" > "$TMP/tls/req.err" 2>&1; then
    have_tls=0; echo "bench: note: openssl req failed: the TLS scenarios are skipped: $(tail -2 "$TMP/tls/req.err")"
  fi
fi
NGINX_TICKETS=off; [ "$TLS_TICKETS" = 1 ] && NGINX_TICKETS=on
tls_servers() { local s="multiloop"; [ $have_nginx = 1 ] && s="$s nginx-lua"; echo "$s"; }
tls_bulk_servers() { local s="multiloop"; [ $have_proxy_handler = 1 ] && s="$s ml-proxy"; [ $have_nginx_stream = 1 ] && s="$s nginx-stream"; echo "$s"; }

# start_echo SERVER WORKERS [DISPATCH]
start_echo() {
  case $1 in
    multiloop) launch multiloop lua5.4 bench/ml_server.lua examples.echo_handler "$2" "${3:-$DISPATCH}" ;;
    ml-serve) launch ml-serve lua5.4 bench/ml_server.lua bench.serve_echo_handler "$2" "${3:-$DISPATCH}" ;;
    ref-c) launch ref-c $B/ref_server --workers "$2" --dispatch "${3:-$DISPATCH}" --max-seconds "$LIFE" ;;
    luv) launch luv lua5.4 bench/peers/luv_echo.lua "$LIFE" ;;
    node) launch node node bench/peers/node_echo.js --workers "$2" --max-seconds "$LIFE" ;;
  esac
}

start_http() {
  case $1 in
    multiloop) launch multiloop lua5.4 bench/ml_server.lua examples.http_hello "$2" "$DISPATCH" ;;
    ref-c) launch ref-c $B/ref_server --mode http --workers "$2" --dispatch "$DISPATCH" --max-seconds "$LIFE" ;;
    nginx-lua) launch_nginx "$2" ;;
    node) launch node node bench/peers/node_echo.js --mode http --workers "$2" --max-seconds "$LIFE" ;;
  esac
}

# The list rotated by one place per repeat, so no server is always first.
rotate() {
  local k=$1; shift
  local a=("$@") n=$# i
  for ((i = 0; i < n; i++)); do printf '%s ' "${a[$(((i + k) % n))]}"; done
}

echo_servers() { local s="multiloop ref-c"; [ $have_serve = 1 ] && s="$s ml-serve"; [ "$1" = 1 ] && [ $have_luv = 1 ] && s="$s luv"; [ $have_node = 1 ] && s="$s node"; echo "$s"; }
proxy_servers() { local s=""; [ $have_proxy_handler = 1 ] && s="multiloop"; [ $have_haproxy = 1 ] && s="$s haproxy"; [ $have_nginx_stream = 1 ] && s="$s nginx-stream"; echo "$s"; }
http_servers() { local s="multiloop ref-c"; [ $have_nginx = 1 ] && s="$s nginx-lua"; [ $have_node = 1 ] && s="$s node"; echo "$s"; }

# --- the machine and the settings, for the report -----------------------------

{
  echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "nproc=$(nproc)"
  echo "cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
  echo "kernel=$(uname -sr)"
  echo "seconds=$SECS"
  echo "repeats=$REPEATS"
  echo "idle_conns=$IDLE"
  echo "workers=$WORKERS_LIST"
  echo "dispatch=$DISPATCH"
  echo "quick=${BENCH_QUICK:-0}"
  echo "libuv=$(pkg-config --modversion libuv)"
  echo "lua=$(lua5.4 -v 2>&1 | awk '{ print $2 }')"
  echo "luv=$([ $have_luv = 1 ] && dpkg-query -W -f='${Version}' lua-luv 2>/dev/null || echo missing)"
  echo "node=$([ $have_node = 1 ] && node --version || echo missing)"
  echo "nginx=$([ $have_nginx = 1 ] && nginx -v 2>&1 | sed 's/.*nginx\///' || echo missing)"
  echo "nginx_lua=$([ $have_nginx = 1 ] && dpkg-query -W -f='${Version}' libnginx-mod-http-lua 2>/dev/null || echo missing)"
  echo "wrk=$([ $have_wrk = 1 ] && dpkg-query -W -f='${Version}' wrk 2>/dev/null || echo missing)"
  echo "valgrind=$([ $have_valgrind = 1 ] && { want echo-ir || want proxy-ir; } && valgrind --version | sed 's/^valgrind-//' || echo missing)"
  echo "redis=$([ $have_redis = 1 ] && { want kv || want redis-pool; } && command -v redis-server > /dev/null && redis-server --version | sed 's/.* v=\([^ ]*\).*/\1/' || echo missing)"
  echo "ir_seconds=$IR_SECS"
  echo "ir_handlers=$IR_HANDLERS"
  echo "kv_handler=$KV_HANDLER"
  echo "kv_n16=$KV_N16"
  echo "kv_n1=$KV_N1"
  echo "proxy_handler=$PROXY_HANDLER"
  echo "haproxy=$([ $have_haproxy = 1 ] && { want proxy || want proxy-ir; } && haproxy -v | awk 'NR == 1 { print $3 }' || echo missing)"
  echo "nginx_stream=$([ $have_nginx_stream = 1 ] && { want proxy || want proxy-ir; } && dpkg-query -W -f='${Version}' libnginx-mod-stream 2>/dev/null || echo missing)"
  echo "only=$ONLY"
  if [ $have_tls = 1 ]; then
    echo "openssl=$(openssl version | awk '{ print $2 }')"
    echo "libssl=$(dpkg-query -W -f='${Version}' libssl3 2>/dev/null || echo '?')"
    echo "libssl_ml=$(ldd build/multiloop/core.so 2>/dev/null | awk '/libssl/ { print $1; exit }')"
    echo "openssl_nginx=$(nginx -V 2>&1 | sed -n 's/^built with //p' | head -1)"
    echo "tls_suite=$TLS_SUITE"
    echo "tls_group=X25519"
    echo "tls_key=$([ "$TLS_KEYTYPE" = ec ] && echo 'ECDSA P-256' || echo 'RSA 2048')"
    echo "tls_idle_conns=$TLS_IDLE"
    echo "tls_bulk_bytes=$TLS_BULK"
    echo "tls_tickets=$TLS_TICKETS"
  fi
  echo "loadavg_before=$(cut -d' ' -f1-3 /proc/loadavg)"
} > "$RES/meta.txt"

# --- the run -----------------------------------------------------------------

echo "bench: $REPEATS repeat(s), ${SECS} s per measurement, workers: $WORKERS_LIST, dispatch: $DISPATCH"
echo "bench: load average before: $(cut -d' ' -f1-3 /proc/loadavg) (other load on this machine skews absolute figures)"
start_time=$(date +%s)
checked_http=""
for r in $(seq "$REPEATS"); do
  echo "bench: repeat $r of $REPEATS"
  for w in $WORKERS_LIST; do
    if [ "$w" = 1 ]; then SERVER_PIN="taskset -c 0"; CLIENT_PIN="taskset -c 1"
    else SERVER_PIN=""; CLIENT_PIN=""; fi
    if want echo; then
      for s in $(rotate "$r" $(echo_servers "$w")); do
        start_echo "$s" "$w" || continue
        idle_run "$r" "$w" "$s"
        loadgen_run "$r" "$w" echo-p1 "$s" --mode echo --conns 64 --size 64 --depth 1
        loadgen_run "$r" "$w" echo-p16 "$s" --mode echo --conns 64 --size 64 --depth 16
        loadgen_run "$r" "$w" connrate "$s" --mode connrate --conns 32 --size 64
        stop_server
      done
    fi
    if want http && [ $have_wrk = 1 ]; then
      for s in $(rotate "$r" $(http_servers "$w")); do
        start_http "$s" "$w" || continue
        case " $checked_http " in
          *" $s "*) ;;
          *) if lua5.4 bench/check_http.lua "$PORT" > "$TMP/check.out" 2>&1; then
               checked_http="$checked_http $s"
             else
               echo "bench: http/$s: the wire check failed:" >&2; sed 's/^/  /' "$TMP/check.out" >&2
             fi ;;
        esac
        wrk_run "$r" "$w" "$s"
        stop_server
      done
    fi
    if [ $have_tls = 1 ] && { want tls-hello || want tls-handshake || want tls-idle; }; then
      for s in $(rotate "$r" $(tls_servers)); do
        start_tls "$s" "$w" hello || continue
        want tls-idle && tls_idle_run "$r" "$w" "$s" http
        if tls_check tls-hello "$s" --mode http --conns 2; then
          want tls-hello && [ $have_wrk = 1 ] && wrk_run "$r" "$w" "$s" tls-hello https
          want tls-handshake && tls_run "$r" "$w" tls-handshake "$s" --mode handshake --conns 32
        fi
        stop_server
      done
    fi
    if want dispatch && [ "$w" = 2 ]; then   # the other dispatch modes, connection rate
      for d in ipc queue reuseport; do
        [ "$d" = "$DISPATCH" ] && continue
        for s in multiloop ref-c; do
          start_echo "$s" "$w" "$d" || continue
          loadgen_run "$r" "$w" "connrate-$d" "$s" --mode connrate --conns 32 --size 64
          stop_server
        done
      done
    fi
  done
  SERVER_PIN="taskset -c 0"; CLIENT_PIN="taskset -c 1"   # 1 worker, pinned, from here on
  if want echo-ir && [ $have_valgrind = 1 ]; then
    for s in $(rotate "$r" $IR_HANDLERS ref-c); do
      case $s in
        ref-c) ir_run "$r" ref-c $B/ref_server --workers 1 --dispatch "$DISPATCH" --max-seconds "$LIFE" ;;
        *=*) mod=${s#*=}
             if [ -f "$(echo "$mod" | tr . /).lua" ]; then
               ir_run "$r" "${s%%=*}" lua5.4 bench/ml_server.lua "$mod" 1 "$DISPATCH"
             elif [ "$r" = 1 ]; then
               echo "bench: note: echo-ir: $(echo "$mod" | tr . /).lua is missing: ${s%%=*} is skipped"
             fi ;;
        *) echo "bench: BENCH_IR_HANDLERS: '$s' is not NAME=MODULE" >&2 ;;
      esac
    done
  fi
  if want kv && [ $have_redis = 1 ]; then
    for s in $(rotate "$r" multiloop redis); do
      case $s in
        multiloop) launch kv lua5.4 bench/ml_server.lua "$KV_HANDLER" 1 || continue ;;
        redis) launch_redis || continue ;;
      esac
      kv_run "$r" "$s"
      stop_server
    done
  fi
  if want proxy && [ -n "$(proxy_servers)" ]; then
    if start_upstream; then
      for s in $(rotate "$r" $(proxy_servers)); do
        start_proxy "$s" || continue
        if proxy_check proxy "$s"; then
          loadgen_run "$r" 1 proxy-p1 "$s" --mode echo --conns 64 --size 64 --depth 1
          loadgen_run "$r" 1 proxy-p16 "$s" --mode echo --conns 64 --size 64 --depth 16
        fi
        stop_server
      done
      stop_upstream
    fi
  fi
  if want redis-pool && [ $have_resty_redis = 1 ]; then
    if SERVER_PIN="taskset -c 1" launch_redis; then
      UPID=$SPID; UPORT=$PORT; SPID=""
      if [ "$(redis-cli -h 127.0.0.1 -p "$UPORT" set bench:pool 42 2>&1)" = OK ]; then
        for s in $(rotate "$r" pool connect); do
          launch "redis-$s" lua5.4 bench/ml_server.lua bench.redis_pool_handler 1 "$DISPATCH" \
            "redis_port=$UPORT" "mode=$s" || continue
          if proxy_check redis-pool "$s"; then
            loadgen_run "$r" 1 redis-pool "$s" --mode echo --conns 64 --size 64 --depth 1
          fi
          stop_server
        done
      else
        echo "bench: redis-pool: SET bench:pool with redis-cli failed: skipped" >&2
      fi
      stop_upstream
    fi
  fi
  if want proxy-ir && [ $have_valgrind = 1 ] && [ -n "$(proxy_servers)" ]; then
    if start_upstream; then
      for s in $(rotate "$r" $(proxy_servers)); do
        rm -f "$TMP/callgrind.out" "$TMP/callgrind.out".*
        PEER_WRAP="valgrind --tool=callgrind --callgrind-out-file=$TMP/callgrind.out" \
          NGINX_SINGLE=single LAUNCH_TRIES=1200 start_proxy "$s" || continue
        if proxy_check proxy-ir "$s"; then ir_count "$r" proxy-ir "$s"; else stop_server; fi
      done
      stop_upstream
    fi
  fi
  if want tls-bulk && [ $have_tls = 1 ]; then
    if start_upstream; then
      for s in $(rotate "$r" $(tls_bulk_servers)); do
        start_tls "$s" 1 echo || continue
        if tls_check tls-bulk "$s" --mode bulk --conns 1 --bytes 1048576; then
          tls_run "$r" 1 tls-bulk "$s" --mode bulk --conns 1 --bytes "$TLS_BULK"
        fi
        stop_server
      done
      stop_upstream
    fi
  fi
  if want tls-ir && [ $have_tls = 1 ] && [ $have_valgrind = 1 ]; then
    for s in $(rotate "$r" $(tls_servers)); do
      rm -f "$TMP/callgrind.out" "$TMP/callgrind.out".*
      PEER_WRAP="valgrind --tool=callgrind --callgrind-out-file=$TMP/callgrind.out" \
        NGINX_SINGLE=single LAUNCH_TRIES=1200 start_tls "$s" 1 hello || continue
      if tls_check tls-ir "$s" --mode http --conns 2; then tls_ir_count "$r" "$s"; else stop_server; fi
    done
  fi
done
echo "bench: measured in $(( $(date +%s) - start_time )) s"
echo "loadavg_after=$(cut -d' ' -f1-3 /proc/loadavg)" >> "$RES/meta.txt"
echo "elapsed_s=$(( $(date +%s) - start_time ))" >> "$RES/meta.txt"

lua5.4 bench/report.lua
