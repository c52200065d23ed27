/*
 * resolve.c: name resolution for outbound connections, off the loop, with a
 * per-worker cache; and worker.resolve(name).
 *
 * Runs only on the worker thread. A lookup is libuv's uv_getaddrinfo, which
 * runs getaddrinfo(3) on libuv's thread pool: one pool for the whole
 * process (4 threads unless UV_THREADPOOL_SIZE says otherwise when the
 * process first uses it), shared by every worker. So that one worker cannot
 * fill it, each worker runs at most `dns_max_lookups` lookups at once; the
 * others wait in a FIFO here, each in its own caller's time limit (a
 * connect's timeout cancels its lookup, waiting or not).
 *
 * Answers are cached per worker for `dns_cache_ttl` ms (0: no cache), at
 * most CACHE_MAX names, least recently used first out. Failures are not
 * cached. Numeric addresses never come here (outbound.c parses them).
 *
 * A request the caller cancels (its connect timed out, its thread was
 * killed, the worker stops) is detached: its callback will not run; if
 * getaddrinfo is already running on the pool it cannot be stopped, and the
 * request is freed when it returns. The worker's loop ends only once every
 * request has come back (libuv counts them as active).
 */
#include <stdlib.h>
#include <string.h>
#include <netdb.h>

#include "multiloop.h"

#define CACHE_MAX 256

typedef struct cache_entry_s {
  struct cache_entry_s *prev, *next;   /* most recently used first */
  uint64_t expires;                    /* loop time, ms */
  int n;
  struct sockaddr_storage addrs[MULTILOOP_RESOLVE_MAX_ADDRS];
  char name[];
} cache_entry_t;

struct multiloop_resolve_s {
  uv_getaddrinfo_t req;
  multiloop_worker_t *w;
  multiloop_resolve_cb cb;             /* NULL: cancelled */
  void *data;
  multiloop_resolve_t *prev, *next;    /* the waiting FIFO, or the running list */
  int running;
  char name[];
};

struct multiloop_resolver_s {
  cache_entry_t *head, *tail;
  int ncached;
  int running;                         /* lookups on the pool now */
  multiloop_resolve_t *run;            /* those, to cancel them at stop */
  multiloop_resolve_t *wait_head, *wait_tail;
};

static multiloop_resolver_t *resolver(multiloop_worker_t *w) {
  if (w->resolver == NULL) w->resolver = calloc(1, sizeof *w->resolver);
  return w->resolver;
}

/* --- the cache --------------------------------------------------------------- */

static void cache_unlink(multiloop_resolver_t *r, cache_entry_t *e) {
  if (e->prev) e->prev->next = e->next;
  else r->head = e->next;
  if (e->next) e->next->prev = e->prev;
  else r->tail = e->prev;
  e->prev = e->next = NULL;
  r->ncached--;
}

static void cache_push(multiloop_resolver_t *r, cache_entry_t *e) {
  e->prev = NULL;
  e->next = r->head;
  if (r->head) r->head->prev = e;
  else r->tail = e;
  r->head = e;
  r->ncached++;
}

static cache_entry_t *cache_find(multiloop_resolver_t *r, const char *name) {
  cache_entry_t *e;
  for (e = r->head; e; e = e->next)
    if (strcmp(e->name, name) == 0) return e;
  return NULL;
}

int multiloop_resolve_cached(multiloop_worker_t *w, const char *name,
                             struct sockaddr_storage *addrs) {
  multiloop_resolver_t *r = w->resolver;
  cache_entry_t *e;
  if (r == NULL || (e = cache_find(r, name)) == NULL) return 0;
  cache_unlink(r, e);
  if (e->expires <= uv_now(&w->loop)) {
    free(e);
    return 0;
  }
  cache_push(r, e);
  memcpy(addrs, e->addrs, (size_t)e->n * sizeof *addrs);
  return e->n;
}

static void cache_store(multiloop_worker_t *w, const char *name,
                        const struct sockaddr_storage *addrs, int n) {
  multiloop_resolver_t *r = w->resolver;
  size_t len = strlen(name);
  cache_entry_t *e;
  if (w->cfg->dns_cache_ttl == 0 || n == 0) return;
  if ((e = cache_find(r, name)) != NULL) {
    cache_unlink(r, e);
    free(e);
  }
  if (r->ncached >= CACHE_MAX) {
    cache_entry_t *old = r->tail;
    cache_unlink(r, old);
    free(old);
  }
  if ((e = malloc(sizeof *e + len + 1)) == NULL) return;   /* not cached: no harm */
  e->expires = uv_now(&w->loop) + w->cfg->dns_cache_ttl;
  e->n = n;
  memcpy(e->addrs, addrs, (size_t)n * sizeof *addrs);
  memcpy(e->name, name, len + 1);
  cache_push(r, e);
}

/* --- lookups ------------------------------------------------------------------ */

static void run_next(multiloop_worker_t *w);

