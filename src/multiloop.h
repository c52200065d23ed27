/*
 * multiloop.h: the types every part of the core shares, and who owns what.
 *
 * Threads:
 *   - the main thread runs the Lua state that created the server (server.c);
 *   - one acceptor thread owns the listening socket and its own uv loop (acceptor.c);
 *   - N worker threads each own a uv loop and a lua_State (worker.c, conn.c,
 *     stream.c).
 * Nothing Lua-shaped crosses a thread. The main thread writes multiloop_config_t
 * before any thread starts and frees it after every thread is joined; the other
 * threads only read it. Connections cross as file descriptors over a socketpair
 * opened as IPC pipes on both ends (the libuv multi-echo-server hand-off).
 */
#ifndef MULTILOOP_H
#define MULTILOOP_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <uv.h>

#include "lua_noreturn.h"

/* Everything declared here is internal: hidden even when a build (luarocks'
 * builtin one) does not pass -fvisibility=hidden. */
#pragma GCC visibility push(hidden)

#define MULTILOOP_READ_BUFFER_SIZE (64 * 1024)
/* The registry field that holds a worker state's `worker` object (worker.c),
 * read by core.worker() (module.c). */
#define MULTILOOP_WORKER_KEY "multiloop.worker"

typedef enum {
  MULTILOOP_DISPATCH_IPC,     /* uv_write2 over a socketpair per worker */
  MULTILOOP_DISPATCH_QUEUE,   /* the worker's inbox, rung by uv_async_send */
  MULTILOOP_DISPATCH_REUSEPORT /* no acceptor: a SO_REUSEPORT socket per worker */
} multiloop_dispatch;

typedef enum {
  MULTILOOP_BALANCE_ROUND_ROBIN,
  MULTILOOP_BALANCE_LEAST_CONNECTIONS
} multiloop_balance;

typedef enum {
  MULTILOOP_HANDLER_MODULE,   /* a module name, require()d in each worker */
  MULTILOOP_HANDLER_PATH,     /* a path to a .lua file, run in each worker */
  MULTILOOP_HANDLER_BYTECODE  /* string.dump of a function with no upvalues */
} multiloop_handler_kind;

/* Plain, immutable data: written by the main thread before start, read by all. */
typedef struct {
  char *host;
  int port;
  char *path;                 /* a Unix socket instead of host/port, or NULL */
  int unlink;                 /* remove a stale socket file at path */
  multiloop_dispatch dispatch;
  multiloop_balance balance;
  int backlog;
  int nworkers;
  multiloop_handler_kind handler_kind;
  char *handler;              /* module name, path, or bytecode */
  size_t handler_len;
  char *config;               /* the user's config, encoded by copy.c */
  size_t config_len;
  char *package_path;
  char *package_cpath;
  /* Connections (conn.c; the water marks: stream.c) */
  int max_connections;        /* 0: unlimited */
  uint64_t idle_timeout;      /* ms, 0: none */
  size_t write_high_water;    /* write() returns false above this many queued bytes */
  size_t write_low_water;     /* on_drain runs when the queue falls to this */
  int nodelay;                /* TCP_NODELAY on accepted connections */
  unsigned keepalive;         /* seconds, 0: off */
  /* Inbox limit (inbox.c, message.c) */
  size_t inbox_limit;         /* bytes of messages queued per worker: send says "full" past it */
  /* Unix socket permissions (listener.c) */
  int mode;                   /* chmod'ed after bind, before listen; -1: leave the umask's */
  /* Start timeout (server.c, worker.c) */
  uint64_t start_timeout;     /* ms a worker may take to load the handler and run init */
  /* Sequential connections (serve.c) */
  size_t receive_limit;       /* bytes a line, an until-pattern or "*a" may buffer */
  /* Outbound connections: name resolution (resolve.c) */
  uint64_t dns_cache_ttl;     /* ms an answer is reused, 0: never */
  int dns_max_lookups;        /* lookups one worker runs at once on libuv's pool */
  /* TLS (tls.c): the server's contexts (NULL: plain), and the client's for
   * sslhandshake (made on first use; tls_ca's path). */
  struct multiloop_tls_s *tls;
  struct multiloop_tls_client_s *tls_client;
  /* PROXY protocol (proxy.c): the trusted sources and timeout, or NULL. */
  struct multiloop_proxy_cfg_s *proxy;
  /* Socket activation and inherited sockets (activation.c) */
  int ninherit;               /* inherited sockets to listen on (dups of them); 0: none */
  int *inherit_fds;           /* malloc'd: their fds, ninherit of them */
  char *inherit_listen;       /* the `listen` option that named them ("systemd:web"), or NULL */
  /* Logs (log.c): made by core.new from log and log_level, freed with the
   * config; the pointer never changes, what it points to locks itself. */
  struct multiloop_logger_s *logger;
  /* Reload (worker.c): ms an old generation may drain before its
   * connections close with reason "reload". */
  uint64_t drain_timeout;
} multiloop_config_t;
/* What a worker loads (worker.c): the handler and the encoded config, from
 * the config at start, or server:reload's (server.c) at a reload. */
typedef struct multiloop_reload_s {
  multiloop_handler_kind kind;
  const char *handler;
  size_t handler_len;
  const char *config;
  size_t config_len;
} multiloop_reload_t;
typedef struct multiloop_tls_s multiloop_tls_t;
typedef struct multiloop_tls_client_s multiloop_tls_client_t;
typedef struct multiloop_tls_worker_s multiloop_tls_worker_t;
typedef struct multiloop_proxy_cfg_s multiloop_proxy_cfg_t;

