// bench/peers/node_echo.js: the Node.js peer in `make bench`, with the
// cluster module: the primary forks WORKERS workers that share one listening
// socket (on Linux the primary accepts and hands each connection to a worker
// round-robin over IPC, as multiloop's "ipc" dispatch does).
//   node bench/peers/node_echo.js [--workers N] [--mode echo|http] [--max-seconds S]
// echo: writes back what it reads (pausing a client that does not read its
// echoes, as examples/echo_handler.lua does); http: the same answer as
// examples/http_hello.lua through node's http module (keep-alive).
// Listens on 127.0.0.1, a free port, printed as "LISTENING <port>" once
// every worker listens; SIGTERM or SIGINT to the primary stops them all, and
// it stops by itself after max_seconds (default 900).
'use strict';
const cluster = require('cluster');
const net = require('net');
const http = require('http');

function option(name, fallback) {
  const i = process.argv.indexOf('--' + name);
  return i > 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}
const workers = parseInt(option('workers', '1'), 10);
const mode = option('mode', 'echo');
const maxSeconds = parseInt(option('max-seconds', '900'), 10);
const BODY = 'Hello, world!\n';

if (cluster.isPrimary) {
  cluster.schedulingPolicy = cluster.SCHED_RR;
  let listening = 0;
  let port = 0;
  for (let i = 0; i < workers; i++) {
    cluster.fork({ BENCH_PORT: String(port) });
  }
  cluster.on('listening', (worker, address) => {
    port = address.port;
    if (++listening === workers) console.log('LISTENING ' + port);
  });
  let stopping = false;
  const stop = () => {
    if (stopping) return;
    stopping = true;
    for (const id in cluster.workers) cluster.workers[id].process.kill('SIGTERM');
    setTimeout(() => process.exit(0), 2000).unref();
  };
  cluster.on('exit', () => {
    if (stopping && Object.keys(cluster.workers).length === 0) process.exit(0);
  });
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  setTimeout(stop, maxSeconds * 1000).unref();
} else {
  let server;
  if (mode === 'http') {
    server = http.createServer((req, res) => {
      res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': BODY.length });
      res.end(BODY);
    });
    server.keepAliveTimeout = 0;                 // no idle closing during a run
  } else {
    server = net.createServer({ noDelay: true }, (socket) => {
      socket.setNoDelay(true);
      socket.on('data', (data) => {
        if (!socket.write(data)) socket.pause();
      });
      socket.on('drain', () => socket.resume());
      socket.on('error', () => socket.destroy());
    });
  }
  // Port 0 in every worker: the cluster primary binds once and shares it.
  server.listen(0, '127.0.0.1');
  process.on('SIGTERM', () => process.exit(0));
}
