/*
 * proxy.c: the PROXY protocol, versions 1 and 2 (HAProxy's
 * doc/proxy-protocol.txt): a load balancer in front of the server sends a
 * header with the client's real address before the connection's first byte.
 *
 * The header is a phase before the handler (conn.c): an accepted connection
 * from a trusted source (the `proxy_protocol.from` list) is read until its
 * header is complete, within `proxy_protocol.timeout`; only then does the
 * handler see it (with TLS, the header comes before the ClientHello, and the
 * handshake starts after it). A connection from anywhere else, a malformed
 * or oversized header, or none in time: closed, counted in proxy_errors.
 * Whether a header is there is never guessed: from a trusted source it must
 * be, and from any other it is never read.
 *
 * Parsing works on whatever bytes have arrived: "more" until the header is
 * whole (the stream keeps the bytes, so headers split across reads are
 * seen whole), never more than PROXY_MAX bytes.
 */
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/un.h>

#include "conn.h"
#include "proxy.h"

/* v1: "PROXY " ... CRLF, at most 107 bytes with the CRLF (the spec's
 * bound). v2: 16 bytes and at most this many of addresses and TLVs (the
 * spec allows 65535; load balancers send a few hundred). */
#define V1_MAX 107
#define V2_MAX_BODY 4096

static const unsigned char v2_sig[12] = { 0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                          0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A };

typedef struct {
  int family;                          /* AF_INET, AF_INET6, or AF_UNIX: any Unix peer */
  unsigned char addr[16];
  int bits;
} cidr_t;

struct multiloop_proxy_cfg_s {
  cidr_t *from;
  int n;
  uint64_t timeout;
};

/* --- the option (main thread) ---------------------------------------------- */

static int parse_cidr(const char *s, cidr_t *c) {
  char buf[64];
  const char *slash = strchr(s, '/');
  size_t n = slash ? (size_t)(slash - s) : strlen(s);
  int max;
  memset(c, 0, sizeof *c);
  if (strcmp(s, "unix") == 0) {
    c->family = AF_UNIX;
    return 1;
  }
  if (n == 0 || n >= sizeof buf) return 0;
  memcpy(buf, s, n);
  buf[n] = 0;
  if (inet_pton(AF_INET, buf, c->addr) == 1) c->family = AF_INET, max = 32;
  else if (inet_pton(AF_INET6, buf, c->addr) == 1) c->family = AF_INET6, max = 128;
  else return 0;
  c->bits = max;
  if (slash) {
    char *end;
    long b = strtol(slash + 1, &end, 10);
    if (slash[1] < '0' || slash[1] > '9' || *end != 0 || b < 0 || b > max) return 0;
    c->bits = (int)b;
  }
  return 1;
}

void multiloop_proxy_configure(lua_State *L, int opts, multiloop_config_t *cfg) {
  multiloop_proxy_cfg_t *p;
  int idx, i, n;
  if (lua_getfield(L, opts, "proxy_protocol") == LUA_TNIL) {
    lua_pop(L, 1);
    return;
  }
  if (!lua_istable(L, -1))
    luaL_error(L, "option 'proxy_protocol' must be a table { from = { ... } }");
  idx = lua_gettop(L);
  if ((p = cfg->proxy = calloc(1, sizeof *p)) == NULL) luaL_error(L, "not enough memory");
  p->timeout = 3000;
  if (lua_getfield(L, idx, "timeout") != LUA_TNIL) {
    int isint;
    lua_Integer ms = lua_tointegerx(L, -1, &isint);
    if (!isint || ms < 1 || ms > 0x7fffffff)
      luaL_error(L, "option 'proxy_protocol.timeout' must be an integer from 1 to %d", 0x7fffffff);
    p->timeout = (uint64_t)ms;
  }
  lua_pop(L, 1);
  lua_getfield(L, idx, "from");
  n = lua_istable(L, -1) ? (int)lua_rawlen(L, -1) : 0;
  if (n == 0 || n > 1024)
    luaL_error(L, "option 'proxy_protocol.from' is required: a list of 1 to 1024 trusted "
                  "addresses or CIDR blocks (\"127.0.0.1\", \"10.0.0.0/8\", \"::1\", \"unix\")");
  if ((p->from = calloc((size_t)n, sizeof *p->from)) == NULL) luaL_error(L, "not enough memory");
  for (i = 1; i <= n; i++) {
    if (lua_rawgeti(L, -1, i) != LUA_TSTRING || !parse_cidr(lua_tostring(L, -1), &p->from[i - 1]))
      luaL_error(L, "option 'proxy_protocol.from' item %d is not an address, a CIDR block or "
                    "\"unix\" (got %s)", i, luaL_tolstring(L, -1, NULL));
    p->n = i;
    lua_pop(L, 1);
  }
  lua_settop(L, idx - 1);
}

