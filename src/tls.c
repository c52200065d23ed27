/*
 * tls.c: TLS on OpenSSL 3, as a transport of the stream core (stream.h).
 *
 * Three parts:
 *   - contexts, made on the main thread when a server is created (the `tls`
 *     option: one SSL_CTX, one more per SNI name) and shared read-only by
 *     every worker, so session tickets made by one worker resume on any;
 *     the client context for sslhandshake, made on first use under a lock;
 *   - the transport: one SSL per connection over a BIO of ours that reads
 *     the ciphertext straight from the worker's read buffer and writes into
 *     one per-worker output buffer, which goes to the socket at once
 *     (uv_try_write) and only the rest is copied into a queued write. What
 *     the socket does not take stays plaintext, the owner's, and is
 *     encrypted as the queue drains (TLS_QUEUE_AHEAD), so a big send is
 *     never copied whole. Above it the stream sees plaintext: both handler
 *     styles, pipes and pools work unchanged;
 *   - the Lua side: conn:tls() and conn:sslhandshake() (outbound, and
 *     STARTTLS on an accepted connection of a server with tls.starttls).
 *
 * The handshake runs by itself: the transport reads from the socket until it
 * is done whatever its owner asked, and holds the owner's writes (counted in
 * the stream's `held`, so backpressure and close-after-flush see them) until
 * then. After it, the socket is read only while the owner reads; ciphertext
 * read while the owner paused is kept (the stash) and, with what OpenSSL
 * holds decrypted, handed on from an idle callback once the owner reads
 * again: never from inside the owner's own call.
 *
 * A failed or timed-out handshake, a bad record or a fatal alert closes that
 * connection (reason "tls", or "timeout" for handshake_timeout) and counts
 * in the worker's tls_errors. Renegotiation is off; SSL_MODE_RELEASE_BUFFERS
 * is on, so an idle connection holds no record buffers.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "conn.h"
#include "tls.h"

/* gcc 12's -fanalyzer loses memory stored through a pointer it reached by a
 * cast (the worker from loop->data, the state from the stream's ext block,
 * a write request handed to uv_write) and reports it leaked, as in stream.c
 * and serve.c; here every allocation takes that path. ASan's and valgrind's
 * leak checks run the TLS specs instead. */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#pragma GCC diagnostic ignored "-Wanalyzer-malloc-leak"
#endif

/* Plaintext handed to the owner at once, at most (several records). */
#define TLS_PLAIN_SIZE (64 * 1024)
/* Plaintext encrypted in one go by a write: a queued write's ciphertext
 * then stays near this size. */
#define TLS_WRITE_CHUNK (64 * 1024)
/* The owner's writes are encrypted as the socket takes them: more only
 * while less than this is queued, so a 64 MiB send is not copied whole as
 * ciphertext (its plaintext is the owner's until `written`). */
#define TLS_QUEUE_AHEAD (2 * TLS_WRITE_CHUNK)
/* The output buffer kept between uses, at most. */
#define TLS_OUT_KEEP (160 * 1024)
/* What the transport's reading made (handshake flights, alerts, KeyUpdate
 * answers) queued for a peer that does not read, at most: then the socket
 * is not read until it drains. Without it a KeyUpdate storm from a client
 * that never reads grows the queue as fast as the client sends. */
#define TLS_OWN_MAX (64 * 1024)
#define SESSION_MT "multiloop.ssl_session"

/* --- contexts (main thread) ------------------------------------------------ */

typedef struct {
  char *name;
  SSL_CTX *ctx;
} sni_entry_t;

struct multiloop_tls_s {
  SSL_CTX *ctx;                        /* the default certificate */
  sni_entry_t *sni;
  int nsni;
  unsigned char *alpn;                 /* wire format: length-prefixed names */
  unsigned alpn_len;
  uint64_t handshake_timeout;          /* ms, 0: none */
  int starttls;                        /* connections start plain: conn:sslhandshake() */
};

struct multiloop_tls_client_s {
  uv_mutex_t lock;
  SSL_CTX *ctx;                        /* made on first use, under lock */
  char *ca;                            /* tls_ca, or NULL: the system store */
  char error[200];                     /* why ctx could not be made */
};

/* Empties the thread's error queue before an SSL call, so SSL_get_error
 * sees only that call's: only when it holds something, as OpenSSL 3.0's
 * ERR_clear_error clears all 16 slots every time (840 Ir, twice a request:
 * 4.8% of a keep-alive TLS request, bench/notes.md). */
static inline void clear_errors(void) {
  if (ERR_peek_error() != 0) ERR_clear_error();
}

/* OpenSSL's reason for the first error queued (the cause; later ones say
 * where it surfaced: "PEM lib"), with the queue emptied. */
static const char *ssl_reason(char *buf, size_t len) {
  unsigned long e, last = ERR_get_error();
  while ((e = ERR_get_error()) != 0) {}
  if (last == 0) snprintf(buf, len, "unknown error");
  else if (ERR_reason_error_string(last)) snprintf(buf, len, "%s", ERR_reason_error_string(last));
  else ERR_error_string_n(last, buf, len);
  return buf;
}

static int alpn_select_cb(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                          const unsigned char *in, unsigned int inlen, void *arg) {
  const multiloop_tls_t *t = arg;
  unsigned char *o;
  (void)ssl;
  /* The server's order wins: the first of ours the client offers. */
  if (SSL_select_next_proto(&o, outlen, t->alpn, t->alpn_len, in, inlen) != OPENSSL_NPN_NEGOTIATED)
    return SSL_TLSEXT_ERR_NOACK;         /* no common protocol: go on without one (as nginx) */
  *out = o;
  return SSL_TLSEXT_ERR_OK;
}

static int sni_cb(SSL *ssl, int *alert, void *arg) {
  const multiloop_tls_t *t = arg;
  const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
  int i;
  (void)alert;
  if (name == NULL) return SSL_TLSEXT_ERR_NOACK;
  for (i = 0; i < t->nsni; i++)
    if (strcasecmp(name, t->sni[i].name) == 0) {
      SSL_set_SSL_CTX(ssl, t->sni[i].ctx);
      return SSL_TLSEXT_ERR_OK;
    }
  return SSL_TLSEXT_ERR_NOACK;           /* the default certificate */
}

/* t[key] as a string or NULL when absent; raises naming `opt` otherwise. */
static const char *opt_string(lua_State *L, int idx, const char *key, const char *opt) {
  const char *v = NULL;
  int type = lua_getfield(L, idx, key);
  if (type == LUA_TSTRING) v = lua_tostring(L, -1);
  else if (type != LUA_TNIL)
    luaL_error(L, "option '%s' must be a string (got %s)", opt, luaL_typename(L, -1));
  lua_pop(L, 1);                         /* the string stays in the table */
  return v;
}

static int readable(lua_State *L, const char *opt, const char *path) {
  if (access(path, R_OK) != 0)
    return luaL_error(L, "option '%s': cannot read '%s': %s", opt, path, strerror(errno));
  return 1;
}

/* A server context with cert/key loaded; raises naming the options (`pre`:
 * "tls" or "tls.sni['name']"). ctxp is where the context is kept as soon
 * as it exists, so that the caller's __gc frees it if this raises. */
