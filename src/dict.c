/*
 * dict.c: the dictionaries behind multiloop.shared (shared.c is their Lua
 * object): a process-wide registry of named dictionaries, each a set of
 * striped hash tables with an LRU list and expiry. Keys are byte strings;
 * values booleans, integers, floats or byte strings (multiloop_value_t), or
 * lists of integers, floats and strings (a doubly linked list of nodes that
 * the entry owns, as OpenResty's). No Lua API is used here, so no Lua error
 * can ever longjmp past a lock.
 *
 * Owns: the registry (dictionaries by name), the dictionaries and their
 * entries. The registry is a list under one mutex, initialised once; it is
 * the one mutable global of the module, and unavoidable: a worker's fresh
 * state has no other way to meet the dictionary that the main state made.
 *
 * Memory is bounded by the capacity, split evenly over the stripes (16 from
 * 1 MiB up; below that fewer, each at least 64 KiB): a stripe's bytes are
 * its entries (header, key, string value; a list's header and nodes) plus
 * the hash buckets it grew beyond the first INITIAL_BUCKETS; malloc's own
 * overhead is not counted. The buckets double when there are more entries
 * than buckets and halve when there are fewer than a quarter (the gap keeps
 * resizing O(1) amortised), and flush goes back to the first size, so space
 * the buckets took is usable again once the entries are gone. The capacity
 * is a ceiling, not a reservation: entries are malloc'ed one at a time, and
 * a malloc that fails reports no memory. When an entry does not fit, the
 * stripe's least recently used entries are freed until it does (a store reports
 * MULTILOOP_DICT_STORED_FORCED when a live one went); an entry larger than
 * a stripe's share is refused (MULTILOOP_DICT_NO_MEMORY) and nothing
 * changes. A "safe" store and a list push never evict a live entry: they
 * free expired ones from the LRU end and else report no memory. Expired
 * entries are freed lazily: when a lookup meets one, when eviction reaches
 * it, and by count, keys and flush_expired. Time is uv_hrtime():
 * monotonic, one clock for every thread.
 *
 * Threads: any thread. The registry lock guards the list and every
 * dictionary's reference count; a stripe's lock guards its hash table, LRU
 * list and byte count. A key's hash picks its stripe, so threads working on
 * different keys rarely meet on one lock. No lock is held while another is
 * taken. What a read returns is copied out under the stripe's lock (strings
 * into the caller's multiloop_scratch_t), so nothing points into the
 * dictionary once the call returns.
 *
 * Freeing: each holder has one reference (multiloop_dict_acquire). The last
 * release unlinks the dictionary from the registry and frees it with every
 * entry, so a dictionary that nobody references is gone: the next acquire
 * of its name makes a new, empty one.
 */
#include <stdlib.h>
#include <string.h>

#include "multiloop.h"

#define MAX_STRIPES 16                   /* a power of two */
#define STRIPE_MIN_BYTES (64 * 1024)     /* fewer stripes below 16 * this */
#define INITIAL_BUCKETS 8                /* a power of two */
#define NS_PER_MS UINT64_C(1000000)
#define T_LIST 100                       /* entry->type of a list: no MULTILOOP_V_* */

/* One element of a list: an integer, a float or a string's bytes. */
typedef struct lnode_s {
  struct lnode_s *prev, *next;
  size_t len;                            /* strings only */
  union {
    lua_Integer i;
    lua_Number n;
  } v;
  int type;                              /* MULTILOOP_V_INTEGER, _FLOAT or _STRING */
  char data[];
} lnode;

/* A list entry's value, malloc'ed apart (the entry points at it). */
typedef struct {
  lnode *head, *tail;
  size_t len;                            /* elements */
} list;

typedef struct entry_s {
  struct entry_s *hnext;                 /* hash chain */
  struct entry_s *prev, *next;           /* LRU list: head is the most recent */
  uint64_t hash;
  uint64_t expires;                      /* uv_hrtime() in ns; 0: never */
  size_t klen;
  size_t vlen;                           /* a string's bytes; a list's (header, nodes) */
  int type;                              /* MULTILOOP_V_* or T_LIST */
  union {
    int b;
    lua_Integer i;
    lua_Number n;
    list *l;
  } v;
  char data[];                           /* the key, then a string value */
} entry;

/* Aligned to a cache line, so that threads on neighbouring stripes do not
 * invalidate each other's lock. */
typedef struct {
  uv_mutex_t lock;
  entry **buckets;
  size_t nbuckets;                       /* a power of two */
  entry *head, *tail;
  size_t count;                          /* entries, expired ones included */
  size_t used;                           /* bytes: entries and buckets past the first */
  size_t cap;                            /* this stripe's share of the capacity */
} __attribute__((aligned(64))) stripe;

/* Everything but `next`, `refs` and the stripes is written once, before the
 * registry lock publishes the dictionary, and only read afterwards. */
struct multiloop_dict_s {
  struct multiloop_dict_s *next;            /* the registry list */
  int refs;                              /* under the registry lock */
  char *name;
  size_t namelen;
  size_t capacity;
  uint64_t seed;
  unsigned nstripes;                     /* a power of two */
  stripe stripes[];
};

