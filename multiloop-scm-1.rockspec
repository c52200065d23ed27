rockspec_format = "3.0"
package = "multiloop"
version = "scm-1"

source = {
   url = "git+https://example.invalid/multiloop.git",
}

description = {
   summary = "A multi-threaded TCP server for Lua 5.4 on libuv: one acceptor thread, N worker threads each with its own loop and Lua state",
   license = "MIT",
}

dependencies = {
   "lua >= 5.4, < 5.5",
}

external_dependencies = {
   LIBUV = {
      header = "uv.h",
      library = "uv",
   },
}

build = {
   type = "builtin",
   modules = {
      ["multiloop"] = "lua/multiloop/init.lua",
      ["multiloop.shared"] = "lua/multiloop/shared.lua",
      ["multiloop.core"] = {
         sources = {
            "src/acceptor.c",
            "src/conn.c",
            "src/copy.c",
            "src/enter.c",
            "src/idle.c",
            "src/inbox.c",
            "src/listener.c",
            "src/message.c",
            "src/server.c",
            "src/shared.c",
            "src/timer.c",
            "src/worker.c",
         },
         libraries = { "uv", "pthread" },
         incdirs = { "$(LIBUV_INCDIR)" },
         libdirs = { "$(LIBUV_LIBDIR)" },
      },
   },
}
