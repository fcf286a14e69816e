"""Reading the bearer credential from a request's headers (spec 5), pure."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from gateway.errors import Denial

MAX_TOKEN_LENGTH: Final = 512
# RFC 6750 b64token: the only characters a bearer token may contain.
B64TOKEN: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True, slots=True)
class Bearer:
    token: str

    def __repr__(self) -> str:  # never print the token
        return "Bearer(<redacted>)"


def bearer_from(authorization: Sequence[str]) -> Bearer | Denial:
    """The bearer token from every Authorization header value the request carried."""
    if not authorization:
        return Denial("missing_key")
    if len(authorization) > 1:
        return Denial("invalid_request", "The request carries more than one Authorization header")
    scheme, _, token = authorization[0].strip().partition(" ")
    token = token.strip(" ")
    if scheme.lower() != "bearer" or not token:
        return Denial("malformed_key")
    if len(token) > MAX_TOKEN_LENGTH:
        return Denial("malformed_key", f"The API key is longer than {MAX_TOKEN_LENGTH} characters")
    if not B64TOKEN.fullmatch(token):
        return Denial("malformed_key")
    return Bearer(token)
