#!/bin/sh
# bench/peers/haproxy_tcp.sh: writes an HAProxy config for the proxy scenario
# of `make bench` into DIR, then runs HAProxy in the foreground (exec: the
# PID that started this script is HAProxy's only process).
#   sh bench/peers/haproxy_tcp.sh DIR PORT UPSTREAM_PORT
# TCP mode, one thread (nbthread 1), listening on 127.0.0.1:PORT only and
# forwarding every connection to 127.0.0.1:UPSTREAM_PORT; no logs, no
# stats, no health checks, splicing off (HAProxy's default). PEER_WRAP, when
# set, is put before the command (the bench's callgrind count). Everything
# HAProxy writes stays in DIR. SIGTERM to the PID stops it.
set -eu
dir=$1 port=$2 upstream=$3
# HAProxy wants two fds per connection and refuses to start beyond the fd
# limit (bench/run.sh sets it from BENCH_IDLE_CONNS): maxconn fits in it.
limit=$(ulimit -n)
maxconn=4096
[ "$limit" != unlimited ] && [ $(( (limit - 100) / 2 )) -lt $maxconn ] && maxconn=$(( (limit - 100) / 2 ))
mkdir -p "$dir"
cat > "$dir/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn $maxconn
  pidfile $dir/haproxy.pid
defaults
  mode tcp
  timeout connect 5s
  timeout client 300s
  timeout server 300s
frontend bench
  bind 127.0.0.1:$port
  default_backend upstream
backend upstream
  server echo 127.0.0.1:$upstream
CONF
exec ${PEER_WRAP:-} haproxy -db -f "$dir/haproxy.cfg"
