"""The Standard Webhooks signature (https://www.standardwebhooks.com, "Signature scheme").

`webhook-signature` is `v1,` and the base64 of HMAC-SHA256 under the secret's key over
`{webhook-id}.{webhook-timestamp}.{body}`; the timestamp is whole seconds since the epoch. Standard
library only: the reference package (`standardwebhooks`) verifies what this signs in the tests.

May import: nothing of the gateway.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one attempt."""
    signed = msg_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, msg_id, timestamp, body),
    }
