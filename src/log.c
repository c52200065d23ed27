/*
 * log.c: the log, where every message of the process goes: worker.log,
 * conn:log, multiloop.log and server:log from Lua, and every internal
 * message (a callback's error and traceback, an EMFILE episode, a loop
 * closed with handles open, slots not given back).
 *
 * A logger belongs to a server: its level (immutable) and where it writes,
 * stderr (fd 2, not ours) or the file of the `log` option, opened by core.new
 * (server.c) with O_APPEND and freed by the server's __gc, after every
 * thread that could write through it is joined. Any thread may write.
 *
 * One line (a record) per message: "<ISO 8601 UTC time, ms> <level> <who>[
 * conn <id>]: <message>\n", formatted whole into one buffer and written with
 * one write(2) while holding `lock`, a process-wide mutex (the fds are the
 * process's too: two servers may share stderr), so records from different
 * threads never interleave, not even on a pipe past PIPE_BUF or after a short
 * write. A newline inside a message (a traceback) is followed by a tab, so a
 * line that does not start with a tab always starts a record: a message
 * cannot forge one. Its other control bytes (but tab) are written as \xHH:
 * journald also ends a line at a NUL, a terminal rewrites one after a CR,
 * and grep calls a file with a NUL in it binary.
 *
 * Reopening (SIGUSR1 in server:run(), server:reopen_log()) opens the path
 * again and dup3()s the new file onto the logger's fd number, under the lock:
 * a writer sees the old file or the new one, never a closed fd.
 *
 * `current` is the logger multiloop.log writes through: the most recently
 * made server's, until that server is collected; stderr at level info when
 * there is none. The lock guards it, and a logger is freed only after it
 * stops being current, under the lock.
 */
#define _GNU_SOURCE                    /* dup3 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "multiloop.h"

struct multiloop_logger_s {
  int level;                           /* MULTILOOP_LOG_*: records above it are dropped */
  int fd;                              /* 2, or the file's (owned) */
  char *path;                          /* NULL: stderr */
};

const char *const multiloop_log_levels[] = { "error", "warn", "info", "debug", NULL };

static uv_once_t once = UV_ONCE_INIT;
static uv_mutex_t lock;                /* every write, every reopen, `current` */
static int lock_ok;
static multiloop_logger_t *current;
static multiloop_logger_t fallback = { MULTILOOP_LOG_INFO, 2, NULL };

static void init_lock(void) { lock_ok = uv_mutex_init(&lock) == 0; }

/* Without a mutex (uv_mutex_init failed, which it does not on Linux), the
 * records are still written whole, one write each. */
static void lock_all(void) {
  uv_once(&once, init_lock);
  if (lock_ok) uv_mutex_lock(&lock);
}

static void unlock_all(void) {
  if (lock_ok) uv_mutex_unlock(&lock);
}

int multiloop_log_level(const char *name) {
  int i;
  for (i = 0; multiloop_log_levels[i]; i++)
    if (strcmp(name, multiloop_log_levels[i]) == 0) return i + 1;
  return 0;
}

static int open_path(const char *path) {
  int fd;
  do fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0666);
  while (fd < 0 && errno == EINTR);
  return fd;
}

static void open_error(const char *path, int e, char *err, size_t errlen) {
  int uv = uv_translate_sys_error(e);
  snprintf(err, errlen, "%s: %s (%s)", path, uv_strerror(uv), uv_err_name(uv));
}

multiloop_logger_t *multiloop_logger_open(const char *path, int level, char *err,
                                          size_t errlen) {
  multiloop_logger_t *lg = calloc(1, sizeof *lg);
  if (lg == NULL || (path && (lg->path = strdup(path)) == NULL)) {
    free(lg);
    snprintf(err, errlen, "not enough memory");
    return NULL;
  }
  lg->level = level >= MULTILOOP_LOG_ERROR && level <= MULTILOOP_LOG_DEBUG ? level
                                                                            : MULTILOOP_LOG_INFO;
  lg->fd = 2;
  if (path && (lg->fd = open_path(path)) < 0) {
    open_error(path, errno, err, errlen);
    free(lg->path);
    free(lg);
    return NULL;
  }
  return lg;
}

void multiloop_logger_make_current(multiloop_logger_t *lg) {
  lock_all();
  current = lg;
  unlock_all();
}

void multiloop_logger_free(multiloop_logger_t *lg) {
  if (lg == NULL) return;
  lock_all();
  if (current == lg) current = NULL;
  unlock_all();
  if (lg->path) close(lg->fd);
  free(lg->path);
  free(lg);
}