/* --- the registry (the one global) ---------------------------------------- */

static uv_once_t registry_once = UV_ONCE_INIT;
static uv_mutex_t registry_lock;
static multiloop_dict_t *registry_head;

static void registry_init(void) {
  if (uv_mutex_init(&registry_lock) != 0) abort();   /* as libuv does for its own */
}

/* --- one stripe ----------------------------------------------------------- */

/* What an entry counts against its stripe; for a list, vlen is its header
 * and nodes (list_node_size each). */
static size_t entry_size(size_t klen, size_t vlen) {
  return sizeof(entry) + klen + vlen;
}

static size_t list_node_size(const multiloop_value_t *v) {
  return sizeof(lnode) + (v->type == MULTILOOP_V_STRING ? v->len : 0);
}

/* The buckets beyond the first INITIAL_BUCKETS, which a stripe always has. */
static size_t bucket_bytes(size_t nbuckets) {
  return (nbuckets - INITIAL_BUCKETS) * sizeof(entry *);
}

static void entry_free(entry *e) {
  if (e->type == T_LIST) {
    lnode *n = e->v.l->head, *next;
    for (; n != NULL; n = next) {
      next = n->next;
      free(n);
    }
    free(e->v.l);
  }
  free(e);
}

static int expired(const entry *e, uint64_t now) {
  return e->expires != 0 && e->expires <= now;
}

static void lru_unlink(stripe *s, entry *e) {
  if (e->prev) e->prev->next = e->next;
  else s->head = e->next;
  if (e->next) e->next->prev = e->prev;
  else s->tail = e->prev;
}

static void lru_push(stripe *s, entry *e) {
  e->prev = NULL;
  e->next = s->head;
  if (s->head) s->head->prev = e;
  else s->tail = e;
  s->head = e;
}

static void lru_touch(stripe *s, entry *e) {
  if (s->head == e) return;
  lru_unlink(s, e);
  lru_push(s, e);
}

/* The link that points at the entry for the key, or at the chain's end. */
static entry **lookup(stripe *s, uint64_t h, const char *k, size_t kn) {
  entry **pp = &s->buckets[h & (s->nbuckets - 1)];
  for (; *pp != NULL; pp = &(*pp)->hnext) {
    entry *e = *pp;
    if (e->hash == h && e->klen == kn && memcmp(e->data, k, kn) == 0) break;
  }
  return pp;
}

/* Moves every entry into a table of n buckets, which the caller allocated
 * zeroed, and frees the old one. */
static void rehash(stripe *s, entry **b, size_t n) {
  size_t i;
  for (i = 0; i < s->nbuckets; i++) {
    entry *e = s->buckets[i], *next;
    for (; e != NULL; e = next) {
      next = e->hnext;
      e->hnext = b[e->hash & (n - 1)];
      b[e->hash & (n - 1)] = e;
    }
  }
  free(s->buckets);
  s->used -= bucket_bytes(s->nbuckets);
  s->used += bucket_bytes(n);
  s->buckets = b;
  s->nbuckets = n;
}

/* Halves the buckets when fewer than a quarter are used, so that the space
 * a crowd of entries made them take comes back once the entries go (after
 * a shrink the table is half full: a grow needs as many inserts again).
 * Never fails: without memory for the smaller table, the old one stays. */
static void maybe_shrink(stripe *s) {
  entry **b;
  if (s->nbuckets <= INITIAL_BUCKETS || s->count >= s->nbuckets / 4) return;
  if ((b = calloc(s->nbuckets / 2, sizeof *b)) == NULL) return;
  rehash(s, b, s->nbuckets / 2);
}

/* Unlinks and frees the entry. Callers hold no pointer into the buckets
 * across this call: it may resize them. */
static void remove_entry(stripe *s, entry *e) {
  entry **pp = &s->buckets[e->hash & (s->nbuckets - 1)];
  while (*pp != e) pp = &(*pp)->hnext;
  *pp = e->hnext;
  lru_unlink(s, e);
  s->used -= entry_size(e->klen, e->vlen);
  s->count--;
  entry_free(e);
  maybe_shrink(s);
}

/* The live entry for the key, or NULL; an expired one is freed on the way. */
static entry *find(stripe *s, uint64_t h, const char *k, size_t kn, uint64_t now) {
  entry *e = *lookup(s, h, k, kn);
  if (e != NULL && expired(e, now)) {
    remove_entry(s, e);
    e = NULL;
  }
  return e;
}

/* Frees up to max expired entries (0: all); returns how many went. */
static size_t purge_expired(stripe *s, uint64_t now, size_t max) {
  entry *e = s->head, *next;
  size_t n = 0;
  for (; e != NULL && (max == 0 || n < max); e = next) {
    next = e->next;
    if (expired(e, now)) {
      remove_entry(s, e);
      n++;
    }
  }
  return n;
}

/* Doubles the buckets when the table is loaded, if the bytes fit in the
 * stripe's share; otherwise chains just grow longer. Never fails. */