static void load_pair(lua_State *L, int idx, const char *pre, SSL_CTX **ctxp) {
  char opt[300], reason[160];
  const char *cert, *key;
  SSL_CTX *ctx;
  snprintf(opt, sizeof opt, "%s.cert", pre);
  if ((cert = opt_string(L, idx, "cert", opt)) == NULL)
    luaL_error(L, "option '%s' is required (a PEM certificate file)", opt);
  readable(L, opt, cert);
  snprintf(opt, sizeof opt, "%s.key", pre);
  if ((key = opt_string(L, idx, "key", opt)) == NULL)
    luaL_error(L, "option '%s' is required (a PEM private key file)", opt);
  readable(L, opt, key);
  clear_errors();
  if ((ctx = *ctxp = SSL_CTX_new(TLS_server_method())) == NULL)
    luaL_error(L, "option '%s': %s", pre, ssl_reason(reason, sizeof reason));
  if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
    snprintf(opt, sizeof opt, "%s.cert", pre);
    luaL_error(L, "option '%s': cannot load '%s': %s", opt, cert, ssl_reason(reason, sizeof reason));
  }
  if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
    ssl_reason(reason, sizeof reason);
    if (strcmp(reason, "key values mismatch") == 0)   /* OpenSSL checks the pair here */
      luaL_error(L, "option '%s': '%s' does not match the certificate in '%s.cert' (%s)", opt, key,
                 pre, reason);
    luaL_error(L, "option '%s': cannot load '%s': %s", opt, key, reason);
  }
  if (SSL_CTX_check_private_key(ctx) != 1)
    luaL_error(L, "option '%s': '%s' does not match the certificate in '%s.cert' (%s)", opt, key,
               pre, ssl_reason(reason, sizeof reason));
}

/* What every server context shares: versions, options, ciphers, ALPN, SNI. */
static void configure(lua_State *L, int idx, multiloop_tls_t *t, SSL_CTX *ctx, int min_version,
                      int tickets) {
  char reason[160];
  const char *v;
  SSL_CTX_set_min_proto_version(ctx, min_version);
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE |
                               SSL_OP_NO_COMPRESSION | SSL_OP_IGNORE_UNEXPECTED_EOF |
                               (tickets ? 0 : SSL_OP_NO_TICKET));
  SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
  /* Without tickets, TLS 1.3 would still send two stateful ones and keep
   * every session in the cache the workers share, under its lock (150k Ir a
   * handshake, 1 KiB a connection: bench/notes.md): none at all. */
  if (!tickets) SSL_CTX_set_num_tickets(ctx, 0);
  SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"multiloop", 9);
  clear_errors();
  if ((v = opt_string(L, idx, "ciphers", "tls.ciphers")) && SSL_CTX_set_cipher_list(ctx, v) != 1)
    luaL_error(L, "option 'tls.ciphers': '%s': %s", v, ssl_reason(reason, sizeof reason));
  if ((v = opt_string(L, idx, "ciphersuites", "tls.ciphersuites")) &&
      SSL_CTX_set_ciphersuites(ctx, v) != 1)
    luaL_error(L, "option 'tls.ciphersuites': '%s': %s", v, ssl_reason(reason, sizeof reason));
  if ((v = opt_string(L, idx, "ca", "tls.ca"))) {
    int vc;
    readable(L, "tls.ca", v);
    if (SSL_CTX_load_verify_locations(ctx, v, NULL) != 1)
      luaL_error(L, "option 'tls.ca': cannot load '%s': %s", v, ssl_reason(reason, sizeof reason));
    SSL_CTX_set_client_CA_list(ctx, SSL_load_client_CA_file(v));
    lua_getfield(L, idx, "verify_client");
    vc = lua_type(L, -1) == LUA_TSTRING ? 2 : lua_toboolean(L, -1);   /* "optional": 2 */
    lua_pop(L, 1);
    if (vc) SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | (vc == 1 ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
                               NULL);
  }
  if (t->alpn) SSL_CTX_set_alpn_select_cb(ctx, alpn_select_cb, t);
}

static void tls_free(multiloop_tls_t *t) {
  int i;
  if (t == NULL) return;
  SSL_CTX_free(t->ctx);
  for (i = 0; i < t->nsni; i++) {
    SSL_CTX_free(t->sni[i].ctx);
    free(t->sni[i].name);
  }
  free(t->sni);
  free(t->alpn);
  free(t);
}

void multiloop_tls_free(multiloop_config_t *cfg) {
  tls_free(cfg->tls);
  cfg->tls = NULL;
  if (cfg->tls_client) {
    uv_mutex_destroy(&cfg->tls_client->lock);
    SSL_CTX_free(cfg->tls_client->ctx);
    free(cfg->tls_client->ca);
    free(cfg->tls_client);
    cfg->tls_client = NULL;
  }
}

static const char *const version_names[] = { "TLSv1.2", "TLSv1.3", NULL };
static const int version_codes[] = { TLS1_2_VERSION, TLS1_3_VERSION };

static void known_keys(lua_State *L, int idx, const char *const keys[], const char *pre) {
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int i, ok = 0;
    lua_pop(L, 1);
    if (lua_type(L, -1) == LUA_TSTRING)
      for (i = 0; keys[i]; i++) ok = ok || strcmp(lua_tostring(L, -1), keys[i]) == 0;
    if (!ok) luaL_error(L, "option '%s' has an unknown field '%s'", pre, luaL_tolstring(L, -1, NULL));
  }
}

/* cfg->tls from opts.tls (the table at idx), and cfg->tls_client from
 * opts.tls_ca. Raises naming the option and OpenSSL's reason; what was made
 * so far is in cfg, freed by multiloop_tls_free. */