static void list_remove(multiloop_resolve_t **head, multiloop_resolve_t **tail,
                        multiloop_resolve_t *q) {
  if (q->prev) q->prev->next = q->next;
  else *head = q->next;
  if (q->next) q->next->prev = q->prev;
  else if (tail) *tail = q->prev;
  q->prev = q->next = NULL;
}

static void getaddrinfo_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  multiloop_resolve_t *q = (multiloop_resolve_t *)req;
  multiloop_worker_t *w = q->w;
  multiloop_resolver_t *r = w->resolver;
  struct sockaddr_storage addrs[MULTILOOP_RESOLVE_MAX_ADDRS];
  struct addrinfo *ai;
  int n = 0;
  list_remove(&r->run, NULL, q);
  r->running--;
  for (ai = res; status == 0 && ai && n < MULTILOOP_RESOLVE_MAX_ADDRS; ai = ai->ai_next) {
    int i, dup = 0;
    if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6) ||
        ai->ai_addrlen > sizeof addrs[0])
      continue;
    memset(&addrs[n], 0, sizeof addrs[n]);
    memcpy(&addrs[n], ai->ai_addr, ai->ai_addrlen);
    for (i = 0; i < n && !dup; i++) dup = memcmp(&addrs[i], &addrs[n], sizeof addrs[n]) == 0;
    if (!dup) n++;
  }
  if (res) uv_freeaddrinfo(res);
  if (status == 0 && n == 0) status = UV_EAI_NODATA;
  if (status == 0 && !w->closing) cache_store(w, q->name, addrs, n);
  if (q->cb) q->cb(q->data, status, addrs, n);
  free(q);
  if (!w->closing) run_next(w);
}

static int start(multiloop_worker_t *w, multiloop_resolve_t *q) {
  multiloop_resolver_t *r = w->resolver;
  struct addrinfo hints;
  int rc;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  /* No AI_ADDRCONFIG: it drops ::1 for "localhost" on a host whose only
   * IPv6 address is the loopback one. */
  rc = uv_getaddrinfo(&w->loop, &q->req, getaddrinfo_cb, q->name, NULL, &hints);
  if (rc != 0) return rc;
  q->running = 1;
  r->running++;
  q->prev = NULL;
  q->next = r->run;
  if (r->run) r->run->prev = q;
  r->run = q;
  return 0;
}

/* Starts what waits, while there is room. A start that fails reports. */
static void run_next(multiloop_worker_t *w) {
  multiloop_resolver_t *r = w->resolver;
  while (r->wait_head && r->running < w->cfg->dns_max_lookups) {
    multiloop_resolve_t *q = r->wait_head;
    int rc;
    list_remove(&r->wait_head, &r->wait_tail, q);
    if ((rc = start(w, q)) != 0) {
      if (q->cb) q->cb(q->data, rc, NULL, 0);
      free(q);
    }
  }
}

multiloop_resolve_t *multiloop_resolve_start(multiloop_worker_t *w, const char *name,
                                             multiloop_resolve_cb cb, void *data) {
  multiloop_resolver_t *r = resolver(w);
  size_t len = strlen(name);
  multiloop_resolve_t *q;
  if (r == NULL || (q = calloc(1, sizeof *q + len + 1)) == NULL) return NULL;
  q->w = w;
  q->cb = cb;
  q->data = data;
  memcpy(q->name, name, len + 1);
  if (r->running < w->cfg->dns_max_lookups) {
    if (start(w, q) != 0) {
      free(q);
      return NULL;
    }
    return q;
  }
  q->prev = r->wait_tail;              /* waits its turn */
  if (r->wait_tail) r->wait_tail->next = q;
  else r->wait_head = q;
  r->wait_tail = q;
  return q;
}

void multiloop_resolve_cancel(multiloop_resolve_t *q) {
  multiloop_resolver_t *r = q->w->resolver;
  q->cb = NULL;
  if (q->running) {
    (void)uv_cancel((uv_req_t *)&q->req);   /* its callback frees it, cancelled or not */
    return;
  }
  list_remove(&r->wait_head, &r->wait_tail, q);
  free(q);
}

/* The worker is closing: waiting lookups end with UV_ECANCELED, running ones
 * are cancelled (libuv can only cancel those the pool has not begun). */
void multiloop_resolver_stop(multiloop_worker_t *w) {
  multiloop_resolver_t *r = w->resolver;
  multiloop_resolve_t *q;
  if (r == NULL) return;
  while ((q = r->wait_head) != NULL) {
    list_remove(&r->wait_head, &r->wait_tail, q);
    if (q->cb) q->cb(q->data, UV_ECANCELED, NULL, 0);
    free(q);
  }
  for (q = r->run; q; q = q->next) (void)uv_cancel((uv_req_t *)&q->req);
}

/* After the loop has ended: every request has come back. */
void multiloop_resolver_free(multiloop_worker_t *w) {
  multiloop_resolver_t *r = w->resolver;
  if (r == NULL) return;
  while (r->head) {
    cache_entry_t *e = r->head;
    cache_unlink(r, e);
    free(e);
  }
  free(r);
  w->resolver = NULL;
}

/* --- worker.resolve(name) ------------------------------------------------------ */