void multiloop_proxy_free(multiloop_config_t *cfg) {
  if (cfg->proxy == NULL) return;
  free(cfg->proxy->from);
  free(cfg->proxy);
  cfg->proxy = NULL;
}

uint64_t multiloop_proxy_timeout(const multiloop_config_t *cfg) { return cfg->proxy->timeout; }

/* --- trust ----------------------------------------------------------------- */

static int in_cidr(const cidr_t *c, const unsigned char *a, int family) {
  int full = c->bits / 8, rest = c->bits % 8;
  if (c->family != family) return 0;
  if (memcmp(c->addr, a, (size_t)full) != 0) return 0;
  return rest == 0 || ((c->addr[full] ^ a[full]) & (0xff << (8 - rest))) == 0;
}

int multiloop_proxy_trusted(const multiloop_config_t *cfg, const struct sockaddr *peer) {
  const multiloop_proxy_cfg_t *p = cfg->proxy;
  const unsigned char *a = NULL;
  unsigned char v4[4];
  int family = peer->sa_family, i;
  if (family == AF_INET) {
    a = (const unsigned char *)&((const struct sockaddr_in *)peer)->sin_addr;
  } else if (family == AF_INET6) {
    const struct in6_addr *a6 = &((const struct sockaddr_in6 *)peer)->sin6_addr;
    a = a6->s6_addr;
    if (IN6_IS_ADDR_V4MAPPED(a6)) {      /* a v4 client of a dual-stack socket */
      memcpy(v4, a + 12, 4);
      for (i = 0; i < p->n; i++) if (in_cidr(&p->from[i], v4, AF_INET)) return 1;
    }
  }
  for (i = 0; i < p->n; i++) {
    if (p->from[i].family == AF_UNIX) {
      if (family == AF_UNIX) return 1;
    } else if (a && in_cidr(&p->from[i], a, family)) {
      return 1;
    }
  }
  return 0;
}

/* --- parsing --------------------------------------------------------------- */

static int fail(char *err, size_t errlen, const char *why) {
  snprintf(err, errlen, "%s", why);
  return -1;
}

/* A v1 port: decimal 0..65535, no sign, no leading zero. */
static int v1_port(const char *s, size_t n, uint16_t *port) {
  unsigned long v = 0;
  size_t i;
  if (n == 0 || n > 5 || (n > 1 && s[0] == '0')) return 0;
  for (i = 0; i < n; i++) {
    if (s[i] < '0' || s[i] > '9') return 0;
    v = v * 10 + (unsigned long)(s[i] - '0');
  }
  if (v > 65535) return 0;
  *port = (uint16_t)v;
  return 1;
}

static void set_addr(struct sockaddr_storage *ss, int family, const void *addr, uint16_t port) {
  memset(ss, 0, sizeof *ss);
  if (family == AF_INET) {
    struct sockaddr_in *in = (struct sockaddr_in *)ss;
    in->sin_family = AF_INET;
    memcpy(&in->sin_addr, addr, 4);
    in->sin_port = htons(port);
  } else {
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    in6->sin6_family = AF_INET6;
    memcpy(&in6->sin6_addr, addr, 16);
    in6->sin6_port = htons(port);
  }
}

