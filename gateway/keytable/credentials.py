"""Reading the bearer credential from a request's headers (spec 5), pure.

One parser for both listeners: the proxy's API keys (`bearer_from`) and the admin API's tokens
(`bearer_token`, which the admin API maps to its own codes). The rule is RFC 6750 2.1's: exactly
one Authorization header, the scheme `Bearer` in any case, spaces, then a b64token and nothing
else. Two things are the caller's: the length bound (an API key is at most `MAX_TOKEN_LENGTH`)
and the characters: an API key is a b64token; an admin token may be any visible ASCII, because
tokens operators chose before `gwadm_` tokens existed were hashed from whatever they typed and must
keep working (docs/admin-api.md, migration).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from gateway.errors import Denial

MAX_TOKEN_LENGTH: Final = 512
# RFC 6750 b64token: the only characters a bearer token may contain.
B64TOKEN: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
VISIBLE_ASCII: Final = re.compile(r"[\x21-\x7e]+")  # an admin token's characters (see above)


@dataclass(frozen=True, slots=True)
class Bearer:
    token: str

    def __repr__(self) -> str:  # never print the token
        return "Bearer(<redacted>)"


class NoBearer(enum.Enum):
    """Why a request carries no usable bearer token."""

    MISSING = "missing"  # no Authorization header
    REPEATED = "repeated"  # more than one
    MALFORMED = "malformed"  # another scheme, an empty token, or characters a b64token cannot have
    OVERSIZED = "oversized"  # longer than the caller's bound


REPEATED_DETAIL: Final = "The request carries more than one Authorization header"


def bearer_token(
    authorization: Sequence[str], max_length: int = MAX_TOKEN_LENGTH, chars: re.Pattern[str] = B64TOKEN
) -> str | NoBearer:
    """The bearer token from every Authorization header value the request carried (RFC 6750 2.1)."""
    if not authorization:
        return NoBearer.MISSING
    if len(authorization) > 1:
        return NoBearer.REPEATED
    scheme, _, token = authorization[0].strip().partition(" ")
    token = token.strip(" ")
    if scheme.lower() != "bearer" or not token:
        return NoBearer.MALFORMED
    if len(token) > max_length:
        return NoBearer.OVERSIZED
    if not chars.fullmatch(token):
        return NoBearer.MALFORMED
    return token


def bearer_from(authorization: Sequence[str]) -> Bearer | Denial:
    """The API key from every Authorization header value the request carried, or the proxy's denial."""
    token = bearer_token(authorization)
    if isinstance(token, str):
        return Bearer(token)
    if token is NoBearer.MISSING:
        return Denial("missing_key")
    if token is NoBearer.REPEATED:
        return Denial("invalid_request", REPEATED_DETAIL)
    if token is NoBearer.OVERSIZED:
        return Denial("malformed_key", f"The API key is longer than {MAX_TOKEN_LENGTH} characters")
    return Denial("malformed_key")