static void maybe_grow(stripe *s) {
  size_t n = s->nbuckets * 2;
  entry **b;
  if (s->count <= s->nbuckets) return;
  if (s->used + s->nbuckets * sizeof *b > s->cap) return;  /* n - nbuckets more */
  if ((b = calloc(n, sizeof *b)) == NULL) return;
  rehash(s, b, n);
}

/* Whether an entry of `size` bytes fits once every other entry is gone
 * (the buckets may shrink on the way: this is the cautious answer). */
static int fits(const stripe *s, size_t size) {
  return size <= s->cap && bucket_bytes(s->nbuckets) <= s->cap - size;
}

/* Whether `size` more bytes fit once the expired entries at the LRU end
 * are freed; nothing live is evicted. For safe stores and list pushes. */
static int room_without_eviction(stripe *s, size_t size, uint64_t now) {
  while (s->used + size > s->cap && s->tail != NULL && expired(s->tail, now))
    remove_entry(s, s->tail);
  return size <= s->cap && s->used <= s->cap - size;
}

/* Frees entries from the LRU end until `size` more bytes fit (the caller
 * checked fits()). Returns 1 when a live, unexpired entry had to go. */
static int make_room(stripe *s, size_t size, uint64_t now) {
  int forced = 0;
  while (s->used + size > s->cap && s->tail != NULL) {
    if (!expired(s->tail, now)) forced = 1;
    remove_entry(s, s->tail);
  }
  return forced;
}

static void insert(stripe *s, entry *e) {
  entry **b = &s->buckets[e->hash & (s->nbuckets - 1)];
  e->hnext = *b;
  *b = e;
  lru_push(s, e);
  s->used += entry_size(e->klen, e->vlen);
  s->count++;
  maybe_grow(s);
}

static void put_value(entry *e, const multiloop_value_t *v) {
  e->type = v->type;
  switch (v->type) {
    case MULTILOOP_V_BOOLEAN: e->v.b = v->b; break;
    case MULTILOOP_V_INTEGER: e->v.i = v->i; break;
    case MULTILOOP_V_FLOAT: e->v.n = v->n; break;
    default: memcpy(e->data + e->klen, v->s, v->len); break;
  }
}

/* The entry's value, except a string's bytes. */
static void get_value(const entry *e, multiloop_value_t *v) {
  memset(v, 0, sizeof *v);
  v->type = e->type;
  switch (e->type) {
    case MULTILOOP_V_BOOLEAN: v->b = e->v.b; break;
    case MULTILOOP_V_INTEGER: v->i = e->v.i; break;
    case MULTILOOP_V_FLOAT: v->n = e->v.n; break;
    default: break;
  }
}

/* A new, unlinked entry, or NULL when out of memory. */
static entry *new_entry(uint64_t h, const char *k, size_t kn, const multiloop_value_t *v,
                        uint64_t expires) {
  size_t vlen = v->type == MULTILOOP_V_STRING ? v->len : 0;
  entry *e = malloc(entry_size(kn, vlen));
  if (e == NULL) return NULL;
  e->hash = h;
  e->expires = expires;
  e->klen = kn;
  e->vlen = vlen;
  memcpy(e->data, k, kn);
  put_value(e, v);
  return e;
}

/* Frees every entry and goes back to the first bucket array `small` (a
 * zeroed one of INITIAL_BUCKETS, or NULL), keeping the larger one, emptied,
 * when there is none. Returns the array left over for the caller to free:
 * the old one, or `small` when it was not needed. */
static entry **stripe_clear(stripe *s, entry **small) {
  entry *e = s->head, *next, **old = small;
  for (; e != NULL; e = next) {
    next = e->next;
    entry_free(e);
  }
  if (s->nbuckets > INITIAL_BUCKETS && small != NULL) {
    old = s->buckets;
    s->buckets = small;
    s->nbuckets = INITIAL_BUCKETS;
  } else {
    memset(s->buckets, 0, s->nbuckets * sizeof *s->buckets);
  }
  s->head = s->tail = NULL;
  s->count = 0;
  s->used = bucket_bytes(s->nbuckets);
  return old;
}

/* --- a dictionary --------------------------------------------------------- */

static uint64_t hash_key(const multiloop_dict_t *d, const char *k, size_t kn) {
  uint64_t h = d->seed ^ (kn * UINT64_C(0x9e3779b97f4a7c15));
  size_t i;
  for (i = 0; i < kn; i++) h = (h ^ (unsigned char)k[i]) * UINT64_C(0x100000001b3);
  h ^= h >> 33;                          /* finalizer: spread every bit */
  h *= UINT64_C(0xff51afd7ed558ccd);
  h ^= h >> 33;
  h *= UINT64_C(0xc4ceb9fe1a85ec53);
  h ^= h >> 33;
  return h;
}

/* The stripe takes bits that bucket indexes only reach in huge tables. */
static stripe *stripe_of(multiloop_dict_t *d, uint64_t h) {
  return &d->stripes[(h >> 48) & (d->nstripes - 1)];
}