/* inbox_limit: the default, and the bound server.c checks (as init.lua does). */
#define MULTILOOP_INBOX_LIMIT_DEFAULT (64 * 1024 * 1024)
#define MULTILOOP_INBOX_LIMIT_MAX 0x7fffffff
/* receive_limit: the default and the bound (as init.lua checks them). */
#define MULTILOOP_RECEIVE_LIMIT_DEFAULT (1024 * 1024)
#define MULTILOOP_RECEIVE_LIMIT_MAX 0x7fffffff

/* dns_*: the defaults and bounds (as init.lua's). */
#define MULTILOOP_DNS_CACHE_TTL_DEFAULT 30000
#define MULTILOOP_DNS_MAX_LOOKUPS_DEFAULT 4
#define MULTILOOP_DNS_MAX_LOOKUPS_MAX 64

/* log: the longest path (PATH_MAX less its NUL), as init.lua checks it. */
#define MULTILOOP_LOG_MAX_PATH 4095

/* Bounds that protect memory, checked by core.new (server.c) as well as by
 * lua/multiloop/init.lua. */
#define MULTILOOP_MAX_WORKERS 1024
#define MULTILOOP_MAX_PATH 107        /* sizeof sun_path - 1: the path and its NUL */
#define MULTILOOP_MAX_HOST 253        /* the longest DNS name */

/* Where one start() listens (listener.c): the TCP address resolved once, so
 * that every socket of the start binds the same one, and the Unix socket file
 * bind made, which stop removes only while the path still names it. */
typedef struct {
  struct sockaddr_storage addr;        /* TCP: port 0 here, set per socket */
  socklen_t addrlen;
  int unix_made;                       /* bind made the file at cfg->path */
  dev_t unix_dev;                      /* ... and this is the file it made */
  ino_t unix_ino;
} multiloop_listen_addr_t;

typedef struct multiloop_runtime_s multiloop_runtime_t;
typedef struct multiloop_worker_s multiloop_worker_t;
typedef struct multiloop_resolver_s multiloop_resolver_t;    /* resolve.c */
typedef struct multiloop_resolve_s multiloop_resolve_t;
typedef struct multiloop_connect_s multiloop_connect_t;      /* outbound.c */
typedef struct multiloop_pool_s multiloop_pool_t;

/* Light threads (thread.c): a coroutine of a worker's state that the worker
 * resumes from its loop callbacks. Opaque outside thread.c. */
typedef struct multiloop_thread_s multiloop_thread_t;
typedef struct {                       /* a FIFO of threads (intrusive) */
  multiloop_thread_t *head, *tail;
  int n;
} multiloop_tqueue_t;
typedef struct {                       /* a worker's light threads */
  multiloop_thread_t *live;            /* every live thread (spawned, or a timer's that yielded) */
  multiloop_tqueue_t ready;            /* to resume on the next turn of the loop */
  uv_idle_t ready_idle;                /* runs `ready`; open from start to the end of the loop */
  multiloop_thread_t *spare;           /* a timer callback's thread, kept while callbacks do not yield */
  int count;                           /* live threads */
  int closing;                         /* the worker is closing: sleep returns nil, "stopped" */
  int open;                            /* ready_idle is initialised */
} multiloop_threads_t;

/* A message for a worker's inbox (inbox.c): plain C data only. */
typedef enum {
  MULTILOOP_MSG_FD,                    /* a connection to serve (queue dispatch) */
  MULTILOOP_MSG_VALUE,                 /* a copied Lua value (copy.c) for message() */
  MULTILOOP_MSG_STOP,                  /* graceful stop: `timeout` ms */
  MULTILOOP_MSG_RELOAD                 /* reload step `timeout` (MULTILOOP_RELOAD_*) */
} multiloop_msg_kind;

typedef struct multiloop_msg_s {
  struct multiloop_msg_s *next;
  multiloop_msg_kind kind;
  int from;                            /* the sending worker's id, 0 for the main state */
  uv_os_sock_t fd;                     /* MULTILOOP_MSG_FD, else -1 */
  uint64_t timeout;                    /* MULTILOOP_MSG_STOP */
  int keep;                            /* preallocated: multiloop_msg_free leaves it */
  size_t len;                          /* MULTILOOP_MSG_VALUE: bytes in data */
  char data[];
} multiloop_msg_t;

typedef void (*multiloop_inbox_handler)(multiloop_worker_t *w, multiloop_msg_t *msg);

typedef struct {
  uv_mutex_t lock;
  multiloop_msg_t *head, *tail;
  size_t queued;                       /* lock: bytes of counted messages not yet handled */
  uv_async_t async;
  int open;                            /* written under lock by the owner only */
  int initialized;                     /* the lock exists: destroy after the join */
  multiloop_worker_t *owner;
  multiloop_inbox_handler handle;
} multiloop_inbox_t;
typedef struct multiloop_deadline_list_s multiloop_deadline_list_t;
typedef struct multiloop_deadline_s multiloop_deadline_t;

/* Runs on the worker thread when a deadline of `ms` expires; the entry has
 * already left its list, so the callback may set it again. */
typedef void (*multiloop_deadline_cb)(multiloop_deadline_t *d, uint64_t ms);

/* A deadline, embedded in its owner (deadline.c): its place in one of the
 * worker's per-duration lists, and what to call when it expires. */
struct multiloop_deadline_s {
  multiloop_deadline_list_t *list;     /* NULL: not running */
  multiloop_deadline_t *prev, *next;
  uint64_t last;                       /* loop time the period began (set or touch), ms */
  multiloop_deadline_cb expire;
};
typedef struct multiloop_conn_s multiloop_conn_t;
typedef struct multiloop_timer_s multiloop_timer_t;   /* timer.c */

/* A listening socket and our own accept path (listener.c). */
typedef struct multiloop_listener_s multiloop_listener_t;
/* Takes the accepted fd, and a slot for it (multiloop_slot_take). */
typedef void (*multiloop_fd_cb)(multiloop_listener_t *l, uv_os_sock_t fd);

