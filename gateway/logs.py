"""Log lines: one JSON object per line (the default, as container log collectors expect) or text.

Every record, the access log's included, goes through one of two formatters.
Fields passed as `extra=` become JSON members (or `key=value` pairs in text).
Nothing a client sent can break a line: JSON escapes control characters, and
the text format escapes them as `\\xNN`; bytes that are not UTF-8 (aiohttp
keeps them as surrogates) are escaped too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, Final

import orjson

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
# C0 controls and DEL, escaped in text lines; other non-printable characters are escaped by escape().
_ESCAPES: Final = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}
# Valid inside JSON strings but taken as line breaks by Unicode-aware readers: escaped too.
_JSON_BREAKS: Final = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


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
            text = orjson.dumps(line, default=str).decode()
        except TypeError:
            # A string orjson refuses (lone surrogates from non-UTF-8 header bytes): the
            # standard library escapes them as \udcXX and still writes one line.
            return json.dumps(line, default=str, ensure_ascii=True)
        return text if text.isascii() else text.translate(_JSON_BREAKS)


def escape(text: str) -> str:
    """A text-log-safe rendering: control characters and surrogates escaped."""
    text = text.translate(_ESCAPES)
    if text.isascii():
        return text
    # C1 controls, U+2028/2029 and other non-printables; surrogates (non-UTF-8 bytes) too.
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.name, escape(record.getMessage())]
        for key, value in _extras(record).items():
            parts.append(f"{key}={escape(value if isinstance(value, str) else str(value))}")
        line = " ".join(parts)
        if record.exc_info:
            line += " exc=" + escape(self.formatException(record.exc_info))
        return line


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the lines of one event-loop turn together: one `write` for many access records
    instead of one each. A warning or worse, and anything logged outside a running loop (startup,
    shutdown, another thread), is written at once with what is pending; so is everything at exit
    (logging.shutdown flushes)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.flush()
            return
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._scheduled = False
            if self._pending:
                data = "".join(self._pending)
                self._pending.clear()
                self.stream.write(data)
            super().flush()
        finally:
            self.release()


class QuietParserErrors(logging.Filter):
    """aiohttp's server logs a request its HTTP parser refused as an error with a traceback
    that quotes the offending header line, which can hold a client's key. Any client can
    cause it at will, so: info level, the exception's type only, never its text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("aiohttp") and record.exc_info:
            exc = record.exc_info[1]
            record.args = (record.getMessage(), type(exc).__name__)
            record.msg = "%s (%s; details withheld: they can quote request headers)"
            record.exc_info = None
            record.exc_text = None
            if record.levelno > logging.INFO:
                record.levelno, record.levelname = logging.INFO, "INFO"
                return logging.getLogger().isEnabledFor(logging.INFO)  # lowered: below a warning level
        return True


def configure(level: str, fmt: str) -> None:
    """Root logging to stderr in the chosen format; replaces any handler set before."""
    handler = BatchedStreamHandler(sys.stderr)
    handler.addFilter(QuietParserErrors())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
