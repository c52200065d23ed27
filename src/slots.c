/*
 * slots.c: connection slots, the one owner of max_connections accounting.
 *
 * A slot is one accepted connection, counted twice from its accept to its
 * close: process-wide in rt->active, against max_connections, and in its
 * worker's w->active, which least_connections balances on and stats()
 * reports. Both counts move here and nowhere else, together:
 *   - a slot is taken (multiloop_slot_take) by whoever gets an fd from a
 *     listener and knows its worker: the acceptor as it picks one
 *     (acceptor.c; counted now, not on arrival, so that least_connections
 *     sees the hand-offs still in flight), or a reuseport worker as its own
 *     listener accepts (worker.c);
 *   - it is given back (multiloop_slot_give) exactly once, by whoever holds
 *     the fd when it is closed: conn.c once a connection's stream has closed
 *     (the connection's `counted` bit says it holds one), worker.c for one
 *     that reached the worker and is not served (stopping, no memory, still
 *     queued or pending on the pipe as it closes), acceptor.c for one that
 *     never reached its worker (a failed or cancelled hand-off).
 *
 * A listener asks multiloop_slots_full before each accept4, so a client over
 * the limit waits in the kernel's backlog, never accepted and dropped. The
 * check and the take are two steps: with reuseport, where each worker has a
 * listener of its own, workers accepting at the same moment can go past the
 * limit by up to one connection per other worker (the acceptor is a single
 * listener and cannot).
 *
 * Pausing at the limit: the acceptor raises accept_waiting, then looks at
 * the count again (multiloop_slots_wait); a give decrements, then reads the
 * flag and rings the acceptor's resume_async. Both sides are seq_cst, so one
 * of the two always sees the other and no wake-up is lost. The ring is made
 * under resume_lock, and the acceptor sets the handle to ring
 * (multiloop_slots_bell) only while it is open, so no give rings a closed
 * handle. A reuseport worker's listener is rung by nobody and raises no
 * flag: it looks again on a short timer (listener.c).
 *
 * Memory orders: rt->active and accept_waiting are seq_cst (the pause
 * handshake above); w->active is relaxed (a statistic and a balancing hint,
 * read by the acceptor and by stats()).
 *
 * Threads: multiloop_slots_full, _wait, _resume and multiloop_slot_take run
 * on the listener's (or its owner's) thread; multiloop_slot_give on any;
 * multiloop_slots_bell on the acceptor thread. Nothing here allocates.
 * resume_lock is made and destroyed with the runtime (server.c).
 */
#include <stdio.h>

#include "multiloop.h"

/* Listener's thread, before each accept: at max_connections (0: no limit)? */
int multiloop_slots_full(multiloop_runtime_t *rt) {
  int max = rt->cfg->max_connections;
  return max > 0 && atomic_load(&rt->active) >= max;
}

/* Listener's thread: an fd was just accepted for worker `w` (the acceptor's
 * pick, or the reuseport worker itself). */
void multiloop_slot_take(multiloop_runtime_t *rt, multiloop_worker_t *w) {
  atomic_fetch_add(&rt->active, 1);
  atomic_fetch_add_explicit(&w->active, 1, memory_order_relaxed);
}

/* Any thread: the connection that took a slot for `w` is closed (or never
 * reached it). Frees the slot and rings the acceptor if it paused for one. */
void multiloop_slot_give(multiloop_runtime_t *rt, multiloop_worker_t *w) {
  atomic_fetch_sub_explicit(&w->active, 1, memory_order_relaxed);
  atomic_fetch_sub(&rt->active, 1);
  if (!atomic_load(&rt->accept_waiting)) return;       /* the usual, lock-free case */
  uv_mutex_lock(&rt->resume_lock);
  if (rt->resume_bell != NULL) uv_async_send(rt->resume_bell);
  uv_mutex_unlock(&rt->resume_lock);
}

/* Listener's thread, paused at the limit: whether a slot is free again. A
 * listener a give rings (`woken`: the acceptor) lowers its flag then. */
int multiloop_slots_resume(multiloop_runtime_t *rt, int woken) {
  if (atomic_load(&rt->active) >= rt->cfg->max_connections) return 0;
  if (woken) atomic_store(&rt->accept_waiting, 0);
  return 1;
}

/* Listener's thread, found full: whether to pause. The acceptor raises its
 * flag before it looks at the count again, so a give that frees a slot
 * meanwhile either is seen here or sees the flag and rings. A listener
 * nobody rings (reuseport) raises none: the flag would only send every give
 * after it through resume_lock, for a ring that has no handle to reach. */
int multiloop_slots_wait(multiloop_runtime_t *rt, int woken) {
  if (woken) atomic_store(&rt->accept_waiting, 1);
  return !multiloop_slots_resume(rt, woken);
}

/* Acceptor thread: the handle a give rings while the acceptor is paused
 * (its resume_async once open), or NULL before it closes that handle. */
void multiloop_slots_bell(multiloop_runtime_t *rt, uv_async_t *bell) {
  uv_mutex_lock(&rt->resume_lock);
  rt->resume_bell = bell;
  uv_mutex_unlock(&rt->resume_lock);
}

/* Main thread, once every thread is joined (server.c): every slot taken
 * must have been given back. One that was not is a bug in whoever held it,
 * and a silent one (it shrinks max_connections for the rest of the run), so
 * it is reported. Returns how many were not. */
int multiloop_slots_audit(multiloop_runtime_t *rt) {
  int i, left = atomic_load(&rt->active), held = 0;
  for (i = 0; i < rt->cfg->nworkers; i++) held += multiloop_slots_held(&rt->workers[i]);
  if (left != 0 || held != 0) {
    multiloop_log_as(rt->cfg->logger, MULTILOOP_LOG_ERROR, "main", 0,
                     "stop: %d connection slots not given back (%d held by workers)", left, held);
  }
  return left != 0 || held != 0;
}
