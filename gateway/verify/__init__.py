"""Verify mode: the gateway as the key check of a proxy the operator already runs.

nginx `auth_request`, Caddy `forward_auth`, Traefik `ForwardAuth` and Envoy's HTTP `ext_authz`
ask the verify listener (its own port, `verify.listen`) about each request they are about to
forward; it runs the proxy's request path up to the key decision on the `mode: verify` routes
(gateway/proxy.py's `Gate`: the same normalisation, route match, method rule, bearer parsing,
cache, lease and decision) and answers 200 with the key's identity, or the spec 5 refusal, instead
of forwarding. A disable reaches it as it reaches the proxy: the same cache, the same confirmed
propagation.

Owns: `original` (which request the asking proxy is asking about, read from the headers it sends,
believed only from `trusted_proxies`; pure) and `verifier` (the listener's handler).

May import: the proxy, h1, keytable, routing and the base. Not admin, runtime or cli.
"""
