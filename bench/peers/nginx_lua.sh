#!/bin/sh
# bench/peers/nginx_lua.sh: writes an nginx + Lua (lua-nginx-module) config
# for the HTTP hello scenario of `make bench` into DIR, then runs nginx in the
# foreground (exec: the PID that started this script is nginx's master).
#   sh bench/peers/nginx_lua.sh DIR PORT WORKERS [single]
# Listens on 127.0.0.1:PORT only; the answer is the body of
# examples/http_hello.lua, written by content_by_lua_block. Everything nginx
# writes (pid, logs, temp files) stays in DIR. SIGTERM to the PID stops it.
# With "single", master_process off (one process, for the bench's callgrind
# count); PEER_WRAP, when set, is put before the command. With TLS_CERT and
# TLS_KEY set (PEM files), `listen ... ssl` with the TLS scenarios' settings
# (bench/peers/nginx_tls.sh).
set -eu
dir=$1 port=$2 workers=$3 master=on
[ "${4:-}" = single ] && master=off
mkdir -p "$dir/logs" "$dir/tmp"
. "$(dirname "$0")/nginx_tls.sh"
cat > "$dir/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
daemon off;
master_process $master;
worker_processes $workers;
worker_rlimit_nofile 20000;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
user root;
events {
  worker_connections 20000;
  multi_accept on;
}
http {
  access_log off;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {
    $listen
    $tls
    location / {
      default_type text/plain;
      content_by_lua_block {
        ngx.header["Content-Length"] = 14
        ngx.print("Hello, world!\n")
      }
    }
  }
}
CONF
exec ${PEER_WRAP:-} nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log"
