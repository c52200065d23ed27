-- examples/http_hello_server.lua: the HTTP responder of examples/http_hello.lua
-- on 127.0.0.1:8080, one worker per core (or as many as the second argument),
-- over TLS when given a certificate and its key (PEM files).
--   lua5.4 examples/http_hello_server.lua [port] [workers] [cert.pem key.pem]
-- TLS: make a throwaway pair with
--   openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
--     -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1 -keyout key.pem -out cert.pem
-- then: curl --cacert cert.pem https://127.0.0.1:8443/
-- Try it: curl -v http://127.0.0.1:8080/ http://127.0.0.1:8080/again   (one
-- connection), or load it: ab -k -n 20000 -c 50 http://127.0.0.1:8080/
-- (apache2-utils) or wrk -c 64 -d 5s http://127.0.0.1:8080/
local multiloop = require("multiloop")

local server = multiloop.server{
  host = "127.0.0.1",
  port = tonumber(arg[1]) or 8080,
  workers = tonumber(arg[2]),
  handler = "examples.http_hello",
  tls = arg[3] and { cert = arg[3], key = arg[4] or arg[3], alpn = { "http/1.1" } } or nil,
}
server:start()
local host, port = server:address()
print(("multiloop http hello on %s://%s:%d/ with %d workers; Ctrl-C stops it")
  :format(arg[3] and "https" or "http", host, port, server.workers))
io.stdout:flush()
local signal = server:run()
print(("stopped on %s"):format(signal))