void multiloop_tls_configure(lua_State *L, int opts, multiloop_config_t *cfg) {
  static const char *const keys[] = { "cert", "key", "ca", "verify_client", "alpn", "sni",
                                      "min_version", "ciphers", "ciphersuites",
                                      "session_tickets", "handshake_timeout", "starttls", NULL };
  static const char *const sni_keys[] = { "cert", "key", NULL };
  multiloop_tls_t *t;
  int idx, min_version = TLS1_2_VERSION, tickets = 1, i;
  const char *ca;

  if ((cfg->tls_client = calloc(1, sizeof *cfg->tls_client)) == NULL)
    luaL_error(L, "not enough memory");
  uv_mutex_init(&cfg->tls_client->lock);
  lua_getfield(L, opts, "tls_ca");
  if (lua_type(L, -1) == LUA_TSTRING) {
    ca = lua_tostring(L, -1);
    readable(L, "tls_ca", ca);
    if ((cfg->tls_client->ca = strdup(ca)) == NULL) luaL_error(L, "not enough memory");
  } else if (!lua_isnil(L, -1)) {
    luaL_error(L, "option 'tls_ca' must be a string (a PEM file of CA certificates)");
  }
  lua_pop(L, 1);

  if (lua_getfield(L, opts, "tls") == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  if (!lua_istable(L, -1))
    luaL_error(L, "option 'tls' must be a table (got %s)", luaL_typename(L, -1));
  idx = lua_gettop(L);
  known_keys(L, idx, keys, "tls");
  if ((t = cfg->tls = calloc(1, sizeof *t)) == NULL) luaL_error(L, "not enough memory");
  t->handshake_timeout = 10000;

  if (lua_getfield(L, idx, "min_version") != LUA_TNIL) {
    const char *v = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
    for (i = 0; v && version_names[i] && strcmp(v, version_names[i]) != 0; i++) {}
    if (v == NULL || version_names[i] == NULL)
      luaL_error(L, "option 'tls.min_version' must be 'TLSv1.2' or 'TLSv1.3' (got %s)",
                 luaL_tolstring(L, -1, NULL));
    min_version = version_codes[i];
  }
  lua_pop(L, 1);
  if (lua_getfield(L, idx, "session_tickets") != LUA_TNIL) {
    if (!lua_isboolean(L, -1)) luaL_error(L, "option 'tls.session_tickets' must be a boolean");
    tickets = lua_toboolean(L, -1);
  }
  lua_pop(L, 1);
  if (lua_getfield(L, idx, "verify_client") != LUA_TNIL) {
    if (!lua_isboolean(L, -1) &&
        !(lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), "optional") == 0))
      luaL_error(L, "option 'tls.verify_client' must be a boolean or 'optional'");
    if (lua_toboolean(L, -1) && lua_getfield(L, idx, "ca") == LUA_TNIL)
      luaL_error(L, "option 'tls.verify_client' needs 'tls.ca' (the CA file to verify with)");
  }
  lua_settop(L, idx);
  if (lua_getfield(L, idx, "starttls") != LUA_TNIL) {
    if (!lua_isboolean(L, -1)) luaL_error(L, "option 'tls.starttls' must be a boolean");
    t->starttls = lua_toboolean(L, -1);
  }
  lua_pop(L, 1);
  if (lua_getfield(L, idx, "handshake_timeout") != LUA_TNIL) {
    int isint = 0;                     /* a number only: lua_tointegerx takes "200" too */
    lua_Integer ms = lua_type(L, -1) == LUA_TNUMBER ? lua_tointegerx(L, -1, &isint) : 0;
    if (!isint || ms < 0 || ms > 0x7fffffff)
      luaL_error(L, "option 'tls.handshake_timeout' must be an integer from 0 to %d (got %s)",
                 0x7fffffff, luaL_tolstring(L, -1, NULL));
    t->handshake_timeout = (uint64_t)ms;
  }
  lua_pop(L, 1);
  if (lua_getfield(L, idx, "alpn") != LUA_TNIL) {
    size_t n = lua_istable(L, -1) ? lua_rawlen(L, -1) : 0, total = 0, len;
    if (n == 0) luaL_error(L, "option 'tls.alpn' must be a non-empty list of protocol names");
    for (i = 1; i <= (int)n; i++) {
      if (lua_rawgeti(L, -1, i) != LUA_TSTRING || (len = lua_rawlen(L, -1)) == 0 || len > 255)
        luaL_error(L, "option 'tls.alpn' item %d must be a string of 1 to 255 bytes", i);
      total += 1 + len;
      lua_pop(L, 1);
    }
    if (total > 0xffff) luaL_error(L, "option 'tls.alpn' is too long (%d bytes)", (int)total);
    if ((t->alpn = malloc(total)) == NULL) luaL_error(L, "not enough memory");
    for (i = 1; i <= (int)n; i++) {
      const char *p = (lua_rawgeti(L, -1, i), lua_tolstring(L, -1, &len));
      t->alpn[t->alpn_len] = (unsigned char)len;
      memcpy(t->alpn + t->alpn_len + 1, p, len);
      t->alpn_len += (unsigned)(1 + len);
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);

  load_pair(L, idx, "tls", &t->ctx);
  configure(L, idx, t, t->ctx, min_version, tickets);

  if (lua_getfield(L, idx, "sni") != LUA_TNIL) {
    int sni = lua_gettop(L), n = 0;
    if (!lua_istable(L, sni)) luaL_error(L, "option 'tls.sni' must be a table of name = { cert, key }");
    lua_pushnil(L);
    while (lua_next(L, sni)) {
      n++;
      lua_pop(L, 1);
    }
    if ((t->sni = calloc((size_t)n + 1, sizeof *t->sni)) == NULL) luaL_error(L, "not enough memory");
    lua_pushnil(L);
    while (lua_next(L, sni)) {
      char pre[300];
      sni_entry_t *e = &t->sni[t->nsni];
      if (lua_type(L, -2) != LUA_TSTRING || lua_rawlen(L, -2) == 0 || lua_rawlen(L, -2) > 253)
        luaL_error(L, "option 'tls.sni' keys must be host names of 1 to 253 bytes");
      snprintf(pre, sizeof pre, "tls.sni['%s']", lua_tostring(L, -2));
      if (!lua_istable(L, -1)) luaL_error(L, "option '%s' must be a table { cert, key }", pre);
      known_keys(L, lua_gettop(L), sni_keys, pre);
      if ((e->name = strdup(lua_tostring(L, -2))) == NULL) luaL_error(L, "not enough memory");
      t->nsni++;
      load_pair(L, lua_gettop(L), pre, &e->ctx);
      configure(L, idx, t, e->ctx, min_version, tickets);
      lua_pop(L, 1);
    }
    SSL_CTX_set_tlsext_servername_callback(t->ctx, sni_cb);
    SSL_CTX_set_tlsext_servername_arg(t->ctx, t);
  }
  lua_settop(L, idx - 1);
}

/* The client context: made on first use by any worker, then shared. */
static int new_session_cb(SSL *ssl, SSL_SESSION *sess);

static SSL_CTX *client_ctx(multiloop_tls_client_t *cl, char *err, size_t errlen) {
  SSL_CTX *ctx;
  uv_mutex_lock(&cl->lock);
  if ((ctx = cl->ctx) == NULL && cl->error[0] == 0) {
    char reason[160];
    clear_errors();
    ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL ||
        (cl->ca ? SSL_CTX_load_verify_locations(ctx, cl->ca, NULL) : SSL_CTX_set_default_verify_paths(ctx)) != 1) {
      snprintf(cl->error, sizeof cl->error, "cannot make the TLS client context: %s",
               ssl_reason(reason, sizeof reason));
      SSL_CTX_free(ctx);
      ctx = NULL;
    } else {
      SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
      SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION |
                                   SSL_OP_IGNORE_UNEXPECTED_EOF);
      SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
      /* TLS 1.3 tickets arrive after the handshake: new_session_cb keeps
       * the latest in the session object sslhandshake returned. */
      SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
      SSL_CTX_sess_set_new_cb(ctx, new_session_cb);
      cl->ctx = ctx;
    }
  }
  if (ctx == NULL) snprintf(err, errlen, "%s", cl->error);
  uv_mutex_unlock(&cl->lock);
  return ctx;
}

/* --- the worker's part ----------------------------------------------------- */

typedef struct tls_conn_s tls_conn_t;

struct multiloop_tls_worker_s {
  uv_idle_t idle;                      /* runs `deferred` */
  tls_conn_t *deferred;                /* connections with input to hand on */
  char *out;                           /* ciphertext not yet sent, of out_owner */
  size_t out_len, out_cap;
  tls_conn_t *out_owner;
  char plain[TLS_PLAIN_SIZE];
};

/* A session for sslhandshake's caller: shared by the Lua object and the
 * connection that may still get a newer ticket for it. */
typedef struct {
  int refs;
  SSL_SESSION *sess;
} session_box_t;

/* A thread waiting in conn:sslhandshake. */
typedef struct {
  multiloop_thread_t *t;
  tls_conn_t *tc;                      /* NULL once the handshake ended */
  int ok;
  int want_session;
  session_box_t *box;                  /* on success with want_session */
  char err[200];
} hs_wait_t;

/* A queued write of ciphertext: `owner` (the owner's write, or NULL) is
 * done when it is. */
typedef struct {
  uv_write_t req;
  multiloop_stream_write_t *owner;
  size_t own;                          /* bytes counted in the connection's own_queued */
  char data[];
} tls_wreq_t;

/* An owner's write not yet encrypted whole (the handshake runs, or the
 * queue is over TLS_QUEUE_AHEAD): buf/len is what is left of it. */
typedef struct held_s {
  struct held_s *next;
  multiloop_stream_write_t *wr;
  const char *buf;
  size_t len;
} held_t;

struct tls_conn_s {
  SSL *ssl;
  multiloop_stream_t *s;
  const char *in;                      /* ciphertext the BIO reads from */
  size_t in_len;
  char *stash;                         /* ciphertext read while the owner did not read */
  size_t stash_len, stash_cap;
  size_t own_queued;                   /* queued bytes its reading made (TLS_OWN_MAX) */
  held_t *held, *held_tail;
  multiloop_deadline_t hs_dl;          /* handshake_timeout */
  hs_wait_t *wait;
  session_box_t *box;                  /* the client's session object, for newer tickets */
  tls_conn_t *dnext;                   /* in the worker's deferred list */
  char err[200];                       /* why the handshake failed */
  unsigned handshaken : 1;
  unsigned want_read : 1;              /* the owner reads */
  unsigned uv_reading : 1;
  unsigned want_shutdown : 1;          /* asked before the handshake ended */
  unsigned deferred : 1;
  unsigned eof : 1;                    /* the socket ended: the BIO says so */
  unsigned client : 1;
  unsigned failed : 1;
  unsigned seen : 1;                   /* a byte came: a close before one is no TLS error */
};

