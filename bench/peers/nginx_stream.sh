#!/bin/sh
# bench/peers/nginx_stream.sh: writes an nginx stream (TCP proxy) config for
# the proxy scenario of `make bench` into DIR, then runs nginx in the
# foreground (exec: the PID that started this script is nginx's master).
#   sh bench/peers/nginx_stream.sh DIR PORT UPSTREAM_PORT [single]
# One worker, `proxy_pass` from 127.0.0.1:PORT to 127.0.0.1:UPSTREAM_PORT
# (Debian's libnginx-mod-stream, loaded with load_module). With "single",
# master_process off: one process doing the work, for the bench's callgrind
# count; PEER_WRAP, when set, is put before the command. Everything nginx
# writes (pid, logs) stays in DIR. SIGTERM to the PID stops it. With TLS_CERT
# and TLS_KEY set (PEM files), `listen ... ssl` (TLS terminated, plaintext to
# the upstream) with the TLS scenarios' settings (bench/peers/nginx_tls.sh).
set -eu
dir=$1 port=$2 upstream=$3 master=on
[ "${4:-}" = single ] && master=off
mkdir -p "$dir/logs"
. "$(dirname "$0")/nginx_tls.sh"
cat > "$dir/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
master_process $master;
worker_processes 1;
worker_rlimit_nofile 20000;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
user root;
events {
  worker_connections 20000;
  multi_accept on;
}
stream {
  upstream echo {
    server 127.0.0.1:$upstream;
  }
  server {
    $listen
    $tls
    proxy_pass echo;
  }
}
CONF
exec ${PEER_WRAP:-} nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log"