typedef struct {
  multiloop_resolve_t *q;
  multiloop_thread_t *t;
  int status, n;
  struct sockaddr_storage addrs[MULTILOOP_RESOLVE_MAX_ADDRS];
  char name[MULTILOOP_MAX_HOST + 1];
} resolve_wait_t;

int multiloop_push_addrs(lua_State *L, const struct sockaddr_storage *addrs, int n) {
  int i;
  lua_createtable(L, n, 0);
  for (i = 0; i < n; i++) {
    char ip[INET6_ADDRSTRLEN];
    uv_ip_name((const struct sockaddr *)&addrs[i], ip, sizeof ip);
    lua_pushstring(L, ip);
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

const char *multiloop_resolve_error(lua_State *L, const char *name, int status) {
  return lua_pushfstring(L, "%s could not be resolved (%s)", name,
                         status == UV_ECANCELED || status == UV_EAI_CANCELED ? "stopped"
                                                                             : uv_strerror(status));
}

static int push_resolved(lua_State *L, void *ev) {
  resolve_wait_t *rw = ev;
  if (rw->status == 0) return multiloop_push_addrs(L, rw->addrs, rw->n);
  lua_pushnil(L);
  multiloop_resolve_error(L, rw->name, rw->status);
  return 2;
}

static void resolved(void *data, int status, const struct sockaddr_storage *addrs, int n) {
  resolve_wait_t *rw = data;
  rw->q = NULL;
  rw->status = status;
  rw->n = n;
  if (n > 0) memcpy(rw->addrs, addrs, (size_t)n * sizeof *addrs);
  multiloop_thread_wake(rw->t, 0, push_resolved, rw);   /* a loop callback: may resume */
  free(rw);
}

static void cancel_resolve(multiloop_thread_t *t, void *data) {
  resolve_wait_t *rw = data;
  (void)t;
  if (rw->q) multiloop_resolve_cancel(rw->q);
  free(rw);
}

/* Fills addrs with `name` if it is a numeric IPv4 or IPv6 address (an IPv6
 * one may be in brackets): 1, or 0. `port` goes in too. */
int multiloop_numeric_addr(const char *name, int port, struct sockaddr_storage *addr) {
  char buf[INET6_ADDRSTRLEN + 2];
  size_t len = strlen(name);
  memset(addr, 0, sizeof *addr);
  if (uv_ip4_addr(name, port, (struct sockaddr_in *)addr) == 0) return 1;
  if (len >= 2 && len < sizeof buf && name[0] == '[' && name[len - 1] == ']') {
    memcpy(buf, name + 1, len - 2);
    buf[len - 2] = '\0';
    name = buf;
  }
  memset(addr, 0, sizeof *addr);
  return uv_ip6_addr(name, port, (struct sockaddr_in6 *)addr) == 0;
}

/* Checks a host name argument: a string of 1 to MULTILOOP_MAX_HOST bytes
 * with no NUL. */
const char *multiloop_check_host(lua_State *L, int arg, const char *who) {
  size_t len;
  const char *name;
  if (lua_type(L, arg) != LUA_TSTRING)
    luaL_error(L, "%s: the host must be a string (got %s)", who, luaL_typename(L, arg));
  name = lua_tolstring(L, arg, &len);
  if (len == 0 || len > MULTILOOP_MAX_HOST || strlen(name) != len)
    luaL_error(L, "%s: the host must be 1 to %d bytes with no NUL (got %d bytes)", who,
               MULTILOOP_MAX_HOST, (int)len);
  return name;
}

/* worker.resolve(name) -> { address, ... } | nil, err. */
static int core_resolve(lua_State *L) {
  multiloop_worker_t *w = lua_touserdata(L, lua_upvalueindex(1));
  const char *name = multiloop_check_host(L, 1, "worker.resolve");
  struct sockaddr_storage addrs[MULTILOOP_RESOLVE_MAX_ADDRS];
  multiloop_thread_t *t;
  resolve_wait_t *rw;
  int n;
  if (multiloop_numeric_addr(name, 0, &addrs[0])) return multiloop_push_addrs(L, addrs, 1);
  if ((n = multiloop_resolve_cached(w, name, addrs)) > 0) return multiloop_push_addrs(L, addrs, n);
  t = multiloop_thread_self(L, "worker.resolve");
  if (multiloop_threads_closing(L)) {
    lua_pushnil(L);
    lua_pushliteral(L, "stopped");
    return 2;
  }
  if ((rw = calloc(1, sizeof *rw)) == NULL) return luaL_error(L, "not enough memory");
  strcpy(rw->name, name);                  /* checked: at most MULTILOOP_MAX_HOST */
  rw->t = t;
  if ((rw->q = multiloop_resolve_start(w, name, resolved, rw)) == NULL) {
    free(rw);
    return luaL_error(L, "not enough memory");
  }
  return multiloop_await(L, t, cancel_resolve, rw, NULL);
}

const luaL_Reg multiloop_resolve_funcs[] = {
  { "resolve", core_resolve },
  { NULL, NULL }
};