static BIO_METHOD *bio_method;
static uv_once_t bio_once = UV_ONCE_INIT;

static tls_conn_t *TC(const multiloop_stream_t *s) { return (tls_conn_t *)s->ext->tp_state; }

static multiloop_tls_worker_t *tls_worker(multiloop_worker_t *w);
/* flush's flags: try the socket first; the bytes are the reading's own. */
enum { FLUSH_TRY = 1, FLUSH_OWN = 2 };
static int flush(tls_conn_t *tc, int flags);
static void idle_cb(uv_idle_t *h);
static void sync_reading(tls_conn_t *tc);
static int drain_held(tls_conn_t *tc);

static int bio_write(BIO *b, const char *data, int len) {
  tls_conn_t *tc = BIO_get_data(b);
  multiloop_tls_worker_t *tw = multiloop_stream_worker(tc->s)->tls;
  BIO_clear_retry_flags(b);
  if (tw->out_len > 0 && tw->out_owner != tc && flush(tw->out_owner, 0) != 0) {
    tw->out_len = 0;                     /* its stream closes; ours goes on */
  }
  if (tw->out_cap - tw->out_len < (size_t)len) {
    size_t cap = tw->out_cap ? tw->out_cap : 16 * 1024;
    char *p;
    while (cap - tw->out_len < (size_t)len) cap *= 2;
    if ((p = realloc(tw->out, cap)) == NULL) return -1;
    tw->out = p;
    tw->out_cap = cap;
  }
  memcpy(tw->out + tw->out_len, data, (size_t)len);
  tw->out_len += (size_t)len;
  tw->out_owner = tc;
  return len;
}

static int bio_read(BIO *b, char *buf, int len) {
  tls_conn_t *tc = BIO_get_data(b);
  size_t n;
  BIO_clear_retry_flags(b);
  if (tc->in_len == 0) {
    if (tc->eof) return 0;
    BIO_set_retry_read(b);
    return -1;
  }
  n = tc->in_len < (size_t)len ? tc->in_len : (size_t)len;
  memcpy(buf, tc->in, n);
  tc->in += n;
  tc->in_len -= n;
  return (int)n;
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr) {
  tls_conn_t *tc = BIO_get_data(b);
  (void)num; (void)ptr;
  if (cmd == BIO_CTRL_FLUSH) return 1;
  if (cmd == BIO_CTRL_EOF) return tc && tc->eof && tc->in_len == 0;   /* the peer's FIN */
  return 0;
}

static int bio_create(BIO *b) {
  BIO_set_init(b, 1);
  return 1;
}

static void make_bio_method(void) {
  bio_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "multiloop");
  if (bio_method == NULL) return;
  BIO_meth_set_write(bio_method, bio_write);
  BIO_meth_set_read(bio_method, bio_read);
  BIO_meth_set_ctrl(bio_method, bio_ctrl);
  BIO_meth_set_create(bio_method, bio_create);
}

/* Made once per process; freed as the module is unloaded (lua_close of the
 * state that loaded it dlcloses it), when no worker runs any more. */
__attribute__((destructor)) static void free_bio_method(void) {
  if (bio_method) BIO_meth_free(bio_method);
  bio_method = NULL;
}

static multiloop_tls_worker_t *tls_worker(multiloop_worker_t *w) {
  if (w->tls == NULL && !w->closing) {
    multiloop_tls_worker_t *tw = calloc(1, sizeof *tw);
    if (tw == NULL) return NULL;
    uv_idle_init(&w->loop, &tw->idle);
    tw->idle.data = w;
    w->tls = tw;
  }
  return w->tls;
}

void multiloop_tls_worker_close(multiloop_worker_t *w) {
  if (w->tls && !uv_is_closing((uv_handle_t *)&w->tls->idle))
    uv_close((uv_handle_t *)&w->tls->idle, NULL);
}

void multiloop_tls_worker_free(multiloop_worker_t *w) {
  if (w->tls == NULL) return;
  free(w->tls->out);
  free(w->tls);
  w->tls = NULL;
  OPENSSL_thread_stop();                 /* this thread's error queue */
}

/* Counted and logged (info, as nginx logs failed handshakes): every
 * stream is a connection's (conn.c), which has the id. */
static void count_error(tls_conn_t *tc) {
  multiloop_worker_t *w = multiloop_stream_worker(tc->s);
  atomic_fetch_add_explicit(&w->tls_errors, 1, memory_order_relaxed);
  multiloop_log(w, MULTILOOP_LOG_INFO, ((multiloop_conn_t *)tc->s)->id, "TLS: %s",
                tc->err[0] ? tc->err : "error");
}

/* --- writing ciphertext ---------------------------------------------------- */

static void wreq_cb(uv_write_t *req, int status) {
  tls_wreq_t *r = (tls_wreq_t *)req;
  multiloop_stream_t *s = (multiloop_stream_t *)req->handle;
  multiloop_stream_write_t *owner = r->owner;
  size_t own = r->own;
  int rc;
  free(r);
  if (own > 0) TC(s)->own_queued -= own;   /* the state lives until the close callback */
  multiloop_stream_write_done(s, owner, status);
  if (s->closing) return;
  if (own > 0) sync_reading(TC(s));        /* under TLS_OWN_MAX again? */
  if (TC(s)->held && (rc = drain_held(TC(s))) != 0) multiloop_stream_close(s, rc);
}

/* Queues `len` bytes of ciphertext, a copy, done with `owner`; `own`:
 * counted in own_queued. */
static int queue_bytes(tls_conn_t *tc, const char *p, size_t len, multiloop_stream_write_t *owner,
                       int own) {
  tls_wreq_t *r = malloc(sizeof *r + len);
  uv_buf_t b;
  int rc;
  if (r == NULL) return UV_ENOMEM;
  r->owner = owner;
  r->own = own ? len : 0;
  memcpy(r->data, p, len);
  b = uv_buf_init(r->data, (unsigned)len);
  if ((rc = uv_write(&r->req, &tc->s->h.stream, &b, 1, wreq_cb)) != 0) free(r);
  else tc->own_queued += r->own;
  return rc;
}

/* Sends tc's ciphertext in the output buffer: what the socket takes now
 * (with FLUSH_TRY and nothing queued before it), the rest queued (counted
 * in own_queued with FLUSH_OWN). 0 or a libuv error (the caller closes). */
static int flush(tls_conn_t *tc, int flags) {
  multiloop_tls_worker_t *tw = multiloop_stream_worker(tc->s)->tls;
  size_t off = 0, len;
  int rc = 0;
  if (tw->out_owner != tc || tw->out_len == 0) return 0;
  len = tw->out_len;
  tw->out_len = 0;
  if (tc->s->closing) return 0;
  if ((flags & FLUSH_TRY) && tc->s->h.stream.write_queue_size == 0) {
    uv_buf_t b = uv_buf_init(tw->out, (unsigned)len);
    int n = uv_try_write(&tc->s->h.stream, &b, 1);
    if (n < 0 && n != UV_EAGAIN) rc = n;
    else if (n > 0) off = (size_t)n;
  }
  if (rc == 0 && off < len) rc = queue_bytes(tc, tw->out + off, len - off, NULL, flags & FLUSH_OWN);
  if (tw->out_cap > TLS_OUT_KEEP) {
    free(tw->out);
    tw->out = NULL;
    tw->out_cap = 0;
  }
  return rc;
}

/* The ciphertext of wr's last chunk: what the socket takes now (nothing
 * queued before it), the rest (maybe none) queued with wr, so that wr is
 * done (`written`, from a callback: never from inside the owner's call)
 * once its last byte is out. */
static int flush_write(tls_conn_t *tc, multiloop_stream_write_t *wr) {
  multiloop_tls_worker_t *tw = multiloop_stream_worker(tc->s)->tls;
  size_t len = tw->out_owner == tc ? tw->out_len : 0, off = 0;
  if (len > 0) tw->out_len = 0;
  if (len > 0 && tc->s->h.stream.write_queue_size == 0) {
    uv_buf_t b = uv_buf_init(tw->out, (unsigned)len);
    int n = uv_try_write(&tc->s->h.stream, &b, 1);
    if (n < 0 && n != UV_EAGAIN) return n;
    if (n > 0) off = (size_t)n;
  }
  return queue_bytes(tc, len > off ? tw->out + off : "", len - off, wr, 0);
}

