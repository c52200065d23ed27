#!/usr/bin/env bash
# bench/kv_vs_redis.sh: examples/kv.lua against redis-server, by hand (not in
# `make bench` yet). One worker pinned to CPU 0 (taskset), redis-server pinned
# the same way in its turn, redis-benchmark on CPU 1:
#   redis-benchmark -h 127.0.0.1 -p P -t set|get -n N -P 16|1 -c 50
# The figure is requests per server CPU-second: N over the server's utime +
# stime (/proc/PID/stat, the whole process) across the run. Prints each
# run, then the medians and their ratio to redis-server's.
#   bench/kv_vs_redis.sh            (after make; REPEATS=3, N16=500000, N1=150000)
#   KV_OLD=main bench/kv_vs_redis.sh   adds examples/kv.lua as it is at that rev
# Every process it starts is stopped by its PID.
set -u
cd "$(dirname "$0")/.."
REPEATS=${REPEATS:-3}; N16=${N16:-500000}; N1=${N1:-150000}
HZ=$(getconf CLK_TCK)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export LUA_PATH="$TMP/?.lua;./lua/?.lua;./lua/?/init.lua;./?.lua;;"
export LUA_CPATH="./build/?.so;;"
for p in redis-server redis-benchmark redis-cli taskset; do
  command -v $p > /dev/null || { echo "kv_vs_redis: $p is not installed" >&2; exit 2; }
done
kinds="kv redis"
if [ -n "${KV_OLD:-}" ]; then
  mkdir -p "$TMP/old" && git show "$KV_OLD:examples/kv.lua" > "$TMP/old/kv.lua" || exit 2
  kinds="old $kinds"
fi
cat > "$TMP/server.lua" <<'EOF'
local multiloop = require("multiloop")
local server = multiloop.server{ host = "127.0.0.1", port = 0, workers = 1, handler = arg[1],
  config = { capacity = 64 * 1024 * 1024 } }
server:start()
local _, port = server:address()
print(port)
io.stdout:flush()
server:run()
EOF

# run KIND P: one line per test, "KIND TEST P requests_per_cpu_second"
run() {
  local kind=$1 P=$2 N pid port out=$TMP/port
  N=$([ "$P" = 16 ] && echo "$N16" || echo "$N1")
  : > "$out"
  if [ "$kind" = redis ]; then
    while :; do port=$((20000 + RANDOM % 20000)); ss -ltn | grep -q ":$port " || break; done
    taskset -c 0 redis-server --port $port --bind 127.0.0.1 --save '' --appendonly no \
      --logfile /dev/null & pid=$!
  else
    local h=examples.kv; [ "$kind" = old ] && h=old.kv
    taskset -c 0 lua5.4 "$TMP/server.lua" $h > "$out" & pid=$!
    for _ in $(seq 100); do [ -s "$out" ] && break; sleep 0.1; done
    port=$(head -1 "$out")
  fi
  for _ in $(seq 100); do redis-cli -p "$port" ping > /dev/null 2>&1 && break; sleep 0.1; done
  if ! kill -0 $pid 2> /dev/null; then echo "kv_vs_redis: $kind did not start" >&2; return; fi
  for t in set get; do
    local a b
    a=$(awk '{print $14 + $15}' /proc/$pid/stat)
    timeout 300 taskset -c 1 redis-benchmark -h 127.0.0.1 -p "$port" -t $t -n "$N" -P "$P" \
      -c 50 -q > /dev/null 2>&1
    b=$(awk '{print $14 + $15}' /proc/$pid/stat)
    echo "$kind $t $P $(( N * HZ / (b - a > 0 ? b - a : 1) ))"
  done
  kill $pid; wait $pid 2> /dev/null
}

echo "# $(date -u '+%F %T') UTC, load $(cut -d' ' -f1-3 /proc/loadavg)"
for _ in $(seq "$REPEATS"); do
  for kind in $kinds; do run $kind 16; run $kind 1; done
done | tee "$TMP/runs"
echo "# medians (requests per server CPU-second) and ratio to redis-server"
for P in 16 1; do for t in set get; do
  for kind in $kinds; do
    printf '%s %s -P %s: ' "$kind" "$t" "$P"
    awk -v k=$kind -v t=$t -v p=$P '$1 == k && $2 == t && $3 == p { print $4 }' "$TMP/runs" \
      | sort -n | awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : 0) }'
  done
done; done | tee "$TMP/medians" | awk '
  { split($0, a, ": "); key = a[1]; sub(/^[a-z]+ /, "", key); m[$1 " " key] = a[2]; order[NR] = $0 }
  END { for (i = 1; i <= NR; i++) { split(order[i], a, ": "); split(a[1], f, " ")
    r = m["redis " f[2] " " f[3] " " f[4]]; printf "%-18s %8d  %.2fx\n", a[1], a[2], r ? a[2] / r : 0 } }'