struct multiloop_listener_s {
  multiloop_runtime_t *rt;
  uv_os_sock_t fd;
  uv_poll_t poll;
  uv_timer_t retry_timer;              /* after EMFILE/ENFILE, or a limit re-check */
  uv_timer_t quiet_timer;              /* ends an EMFILE episode */
  multiloop_fd_cb on_fd;
  void *data;
  int started, closing, polling;
  int paused_for_limit, paused_for_fds;
  int woken_on_release;                /* a release rings us (the acceptor) */
  unsigned long fd_failures;           /* in the current EMFILE episode */
  char who[32];                        /* "acceptor", "worker 2": for log lines */
  /* Read by the main thread for stats(). */
  atomic_uint_fast64_t accepted;
  atomic_uint_fast64_t accept_errors;
};

/* Reload (worker.c): a generation of a worker's handler code, its own Lua
 * state and everything that lives in it. A worker has one current
 * generation (new connections, timers and messages go to it) and, while a
 * reload drains, one old one, which keeps serving the connections and light
 * threads it has until they end or drain_timeout, and is then closed on the
 * worker's thread. Every object made in a state (a connection: its 1-bit
 * `gen`; a light thread, a timer, a pool, a connect: a pointer) calls back
 * into that state alone. The state's allocator userdata is its generation
 * (lua_setallocf over luaL_newstate's own allocator, which ignores it), so
 * a C function finds the generation of the state that calls it with
 * multiloop_gen_of(L). Worker thread only, but the counters it publishes. */
typedef struct multiloop_gen_s {
  multiloop_worker_t *w;
  lua_State *L;                        /* NULL: this slot is free */
  int handler_ref;                     /* registry: the handler table */
  int worker_ref;                      /* registry: the `worker` table */
  int serve;                           /* the handler has serve (sequential), not connect */
  int cork_ref;                        /* serve.c: the cork table (0: not made yet) */
  multiloop_threads_t th;              /* light threads (thread.c) */
  multiloop_timer_t *timers;           /* open timers (timer.c) */
  multiloop_pool_t *pools;             /* keepalive pools, by key (outbound.c) */
  int nconns;                          /* connection objects pinned (conn.c, outbound.c) */
  int nconnects;                       /* connects in flight (outbound.c) */
  int pending;                         /* closes in flight whose callbacks use L */
  uint64_t number;                     /* 1 at start, one more at each reload */
  uint64_t drain_due;                  /* retired: loop time its drain_timeout ends */
  unsigned retired : 1;                /* an old one: closes once nothing is left in it */
  unsigned forced : 1;                 /* drain_timeout passed: its threads are closed too */
  unsigned closed : 1;                 /* its timers and threads are closing: lua_close next */
} multiloop_gen_t;

static inline multiloop_gen_t *multiloop_gen_of(lua_State *L) {
  void *ud;
  (void)lua_getallocf(L, &ud);
  return ud;
}

struct multiloop_worker_s {
  int id;                              /* 1..nworkers */
  const multiloop_config_t *cfg;
  multiloop_runtime_t *rt;
  uv_thread_t thread;
  int thread_started;
  uv_file pipe_fd;                     /* worker end of the hand-off socketpair */

  /* Only the worker thread touches these. */
  uv_loop_t loop;
  /* Reload: the generations (above); gen[cur] is the current one. */
  multiloop_gen_t gen[2];
  int cur;
  uv_timer_t drain_timer;              /* the old generation's drain_timeout */
  int reload_deferred;                 /* a PREPARE waits for the old generation to close */
  uv_pipe_t pipe;
  union {                              /* ipc: refuses a pending connection when */
    uv_handle_t handle;                /* malloc fails (worker.c); busy from */
    uv_stream_t stream;                /* uv_accept to its close callback */
    uv_tcp_t tcp;
    uv_pipe_t pipe;
  } spare;
  int spare_busy;
  int pipe_left;                       /* ipc: pending on the pipe as take_pending returned */
  multiloop_inbox_t inbox;             /* fds (queue dispatch), messages, stops */
  multiloop_msg_t *stop_msg;           /* preallocated: a stop can always be posted */
  int stop_posted;                     /* main thread: stop_msg is in the inbox */
  multiloop_listener_t listener;       /* reuseport dispatch only */
  uv_os_sock_t listen_fd;              /* reuseport: made by the main thread, or -1 */
  uv_timer_t grace_timer;              /* graceful stop: closes what is left */
  int closing;                         /* every handle is being closed: the loop ends */
  char *read_buffer;                   /* one per loop, shared by every read */
  multiloop_conn_t *conns;             /* open connections, to close them at stop */
  uv_timer_t deadline_timer;           /* one timer for every deadline (deadline.c) */
  uint64_t deadline_due;               /* when it fires, while it is active */
  multiloop_deadline_list_t *deadline_lists;
  /* serve.c: the bytes a read event hands a serve connection, while it is
   * handing them (the reader it wakes consumes from here), and what that
   * reader's pattern found in them. One per worker: events do not nest. */
  struct {
    multiloop_conn_t *conn;            /* NULL outside a serve connection's read event */
    const char *p;
    size_t len, used;
    int found;                         /* the scan's result for the waiting reader */
    size_t ret, consume;
    /* Sends on that connection during the event, held back to go out in
     * one write as it ends: a registry table of the strings (made once per
     * generation: gen->cork_ref), how many, their bytes, and whose they are. */
    int sends;                         /* sends during the event: the first goes at once */
    int cork_n;
    size_t cork_bytes;
    multiloop_conn_t *cork_conn;
  } view;
  int stopping;