static int parse_v1(const char *p, size_t len, multiloop_proxy_info_t **out, size_t *hlen,
                    char *err, size_t errlen) {
  const char *end = memchr(p, '\n', len < V1_MAX ? len : V1_MAX);
  const char *f[6];
  size_t fl[6];
  int nf = 0, family;
  const char *q, *line_end;
  unsigned char a[2][16];
  uint16_t port[2];
  multiloop_proxy_info_t *info;
  if (end == NULL) {
    if (len >= V1_MAX) return fail(err, errlen, "v1 header longer than 107 bytes");
    return 0;
  }
  if (end == p || end[-1] != '\r') return fail(err, errlen, "v1 header does not end in CRLF");
  line_end = end - 1;
  /* UNKNOWN: "the receiver must ignore anything presented before the CRLF". */
  if (line_end - p >= 13 && memcmp(p, "PROXY UNKNOWN", 13) == 0 &&
      (line_end - p == 13 || p[13] == ' ')) {
    if ((info = calloc(1, sizeof *info)) == NULL) return fail(err, errlen, "out of memory");
    info->version = 1;
    info->local = 1;
    *out = info;
    *hlen = (size_t)(end - p) + 1;
    return 1;
  }
  for (q = p; q < line_end && nf < 6;) {      /* fields separated by single spaces */
    const char *sp = memchr(q, ' ', (size_t)(line_end - q));
    const char *fe = sp ? sp : line_end;
    f[nf] = q;
    fl[nf++] = (size_t)(fe - q);
    if (fe == q) return fail(err, errlen, "v1 header has an empty field");
    q = sp ? sp + 1 : line_end;
    if (sp && q == line_end) return fail(err, errlen, "v1 header ends in a space");
  }
  if (q < line_end) return fail(err, errlen, "v1 header has too many fields");
  if ((info = calloc(1, sizeof *info)) == NULL) return fail(err, errlen, "out of memory");
  info->version = 1;
  {
    char buf[2][INET6_ADDRSTRLEN + 1];
    int i;
    if (nf != 6) {
      free(info);
      return fail(err, errlen, "v1 header needs TCP4|TCP6 and two addresses and ports");
    }
    if (fl[1] == 4 && memcmp(f[1], "TCP4", 4) == 0) family = AF_INET;
    else if (fl[1] == 4 && memcmp(f[1], "TCP6", 4) == 0) family = AF_INET6;
    else {
      free(info);
      return fail(err, errlen, "v1 header's protocol is not TCP4, TCP6 or UNKNOWN");
    }
    for (i = 0; i < 2; i++) {           /* a NUL would end inet_pton's string early */
      if (fl[2 + i] >= sizeof buf[i] || memchr(f[2 + i], 0, fl[2 + i]) != NULL ||
          (memcpy(buf[i], f[2 + i], fl[2 + i]), buf[i][fl[2 + i]] = 0,
           inet_pton(family, buf[i], a[i]) != 1) ||
          !v1_port(f[4 + i], fl[4 + i], &port[i])) {
        free(info);
        return fail(err, errlen, "v1 header has a bad address or port");
      }
    }
    set_addr(&info->src, family, a[0], port[0]);
    set_addr(&info->dst, family, a[1], port[1]);
  }
  *out = info;
  *hlen = (size_t)(end - p) + 1;
  return 1;
}

static int parse_v2(const unsigned char *p, size_t len, multiloop_proxy_info_t **out,
                    size_t *hlen, char *err, size_t errlen) {
  size_t body, alen = 0, tlv;
  int cmd, fam, proto;
  multiloop_proxy_info_t *info;
  if (len < 16) return 0;
  if ((p[12] >> 4) != 2) return fail(err, errlen, "v2 header's version is not 2");
  cmd = p[12] & 0xf;
  if (cmd > 1) return fail(err, errlen, "v2 header's command is not LOCAL or PROXY");
  fam = p[13] >> 4;
  proto = p[13] & 0xf;
  body = ((size_t)p[14] << 8) | p[15];
  if (body > V2_MAX_BODY) return fail(err, errlen, "v2 header longer than 4096 bytes");
  if (len < 16 + body) return 0;
  if (cmd == 1) {
    /* The combinations the specification defines: any other "must be
     * rejected as invalid by receivers". */
    switch (p[13]) {
    case 0x00: break;                    /* UNSPEC: the real addresses */
    case 0x11: case 0x21: case 0x31: alen = fam == 1 ? 12 : fam == 2 ? 36 : 216; break;
    case 0x12: case 0x22: case 0x32: return fail(err, errlen, "v2 header is for a datagram connection");
    default: return fail(err, errlen, "v2 header's family or protocol is unknown");
    }
    if (body < alen) return fail(err, errlen, "v2 header's addresses are cut short");
    /* The TLVs must tile the rest exactly. */
    for (tlv = 16 + alen; tlv < 16 + body;) {
      size_t l;
      if (16 + body - tlv < 3) return fail(err, errlen, "v2 header has a cut TLV");
      l = ((size_t)p[tlv + 1] << 8) | p[tlv + 2];
      if (16 + body - tlv - 3 < l) return fail(err, errlen, "v2 header has a TLV longer than the header");
      tlv += 3 + l;
    }
  } else {
    /* LOCAL: "the receiver must accept this connection as valid and must
     * use the real connection endpoints and discard the protocol block
     * including the family": its TLVs are kept only if the block is the
     * family's addresses and whole TLVs, and nothing in it refuses it. */
    alen = fam == 1 ? 12 : fam == 2 ? 36 : fam == 3 ? 216 : 0;
    if (proto > 2 || body < alen) alen = 0;
    for (tlv = 16 + alen; tlv < 16 + body;) {
      size_t l;
      if (16 + body - tlv < 3) break;
      l = ((size_t)p[tlv + 1] << 8) | p[tlv + 2];
      if (16 + body - tlv - 3 < l) break;
      tlv += 3 + l;
    }
    if (tlv != 16 + body) alen = body;   /* not TLVs: none */
  }
  if ((info = calloc(1, sizeof *info + (body - alen))) == NULL)
    return fail(err, errlen, "out of memory");
  info->version = 2;
  info->local = cmd == 0 || fam == 0 || fam == 3;
  if (!info->local) {
    const unsigned char *a = p + 16;
    if (fam == 1) {
      set_addr(&info->src, AF_INET, a, (uint16_t)((a[8] << 8) | a[9]));
      set_addr(&info->dst, AF_INET, a + 4, (uint16_t)((a[10] << 8) | a[11]));
    } else {
      set_addr(&info->src, AF_INET6, a, (uint16_t)((a[32] << 8) | a[33]));
      set_addr(&info->dst, AF_INET6, a + 16, (uint16_t)((a[34] << 8) | a[35]));
    }
  }
  info->command_local = cmd == 0;
  info->tlv_len = body - alen;
  memcpy(info->tlvs, p + 16 + alen, info->tlv_len);
  *out = info;
  *hlen = 16 + body;
  return 1;
}

