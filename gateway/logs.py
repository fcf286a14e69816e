"""Log lines: one JSON object per line (the default, as container log collectors expect) or text.

Every record, the access log's included, goes through one of two formatters.
Fields passed as `extra=` become JSON members (or `key=value` pairs in text).
Nothing a client sent can break a line: JSON escapes control characters, and
the text format escapes them as `\\xNN`; bytes that are not UTF-8 (aiohttp
keeps them as surrogates) are escaped too.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final

import orjson

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
# C0 controls and DEL, escaped in text lines; everything else printable stays as it is.
_ESCAPES: Final = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_extras(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(line, default=str).decode()
        except TypeError:
            # A string orjson refuses (lone surrogates from non-UTF-8 header bytes): the
            # standard library escapes them as \udcXX and still writes one line.
            return json.dumps(line, default=str, ensure_ascii=True)


def escape(text: str) -> str:
    """A text-log-safe rendering: control characters and surrogates escaped."""
    text = text.translate(_ESCAPES)
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.name, escape(record.getMessage())]
        for key, value in _extras(record).items():
            parts.append(f"{key}={escape(value if isinstance(value, str) else str(value))}")
        line = " ".join(parts)
        if record.exc_info:
            line += " exc=" + escape(self.formatException(record.exc_info))
        return line


def configure(level: str, fmt: str) -> None:
    """Root logging to stderr in the chosen format; replaces any handler set before."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