  /* Outbound connections (outbound.c, resolve.c): the worker thread's
   * alone, but the counters, which it publishes (relaxed) for stats. */
  multiloop_connect_t *connects;       /* connects in flight (stop ends them) */
  multiloop_resolver_t *resolver;      /* the DNS cache and lookup queue, made on first use */
  atomic_uint_fast64_t connects_ok;    /* connects that succeeded (not reuses) */
  atomic_uint_fast64_t connect_errors;
  atomic_uint_fast64_t reused;         /* connects served from a pool */
  atomic_int pooled;                   /* idle in the pools now */

  /* TLS (tls.c): made on the first TLS connection; the counters published
   * (relaxed) for stats. */
  multiloop_tls_worker_t *tls;
  atomic_uint_fast64_t tls_handshakes;
  atomic_uint_fast64_t tls_errors;     /* failed handshakes, bad records, alerts */
  /* PROXY protocol (proxy.c, conn.c): connections refused before the handler. */
  atomic_uint_fast64_t proxy_errors;

  /* Messages (message.c): msg_ready is set once by the worker (its inbox
   * is up) and read by any sender before it posts. */
  atomic_int msg_ready;                /* the inbox takes messages */

  /* Light threads (thread.c): `nthreads`, published (relaxed) for stats. */
  atomic_int nthreads;                 /* both generations' th.count, for server:stats() */
  /* Reload: published (relaxed) for stats. */
  atomic_uint_fast64_t generation;     /* gen[cur].number */
  atomic_int old_conns;                /* connections still on the old generation */

  /* Reload handshake (worker.c, server.c): under rt->start_lock. */
  int reload_answered;                 /* the worker did the step the main thread posted */
  int reload_failed;
  char *reload_error;                  /* malloc'd message when it failed */
  lua_State *reload_L;                 /* the state a PREPARE is loading: start_timeout's hook */
  int reload_interrupted;              /* the main thread gave up waiting for the load */

  /* Start handshake: written by the worker before it reports ready
   * (multiloop_worker_ready: rt->start_lock). */
  int failed;
  char *error;                         /* malloc'd message when failed */
  /* Start timeout: both under rt->start_lock. */
  int start_phase;                     /* MULTILOOP_START_* */
  int interrupted;                     /* the main thread gave up waiting for it */
  int start_phase_at_deadline;         /* main thread only: for the message */

  /* Counters: written by this worker, read by the main thread (stats). */
  atomic_int active;                   /* slots held for this worker (slots.c alone) */
  atomic_uint_fast64_t accepted;
  atomic_uint_fast64_t bytes_in;
  atomic_uint_fast64_t bytes_out;
  atomic_int finished;                 /* the loop is done: stop can join */
};

typedef struct {
  uv_thread_t thread;
  int thread_started;
  uv_loop_t loop;
  uv_os_sock_t listen_fd;              /* made by the main thread, owned by `listener` */
  multiloop_listener_t listener;
  uv_async_t stop_async;
  uv_async_t resume_async;             /* a worker freed a slot under max_connections */
  uv_pipe_t *pipes;                    /* acceptor ends, one per worker (ipc) */
  uv_file *pipe_fds;
  int next;                            /* round-robin cursor */
  atomic_uint_fast64_t handed_off;
  /* Several inherited sockets (activation.c): the second and later ones,
   * made by the main thread (multiloop_inherited_open) and freed by it
   * after the join (multiloop_inherited_free); the fds are the main
   * thread's until setup() gives each to its listener (then -1). */
  int nmore;
  multiloop_listener_t *more;
  uv_os_sock_t *more_fds;

  /* Start handshake: written by the acceptor before it posts rt->ready. */
  int failed;
  char *error;
} multiloop_acceptor_t;

/* Where a worker's start is (start timeout): what the message of a stuck
 * one names. */
enum {
  MULTILOOP_START_NEW,                 /* no Lua state yet */
  MULTILOOP_START_LOADING,             /* loading the handler */
  MULTILOOP_START_INIT,                /* in the handler's init(worker) */
  MULTILOOP_START_OPENING,             /* past the Lua code: opening its handles */
  MULTILOOP_START_DONE                 /* up, or failed for good */
};

/* Everything that exists between start() and stop(). */
struct multiloop_runtime_s {
  const multiloop_config_t *cfg;
  uv_sem_t ready;                      /* the acceptor posts once it is up or has failed */
  /* Start timeout: the workers' start handshake, which the main thread
   * waits for with a deadline. */
  uv_mutex_t start_lock;
  uv_cond_t start_cond;                /* signalled as each worker gets to DONE */
  int nready;                          /* workers at MULTILOOP_START_DONE */
  int nreload;                         /* reload: workers that answered the step (under it) */
  /* Reload: what a PREPARE loads, set by the main thread before it posts
   * the step and kept until every worker has answered. */
  const struct multiloop_reload_s *reload;
  atomic_uint_fast64_t next_conn_id;
  /* Connection slots: slots.c's alone (the lock is made and destroyed here). */
  atomic_int active;                   /* slots taken: accepted and not yet closed */
  atomic_int accept_waiting;           /* the acceptor paused at max_connections */
  uv_mutex_t resume_lock;              /* guards resume_bell: no ring after close */
  uv_async_t *resume_bell;             /* the acceptor's resume_async while open, or NULL */
  atomic_uint_fast64_t accept_errors;
  multiloop_acceptor_t acceptor;
  multiloop_worker_t *workers;
  char bound_host[64];                 /* what address() reports */
  int bound_port;
  multiloop_listen_addr_t listen_addr; /* what open_sockets resolved and made */
  /* What the connections are (a path, or an inherited socket's family) and,
   * for an inherited Unix socket, its path for address() (activation.c). */
  int listen_unix;                     /* every listening socket is a Unix one */
  int listen_mixed;                    /* some are, some are not: ask each fd */
  int bound_unix;                      /* address() reports bound_path */
  char bound_path[112];                /* sun_path, "@name" when abstract */
};

