/*
 * proxy.h: the PROXY protocol v1/v2 (proxy.c), a phase before the handler
 * sees a connection (conn.c).
 */
#ifndef MULTILOOP_PROXY_H
#define MULTILOOP_PROXY_H

#include "multiloop.h"

/* What a header said. `local`: no addresses to use (v2 LOCAL, v1 UNKNOWN,
 * or an unspecified or Unix family): the socket's own stand. */
typedef struct multiloop_proxy_info_s {
  int version;                         /* 1 or 2 */
  int local;
  int command_local;                   /* v2's LOCAL command (a health check) */
  struct sockaddr_storage src, dst;    /* unless local */
  /* conn.c: a callback handler paused the connection in connect, and the
   * bytes after the header wait in the stream's input until it resumes
   * (then its idle deadline, set to 1 ms, hands them over, and is set back
   * to idle_ms). */
  int replay;
  uint64_t idle_ms;
  size_t tlv_len;                      /* v2: the TLVs, as sent */
  unsigned char tlvs[];
} multiloop_proxy_info_t;

/* Main thread: cfg->proxy from opts.proxy_protocol; raises naming it. */
void multiloop_proxy_configure(lua_State *L, int opts, multiloop_config_t *cfg);
void multiloop_proxy_free(multiloop_config_t *cfg);
uint64_t multiloop_proxy_timeout(const multiloop_config_t *cfg);
/* Whether `peer` (the socket's) is in proxy_protocol.from. */
int multiloop_proxy_trusted(const multiloop_config_t *cfg, const struct sockaddr *peer);
/* A header at the front of data[0..len): 1 (*out malloc'd, *hlen its
 * length), 0 (not whole yet), -1 (refused: err says why). */
int multiloop_proxy_parse(const char *data, size_t len, multiloop_proxy_info_t **out,
                          size_t *hlen, char *err, size_t errlen);
/* { ip = ..., port = ... } of an IPv4 or IPv6 address (conn:proxy()'s fields). */
void multiloop_proxy_push_ipport(lua_State *L, const struct sockaddr_storage *ss);
/* conn:peer() as the header reported it: ip, port. */
int multiloop_proxy_push_peer(lua_State *L, const multiloop_proxy_info_t *info);
/* conn:proxy(): the table, with `via` (a table at that index) as is. */
void multiloop_proxy_push_info(lua_State *L, const multiloop_proxy_info_t *info, int via);

#endif
