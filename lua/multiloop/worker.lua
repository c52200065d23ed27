--- The `worker` object a handler sees (init(worker), conn.worker, the
-- message and shutdown hooks), built once in each worker's own Lua state.
--
-- src/worker.c finds this file through the worker's package.path (copied
-- from the state that made the server), loads it before the handler and calls
-- what it returns with the worker's core table: its `id`, `count` and copied
-- `config`, and the C primitives of src/timer.c (`timer`, `every`, `now`) and
-- src/message.c (`send`, `broadcast`), src/log.c (`log`), src/thread.c (`spawn`, `wait`,
-- `sleep`, `kill`), src/outbound.c (`tcp`, `connect`) and src/resolve.c
-- (`resolve`), each closing over its worker. The table
-- returned here is the `worker` object itself (documented in the README, "The
-- handler"); the core table stays private to this file.
--
-- Hot paths stay in C: `timer`, `every`, `now`, `send` and `broadcast` are
-- the C functions themselves (they check their own arguments), and a timer's
-- callback and a message's delivery are called from C with no Lua in
-- between. Helpers written in Lua go here.
--
-- Runs on the worker's thread only; nothing here is shared with another
-- state.

return function(core)
  return {
    id = core.id,
    count = core.count,
    config = core.config,
    timer = core.timer,       -- fn(t) once, after ms
    every = core.every,       -- fn(t) every ms (at least 1) until t:stop()
    now = core.now,
    send = core.send,
    broadcast = core.broadcast,
    spawn = core.spawn,       -- light threads (src/thread.c)
    wait = core.wait,
    sleep = core.sleep,
    kill = core.kill,
    tcp = core.tcp,           -- outbound (src/outbound.c, src/resolve.c)
    connect = core.connect,
    resolve = core.resolve,
    exiting = core.exiting,   -- true once the worker has begun to stop
    time = core.time,         -- the wall clock, seconds (float)
    log = core.log,           -- log(level, ...): src/log.c
  }
end