static void shutdown_now(tls_conn_t *tc);

/* Encrypts the held writes, a chunk at a time, while the handshake is
 * done and less than TLS_QUEUE_AHEAD is queued; then a shutdown asked
 * meanwhile. Called again as queued writes finish. 0 or an error (the
 * caller closes; a write not queued yet stays held, for release). */
static int drain_held(tls_conn_t *tc) {
  multiloop_stream_t *s = tc->s;
  held_t *h;
  while ((h = tc->held) != NULL && tc->handshaken && !s->closing &&
         s->h.stream.write_queue_size < TLS_QUEUE_AHEAD) {
    size_t n = h->len < TLS_WRITE_CHUNK ? h->len : TLS_WRITE_CHUNK;
    int rc;
    clear_errors();
    if (n > 0 && SSL_write(tc->ssl, h->buf, (int)n) <= 0) {
      ssl_reason(tc->err, sizeof tc->err);
      return MULTILOOP_REASON_TLS;
    }
    h->buf += n;
    h->len -= n;
    s->ext->held -= n;
    if (h->len > 0) {
      if ((rc = flush(tc, FLUSH_TRY)) != 0) return rc;
      continue;
    }
    if ((rc = flush_write(tc, h->wr)) != 0) return rc;
    if ((tc->held = h->next) == NULL) tc->held_tail = NULL;
    free(h);
  }
  if (tc->held == NULL && tc->want_shutdown && tc->handshaken && !s->closing) {
    tc->want_shutdown = 0;
    shutdown_now(tc);
  }
  return 0;
}

/* --- reading --------------------------------------------------------------- */

static void defer(tls_conn_t *tc) {
  multiloop_tls_worker_t *tw = multiloop_stream_worker(tc->s)->tls;
  if (tc->deferred) return;
  tc->deferred = 1;
  tc->dnext = tw->deferred;
  tw->deferred = tc;
  uv_idle_start(&tw->idle, idle_cb);
}

static void undefer(tls_conn_t *tc) {
  multiloop_tls_worker_t *tw = multiloop_stream_worker(tc->s)->tls;
  tls_conn_t **p;
  if (!tc->deferred) return;
  for (p = &tw->deferred; *p; p = &(*p)->dnext)
    if (*p == tc) {
      *p = tc->dnext;
      break;
    }
  tc->deferred = 0;
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  *buf = uv_buf_init(((multiloop_worker_t *)h->loop->data)->read_buffer, MULTILOOP_READ_BUFFER_SIZE);
}

static void read_cb(uv_stream_t *h, ssize_t nread, const uv_buf_t *buf);

/* The socket is read while the handshake runs, then while the owner reads
 * and nothing is stashed; either way not while what reading made waits
 * for a peer that does not read (TLS_OWN_MAX). */
static void sync_reading(tls_conn_t *tc) {
  multiloop_stream_t *s = tc->s;
  int want = !s->closing && !tc->eof && tc->own_queued <= TLS_OWN_MAX &&
             (!tc->handshaken || (tc->want_read && tc->stash_len == 0));
  if (want && !tc->uv_reading) {
    int rc = uv_read_start(&s->h.stream, alloc_cb, read_cb);
    if (rc != 0) {
      multiloop_stream_close(s, rc);
      return;
    }
    tc->uv_reading = 1;
  } else if (!want && tc->uv_reading) {
    uv_read_stop(&s->h.stream);
    tc->uv_reading = 0;
  }
}

static void fail(tls_conn_t *tc, int reason) {
  if (tc->err[0] == 0) ssl_reason(tc->err, sizeof tc->err);
  if (!tc->failed) count_error(tc);
  tc->failed = 1;
  (void)flush(tc, FLUSH_TRY);            /* the alert, if OpenSSL made one */
  multiloop_stream_close(tc->s, reason);
}

static void handshake_failed(tls_conn_t *tc) {
  long v = tc->client ? SSL_get_verify_result(tc->ssl) : X509_V_OK;
  if (v != X509_V_OK) {
    snprintf(tc->err, sizeof tc->err, "certificate verify failed: %s",
             X509_verify_cert_error_string(v));
    clear_errors();
  } else {
    char reason[160];
    snprintf(tc->err, sizeof tc->err, "handshake failed: %s", ssl_reason(reason, sizeof reason));
  }
  fail(tc, MULTILOOP_REASON_TLS);
}

/* The handshake is done: the owner's held writes go out, a shutdown asked
 * meanwhile follows, a waiting sslhandshake is woken (from the idle
 * callback: not from inside this read). */
static void handshake_done(tls_conn_t *tc) {
  multiloop_stream_t *s = tc->s;
  int rc;
  tc->handshaken = 1;
  multiloop_deadline_remove(&tc->hs_dl);
  atomic_fetch_add_explicit(&multiloop_stream_worker(s)->tls_handshakes, 1, memory_order_relaxed);
  if (flush(tc, FLUSH_TRY | FLUSH_OWN) != 0) {
    multiloop_stream_close(s, UV_EPIPE);
    return;
  }
  if ((rc = drain_held(tc)) != 0) {       /* and the shutdown asked meanwhile */
    multiloop_stream_close(s, rc);
    return;
  }
  if (tc->wait && !s->closing) defer(tc);
}

/* Decrypts what the BIO has and hands it to the owner while it reads. */
static void pump(tls_conn_t *tc) {
  multiloop_stream_t *s = tc->s;
  multiloop_tls_worker_t *tw = multiloop_stream_worker(s)->tls;
  if (!tc->handshaken) {
    int r;
    clear_errors();
    r = SSL_do_handshake(tc->ssl);
    if (r != 1) {
      int e = SSL_get_error(tc->ssl, r);
      if (e == SSL_ERROR_WANT_READ && !tc->eof) {
        if (flush(tc, FLUSH_TRY | FLUSH_OWN) != 0) multiloop_stream_close(s, UV_EPIPE);
        return;
      }
      if (tc->eof && e != SSL_ERROR_SSL) {
        snprintf(tc->err, sizeof tc->err, "handshake failed: the peer closed the connection");
        fail(tc, MULTILOOP_REASON_TLS);
      } else {
        handshake_failed(tc);
      }
      return;
    }
    handshake_done(tc);
    if (s->closing) return;
  }
  while (tc->want_read && !s->closing) {
    uv_buf_t room = multiloop_stream_read_room(s, tw->plain, sizeof tw->plain);
    size_t got = 0;
    int r = 0, e = SSL_ERROR_NONE;
    if (room.len == 0) {
      multiloop_stream_close(s, UV_ENOMEM);
      return;
    }
    clear_errors();
    while (got < room.len) {
      r = SSL_read(tc->ssl, room.base + got, (int)(room.len - got));
      if (r <= 0) {
        e = SSL_get_error(tc->ssl, r);
        break;
      }
      got += (size_t)r;
    }
    if (flush(tc, FLUSH_TRY | FLUSH_OWN) != 0) {   /* what a read may make (a KeyUpdate's answer) */
      multiloop_stream_close(s, UV_EPIPE);
      return;
    }
    if (got > 0) multiloop_stream_received(s, &room, got);
    if (s->closing) return;
    if (r > 0) continue;                 /* the room filled: more may follow */
    if (e == SSL_ERROR_WANT_READ) break;
    if (e == SSL_ERROR_ZERO_RETURN) {    /* close_notify, or the socket's EOF */
      if (tc->want_read) {
        tc->eof = 1;
        sync_reading(tc);
        multiloop_stream_ended(s);
      }
      return;
    }
    fail(tc, MULTILOOP_REASON_TLS);
    return;
  }
}