const char *multiloop_logger_path(const multiloop_logger_t *lg) { return lg->path; }

int multiloop_logger_reopen(multiloop_logger_t *lg, char *err, size_t errlen) {
  int fd, rc;
  if (lg->path == NULL) return 0;      /* stderr: nothing to reopen */
  if ((fd = open_path(lg->path)) < 0) {
    open_error(lg->path, errno, err, errlen);
    return -1;
  }
  lock_all();
  do rc = dup3(fd, lg->fd, O_CLOEXEC);
  while (rc < 0 && errno == EINTR);
  if (rc < 0) open_error(lg->path, errno, err, errlen);
  unlock_all();
  close(fd);
  return rc < 0 ? -1 : 0;
}

int multiloop_log_enabled(const multiloop_logger_t *lg, int level) {
  int max;
  if (lg != NULL) return level <= lg->level;
  lock_all();
  max = current ? current->level : fallback.level;
  unlock_all();
  return level <= max;
}

/* Writes all of p[0..n), or gives up: a log never blocks a worker for long
 * (a full, non-blocking pipe gets a second of poll, then the rest is lost). */
static void write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t k = write(fd, p, n);
    if (k > 0) {
      p += k;
      n -= (size_t)k;
    } else if (k < 0 && errno == EINTR) {
      continue;
    } else if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      struct pollfd pfd = { fd, POLLOUT, 0 };
      if (poll(&pfd, 1, 1000) <= 0) return;
    } else {
      return;
    }
  }
}

#define LINE_STACK 4096
/* A byte a record shows as \xHH: the C0 controls but tab and newline, and DEL. */
#define IS_CONTROL(ch) (((unsigned char)(ch) < 0x20 && (ch) != '\t') || (ch) == 0x7f)
#define TRUNCATED " [truncated: not enough memory]"

/* The prefix of a record into buf (at least 128 bytes); returns its length. */
static size_t prefix(char *buf, size_t cap, int level, const char *who, lua_Integer conn_id) {
  struct timespec ts;
  struct tm tm;
  size_t n;
  int k;
  clock_gettime(CLOCK_REALTIME, &ts);
  gmtime_r(&ts.tv_sec, &tm);
  n = strftime(buf, cap, "%Y-%m-%dT%H:%M:%S", &tm);
  if (conn_id > 0)
    k = snprintf(buf + n, cap - n, ".%03ldZ %s %s conn %lld: ", ts.tv_nsec / 1000000L,
                 multiloop_log_levels[level - 1], who, (long long)conn_id);
  else
    k = snprintf(buf + n, cap - n, ".%03ldZ %s %s: ", ts.tv_nsec / 1000000L,
                 multiloop_log_levels[level - 1], who);
  n += k > 0 ? (size_t)k : 0;
  return n < cap ? n : cap - 1;
}

void multiloop_log_text(multiloop_logger_t *lg, int level, const char *who, lua_Integer conn_id,
                        const char *msg, size_t len) {
  char stack[LINE_STACK], *big = NULL, *buf = stack;
  size_t cap = sizeof stack, n, i, lines = 0, room;
  if (level < MULTILOOP_LOG_ERROR || level > MULTILOOP_LOG_DEBUG) return;
  if (who == NULL || strlen(who) > 64) who = "?";
  for (i = 0; i < len; i++) {
    if (msg[i] == '\n') lines++;
    else if (IS_CONTROL(msg[i])) lines += 3;      /* "\xHH" */
  }
  /* The prefix (< 160 bytes), the message with a tab after each newline
   * and its other control bytes escaped, room for the truncation mark, the
   * final newline: a message that does not fit on the stack gets a buffer
   * of its size, or is cut short. */
  if (len + lines <= SIZE_MAX - 256 && len + lines + 256 > cap &&
      (big = malloc(len + lines + 256)) != NULL) {
    buf = big;
    cap = len + lines + 256;
  }
  lock_all();                          /* from here: `current`, and one write at a time */
  if (lg == NULL) lg = current ? current : &fallback;
  if (level > lg->level) goto done;
  n = prefix(buf, cap, level, who, conn_id);
  room = cap - n - 1 - sizeof TRUNCATED;
  for (i = 0; i < len; i++) {
    if (msg[i] == '\n') {              /* never a newline without its tab */
      if (n + 2 > room) break;
      buf[n++] = '\n';
      buf[n++] = '\t';
    } else if (IS_CONTROL(msg[i])) {    /* a NUL ends a line for journald, a CR on a terminal */
      if (n + 4 > room) break;
      buf[n++] = '\\';
      buf[n++] = 'x';
      buf[n++] = "0123456789abcdef"[(unsigned char)msg[i] >> 4];
      buf[n++] = "0123456789abcdef"[(unsigned char)msg[i] & 15];
    } else {
      if (n + 1 > room) break;
      buf[n++] = msg[i];
    }
  }
  if (i < len) {
    memcpy(buf + n, TRUNCATED, sizeof TRUNCATED - 1);
    n += sizeof TRUNCATED - 1;
  }
  buf[n++] = '\n';
  write_all(lg->fd, buf, n);
done:
  unlock_all();
  free(big);
}

