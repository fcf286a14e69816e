"""The command line: `gateway serve | check-config | hash-token | keys ... | audit ...`.

Owns: `main` (the entry point `gateway.cli.main:main` and `python -m gateway`; serve and the
local commands), `keys` (the keys and audit commands: the admin API client and its output),
`keyfile` (reading a key file for `keys import`).

May import: every other package (the top layer); nothing imports it but gateway/__main__.py.
"""
