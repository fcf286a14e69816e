"""The operator console (spec 11): server-rendered pages on the admin listener at `/`.

Owns: `app` (the pages and forms, mounted on the admin application by `mount`), `sessions`
(server-side sessions in Redis, values shown once), `templates/` (Jinja2, autoescaped) and
`static/` (the console's own CSS and a small script; no third-party code, nothing from a CDN).
Every change goes through the admin API's actions (gateway.admin.api.AdminApi), which check
the caller's role themselves.

May import: admin and everything below it (proxy, coherence, h1, keytable, routing, the base).
Not runtime or cli.
"""