static void dict_free(multiloop_dict_t *d, unsigned nready) {
  unsigned i;
  for (i = 0; i < nready; i++) {
    stripe_clear(&d->stripes[i], NULL);
    free(d->stripes[i].buckets);
    uv_mutex_destroy(&d->stripes[i].lock);
  }
  free(d->name);
  free(d);
}

/* A new dictionary with one reference, or NULL when out of memory. */
static multiloop_dict_t *dict_new(const char *name, size_t namelen, size_t capacity) {
  unsigned n = 1, i;
  size_t size;
  multiloop_dict_t *d;
  while (n < MAX_STRIPES && capacity / (2 * n) >= STRIPE_MIN_BYTES) n *= 2;
  size = sizeof *d + n * sizeof(stripe);
  size = (size + 63) & ~(size_t)63;      /* aligned_alloc wants a multiple */
  if ((d = aligned_alloc(64, size)) == NULL) return NULL;
  memset(d, 0, size);
  d->refs = 1;
  d->capacity = capacity;
  d->nstripes = n;
  d->seed = uv_hrtime() ^ (uint64_t)(uintptr_t)d;
  d->namelen = namelen;
  if ((d->name = malloc(namelen + 1)) == NULL) {
    free(d);
    return NULL;
  }
  memcpy(d->name, name, namelen);
  d->name[namelen] = '\0';
  for (i = 0; i < n; i++) {
    stripe *s = &d->stripes[i];
    s->nbuckets = INITIAL_BUCKETS;
    s->cap = capacity / n + (i == 0 ? capacity % n : 0);  /* they add up to capacity */
    s->buckets = calloc(s->nbuckets, sizeof *s->buckets);
    if (s->buckets == NULL || uv_mutex_init(&s->lock) != 0) {
      free(s->buckets);
      dict_free(d, i);
      return NULL;
    }
    s->used = 0;
  }
  return d;
}

/* The named dictionary, found or made, with a reference for the caller;
 * NULL when out of memory. */
multiloop_dict_t *multiloop_dict_acquire(const char *name, size_t namelen, size_t capacity) {
  multiloop_dict_t *d;
  uv_once(&registry_once, registry_init);
  uv_mutex_lock(&registry_lock);
  for (d = registry_head; d != NULL; d = d->next)
    if (d->namelen == namelen && memcmp(d->name, name, namelen) == 0) break;
  if (d != NULL) {
    d->refs++;
  } else if ((d = dict_new(name, namelen, capacity)) != NULL) {
    d->next = registry_head;
    registry_head = d;
  }
  uv_mutex_unlock(&registry_lock);
  return d;
}

void multiloop_dict_release(multiloop_dict_t *d) {
  multiloop_dict_t **pp;
  int last;
  uv_mutex_lock(&registry_lock);
  last = --d->refs == 0;
  if (last) {
    for (pp = &registry_head; *pp != d; pp = &(*pp)->next) {}
    *pp = d->next;
  }
  uv_mutex_unlock(&registry_lock);
  if (last) dict_free(d, d->nstripes);   /* unreachable now: no lock needed */
}

/* --- operations on one key ------------------------------------------------ */

/* Copies a string value out into `buf` (grown as needed): 0, or -1 when out
 * of memory. Called with a stripe locked. */
static int copy_out(multiloop_scratch_t *buf, size_t off, const char *p, size_t n) {
  if (off + n > buf->cap || buf->p == NULL) {        /* NULL: even for 0 bytes */
    size_t cap = buf->cap ? buf->cap : 256;
    char *np;
    while (cap < off + n) cap *= 2;
    if ((np = realloc(buf->p, cap)) == NULL) return -1;
    buf->p = np;
    buf->cap = cap;
  }
  memcpy(buf->p + off, p, n);
  return 0;
}

/* Stores v under the key (mode: MULTILOOP_DICT_SET, _ADD only when absent,
 * _REPLACE only when present; or'ed with MULTILOOP_DICT_SAFE, never evict a
 * live entry), expiring after ttl_ms (0: never). A list under the key is
 * replaced like any value. Returns MULTILOOP_DICT_STORED, _STORED_FORCED
 * (live entries were evicted), or _EXISTS, _NOT_FOUND, _NO_MEMORY with
 * nothing changed. */