/* Keeps the ciphertext the BIO did not read (the owner stopped reading). */
static int stash_rest(tls_conn_t *tc) {
  size_t need;
  if (tc->in_len == 0) return 0;
  if (tc->in >= tc->stash && tc->in < tc->stash + tc->stash_cap) {   /* reading the stash */
    memmove(tc->stash, tc->in, tc->in_len);
    tc->stash_len = tc->in_len;
  } else {
    need = tc->stash_len + tc->in_len;
    if (need > tc->stash_cap) {
      char *p = realloc(tc->stash, need);
      if (p == NULL) return UV_ENOMEM;
      tc->stash = p;
      tc->stash_cap = need;
    }
    memcpy(tc->stash + tc->stash_len, tc->in, tc->in_len);
    tc->stash_len = need;
  }
  tc->in_len = 0;
  return 0;
}

/* Decrypts `n` bytes of ciphertext at p (the read buffer, or the stash);
 * what the owner did not take is stashed. */
static void feed(tls_conn_t *tc, const char *p, size_t n) {
  multiloop_stream_t *s = tc->s;
  tc->in = p;
  tc->in_len = n;
  pump(tc);
  if (s->closing) return;
  if (stash_rest(tc) != 0) {
    multiloop_stream_close(s, UV_ENOMEM);
    return;
  }
  sync_reading(tc);
}

static void read_cb(uv_stream_t *h, ssize_t nread, const uv_buf_t *buf) {
  multiloop_stream_t *s = (multiloop_stream_t *)h;
  tls_conn_t *tc = TC(s);
  if (nread > 0) {
    atomic_fetch_add_explicit(&multiloop_stream_worker(s)->bytes_in, (uint64_t)nread,
                              memory_order_relaxed);
    tc->seen = 1;
    if (tc->stash_len > 0) {             /* behind what is kept: keep it too */
      tc->in = buf->base;
      tc->in_len = (size_t)nread;
      if (stash_rest(tc) != 0) multiloop_stream_close(s, UV_ENOMEM);
      else sync_reading(tc);
      return;
    }
    feed(tc, buf->base, (size_t)nread);
  } else if (nread == UV_EOF) {
    tc->eof = 1;
    if (!tc->handshaken && !tc->seen && !tc->client) {
      multiloop_stream_close(s, 0);      /* connected and left (a health check) */
      return;
    }
    if (tc->handshaken && SSL_has_pending(tc->ssl) && SSL_pending(tc->ssl) == 0) {
      snprintf(tc->err, sizeof tc->err, "the peer closed the connection inside a record");
      fail(tc, MULTILOOP_REASON_TLS);    /* a truncated record, not a clean end */
      return;
    }
    if (!tc->handshaken || tc->want_read) feed(tc, NULL, 0);
    else sync_reading(tc);               /* told when the owner reads again */
  } else if (nread < 0) {
    if (tc->handshaken && SSL_has_pending(tc->ssl) && SSL_pending(tc->ssl) == 0) {
      count_error(tc);                   /* reset inside a record */
      tc->failed = 1;
    }
    if (!tc->handshaken) {
      snprintf(tc->err, sizeof tc->err, "handshake failed: %s", uv_strerror((int)nread));
      count_error(tc);
      tc->failed = 1;
    }
    multiloop_stream_close(s, (int)nread);
  }
}

/* The owner reads again: what is stashed, decrypted in OpenSSL, or the EOF
 * not yet told, goes to it from here. Also wakes a waiting sslhandshake,
 * and encrypts writes made since the last turn (tls_write). */
static void run_deferred(tls_conn_t *tc) {
  multiloop_stream_t *s = tc->s;
  int rc;
  if (tc->held && (rc = drain_held(tc)) != 0) {
    multiloop_stream_close(s, rc);
    return;
  }
  if (tc->wait && tc->handshaken) {
    hs_wait_t *wt = tc->wait;
    tc->wait = NULL;
    wt->tc = NULL;
    wt->ok = 1;
    if (wt->want_session) {
      if ((wt->box = calloc(1, sizeof *wt->box)) != NULL) {
        wt->box->refs = 2;               /* the Lua object's, and ours for newer tickets */
        wt->box->sess = SSL_get1_session(tc->ssl);
        tc->box = wt->box;
      }
    }
    multiloop_thread_wake(wt->t, 0, NULL, NULL);   /* k makes the results */
    if (s->closing) return;
  }
  if (!tc->want_read || !tc->handshaken ||
      !(tc->stash_len > 0 || SSL_pending(tc->ssl) > 0 || tc->eof))
    return;                              /* (deferred for a write only) */
  if (tc->stash_len > 0) {
    size_t n = tc->stash_len;
    tc->stash_len = 0;
    feed(tc, tc->stash, n);
  } else {
    feed(tc, NULL, 0);                   /* OpenSSL's decrypted bytes, or the EOF */
  }
}

/* A connection closed meanwhile stays valid until its close callback, a
 * later loop phase: the list taken here can be walked to its end. */
static void idle_cb(uv_idle_t *h) {
  multiloop_worker_t *w = h->data;
  multiloop_tls_worker_t *tw = w->tls;
  tls_conn_t *list = tw->deferred;
  tw->deferred = NULL;
  uv_idle_stop(h);                       /* defer() starts it again */
  while (list) {
    tls_conn_t *tc = list;
    list = tc->dnext;
    if (!tc->deferred) continue;         /* closed meanwhile (undefer) */
    tc->deferred = 0;
    if (!tc->s->closing) run_deferred(tc);
  }
}

/* --- the transport --------------------------------------------------------- */

static int tls_read_start(multiloop_stream_t *s) {
  tls_conn_t *tc = TC(s);
  tc->want_read = 1;
  if (tc->handshaken && (tc->stash_len > 0 || SSL_pending(tc->ssl) > 0 || tc->eof)) defer(tc);
  else sync_reading(tc);
  return 0;
}

static void tls_read_stop(multiloop_stream_t *s) {
  tls_conn_t *tc = TC(s);
  tc->want_read = 0;
  sync_reading(tc);
}

/* Encrypts while the socket takes all of it: the plaintext bytes taken
 * (their ciphertext is out, the last chunk's maybe partly queued), so the
 * rest comes to tls_write and is encrypted as the socket drains. */
static int tls_try_write(multiloop_stream_t *s, const uv_buf_t *bufs, unsigned n) {
  tls_conn_t *tc = TC(s);
  size_t total = 0;
  unsigned i;
  int rc;
  if (!tc->handshaken || tc->held || (SSL_get_shutdown(tc->ssl) & SSL_SENT_SHUTDOWN)) return 0;
  for (i = 0; i < n; i++) {
    size_t off = 0;
    while (off < bufs[i].len) {
      size_t c = bufs[i].len - off < TLS_WRITE_CHUNK ? bufs[i].len - off : TLS_WRITE_CHUNK;
      if (total > (size_t)INT_MAX - c) return (int)total;   /* what the int return can say */
      clear_errors();
      if (SSL_write(tc->ssl, bufs[i].base + off, (int)c) <= 0) {
        ssl_reason(tc->err, sizeof tc->err);
        return MULTILOOP_REASON_TLS;
      }
      off += c;
      total += c;
      if ((rc = flush(tc, FLUSH_TRY)) != 0) return rc;
      if (s->h.stream.write_queue_size > 0) return (int)total;   /* the socket is full */
    }
  }
  return (int)total;
}

/* Held, and encrypted from the idle callback once the handshake is done
 * (never here: a failure then would close the stream inside the owner's
 * call, with wr queued), then as the queue drains. */
static int tls_write(multiloop_stream_t *s, multiloop_stream_write_t *wr, const char *buf,
                     size_t len) {
  tls_conn_t *tc = TC(s);
  held_t *h = malloc(sizeof *h);
  if (h == NULL) return UV_ENOMEM;
  h->next = NULL;
  h->wr = wr;
  h->buf = buf;
  h->len = len;
  if (tc->held_tail) tc->held_tail->next = h;
  else tc->held = h;
  tc->held_tail = h;
  s->ext->held += len;
  if (tc->handshaken) defer(tc);
  return 0;
}