static void log_va(multiloop_logger_t *lg, int level, const char *who, lua_Integer conn_id,
                   const char *fmt, va_list ap) {
  char stack[LINE_STACK], *big;
  va_list aq;
  int k;
  va_copy(aq, ap);
  k = vsnprintf(stack, sizeof stack, fmt, aq);
  va_end(aq);
  if (k < 0) return;
  if ((size_t)k < sizeof stack) {
    multiloop_log_text(lg, level, who, conn_id, stack, (size_t)k);
    return;
  }
  /* A long traceback: the whole of it if memory allows, else what fitted. */
  if ((big = malloc((size_t)k + 1)) != NULL && vsnprintf(big, (size_t)k + 1, fmt, ap) == k)
    multiloop_log_text(lg, level, who, conn_id, big, (size_t)k);
  else
    multiloop_log_text(lg, level, who, conn_id, stack, sizeof stack - 1);
  free(big);
}

void multiloop_log_as(multiloop_logger_t *lg, int level, const char *who, lua_Integer conn_id,
                      const char *fmt, ...) {
  va_list ap;
  if (!multiloop_log_enabled(lg, level)) return;
  va_start(ap, fmt);
  log_va(lg, level, who, conn_id, fmt, ap);
  va_end(ap);
}

void multiloop_log(multiloop_worker_t *w, int level, lua_Integer conn_id, const char *fmt, ...) {
  va_list ap;
  char who[32];
  multiloop_logger_t *lg = w->cfg->logger;
  if (!multiloop_log_enabled(lg, level)) return;
  snprintf(who, sizeof who, "worker %d", w->id);
  va_start(ap, fmt);
  log_va(lg, level, who, conn_id, fmt, ap);
  va_end(ap);
}

/* --- from Lua ---------------------------------------------------------------- */

/* The level at argument `arg`, or an error naming the function and what it got. */
static int check_level(lua_State *L, int arg, const char *fname) {
  const char *name = lua_type(L, arg) == LUA_TSTRING ? lua_tostring(L, arg) : NULL;
  int level = name ? multiloop_log_level(name) : 0;
  if (level == 0) {
    const char *got = name ? lua_pushfstring(L, "'%s'", name) : luaL_typename(L, arg);
    return luaL_error(L, "%s: the level must be 'error', 'warn', 'info' or 'debug' (got %s)",
                      fname, got);
  }
  return level;
}

int multiloop_log_lua(lua_State *L, multiloop_logger_t *lg, int first, const char *who,
                      lua_Integer conn_id, const char *fname) {
  int level = check_level(L, first, fname), i, top = lua_gettop(L);
  luaL_Buffer b;
  size_t len;
  const char *msg;
  if (!multiloop_log_enabled(lg, level)) return 0;
  luaL_buffinit(L, &b);
  for (i = first + 1; i <= top; i++) {
    if (i > first + 1) luaL_addchar(&b, ' ');
    luaL_tolstring(L, i, NULL);        /* tostring, as print: __tostring and __name */
    luaL_addvalue(&b);
  }
  luaL_pushresult(&b);
  msg = lua_tolstring(L, -1, &len);
  multiloop_log_text(lg, level, who, conn_id, msg, len);
  return 0;
}

/* worker.log(level, ...): upvalue 1 is the worker. */
static int worker_log(lua_State *L) {
  multiloop_worker_t *w = lua_touserdata(L, lua_upvalueindex(1));
  char who[32];
  snprintf(who, sizeof who, "worker %d", w->id);
  return multiloop_log_lua(L, w->cfg->logger, 1, who, 0, "worker.log");
}

const luaL_Reg multiloop_log_funcs[] = {
  { "log", worker_log },
  { NULL, NULL }
};

/* core.log(level, ...): the main state's, through the current logger. */
int multiloop_log_main(lua_State *L) {
  return multiloop_log_lua(L, NULL, 1, "main", 0, "multiloop.log");
}