int multiloop_dict_store(multiloop_dict_t *d, int mode, const char *k, size_t kn,
                         const multiloop_value_t *v, uint64_t ttl_ms) {
  uint64_t now = uv_hrtime(), expires = ttl_ms == 0 ? 0 : now + ttl_ms * NS_PER_MS;
  uint64_t h = hash_key(d, k, kn);
  stripe *s = stripe_of(d, h);
  size_t vlen = v->type == MULTILOOP_V_STRING ? v->len : 0, size = entry_size(kn, vlen);
  int safe = (mode & MULTILOOP_DICT_SAFE) != 0, forced = 0;
  entry *old, *e;

  mode &= ~MULTILOOP_DICT_SAFE;
  uv_mutex_lock(&s->lock);
  old = find(s, h, k, kn, now);
  if (mode == MULTILOOP_DICT_ADD && old != NULL) {
    uv_mutex_unlock(&s->lock);
    return MULTILOOP_DICT_EXISTS;
  }
  if (mode == MULTILOOP_DICT_REPLACE && old == NULL) {
    uv_mutex_unlock(&s->lock);
    return MULTILOOP_DICT_NOT_FOUND;
  }
  if (old != NULL && old->type != T_LIST && old->vlen == vlen) {  /* same size: in place */
    put_value(old, v);
    old->expires = expires;
    lru_touch(s, old);
    uv_mutex_unlock(&s->lock);
    return MULTILOOP_DICT_STORED;
  }
  /* A safe store counts the old entry's bytes as free: it goes either way. */
  if (safe) {
    size_t old_size = old != NULL ? entry_size(old->klen, old->vlen) : 0;
    if (size > old_size && !room_without_eviction(s, size - old_size, now)) {
      uv_mutex_unlock(&s->lock);
      return MULTILOOP_DICT_NO_MEMORY;
    }
  }
  /* Allocate before dropping the old entry, so a failure changes nothing. */
  if (!fits(s, size) || (e = new_entry(h, k, kn, v, expires)) == NULL) {
    uv_mutex_unlock(&s->lock);
    return MULTILOOP_DICT_NO_MEMORY;
  }
  if (old != NULL) remove_entry(s, old);
  if (!safe) forced = make_room(s, size, now);
  insert(s, e);
  uv_mutex_unlock(&s->lock);
  return forced ? MULTILOOP_DICT_STORED_FORCED : MULTILOOP_DICT_STORED;
}

/* Copies the entry's value out: a string's bytes into buf (which out->s
 * then points at). 1, or MULTILOOP_DICT_OOM. */
static int read_value(const entry *e, multiloop_value_t *out, multiloop_scratch_t *buf) {
  get_value(e, out);
  if (e->type != MULTILOOP_V_STRING) return 1;
  if (copy_out(buf, 0, e->data + e->klen, e->vlen) != 0) return MULTILOOP_DICT_OOM;
  out->s = buf->p;
  out->len = e->vlen;
  return 1;
}

/* The live value for the key into *out (a string's bytes into buf, which
 * out->s then points at); the entry becomes the most recently used. Returns
 * 1, 0 when absent or expired, MULTILOOP_DICT_WRONG_KIND for a list, or
 * MULTILOOP_DICT_OOM when buf could not grow. */
int multiloop_dict_get(multiloop_dict_t *d, const char *k, size_t kn, multiloop_value_t *out,
                       multiloop_scratch_t *buf) {
  uint64_t h = hash_key(d, k, kn);
  stripe *s = stripe_of(d, h);
  entry *e;
  int rc = 0;
  uv_mutex_lock(&s->lock);
  if ((e = find(s, h, k, kn, uv_hrtime())) == NULL) {
    rc = 0;
  } else if (e->type == T_LIST) {
    rc = MULTILOOP_DICT_WRONG_KIND;
  } else {
    lru_touch(s, e);
    rc = read_value(e, out, buf);
  }
  uv_mutex_unlock(&s->lock);
  return rc;
}

/* As get, but an expired entry that is still there is read too (and left
 * there), *stale saying whether it had expired. A live entry becomes the
 * most recently used; a stale one does not. */
int multiloop_dict_get_stale(multiloop_dict_t *d, const char *k, size_t kn,
                             multiloop_value_t *out, multiloop_scratch_t *buf, int *stale) {
  uint64_t h = hash_key(d, k, kn);
  stripe *s = stripe_of(d, h);
  entry *e;
  int rc = 0;
  *stale = 0;
  uv_mutex_lock(&s->lock);
  if ((e = *lookup(s, h, k, kn)) == NULL) {
    rc = 0;
  } else if (e->type == T_LIST) {
    rc = MULTILOOP_DICT_WRONG_KIND;
  } else {
    *stale = expired(e, uv_hrtime());
    if (!*stale) lru_touch(s, e);
    rc = read_value(e, out, buf);
  }
  uv_mutex_unlock(&s->lock);
  return rc;
}

/* The milliseconds left before the key expires (rounded up, so an entry
 * that will expire never reads as 0), 0 when it never does, or -1 when it
 * is absent. */
int64_t multiloop_dict_ttl(multiloop_dict_t *d, const char *k, size_t kn) {
  uint64_t h = hash_key(d, k, kn), now = uv_hrtime(), expires = 0;
  stripe *s = stripe_of(d, h);
  entry *e;
  uv_mutex_lock(&s->lock);
  if ((e = find(s, h, k, kn, now)) != NULL) expires = e->expires;
  uv_mutex_unlock(&s->lock);
  if (e == NULL) return -1;
  return expires == 0 ? 0 : (int64_t)((expires - now + NS_PER_MS - 1) / NS_PER_MS);
}

/* Adds n (a number) to the key's number, atomically, into *sum. A missing
 * key starts from *init (NULL: MULTILOOP_DICT_NOT_FOUND) and then expires
 * after init_ttl_ms (0: never). Integers add as integers (wrapping around,
 * as in Lua); with a float on either side the sum is a float. An existing
 * entry keeps its ttl. Returns MULTILOOP_DICT_STORED (or _FORCED), or
 * _NOT_FOUND, _NOT_A_NUMBER (a list too), _NO_MEMORY. */