int multiloop_proxy_parse(const char *data, size_t len, multiloop_proxy_info_t **out,
                          size_t *hlen, char *err, size_t errlen) {
  size_t n = len < 12 ? len : 12;
  if (len >= 6 && memcmp(data, "PROXY ", 6) == 0) return parse_v1(data, len, out, hlen, err, errlen);
  if (memcmp(data, v2_sig, n) == 0) {
    if (len < 12) return 0;
    return parse_v2((const unsigned char *)data, len, out, hlen, err, errlen);
  }
  if (len < 6 && memcmp(data, "PROXY ", len) == 0) return 0;
  return fail(err, errlen, "no PROXY protocol header");
}

/* --- Lua ------------------------------------------------------------------- */

void multiloop_proxy_push_ipport(lua_State *L, const struct sockaddr_storage *ss) {
  char ip[INET6_ADDRSTRLEN];
  uv_ip_name((const struct sockaddr *)ss, ip, sizeof ip);
  lua_createtable(L, 0, 2);
  lua_pushstring(L, ip);
  lua_setfield(L, -2, "ip");
  lua_pushinteger(L, ss->ss_family == AF_INET6
                         ? ntohs(((const struct sockaddr_in6 *)ss)->sin6_port)
                         : ntohs(((const struct sockaddr_in *)ss)->sin_port));
  lua_setfield(L, -2, "port");
}

int multiloop_proxy_push_peer(lua_State *L, const multiloop_proxy_info_t *info) {
  char ip[INET6_ADDRSTRLEN];
  uv_ip_name((const struct sockaddr *)&info->src, ip, sizeof ip);
  lua_pushstring(L, ip);
  lua_pushinteger(L, info->src.ss_family == AF_INET6
                         ? ntohs(((const struct sockaddr_in6 *)&info->src)->sin6_port)
                         : ntohs(((const struct sockaddr_in *)&info->src)->sin_port));
  return 2;
}

/* { version, command, src, dst, via, tlvs }: `via` is the proxy's own
 * address (the socket's peer), pushed by the caller at the top. */
void multiloop_proxy_push_info(lua_State *L, const multiloop_proxy_info_t *info, int via) {
  size_t t;
  lua_createtable(L, 0, 6);
  lua_pushinteger(L, info->version);
  lua_setfield(L, -2, "version");
  lua_pushstring(L, info->version == 1 ? (info->local ? "UNKNOWN" : "PROXY")
                                      : (info->command_local ? "LOCAL" : "PROXY"));
  lua_setfield(L, -2, "command");
  if (!info->local) {
    multiloop_proxy_push_ipport(L, &info->src);
    lua_setfield(L, -2, "src");
    multiloop_proxy_push_ipport(L, &info->dst);
    lua_setfield(L, -2, "dst");
  }
  lua_pushvalue(L, via);
  lua_setfield(L, -2, "via");
  lua_createtable(L, 0, 0);
  for (t = 0; t + 3 <= info->tlv_len;) {
    size_t l = ((size_t)info->tlvs[t + 1] << 8) | info->tlvs[t + 2];
    lua_pushlstring(L, (const char *)info->tlvs + t + 3, l);
    lua_rawseti(L, -2, info->tlvs[t]);   /* by type; a repeated type: the last */
    t += 3 + l;
  }
  lua_setfield(L, -2, "tlvs");
}
