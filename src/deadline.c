/*
 * deadline.c: a worker's deadlines, with one uv_timer_t per worker instead
 * of one per deadline.
 *
 * A deadline is a multiloop_deadline_t embedded in its owner (today a
 * connection's idle timeout, conn.c), with the expiry callback the owner
 * gave it; the callback finds the owner from the entry (offsetof). This file
 * knows nothing of its owners: it only keeps lists and calls callbacks.
 *
 * Deadlines with the same duration sit in one list, ordered by when their
 * period began: touching one moves it to the tail, so the head is always the
 * first to expire. That makes every touch (a read or a write, for an idle
 * timeout) an O(1) pointer move with no timer syscall, and the timer is armed
 * only for the earliest head (Node's timer lists work the same way). Servers
 * use one or a few durations, so there are few lists; an empty list is freed
 * when the timer next fires. An entry is in at most one list at a time: an
 * owner that needs several deadlines at once embeds several entries.
 *
 * Runs only on the worker thread. Lists are malloc'd and freed here; the
 * entries belong to their owners, which must take them out of their list
 * (multiloop_deadline_remove) before freeing them.
 */
#include <stdlib.h>

#include "multiloop.h"

struct multiloop_deadline_list_s {
  uint64_t ms;
  multiloop_deadline_t *head, *tail;
  multiloop_deadline_list_t *next;
};

static void deadline_timer_cb(uv_timer_t *t);

/* Arms the worker's timer for `due` (loop time, ms) unless it fires earlier. */
static void arm(multiloop_worker_t *w, uint64_t due) {
  uint64_t now = uv_now(&w->loop);
  if (uv_is_active((uv_handle_t *)&w->deadline_timer) && w->deadline_due <= due) return;
  w->deadline_due = due;
  uv_timer_start(&w->deadline_timer, deadline_timer_cb, due > now ? due - now : 0, 0);
}

static void append(multiloop_deadline_list_t *l, multiloop_deadline_t *d) {
  d->list = l;
  d->next = NULL;
  d->prev = l->tail;
  if (l->tail) l->tail->next = d;
  else l->head = d;
  l->tail = d;
}

static void unlink_entry(multiloop_deadline_t *d) {
  multiloop_deadline_list_t *l = d->list;
  if (d->prev) d->prev->next = d->next;
  else l->head = d->next;
  if (d->next) d->next->prev = d->prev;
  else l->tail = d->prev;
  d->prev = d->next = NULL;
  d->list = NULL;
}

/* Once, before the entry is first set: not in any list, and what runs when
 * it expires. */
void multiloop_deadline_init(multiloop_deadline_t *d, multiloop_deadline_cb expire) {
  d->list = NULL;
  d->prev = d->next = NULL;
  d->last = 0;
  d->expire = expire;
}

/* Lists are freed only by the timer's sweep, never here: an expiry callback
 * that removes other entries must not free the list being walked. */
void multiloop_deadline_remove(multiloop_deadline_t *d) {
  if (d->list != NULL) unlink_entry(d);
}

/* Starts the deadline `ms` from now, or with ms == 0 stops it. Returns 0 or
 * UV_ENOMEM (then the entry is in no list). */
int multiloop_deadline_set(multiloop_worker_t *w, multiloop_deadline_t *d, uint64_t ms) {
  multiloop_deadline_list_t *l;
  multiloop_deadline_remove(d);
  if (ms == 0) return 0;
  for (l = w->deadline_lists; l && l->ms != ms; l = l->next) {}
  if (l == NULL) {
    if ((l = calloc(1, sizeof *l)) == NULL) return UV_ENOMEM;
    l->ms = ms;
    l->next = w->deadline_lists;
    w->deadline_lists = l;
  }
  d->last = uv_now(&w->loop);
  append(l, d);
  arm(w, d->last + ms);
  return 0;
}

/* The duration a deadline runs with, 0 when it is not running. */
uint64_t multiloop_deadline_ms(const multiloop_deadline_t *d) { return d->list ? d->list->ms : 0; }

/* Pushes a running deadline back to its full duration from now: the entry
 * goes to the tail of its list. The timer is not touched: when it fires for
 * the old time it finds a later head and is armed again for that. */
void multiloop_deadline_touch(multiloop_worker_t *w, multiloop_deadline_t *d) {
  multiloop_deadline_list_t *l = d->list;
  if (l == NULL) return;
  d->last = uv_now(&w->loop);
  if (l->tail == d) return;
  unlink_entry(d);
  append(l, d);
}

/* multiloop_deadline_set, but an entry already running with that duration
 * is only touched (O(1): no list search, no timer call). */
int multiloop_deadline_restart(multiloop_worker_t *w, multiloop_deadline_t *d, uint64_t ms) {
  if (ms != 0 && d->list != NULL && d->list->ms == ms) {
    multiloop_deadline_touch(w, d);
    return 0;
  }
  return multiloop_deadline_set(w, d, ms);
}

static void deadline_timer_cb(uv_timer_t *t) {
  multiloop_worker_t *w = t->data;
  uint64_t now = uv_now(&w->loop), next = UINT64_MAX;
  multiloop_deadline_list_t *l, **pp;
  for (l = w->deadline_lists; l; l = l->next) {
    /* Each expired entry leaves its list before its callback, which may set
     * it again, remove it, or touch or remove others. Lists the callback
     * makes go in front of this one, so this walk never reaches them; the
     * sweep below does. */
    while (l->head && l->head->last + l->ms <= now) {
      multiloop_deadline_t *d = l->head;
      unlink_entry(d);
      d->expire(d, l->ms);
      /* The callback closed the last connection of a graceful stop: the
       * worker finished, and multiloop_deadlines_close freed every list
       * (this one too) and closed the timer. */
      if (uv_is_closing((uv_handle_t *)t)) return;
    }
  }
  for (pp = &w->deadline_lists; (l = *pp) != NULL;) {
    if (l->head == NULL) {                 /* sweep: no entry uses it */
      *pp = l->next;
      free(l);
      continue;
    }
    if (l->head->last + l->ms < next) next = l->head->last + l->ms;
    pp = &l->next;
  }
  if (next != UINT64_MAX) {
    w->deadline_due = next;
    uv_timer_start(&w->deadline_timer, deadline_timer_cb, next > now ? next - now : 0, 0);
  }
}

void multiloop_deadlines_init(multiloop_worker_t *w) {
  uv_timer_init(&w->loop, &w->deadline_timer);
  w->deadline_timer.data = w;
  w->deadline_lists = NULL;
}

/* At stop, after every owner has removed its entries (every connection has
 * closed). */
void multiloop_deadlines_close(multiloop_worker_t *w) {
  while (w->deadline_lists) {
    multiloop_deadline_list_t *l = w->deadline_lists;
    w->deadline_lists = l->next;
    free(l);
  }
  uv_close((uv_handle_t *)&w->deadline_timer, NULL);
}