/* uv_loop_init, without the fd it leaks on failure: before libuv 1.51
 * (libuv PR #4757) its error path forgot the epoll fd it had made, so each
 * start that failed for want of fds lost one more. It begins by zeroing the
 * loop, so a failure before it sets backend_fd (out of memory for its
 * internal fields, or their mutex) leaves 0 there: the process's fd 0, not
 * ours (an epoll fd that really is 0 then leaks, as before). */
static inline int multiloop_loop_init(uv_loop_t *loop) {
  int rc = uv_loop_init(loop);
#if UV_VERSION_HEX < 0x013300
  if (rc != 0 && loop->backend_fd > 0) {
    close(loop->backend_fd);
    loop->backend_fd = -1;
  }
#endif
  return rc;
}

/* log.c: the log (see its header for the line format). Any thread. Every
 * message of the process goes through multiloop_log (a worker's, who is
 * "worker N") or multiloop_log_as (anyone else: "main", "acceptor"); a
 * record above the logger's level is dropped before it is formatted.
 * conn_id 0: no connection. lg NULL: the current logger (multiloop.log's). */
typedef struct multiloop_logger_s multiloop_logger_t;
enum { MULTILOOP_LOG_ERROR = 1, MULTILOOP_LOG_WARN, MULTILOOP_LOG_INFO, MULTILOOP_LOG_DEBUG };
extern const char *const multiloop_log_levels[];      /* "error" .. "debug", NULL */
int multiloop_log_level(const char *name);             /* MULTILOOP_LOG_*, or 0 */
/* path NULL: stderr. NULL with a message in err ("<path>: <why> (<NAME>)"). */
multiloop_logger_t *multiloop_logger_open(const char *path, int level, char *err,
                                          size_t errlen);
