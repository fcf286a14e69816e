"""gateway: an API-key gateway in front of existing HTTP APIs.

The package map and its import rules are in docs/architecture.md. High to low:
cli > runtime > admin > proxy > coherence > (h1 | keytable) > ratelimit > routing > base
(config, errors, metrics, logs); a module imports only its own layer and the layers below
(h1 and keytable not each other), as pyproject.toml's import-linter contract and
tests/test_architecture.py check.
"""

__version__ = "0.1.0"