int multiloop_dict_incr(multiloop_dict_t *d, const char *k, size_t kn, const multiloop_value_t *n,
                        const multiloop_value_t *init, uint64_t init_ttl_ms,
                        multiloop_value_t *sum) {
  uint64_t h = hash_key(d, k, kn), now = uv_hrtime();
  stripe *s = stripe_of(d, h);
  multiloop_value_t base;
  int rc = MULTILOOP_DICT_STORED;
  entry *e;

  memset(&base, 0, sizeof base);
  memset(sum, 0, sizeof *sum);
  if (init != NULL) base = *init;
  uv_mutex_lock(&s->lock);
  e = find(s, h, k, kn, now);
  if (e != NULL) {
    if (e->type != MULTILOOP_V_INTEGER && e->type != MULTILOOP_V_FLOAT)
      rc = MULTILOOP_DICT_NOT_A_NUMBER;
    else
      get_value(e, &base);
  } else if (init == NULL) {
    rc = MULTILOOP_DICT_NOT_FOUND;
  }
  if (rc == MULTILOOP_DICT_STORED) {
    if (base.type == MULTILOOP_V_INTEGER && n->type == MULTILOOP_V_INTEGER) {
      sum->type = MULTILOOP_V_INTEGER;
      sum->i = (lua_Integer)((lua_Unsigned)base.i + (lua_Unsigned)n->i);
    } else {
      sum->type = MULTILOOP_V_FLOAT;
      sum->n = (base.type == MULTILOOP_V_INTEGER ? (lua_Number)base.i : base.n) +
               (n->type == MULTILOOP_V_INTEGER ? (lua_Number)n->i : n->n);
    }
    if (e != NULL) {
      put_value(e, sum);
      lru_touch(s, e);
    } else if (!fits(s, entry_size(kn, 0)) ||
               (e = new_entry(h, k, kn, sum,
                              init_ttl_ms == 0 ? 0 : now + init_ttl_ms * NS_PER_MS)) == NULL) {
      rc = MULTILOOP_DICT_NO_MEMORY;
    } else {
      if (make_room(s, entry_size(kn, 0), now)) rc = MULTILOOP_DICT_STORED_FORCED;
      insert(s, e);
    }
  }
  uv_mutex_unlock(&s->lock);
  return rc;
}

/* Sets the live key's expiry to ttl_ms from now (0: never expires). 1, or 0
 * when the key is absent. */
int multiloop_dict_expire(multiloop_dict_t *d, const char *k, size_t kn, uint64_t ttl_ms) {
  uint64_t h = hash_key(d, k, kn), now = uv_hrtime();
  stripe *s = stripe_of(d, h);
  entry *e;
  uv_mutex_lock(&s->lock);
  if ((e = find(s, h, k, kn, now)) != NULL) e->expires = ttl_ms == 0 ? 0 : now + ttl_ms * NS_PER_MS;
  uv_mutex_unlock(&s->lock);
  return e != NULL;
}

/* 1 when a live entry was removed, 0 when the key was absent. */
int multiloop_dict_delete(multiloop_dict_t *d, const char *k, size_t kn) {
  uint64_t h = hash_key(d, k, kn);
  stripe *s = stripe_of(d, h);
  entry *e;
  uv_mutex_lock(&s->lock);
  if ((e = find(s, h, k, kn, uv_hrtime())) != NULL) remove_entry(s, e);
  uv_mutex_unlock(&s->lock);
  return e != NULL;
}

/* --- lists ------------------------------------------------------------------ */

/* The live list under the key into *out: 1, 0 when absent, or
 * MULTILOOP_DICT_WRONG_KIND when the key holds another value. */
static int find_list(stripe *s, uint64_t h, const char *k, size_t kn, uint64_t now,
                     entry **out) {
  entry *e = find(s, h, k, kn, now);
  *out = e;
  if (e == NULL) return 0;
  return e->type == T_LIST ? 1 : MULTILOOP_DICT_WRONG_KIND;
}

/* Pushes v (an integer, float or string) at the head (left) or the tail of
 * the key's list, made when absent; *len is the new length. Never evicts a
 * live entry (as OpenResty): only expired ones at the LRU end make room.
 * Returns MULTILOOP_DICT_STORED, or _NOT_A_LIST, _NO_MEMORY with nothing
 * changed. */