void multiloop_logger_make_current(multiloop_logger_t *lg);
void multiloop_logger_free(multiloop_logger_t *lg);   /* once nothing writes through it */
int multiloop_logger_reopen(multiloop_logger_t *lg, char *err, size_t errlen);  /* 0 or -1 */
const char *multiloop_logger_path(const multiloop_logger_t *lg);   /* NULL: stderr */
int multiloop_log_enabled(const multiloop_logger_t *lg, int level);
void multiloop_log(multiloop_worker_t *w, int level, lua_Integer conn_id, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void multiloop_log_as(multiloop_logger_t *lg, int level, const char *who, lua_Integer conn_id,
                      const char *fmt, ...) __attribute__((format(printf, 5, 6)));
void multiloop_log_text(multiloop_logger_t *lg, int level, const char *who, lua_Integer conn_id,
                        const char *msg, size_t len);
/* From Lua: the level at `first` (raises naming fname when it is not one),
 * the rest joined as print joins them, by spaces. Returns 0 (no results). */
int multiloop_log_lua(lua_State *L, multiloop_logger_t *lg, int first, const char *who,
                      lua_Integer conn_id, const char *fname);
extern const luaL_Reg multiloop_log_funcs[];           /* the core table's log */
int multiloop_log_main(lua_State *L);                  /* core.log: multiloop.log */

/* enter.c: the one door from a libuv callback into Lua. */
int multiloop_enter(multiloop_gen_t *g, lua_CFunction body, void *ev,
                    const lua_Integer *conn_id, const char *what);
int multiloop_traceback(lua_State *L);

/* enter.c: the same door for a light thread. Never raises. Resumes `co` (a
 * light thread's coroutine) from a loop callback (from = its generation's g->L) or from
 * worker.spawn (from = its caller's state). `nargs` values are on co already,
 * pushed without allocating; `push` (may be NULL) pushes more on `from`,
 * protected, and they are moved onto co. Returns lua_resume's status, with
 * *nres as lua_resume sets it. On an error in the thread, or in push (co then
 * stays suspended, not resumed), logs "<what>: <msg>" and co's traceback
 * (level error, worker N, the connection), and leaves the error object on
 * top of co. */
typedef int (*multiloop_push_fn)(lua_State *L, void *ev);   /* returns how many */
int multiloop_resume(multiloop_worker_t *w, lua_State *from, lua_State *co, int nargs,
                     multiloop_push_fn push, void *ev, int *nres, const lua_Integer *conn_id,
                     const char *what);

/* Lua 5.4.6 replaced lua_resetthread(co) with lua_closethread(co, from);
 * Debian 12's 5.4.4 has only the former. Both close co's pending
 * to-be-closed variables and leave an error (if one) on top of its stack. */
#if LUA_VERSION_RELEASE_NUM >= 50406
#define multiloop_closethread(co, from) lua_closethread((co), (from))
#else
#define multiloop_closethread(co, from) ((void)(from), lua_resetthread(co))
#endif

/* copy.c: Lua values as plain bytes, to cross a thread. */
int multiloop_copy_encode(lua_State *L, int idx, const char *root, char **out,
                          size_t *outlen);
void multiloop_copy_decode(lua_State *L, const char *data, size_t len);

/* listener.c */
int multiloop_listen_resolve(const multiloop_config_t *cfg, multiloop_listen_addr_t *la,
                             char *err, size_t errlen);
int multiloop_listen_socket(const multiloop_config_t *cfg, multiloop_listen_addr_t *la,
                            int port, int reuseport, uv_os_sock_t *out, int *bound_port,
                            char *err, size_t errlen);
void multiloop_listen_unlink(const multiloop_config_t *cfg, const multiloop_listen_addr_t *la);
int multiloop_listener_start(multiloop_listener_t *l, uv_loop_t *loop, multiloop_runtime_t *rt,
                             uv_os_sock_t fd, int woken_on_release, const char *who,
                             multiloop_fd_cb on_fd, void *data);
int multiloop_listen_probe(const multiloop_config_t *cfg, multiloop_listen_addr_t *la,
                           int port, int *bound_port, char *err, size_t errlen);
void multiloop_listener_resume(multiloop_listener_t *l);
void multiloop_listener_close(multiloop_listener_t *l);

/* activation.c: inherited listening sockets (socket activation, fd = n). */
int multiloop_listen_fds(lua_State *L);                            /* core.listen_fds */
void multiloop_inherited_config(lua_State *L, multiloop_config_t *cfg);   /* core.new */
int multiloop_inherited_open(multiloop_runtime_t *rt, char *err, size_t errlen);   /* start */
void multiloop_inherited_free(multiloop_runtime_t *rt);             /* runtime_free */
/* Whether the connection fd (fd < 0: the one pending on `pipe`) is a Unix one. */
int multiloop_conn_is_unix(const multiloop_runtime_t *rt, uv_pipe_t *pipe, uv_os_sock_t fd);

/* acceptor.c */
int multiloop_acceptor_start(multiloop_runtime_t *rt);
void multiloop_acceptor_stop(multiloop_runtime_t *rt);

/* slots.c: connection slots (max_connections), counted in rt->active and in
 * their worker's w->active; the only code that changes either. */
int multiloop_slots_full(multiloop_runtime_t *rt);              /* listener: before accept */
void multiloop_slot_take(multiloop_runtime_t *rt, multiloop_worker_t *w);  /* fd accepted */
void multiloop_slot_give(multiloop_runtime_t *rt, multiloop_worker_t *w);  /* any thread */
int multiloop_slots_wait(multiloop_runtime_t *rt, int woken);   /* listener: 1 = pause */
int multiloop_slots_resume(multiloop_runtime_t *rt, int woken); /* listener: 1 = free again */
void multiloop_slots_bell(multiloop_runtime_t *rt, uv_async_t *bell);   /* acceptor */
int multiloop_slots_audit(multiloop_runtime_t *rt);  /* main, all joined: 0 = all back */
/* A worker's slots now (relaxed: least_connections' hint). */
static inline int multiloop_slots_held(multiloop_worker_t *w) {
  return atomic_load_explicit(&w->active, memory_order_relaxed);
}

/* worker.c */
int multiloop_worker_start(multiloop_worker_t *w);
void multiloop_worker_interrupt(multiloop_worker_t *w);  /* main, holding rt->start_lock */
int multiloop_worker_request_stop(multiloop_worker_t *w, uint64_t timeout);  /* main */
void multiloop_worker_join(multiloop_worker_t *w);
void multiloop_worker_drained(multiloop_worker_t *w);  /* the last conn closed at stop */
/* Reload: something of g's ended (a connection's object, a connect, a
 * thread, a close in flight): a retired generation with nothing left closes. */
void multiloop_gen_check(multiloop_gen_t *g);
int multiloop_worker_request_reload(multiloop_worker_t *w, int step);   /* main */
void multiloop_worker_reload_interrupt(multiloop_worker_t *w);  /* main, holding rt->start_lock */
enum { MULTILOOP_RELOAD_PREPARE = 1, MULTILOOP_RELOAD_COMMIT, MULTILOOP_RELOAD_ABORT };

/* inbox.c */
int multiloop_inbox_init(multiloop_inbox_t *box, uv_loop_t *loop,
                         multiloop_worker_t *owner, multiloop_inbox_handler handle);
int multiloop_inbox_post(multiloop_inbox_t *box, multiloop_msg_t *msg);  /* any thread */
int multiloop_inbox_post_counted(multiloop_inbox_t *box, multiloop_msg_t *msg, size_t bytes,
                                 size_t limit);                          /* any thread */
multiloop_msg_t *multiloop_inbox_close(multiloop_inbox_t *box);  /* what was queued */
void multiloop_inbox_destroy(multiloop_inbox_t *box);  /* after the owner is joined */
void multiloop_msg_free(multiloop_msg_t *msg);

/* deadline.c: runs only on a worker thread. */
void multiloop_deadlines_init(multiloop_worker_t *w);
void multiloop_deadlines_close(multiloop_worker_t *w);   /* after every entry is removed */
void multiloop_deadline_init(multiloop_deadline_t *d, multiloop_deadline_cb expire);
int multiloop_deadline_set(multiloop_worker_t *w, multiloop_deadline_t *d, uint64_t ms);
void multiloop_deadline_touch(multiloop_worker_t *w, multiloop_deadline_t *d);
uint64_t multiloop_deadline_ms(const multiloop_deadline_t *d);   /* 0: not running */
int multiloop_deadline_restart(multiloop_worker_t *w, multiloop_deadline_t *d, uint64_t ms);
void multiloop_deadline_remove(multiloop_deadline_t *d);

/* conn.c: runs only on a worker thread. */
void multiloop_conn_register(lua_State *L);
int multiloop_conn_open(multiloop_worker_t *w, uv_os_sock_t fd);
void multiloop_conn_close_all(multiloop_worker_t *w);   /* reason "stopped" */
void multiloop_conn_close_gen(multiloop_gen_t *g);      /* g's, reason "reload" */

/* server.c: the main state's server object. core.new(opts); the metatable. */
int multiloop_server_new(lua_State *L);
int multiloop_wait_signal(lua_State *L);   /* core.wait_signal() */
void multiloop_server_register(lua_State *L);

/* dict.c: named dictionaries shared by every thread of the process (no Lua
 * API inside); shared.c is their Lua object. */
typedef struct multiloop_dict_s multiloop_dict_t;

enum { MULTILOOP_V_BOOLEAN, MULTILOOP_V_INTEGER, MULTILOOP_V_FLOAT, MULTILOOP_V_STRING };

typedef struct {                       /* a value going in or coming out */
  int type;                            /* MULTILOOP_V_* */
  int b;
  lua_Integer i;
  lua_Number n;
  const char *s;                       /* MULTILOOP_V_STRING: len bytes */
  size_t len;
} multiloop_value_t;

typedef struct {                       /* where reads copy strings to */
  char *p;
  size_t cap;
} multiloop_scratch_t;

enum { MULTILOOP_DICT_SET, MULTILOOP_DICT_ADD, MULTILOOP_DICT_REPLACE };
#define MULTILOOP_DICT_SAFE 0x10       /* or'ed into a mode: never evict a live entry */
enum {
  MULTILOOP_DICT_STORED,
  MULTILOOP_DICT_STORED_FORCED,        /* stored, evicting live entries */
  MULTILOOP_DICT_EXISTS,
  MULTILOOP_DICT_NOT_FOUND,
  MULTILOOP_DICT_NOT_A_NUMBER,
  MULTILOOP_DICT_NO_MEMORY,
  MULTILOOP_DICT_NOT_A_LIST            /* a list operation met another value */
};
/* Negative results of the reads (get, pop, llen, lrange). */
#define MULTILOOP_DICT_OOM (-1)        /* the scratch buffer could not grow */
#define MULTILOOP_DICT_WRONG_KIND (-2) /* get met a list; a list read met a value */

#define MULTILOOP_DICT_MAX_TTL_MS INT64_C(1000000000000)   /* about 31 years */
#define MULTILOOP_DICT_MIN_CAPACITY 4096
#define MULTILOOP_DICT_MAX_CAPACITY (INT64_C(1) << 40)    /* 1 TiB: a ceiling, not a reservation */

multiloop_dict_t *multiloop_dict_acquire(const char *name, size_t namelen, size_t capacity);
void multiloop_dict_release(multiloop_dict_t *d);
const char *multiloop_dict_name(const multiloop_dict_t *d);
size_t multiloop_dict_capacity(const multiloop_dict_t *d);
int multiloop_dict_store(multiloop_dict_t *d, int mode, const char *k, size_t kn,
                         const multiloop_value_t *v, uint64_t ttl_ms);
int multiloop_dict_get(multiloop_dict_t *d, const char *k, size_t kn, multiloop_value_t *out,
                       multiloop_scratch_t *buf);
int64_t multiloop_dict_ttl(multiloop_dict_t *d, const char *k, size_t kn);
int multiloop_dict_get_stale(multiloop_dict_t *d, const char *k, size_t kn,
                             multiloop_value_t *out, multiloop_scratch_t *buf, int *stale);
int multiloop_dict_incr(multiloop_dict_t *d, const char *k, size_t kn, const multiloop_value_t *n,
                        const multiloop_value_t *init, uint64_t init_ttl_ms,
                        multiloop_value_t *sum);
int multiloop_dict_expire(multiloop_dict_t *d, const char *k, size_t kn, uint64_t ttl_ms);
int multiloop_dict_delete(multiloop_dict_t *d, const char *k, size_t kn);
int multiloop_dict_push(multiloop_dict_t *d, const char *k, size_t kn, int left,
                        const multiloop_value_t *v, size_t *len);
int multiloop_dict_pop(multiloop_dict_t *d, const char *k, size_t kn, int left,
                       multiloop_value_t *out, multiloop_scratch_t *buf);
int multiloop_dict_llen(multiloop_dict_t *d, const char *k, size_t kn, size_t *len);
int multiloop_dict_lrange(multiloop_dict_t *d, const char *k, size_t kn, int64_t start,
                          int64_t stop, multiloop_scratch_t *buf, size_t *count);
size_t multiloop_dict_flush_expired(multiloop_dict_t *d, size_t max);
int multiloop_dict_keys(multiloop_dict_t *d, size_t max, multiloop_scratch_t *buf,
                        size_t *count);
size_t multiloop_dict_count(multiloop_dict_t *d);
void multiloop_dict_flush(multiloop_dict_t *d);
size_t multiloop_dict_free_space(multiloop_dict_t *d);

/* shared.c: the Lua object of a dictionary ("multiloop.shared"), in any
 * state. core.shared(name, capacity). */
int multiloop_shared_open(lua_State *L);

/* timer.c: the timer metatable, and the core table's timer/every/now
 * (each closes over the worker); worker thread only. */
extern const luaL_Reg multiloop_timer_funcs[];
void multiloop_timer_register(lua_State *L);
void multiloop_timers_close(multiloop_gen_t *g);
void multiloop_timers_stop_every(multiloop_gen_t *g);   /* reload: the old state's `every`s */

/* thread.c: light threads; worker thread only.
 *
 * The await template. Every blocking-style primitive (worker.sleep,
 * worker.wait, a serve connection's receive and send: serve.c) is a C
 * function that
 *   1. finds its thread: t = multiloop_thread_self(L, "conn:receive"), which
 *      raises "conn:receive: cannot yield here (...: use worker.spawn)"
 *      outside a light thread or across a C-call boundary;
 *   2. completes at once when it can (the fast path: no yield), returning
 *      its results as any C function does;
 *   3. or records t where its event will find it, arms that event (a
 *      uv_timer, a deadline entry, a read) and ends with
 *        return multiloop_await(L, t, cancel, data, k);
 *      `cancel(t, data)` (never NULL: a yield without one counts as a bare
 *      coroutine.yield, resumed on the next turn) disarms the event if the
 *      thread is killed or closed first; it must not resume anything. k
 *      (may be NULL) is a lua_KFunction that runs inside the thread when it
 *      is resumed, with `data` as its context: it pushes the primitive's
 *      results there, where an error (out of memory making a string) is the
 *      thread's own, so the waking callback needs no protected call (a
 *      receive's k makes its string from the bytes the read event holds).
 *      Without k, the values the thread is woken with are the results;
 *   4. the libuv callback of that event wakes it, once:
 *        multiloop_thread_wake(t, nargs, push, ev);
 *      with nargs values already pushed on multiloop_thread_co(t) (no
 *      allocation: booleans, integers, lua_rawgeti) and/or `push(L, ev)`
 *      pushing more, run protected (strings, tables). The thread runs until
 *      it awaits again or ends, through multiloop_resume (the door).
 * Never resume from inside the primitive that made the thread ready: wake
 * from the event's callback (or queue it with multiloop_thread_ready, run on
 * the next turn of the loop, with push's values, or true when push is NULL).
 * While the worker closes (multiloop_threads_closing), a primitive returns
 * nil, "stopped" instead of awaiting. As the
 * worker closes, multiloop_threads_stop wakes only sleepers; a primitive on
 * another event wakes its thread from that event's own end (a connection's
 * close resumes its reader with nil, "closed" or "stopped"), or the thread
 * is closed (lua_closethread) once the loop has run dry. */
typedef void (*multiloop_await_cancel)(multiloop_thread_t *t, void *data);
typedef void (*multiloop_thread_end_fn)(void *data, int ok);
multiloop_thread_t *multiloop_thread_self(lua_State *L, const char *who);
/* Cancels what L's light thread still awaits if it was resumed by hand
 * (multiloop_thread_self does it too); before a primitive's busy checks. */
void multiloop_thread_settle(lua_State *L);
int multiloop_await(lua_State *L, multiloop_thread_t *t, multiloop_await_cancel cancel,
                    void *data, lua_KFunction k);
void multiloop_thread_wake(multiloop_thread_t *t, int nargs, multiloop_push_fn push, void *ev);
void multiloop_thread_ready(multiloop_thread_t *t, multiloop_push_fn push, void *ev);
void multiloop_thread_start(lua_State *L, multiloop_worker_t *w, const char *what,
                            const lua_Integer *conn_id, multiloop_thread_end_fn on_end,
                            void *data);
lua_State *multiloop_thread_co(multiloop_thread_t *t);
int multiloop_threads_closing(lua_State *L);   /* L's generation's */
/* The core table's spawn, wait, sleep and kill (each closes over the worker). */
extern const luaL_Reg multiloop_thread_funcs[];
void multiloop_thread_register(lua_State *L);       /* the metatable; protected */
void multiloop_threads_init(multiloop_gen_t *g);   /* after the loop, before Lua */
void multiloop_threads_stop(multiloop_gen_t *g);   /* closing: sleepers get "stopped" */
void multiloop_threads_close(multiloop_gen_t *g);  /* the loop ran dry: close the rest */
/* Timer callbacks (timer.c): the spare thread's coroutine, empty, to push the
 * function and its arguments on without allocating (NULL: none could be
 * made, reported); then run them as a light thread. `failed(data)` runs if
 * the callback raises (even after yielding); `pin_ref` (a registry ref, or
 * LUA_NOREF) is held by the thread while it is suspended, so that `data`
 * stays valid. */
lua_State *multiloop_thread_spare(multiloop_gen_t *g);
void multiloop_thread_run(multiloop_gen_t *g, int nargs, const char *what,
                          multiloop_thread_end_fn on_end, void *data, int pin_ref);

/* resolve.c: names to addresses off the loop (libuv's thread pool), cached
 * per worker; worker thread only. The callback runs from a loop callback
 * with status 0 and n >= 1 addresses (port 0), or a libuv error. */
#define MULTILOOP_RESOLVE_MAX_ADDRS 8
typedef void (*multiloop_resolve_cb)(void *data, int status, const struct sockaddr_storage *addrs,
                                     int n);
int multiloop_resolve_cached(multiloop_worker_t *w, const char *name,
                             struct sockaddr_storage *addrs);   /* n, or 0: not cached */
multiloop_resolve_t *multiloop_resolve_start(multiloop_worker_t *w, const char *name,
                                             multiloop_resolve_cb cb, void *data);  /* NULL: ENOMEM */
void multiloop_resolve_cancel(multiloop_resolve_t *q);   /* cb will not run */
void multiloop_resolver_stop(multiloop_worker_t *w);     /* closing: cancel every lookup */
void multiloop_resolver_free(multiloop_worker_t *w);     /* the loop has ended */
int multiloop_numeric_addr(const char *name, int port, struct sockaddr_storage *addr);
const char *multiloop_check_host(lua_State *L, int arg, const char *who);
int multiloop_push_addrs(lua_State *L, const struct sockaddr_storage *addrs, int n);
const char *multiloop_resolve_error(lua_State *L, const char *name, int status);
extern const luaL_Reg multiloop_resolve_funcs[];         /* resolve */

/* outbound.c: worker.tcp and worker.connect (the core table's), the socket
 * object, keepalive pools; worker thread only. */
extern const luaL_Reg multiloop_outbound_funcs[];        /* tcp, connect */
void multiloop_outbound_register(lua_State *L);          /* the socket metatable */
void multiloop_pools_close(multiloop_gen_t *g);          /* stopping: idle conns close */
/* closing: connects end "stopped" (g's alone, or every one when g is NULL) */
void multiloop_outbound_stop(multiloop_worker_t *w, multiloop_gen_t *g);

/* message.c: the core table's send/broadcast (each closes over the worker)
 * and the message hook (worker thread); server:send/broadcast (main state,
 * rt NULL when stopped: raises). */
extern const luaL_Reg multiloop_message_funcs[];
void multiloop_message_open(multiloop_worker_t *w);
void multiloop_message_deliver(multiloop_worker_t *w, multiloop_msg_t *msg);
int multiloop_server_send(lua_State *L, multiloop_runtime_t *rt);
int multiloop_server_broadcast(lua_State *L, multiloop_runtime_t *rt);

#pragma GCC visibility pop

#endif