static void shutdown_now(tls_conn_t *tc) {
  multiloop_stream_t *s = tc->s;
  int rc;
  clear_errors();
  (void)SSL_shutdown(tc->ssl);           /* our close_notify, behind the queued writes */
  /* The peer's EOF (its close_notify) came first: both directions are done,
   * and our close_notify not arriving is no error. A TCP half-close here
   * raced the peer's own close: our close_notify reached its closed socket,
   * its reset came back before shutdown(2) ran (or before this write: a
   * client that never read our session tickets resets as it closes), and a
   * clean close reached on_close as "ENOTCONN" or "EPIPE" (tls_spec, 20
   * clients and 10: most runs). */
  if ((rc = flush(tc, FLUSH_TRY)) != 0) {
    multiloop_stream_close(s, s->read_ended ? 0 : rc);
    return;
  }
  if (s->read_ended && multiloop_stream_queue_size(s) == 0) {
    multiloop_stream_close(s, 0);
    return;
  }
  if ((rc = multiloop_transport_plain.shutdown(s)) != 0) multiloop_stream_close(s, rc);
}

static int tls_shutdown(multiloop_stream_t *s) {
  tls_conn_t *tc = TC(s);
  if (!tc->handshaken || tc->held) {
    tc->want_shutdown = 1;               /* after the held writes (drain_held) */
    return 0;
  }
  shutdown_now(tc);
  return 0;
}

static void tls_close(multiloop_stream_t *s) {
  tls_conn_t *tc = TC(s);
  multiloop_tls_worker_t *tw = multiloop_stream_worker(s)->tls;
  multiloop_deadline_remove(&tc->hs_dl);
  undefer(tc);
  /* close_notify, but not over writes dropped unsent */
  if (tc->handshaken && s->reason >= 0 && s->h.stream.write_queue_size == 0 && tc->held == NULL &&
      !(SSL_get_shutdown(tc->ssl) & SSL_SENT_SHUTDOWN)) {
    clear_errors();
    (void)SSL_shutdown(tc->ssl);         /* close_notify, if the socket takes it now */
  }
  if (tw->out_owner == tc && tw->out_len > 0) {
    uv_buf_t b = uv_buf_init(tw->out, (unsigned)tw->out_len);
    if (s->h.stream.write_queue_size == 0) (void)uv_try_write(&s->h.stream, &b, 1);
    tw->out_len = 0;
  }
  if (tw->out_owner == tc) tw->out_owner = NULL;
  if (tc->uv_reading) uv_read_stop(&s->h.stream);
  tc->uv_reading = 0;
  multiloop_transport_plain.close(s);
}

static void box_release(session_box_t *b) {
  if (b && --b->refs == 0) {
    SSL_SESSION_free(b->sess);
    free(b);
  }
}

/* From the close callback: held writes back to the owner, a waiting
 * sslhandshake woken with the error, the state freed. */
static void tls_release(multiloop_stream_t *s) {
  tls_conn_t *tc = TC(s);
  held_t *h;
  while ((h = tc->held) != NULL) {
    tc->held = h->next;
    s->ext->held -= h->len;
    multiloop_stream_write_done(s, h->wr, UV_ECANCELED);
    free(h);
  }
  if (tc->wait) {
    hs_wait_t *wt = tc->wait;
    tc->wait = NULL;
    wt->tc = NULL;
    snprintf(wt->err, sizeof wt->err, "%s", tc->err[0] ? tc->err :
             s->reason == MULTILOOP_REASON_TLS_TIMEOUT ? "timeout" : "closed");
    multiloop_thread_wake(wt->t, 0, NULL, NULL);
  }
  box_release(tc->box);
  SSL_free(tc->ssl);                     /* and its BIO */
  free(tc->stash);
  free(tc);
  s->ext->tp_state = NULL;
  s->ext->tp = NULL;
}

static const multiloop_transport_t transport_tls = {
  "tls", tls_read_start, tls_read_stop, tls_try_write, tls_write, tls_shutdown, tls_close,
  tls_release
};

static void hs_timeout(multiloop_deadline_t *d, uint64_t ms) {
  tls_conn_t *tc = (tls_conn_t *)(void *)((char *)d - offsetof(tls_conn_t, hs_dl));
  (void)ms;
  if (tc->handshaken || tc->s->closing) return;
  snprintf(tc->err, sizeof tc->err, "timeout");
  count_error(tc);
  tc->failed = 1;
  multiloop_stream_close(tc->s, MULTILOOP_REASON_TLS_TIMEOUT);
}

/* TLS on an open stream: a server side (ctx: the server's) or a client one.
 * The owner's read state carries over. Returns 0 or a libuv error (nothing
 * changed then). */
static int attach(multiloop_stream_t *s, SSL_CTX *ctx, int client, uint64_t timeout,
                  tls_conn_t **out) {
  multiloop_worker_t *w = multiloop_stream_worker(s);
  tls_conn_t *tc;
  BIO *bio;
  uv_once(&bio_once, make_bio_method);
  if (bio_method == NULL || tls_worker(w) == NULL) return UV_ENOMEM;
  if (multiloop_stream_ext(s) == NULL || (tc = calloc(1, sizeof *tc)) == NULL) return UV_ENOMEM;
  tc->s = s;
  multiloop_deadline_init(&tc->hs_dl, hs_timeout);
  if ((tc->ssl = SSL_new(ctx)) == NULL || (bio = BIO_new(bio_method)) == NULL) {
    SSL_free(tc->ssl);
    free(tc);
    clear_errors();
    return UV_ENOMEM;
  }
  BIO_set_data(bio, tc);
  SSL_set_bio(tc->ssl, bio, bio);
  tc->client = client != 0;
  if (client) SSL_set_connect_state(tc->ssl);
  else SSL_set_accept_state(tc->ssl);
  if (timeout > 0 && multiloop_deadline_set(w, &tc->hs_dl, timeout) != 0) {
    SSL_free(tc->ssl);
    free(tc);
    return UV_ENOMEM;
  }
  multiloop_stream_set_transport(s, &transport_tls, tc);   /* ext exists: cannot fail */
  *out = tc;
  return 0;
}

int multiloop_tls_at_accept(const multiloop_config_t *cfg) {
  return cfg->tls != NULL && !cfg->tls->starttls;
}

int multiloop_tls_accept(multiloop_stream_t *s, const char *data, size_t len) {
  const multiloop_tls_t *t = multiloop_stream_worker(s)->cfg->tls;
  tls_conn_t *tc;
  int rc;
  if (t == NULL || t->starttls) return 0;
  if (data == NULL) return attach(s, t->ctx, 0, t->handshake_timeout, &tc);
  uv_read_stop(&s->h.stream);            /* the plain reads that brought the PROXY header */
  if ((rc = attach(s, t->ctx, 0, t->handshake_timeout, &tc)) != 0) return rc;
  tc->want_read = !s->paused && !s->read_ended && !s->close_when_flushed;
  feed(tc, data, len);                   /* the ClientHello, or its start */
  return 0;
}

/* --- session objects (client) ----------------------------------------------- */

static int new_session_cb(SSL *ssl, SSL_SESSION *sess) {
  BIO *b = SSL_get_rbio(ssl);
  tls_conn_t *tc = b ? BIO_get_data(b) : NULL;
  if (tc == NULL || tc->box == NULL) return 0;
  SSL_SESSION_free(tc->box->sess);
  tc->box->sess = sess;                  /* ours now: return 1 */
  return 1;
}

static int session_gc(lua_State *L) {
  session_box_t **p = luaL_checkudata(L, 1, SESSION_MT);
  box_release(*p);
  *p = NULL;
  return 0;
}

