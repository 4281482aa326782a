"""Upstream OAuth 2.0: access tokens for Microsoft 365, Google Workspace and any token
endpoint, and the SASL mechanisms that present them (XOAUTH2, OAUTHBEARER).

    providers.py   one grant per provider → AccessToken (or TokenError)
    transport.py   HTTPS to the token endpoint through the relay's own dialer (egress proxy)
    cache.py       one token per upstream, shared by its pool: single flight, refresh ahead
    sasl.py        XOAUTH2 / OAUTHBEARER on an aiosmtplib session (RFC 7628)
    token.py       AccessToken, TokenError, relay_upstream_token_failures_total

Libraries, and why:
- **Authlib** (with **httpx2**) implements all three grants: client credentials with
  client_secret_post/basic and with a private_key_jwt client assertion (RFC 7523 §2.2, the
  Entra ID certificate credential), and the JWT-bearer grant (RFC 7523 §2.1, Google service
  accounts), plus RFC 6749 §5.2 error parsing; JWTs are signed by joserfc. It is async, so a
  token request never blocks the event loop nor needs a thread, and it takes an httpx2
  transport, which lets the token endpoint be reached through the relay's own egress dialer
  (SOCKS5/5h/4 and HTTP CONNECT, verified with the configured CA bundle).
- Not **msal**: synchronous (requests), so a thread per fetch and a second proxy stack (no
  SOCKS4, its own proxy settings); and it fetches the tenant's OpenID metadata and instance
  discovery before the first token, two more endpoints to let through the egress proxy.
  Its extras (user flows, a token cache for many accounts) are not needed for one app
  token per upstream.
- Not **google-auth**: its service-account refresh is synchronous over requests (the async
  transport is experimental), with the same thread and proxy objections.

Failures keep their SMTP meaning: every token failure is a 451 4.7.0 to the client (an
outage passes; an operator's mistake must not bounce mail), with the endpoint's error in the
log and `relay_upstream_token_failures_total{upstream,reason}` counting it.
"""
