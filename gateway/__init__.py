"""gateway: an API-key gateway in front of existing HTTP APIs."""

__version__ = "0.1.0"
