# bench/peers/nginx_tls.sh: sourced by nginx_lua.sh and nginx_stream.sh (not
# run on its own). Sets $listen, the listen directive for 127.0.0.1:$port,
# and $tls, the server block's TLS settings: empty unless TLS_CERT and
# TLS_KEY (PEM files) are set, when `listen ... ssl` with the TLS scenarios'
# settings: TLS 1.3 only, the one suite TLS_CIPHERSUITES (default
# TLS_AES_128_GCM_SHA256), X25519, and no session resumption: no tickets
# (ssl_session_tickets off alone still sends TLS 1.3 stateful tickets, two
# per connection; NumTickets 0 sends none, as multiloop's session_tickets =
# false) and no session cache, so every handshake is a full one. With
# TLS_TICKETS=on, stateless session tickets (two per connection, OpenSSL's
# default, as multiloop's session_tickets = true) and still no cache.
listen="listen 127.0.0.1:$port;"
tls=""
if [ -n "${TLS_CERT:-}" ]; then
  listen="listen 127.0.0.1:$port ssl;"
  tls="ssl_certificate $TLS_CERT;
    ssl_certificate_key $TLS_KEY;
    ssl_protocols TLSv1.3;
    ssl_conf_command Ciphersuites ${TLS_CIPHERSUITES:-TLS_AES_128_GCM_SHA256};
    ssl_ecdh_curve X25519;
    ssl_session_tickets ${TLS_TICKETS:-off};
    ssl_session_cache off;"
  [ "${TLS_TICKETS:-off}" = on ] || tls="$tls
    ssl_conf_command NumTickets 0;"
fi
