/*
 * idle.c: idle timeouts for a worker's connections, with one uv_timer_t per
 * worker instead of one per connection.
 *
 * Connections with the same timeout duration sit in one list, ordered by
 * their last activity: activity moves a connection to the tail, so the head
 * is always the first to expire. That makes every read or write an O(1)
 * pointer move with no timer syscall, and the timer is armed only for the
 * earliest head (Node's timer lists work the same way). Servers use one or a
 * few durations, so there are few lists; an empty list is freed when the timer next fires.
 *
 * Runs only on the worker thread. Lists are malloc'd and freed here; nodes are
 * embedded in the connections (conn.c), which remove themselves on close.
 */
#include <stdlib.h>

#include "multiloop.h"

struct multiloop_idle_list_s {
  uint64_t ms;
  multiloop_idle_t *head, *tail;
  multiloop_idle_list_t *next;
};

static void idle_timer_cb(uv_timer_t *t);

/* Arms the worker's timer for `due` (loop time, ms) unless it fires earlier. */
static void arm(multiloop_worker_t *w, uint64_t due) {
  uint64_t now = uv_now(&w->loop);
  if (uv_is_active((uv_handle_t *)&w->idle_timer) && w->idle_due <= due) return;
  w->idle_due = due;
  uv_timer_start(&w->idle_timer, idle_timer_cb, due > now ? due - now : 0, 0);
}

static void append(multiloop_idle_list_t *l, multiloop_idle_t *n) {
  n->list = l;
  n->next = NULL;
  n->prev = l->tail;
  if (l->tail) l->tail->next = n;
  else l->head = n;
  l->tail = n;
}

static void unlink_node(multiloop_idle_t *n) {
  multiloop_idle_list_t *l = n->list;
  if (n->prev) n->prev->next = n->next;
  else l->head = n->next;
  if (n->next) n->next->prev = n->prev;
  else l->tail = n->prev;
  n->prev = n->next = NULL;
  n->list = NULL;
}

/* Lists are freed only by the timer's sweep, never here: a callback that
 * closes other connections must not free the list being walked. */
void multiloop_idle_remove(multiloop_worker_t *w, multiloop_idle_t *n) {
  (void)w;
  if (n->list != NULL) unlink_node(n);
}

/* Starts (or, with ms == 0, stops) the timeout of one connection. Returns 0
 * or UV_ENOMEM. */
int multiloop_idle_set(multiloop_worker_t *w, multiloop_idle_t *n, uint64_t ms) {
  multiloop_idle_list_t *l;
  multiloop_idle_remove(w, n);
  if (ms == 0) return 0;
  for (l = w->idle_lists; l && l->ms != ms; l = l->next) {}
  if (l == NULL) {
    if ((l = calloc(1, sizeof *l)) == NULL) return UV_ENOMEM;
    l->ms = ms;
    l->next = w->idle_lists;
    w->idle_lists = l;
  }
  n->last = uv_now(&w->loop);
  append(l, n);
  arm(w, n->last + ms);
  return 0;
}

/* Activity: the connection goes to the tail of its list. */
void multiloop_idle_touch(multiloop_worker_t *w, multiloop_idle_t *n) {
  multiloop_idle_list_t *l = n->list;
  if (l == NULL) return;
  n->last = uv_now(&w->loop);
  if (l->tail == n) return;
  unlink_node(n);
  append(l, n);
}

static void idle_timer_cb(uv_timer_t *t) {
  multiloop_worker_t *w = t->data;
  uint64_t now = uv_now(&w->loop), next = UINT64_MAX;
  multiloop_idle_list_t *l, **pp;
  for (l = w->idle_lists; l; l = l->next) {
    /* Each expired node leaves its list before its callback, which may set
     * it again, close it, or touch others. */
    while (l->head && l->head->last + l->ms <= now) {
      multiloop_idle_t *n = l->head;
      unlink_node(n);
      multiloop_conn_idle(n, l->ms);
    }
  }
  for (pp = &w->idle_lists; (l = *pp) != NULL;) {
    if (l->head == NULL) {                 /* sweep: no connection uses it */
      *pp = l->next;
      free(l);
      continue;
    }
    if (l->head->last + l->ms < next) next = l->head->last + l->ms;
    pp = &l->next;
  }
  if (next != UINT64_MAX) {
    w->idle_due = next;
    uv_timer_start(&w->idle_timer, idle_timer_cb, next > now ? next - now : 0, 0);
  }
}

void multiloop_idle_init(multiloop_worker_t *w) {
  uv_timer_init(&w->loop, &w->idle_timer);
  w->idle_timer.data = w;
  w->idle_lists = NULL;
}

/* At stop, after every connection has closed (and left its list). */
void multiloop_idle_close(multiloop_worker_t *w) {
  while (w->idle_lists) {
    multiloop_idle_list_t *l = w->idle_lists;
    w->idle_lists = l->next;
    free(l);
  }
  uv_close((uv_handle_t *)&w->idle_timer, NULL);
}