int multiloop_dict_push(multiloop_dict_t *d, const char *k, size_t kn, int left,
                        const multiloop_value_t *v, size_t *len) {
  uint64_t h = hash_key(d, k, kn), now = uv_hrtime();
  stripe *s = stripe_of(d, h);
  size_t nsize = list_node_size(v), need = nsize;
  entry *e;
  lnode *n;
  list *l = NULL;
  int found;

  *len = 0;
  uv_mutex_lock(&s->lock);
  found = find_list(s, h, k, kn, now, &e);
  if (found < 0) {
    uv_mutex_unlock(&s->lock);
    return MULTILOOP_DICT_NOT_A_LIST;
  }
  if (!found) need += entry_size(kn, sizeof(list));
  /* The entry (a live one is not evicted) must fit whole, then the room. */
  if (!fits(s, (found ? entry_size(kn, e->vlen) : 0) + need) ||
      !room_without_eviction(s, need, now) || (n = malloc(nsize)) == NULL) {
    uv_mutex_unlock(&s->lock);
    return MULTILOOP_DICT_NO_MEMORY;
  }
  if (!found) {
    multiloop_value_t none;
    memset(&none, 0, sizeof none);
    none.type = MULTILOOP_V_INTEGER;
    if ((l = calloc(1, sizeof *l)) == NULL || (e = new_entry(h, k, kn, &none, 0)) == NULL) {
      free(l);
      free(n);
      uv_mutex_unlock(&s->lock);
      return MULTILOOP_DICT_NO_MEMORY;
    }
    e->type = T_LIST;
    e->v.l = l;
    e->vlen = sizeof(list);
  } else {
    l = e->v.l;
    lru_touch(s, e);
  }
  n->type = v->type;
  n->len = 0;
  if (v->type == MULTILOOP_V_INTEGER) n->v.i = v->i;
  else if (v->type == MULTILOOP_V_FLOAT) n->v.n = v->n;
  else memcpy(n->data, v->s, n->len = v->len);
  if (left) {
    n->prev = NULL;
    n->next = l->head;
    if (l->head) l->head->prev = n;
    else l->tail = n;
    l->head = n;
  } else {
    n->next = NULL;
    n->prev = l->tail;
    if (l->tail) l->tail->next = n;
    else l->head = n;
    l->tail = n;
  }
  l->len++;
  e->vlen += nsize;
  if (found) s->used += nsize;
  else insert(s, e);                     /* counts the entry, header and node */
  *len = l->len;
  uv_mutex_unlock(&s->lock);
  return MULTILOOP_DICT_STORED;
}

/* A list element as a value (a string's bytes stay where they are). */
static void node_value(const lnode *n, multiloop_value_t *v) {
  memset(v, 0, sizeof *v);
  v->type = n->type;
  if (n->type == MULTILOOP_V_INTEGER) v->i = n->v.i;
  else if (n->type == MULTILOOP_V_FLOAT) v->n = n->v.n;
  else v->len = n->len;
}

/* Removes the head (left) or tail element of the key's list into *out (a
 * string's bytes into buf); a list left empty is removed. Returns 1, 0 when
 * the key is absent, MULTILOOP_DICT_WRONG_KIND when it is not a list, or
 * MULTILOOP_DICT_OOM (nothing removed) when buf could not grow. */
int multiloop_dict_pop(multiloop_dict_t *d, const char *k, size_t kn, int left,
                       multiloop_value_t *out, multiloop_scratch_t *buf) {
  uint64_t h = hash_key(d, k, kn);
  stripe *s = stripe_of(d, h);
  entry *e;
  lnode *n;
  list *l;
  int rc;
  uv_mutex_lock(&s->lock);
  rc = find_list(s, h, k, kn, uv_hrtime(), &e);
  if (rc != 1) goto done;
  l = e->v.l;
  n = left ? l->head : l->tail;          /* never NULL: an empty list is removed */
  node_value(n, out);
  if (n->type == MULTILOOP_V_STRING) {
    if (copy_out(buf, 0, n->data, n->len) != 0) {
      rc = MULTILOOP_DICT_OOM;
      goto done;
    }
    out->s = buf->p;
  }
  if (n->prev) n->prev->next = n->next;
  else l->head = n->next;
  if (n->next) n->next->prev = n->prev;
  else l->tail = n->prev;
  l->len--;
  e->vlen -= sizeof(lnode) + n->len;
  s->used -= sizeof(lnode) + n->len;
  free(n);
  if (l->len == 0) remove_entry(s, e);
  else lru_touch(s, e);
done:
  uv_mutex_unlock(&s->lock);
  return rc;
}

/* The length of the key's list into *len (0 when absent): 0, or
 * MULTILOOP_DICT_WRONG_KIND when the key is not a list. */
int multiloop_dict_llen(multiloop_dict_t *d, const char *k, size_t kn, size_t *len) {
  uint64_t h = hash_key(d, k, kn);
  stripe *s = stripe_of(d, h);
  entry *e;
  int rc;
  *len = 0;
  uv_mutex_lock(&s->lock);
  rc = find_list(s, h, k, kn, uv_hrtime(), &e);
  if (rc == 1) {
    *len = e->v.l->len;
    lru_touch(s, e);
  }
  uv_mutex_unlock(&s->lock);
  return rc < 0 ? rc : 0;
}

/* The elements start..stop of the key's list, by Redis's rules (0-based,
 * negative counts from the end, both ends included, clipped to the list),
 * copied into buf as records: a multiloop_value_t (s NULL), then a
 * string's bytes; *count says how many. Returns 0 (an absent key has no
 * elements), MULTILOOP_DICT_WRONG_KIND when the key is not a list, or
 * MULTILOOP_DICT_OOM when buf could not grow. */
