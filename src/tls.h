/*
 * tls.h: TLS on OpenSSL 3 (tls.c), a transport of the stream core.
 * Contexts are made on the main thread; everything else runs on a worker.
 */
#ifndef MULTILOOP_TLS_H
#define MULTILOOP_TLS_H

#include "stream.h"

/* Main thread: cfg->tls from opts.tls and cfg->tls_client from opts.tls_ca
 * (opts: the table at `opts`); raises naming the option and OpenSSL's
 * reason. multiloop_tls_free frees both (what was made before a raise too). */
void multiloop_tls_configure(lua_State *L, int opts, multiloop_config_t *cfg);
void multiloop_tls_free(multiloop_config_t *cfg);

/* A worker: an accepted stream of a tls server gets the TLS transport (none
 * with tls.starttls: conn:sslhandshake() does it). `data`: ciphertext that
 * already came (after a PROXY header), NULL for none. 0 or UV_ENOMEM. */
int multiloop_tls_accept(multiloop_stream_t *s, const char *data, size_t len);
/* Whether an accepted connection's bytes are TLS from the start: tls,
 * without starttls. */
int multiloop_tls_at_accept(const multiloop_config_t *cfg);
/* conn:tls() and conn:sslhandshake(...). */
int multiloop_tls_info(lua_State *L);
int multiloop_tls_sslhandshake(lua_State *L);
/* The worker's TLS part: its idle handle closed as the worker closes, and
 * freed once its loop has ended. */
void multiloop_tls_worker_close(multiloop_worker_t *w);
void multiloop_tls_worker_free(multiloop_worker_t *w);

#endif