static void push_session(lua_State *L, session_box_t *b) {
  session_box_t **p = lua_newuserdatauv(L, sizeof *p, 0);
  *p = NULL;
  if (luaL_newmetatable(L, SESSION_MT)) {
    lua_pushcfunction(L, session_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushliteral(L, SESSION_MT);
    lua_setfield(L, -2, "__name");
  }
  lua_setmetatable(L, -2);
  *p = b;
}

/* --- conn:sslhandshake ----------------------------------------------------- */

static void hs_cancel(multiloop_thread_t *t, void *data) {
  hs_wait_t *wt = data;
  (void)t;
  if (wt->tc) wt->tc->wait = NULL;       /* the handshake goes on without a waiter */
  box_release(wt->box);
  free(wt);
}

static int hs_k(lua_State *L, int status, lua_KContext ctx) {
  hs_wait_t *wt = (hs_wait_t *)ctx;
  session_box_t *box = wt->box;
  int ok = wt->ok, want = wt->want_session;
  char err[200];
  (void)status;
  memcpy(err, wt->err, sizeof err);
  free(wt);
  if (!ok) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  if (want && box) {
    push_session(L, box);                /* may raise: box then leaks one ref (out of memory) */
    return 1;
  }
  box_release(box);
  lua_pushboolean(L, 1);
  return 1;
}

/* conn:sslhandshake([reused_session [, server_name [, ssl_verify]]]):
 * OpenResty's tcpsock:sslhandshake. On an outbound connection, the client
 * side (SNI sent, the peer verified with ssl_verify); on an accepted one of
 * a server with tls.starttls, the server side. Returns the session (or true
 * when reused_session is false), or nil, err (the connection is closed). */
int multiloop_tls_sslhandshake(lua_State *L) {
  multiloop_conn_t *c = multiloop_conn_check(L);
  multiloop_stream_t *s = &c->s;
  multiloop_worker_t *w = CONN_WORKER(c);
  int reused_false = lua_isboolean(L, 2) && !lua_toboolean(L, 2);
  session_box_t **sessp = luaL_testudata(L, 2, SESSION_MT);
  const char *name = luaL_optstring(L, 3, NULL);
  int verify = lua_toboolean(L, 4);
  multiloop_thread_t *t;
  tls_conn_t *tc;
  hs_wait_t *wt;
  SSL_CTX *ctx;
  char err[200];
  uint64_t timeout;
  size_t kept;
  int rc;

  luaL_argexpected(L, lua_isnoneornil(L, 2) || lua_isboolean(L, 2) || sessp, 2,
                   "session, boolean or nil");
  t = multiloop_thread_self(L, "conn:sslhandshake");
  if (s->closing) {
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  if (s->ext && s->ext->tp == &transport_tls) {
    tc = TC(s);
    if (tc->handshaken && !tc->wait) {   /* already (a pooled connection) */
      if (reused_false || !tc->client) {
        lua_pushboolean(L, 1);
      } else {
        session_box_t *b = calloc(1, sizeof *b);
        if (b == NULL) return luaL_error(L, "not enough memory");
        b->refs = 1;
        b->sess = SSL_get1_session(tc->ssl);
        push_session(L, b);
      }
      return 1;
    }
    lua_pushnil(L);
    lua_pushliteral(L, "socket busy: a handshake is running");
    return 2;
  }
  /* Bytes behind the command that asked for TLS came in the clear: a reader
   * would take them for the first plaintext (STARTTLS command injection).
   * They are the stream's kept bytes, or those of the read event the
   * caller runs in (serve.c's view, kept only once the event ends). */
  if (w->view.conn == c) kept = w->view.len - w->view.used;
  else (void)multiloop_stream_kept(s, &kept);
  if (kept > 0)
    return luaL_error(L, "conn:sslhandshake: %d bytes were received and not read before it",
                      (int)kept);
  if (c->outbound) {
    if ((ctx = client_ctx(w->cfg->tls_client, err, sizeof err)) == NULL) {
      lua_pushnil(L);
      lua_pushstring(L, err);
      return 2;
    }
    timeout = c->serve && SERVE(c)->read_ms ? SERVE(c)->read_ms : 60000;
  } else {
    const multiloop_tls_t *tt = w->cfg->tls;
    if (tt == NULL || !tt->starttls)
      return luaL_error(L, "conn:sslhandshake: on an accepted connection it needs the server "
                           "option tls = { starttls = true, ... }");
    ctx = tt->ctx;
    timeout = tt->handshake_timeout;
  }
  /* Sends of this read event held back (serve's cork) are plaintext that
   * goes before the handshake (a STARTTLS reply), not through it. */
  if (c->serve) multiloop_serve_uncork(c);
  if (s->closing) {
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  if ((wt = calloc(1, sizeof *wt)) == NULL) return luaL_error(L, "not enough memory");
  if (s->ext == NULL || s->ext->tp == NULL) uv_read_stop(&s->h.stream);   /* the plain reads */
  if ((rc = attach(s, ctx, c->outbound, timeout, &tc)) != 0) {
    free(wt);
    if (!s->closing && !s->paused && !s->read_ended) multiloop_stream_start(s);
    return luaL_error(L, "not enough memory");
  }
  if (c->outbound) {
    struct sockaddr_storage numeric;      /* no SNI for an address (RFC 6066) */
    if (name && !multiloop_numeric_addr(name, 0, &numeric)) SSL_set_tlsext_host_name(tc->ssl, name);
    if (verify) {
      SSL_set_verify(tc->ssl, SSL_VERIFY_PEER, NULL);
      if (name) SSL_set1_host(tc->ssl, name);
    }
    if (sessp && *sessp && (*sessp)->sess) SSL_set_session(tc->ssl, (*sessp)->sess);
  }
  /* The owner read state before: the plain transport's reading. */
  tc->want_read = !s->paused && !s->read_ended && !s->close_when_flushed;
  wt->t = t;
  wt->tc = tc;
  wt->want_session = c->outbound && !reused_false;
  tc->wait = wt;
  feed(tc, NULL, 0);                     /* the ClientHello goes out; the reads start */
  return multiloop_await(L, t, hs_cancel, wt, hs_k);
}

/* --- conn:tls() ------------------------------------------------------------ */

int multiloop_tls_info(lua_State *L) {
  multiloop_conn_t *c = multiloop_conn_check(L);
  multiloop_stream_t *s = &c->s;
  tls_conn_t *tc;
  const unsigned char *alpn;
  unsigned alpn_len;
  const char *sni;
  X509 *peer;
  if (s->closing || s->ext == NULL || s->ext->tp != &transport_tls) {
    lua_pushnil(L);
    return 1;
  }
  tc = TC(s);
  lua_createtable(L, 0, 6);
  lua_pushstring(L, SSL_get_version(tc->ssl));
  lua_setfield(L, -2, "version");
  lua_pushboolean(L, tc->handshaken);
  lua_setfield(L, -2, "established");
  if (!tc->handshaken) return 1;
  lua_pushstring(L, SSL_get_cipher_name(tc->ssl));
  lua_setfield(L, -2, "cipher");
  SSL_get0_alpn_selected(tc->ssl, &alpn, &alpn_len);
  if (alpn_len > 0) {
    lua_pushlstring(L, (const char *)alpn, alpn_len);
    lua_setfield(L, -2, "alpn");
  }
  if ((sni = SSL_get_servername(tc->ssl, TLSEXT_NAMETYPE_host_name)) != NULL) {
    lua_pushstring(L, sni);
    lua_setfield(L, -2, "sni");
  }
  lua_pushboolean(L, SSL_session_reused(tc->ssl));
  lua_setfield(L, -2, "resumed");
  if ((peer = SSL_get0_peer_certificate(tc->ssl)) != NULL) {
    char buf[256];
    X509_NAME_oneline(X509_get_subject_name(peer), buf, sizeof buf);
    lua_pushstring(L, buf);
    lua_setfield(L, -2, "peer");
    lua_pushboolean(L, SSL_get_verify_result(tc->ssl) == X509_V_OK);
    lua_setfield(L, -2, "verified");
  }
  return 1;
}