int multiloop_dict_lrange(multiloop_dict_t *d, const char *k, size_t kn, int64_t start,
                          int64_t stop, multiloop_scratch_t *buf, size_t *count) {
  uint64_t h = hash_key(d, k, kn);
  stripe *s = stripe_of(d, h);
  size_t off = 0, i;
  int64_t len;
  entry *e;
  lnode *n;
  int rc;
  *count = 0;
  uv_mutex_lock(&s->lock);
  rc = find_list(s, h, k, kn, uv_hrtime(), &e);
  if (rc != 1) goto done;
  rc = 0;
  lru_touch(s, e);
  len = (int64_t)e->v.l->len;
  if (start < 0) start = start < -len ? 0 : start + len;
  if (stop < 0) stop += len;             /* may stay negative: then empty */
  if (stop >= len) stop = len - 1;
  if (start > stop) goto done;
  /* Walk from the nearer end. */
  if (start <= len - 1 - stop) {
    for (n = e->v.l->head, i = 0; i < (size_t)start; i++) n = n->next;
  } else {
    for (n = e->v.l->tail, i = (size_t)(len - 1); i > (size_t)start; i--) n = n->prev;
  }
  for (i = (size_t)start; i <= (size_t)stop; i++, n = n->next) {
    multiloop_value_t v;
    node_value(n, &v);
    if (copy_out(buf, off, (const char *)&v, sizeof v) != 0 ||
        copy_out(buf, off + sizeof v, n->data, n->len) != 0) {
      rc = MULTILOOP_DICT_OOM;
      break;
    }
    off += sizeof v + n->len;
    (*count)++;
  }
done:
  uv_mutex_unlock(&s->lock);
  return rc < 0 ? rc : 0;
}

/* --- the whole dictionary: one stripe at a time, so not a snapshot -------- */

/* Up to max live keys (0: all), in no particular order, copied into buf as
 * records of a size_t length and the key's bytes; *count says how many.
 * Returns 0, or -1 when buf could not grow (*count keys are there then). */
int multiloop_dict_keys(multiloop_dict_t *d, size_t max, multiloop_scratch_t *buf,
                        size_t *count) {
  uint64_t now = uv_hrtime();
  size_t off = 0, n = 0;
  unsigned i;
  int rc = 0;
  for (i = 0; i < d->nstripes && rc == 0 && (max == 0 || n < max); i++) {
    stripe *s = &d->stripes[i];
    entry *e;
    uv_mutex_lock(&s->lock);
    purge_expired(s, now, 0);
    for (e = s->head; e != NULL && (max == 0 || n < max); e = e->next) {
      if (copy_out(buf, off, (const char *)&e->klen, sizeof e->klen) != 0 ||
          copy_out(buf, off + sizeof e->klen, e->data, e->klen) != 0) {
        rc = -1;
        break;
      }
      off += sizeof e->klen + e->klen;
      n++;
    }
    uv_mutex_unlock(&s->lock);
  }
  *count = n;
  return rc;
}

/* The number of live entries; expired ones are freed on the way. */
size_t multiloop_dict_count(multiloop_dict_t *d) {
  uint64_t now = uv_hrtime();
  size_t total = 0;
  unsigned i;
  for (i = 0; i < d->nstripes; i++) {
    stripe *s = &d->stripes[i];
    uv_mutex_lock(&s->lock);
    purge_expired(s, now, 0);
    total += s->count;
    uv_mutex_unlock(&s->lock);
  }
  return total;
}

/* Frees up to max expired entries (0: every one); returns how many. */
size_t multiloop_dict_flush_expired(multiloop_dict_t *d, size_t max) {
  uint64_t now = uv_hrtime();
  size_t total = 0;
  unsigned i;
  for (i = 0; i < d->nstripes && (max == 0 || total < max); i++) {
    stripe *s = &d->stripes[i];
    uv_mutex_lock(&s->lock);
    total += purge_expired(s, now, max == 0 ? 0 : max - total);
    uv_mutex_unlock(&s->lock);
  }
  return total;
}

/* Frees every entry; the buckets go back to their first size. */
void multiloop_dict_flush(multiloop_dict_t *d) {
  unsigned i;
  for (i = 0; i < d->nstripes; i++) {
    stripe *s = &d->stripes[i];
    entry **small = calloc(INITIAL_BUCKETS, sizeof *small);  /* outside the lock */
    uv_mutex_lock(&s->lock);
    small = stripe_clear(s, small);
    uv_mutex_unlock(&s->lock);
    free(small);                         /* the one not used, or NULL */
  }
}

/* Bytes not in use, summed over the stripes (so the largest entry that fits
 * without eviction may be smaller). */
size_t multiloop_dict_free_space(multiloop_dict_t *d) {
  size_t total = 0;
  unsigned i;
  for (i = 0; i < d->nstripes; i++) {
    stripe *s = &d->stripes[i];
    uv_mutex_lock(&s->lock);
    total += s->cap - s->used;
    uv_mutex_unlock(&s->lock);
  }
  return total;
}

const char *multiloop_dict_name(const multiloop_dict_t *d) { return d->name; }
size_t multiloop_dict_capacity(const multiloop_dict_t *d) { return d->capacity; }
