"""The file of `gateway keys import`: JSONL or CSV records -> POST /v1/keys bodies. Pure.

Each record names an existing key, by plaintext (`key`) or by digest
(`key_sha256`, 64 hex), with the optional fields of a create: `name`, `owner`,
`scopes`, `meta`, `expires_at`, `prefix`. Every record is checked here with the
admin API's own rules (gateway.admin.bodies), so `--dry-run` gives the verdict
the API would give. A bad record becomes a `Rejection` naming its line; a
problem with the whole file (no header, unknown column, unknown format) is a
`FileError`. No message here ever contains a key or any other cell's text:
only line numbers, field names and rules.

JSONL: one JSON object a line; blank lines are ignored; `scopes` is a list (or
a string like CSV's). CSV: a header row naming the columns (any order, case
and surrounding spaces ignored), then one record a row; an empty cell is an
absent field; `scopes` is separated by spaces or semicolons; `meta` is a JSON
object. A CSV record's line is the line where it ends (quoted cells may span
lines).
"""

from __future__ import annotations

import csv
import hashlib
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Final

import orjson

from gateway.admin import bodies

FIELDS: Final = ("key", "key_sha256", "name", "owner", "scopes", "meta", "expires_at", "prefix")
FORMATS: Final = ("jsonl", "csv")
_SUFFIXES: Final = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}
_SCOPE_SEPARATORS: Final = re.compile(r"[;\s]+")
_PRINTABLE_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,40}")


class FileError(ValueError):
    """The file as a whole cannot be read as an import file (exit 2: nothing is sent)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A valid record: the body to POST, and the key's SHA-256 (to spot repeats in the file)."""

    line: int
    body: dict[str, Any] = field(repr=False)
    digest: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Rejection:
    line: int
    code: str
    detail: str

    def public(self) -> dict[str, Any]:
        return {"line": self.line, "code": self.code, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class Repeat:
    """A record for a key an earlier line of the same file already names: skipped, not sent."""

    line: int
    same_as: int

    def public(self) -> dict[str, int]:
        return {"line": self.line, "same_as": self.same_as}


@dataclass(frozen=True, slots=True)
class Plan:
    entries: list[Entry]
    rejections: list[Rejection]
    repeats: list[Repeat]

    @property
    def records(self) -> int:
        return len(self.entries) + len(self.rejections) + len(self.repeats)


def detect_format(path: str, explicit: str | None) -> str:
    if explicit is not None:
        if explicit not in FORMATS:
            raise FileError(f"unknown format {explicit!r} (use jsonl or csv)")
        return explicit
    fmt = _SUFFIXES.get(PurePath(path).suffix.lower())
    if fmt is None:
        raise FileError("cannot tell the format from the file name: name it .jsonl or .csv, or pass --format")
    return fmt


def split_scopes(text: str) -> list[str]:
    return [s for s in _SCOPE_SEPARATORS.split(text) if s]


def _unknown_fields(names: Iterable[str]) -> str:
    """Field names for a message; a name that could be anything (even a key) is not repeated."""
    shown = sorted({n if _PRINTABLE_NAME.fullmatch(n) and len(n) <= 20 else "<unprintable>" for n in names})
    return ", ".join(shown)


def check(line: int, record: dict[str, Any], now: float) -> Entry | Rejection:
    """One decoded record -> an Entry, or a Rejection with the API's own message."""
    unknown = [name for name in record if name not in FIELDS]
    if unknown:
        return Rejection(line, "invalid_request", f"unknown field(s): {_unknown_fields(unknown)}")
    body = {name: value for name, value in record.items() if value is not None}
    if "key" not in body and "key_sha256" not in body:
        return Rejection(line, "invalid_request", "key, key_sha256: one is required (an import never makes a new key)")
    if isinstance(body.get("scopes"), str):
        body["scopes"] = split_scopes(body["scopes"])
    try:
        spec = bodies.create(body, now)
    except bodies.BadInput as exc:
        return Rejection(line, "invalid_request", str(exc))
    if spec.key is not None:
        digest = hashlib.sha256(spec.key.encode("utf-8")).hexdigest()
    else:
        assert spec.key_sha256 is not None
        digest = spec.key_sha256
    return Entry(line, body, digest)


def parse_jsonl(lines: Iterable[str], now: float | None = None) -> Iterator[Entry | Rejection]:
    when = time.time() if now is None else now
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            # The decoder's message may quote the line; only the column is repeated.
            yield Rejection(number, "invalid_json", f"not valid JSON (column {exc.colno})")
            continue
        if not isinstance(value, dict):
            yield Rejection(number, "invalid_json", "must be a JSON object")
            continue
        yield check(number, value, when)


def _header(row: list[str]) -> list[str]:
    names = [cell.strip().lower() for cell in row]
    unknown = [n for n in names if n not in FIELDS]
    if unknown:
        raise FileError(
            f"CSV header: unknown column(s): {_unknown_fields(unknown)} (allowed: {', '.join(FIELDS)}); "
            "the first row must name the columns"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise FileError(f"CSV header: column(s) named twice: {', '.join(repeated)}")
    if "key" not in names and "key_sha256" not in names:
        raise FileError("CSV header: needs a key or a key_sha256 column")
    return names


def _csv_record(names: list[str], row: list[str], line: int) -> dict[str, Any] | Rejection:
    if len(row) != len(names):
        return Rejection(line, "invalid_csv", f"has {len(row)} field(s), the header names {len(names)}")
    record: dict[str, Any] = {}
    for name, raw in zip(names, row, strict=True):
        cell = raw.strip()
        if not cell:
            continue
        if name == "scopes":
            record[name] = split_scopes(cell)
        elif name == "meta":
            try:
                record[name] = orjson.loads(cell)
            except orjson.JSONDecodeError:
                return Rejection(line, "invalid_request", "meta: must be a JSON object")
        else:
            record[name] = cell
    return record


def parse_csv(lines: Iterable[str], now: float | None = None) -> Iterator[Entry | Rejection]:
    """`lines` as from a file opened with newline="" (the csv module's rule)."""
    when = time.time() if now is None else now
    reader = csv.reader(iter(lines), strict=True)
    names: list[str] | None = None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error:
            # The csv module's message may quote the line; say only what kind of line it is.
            if names is None:
                raise FileError(f"CSV header (line {reader.line_num}): not readable as CSV") from None
            yield Rejection(reader.line_num, "invalid_csv", "not readable as CSV (check the quotes)")
            continue
        if not any(cell.strip() for cell in row):
            continue
        if names is None:
            names = _header(row)
            continue
        record = _csv_record(names, row, reader.line_num)
        yield record if isinstance(record, Rejection) else check(reader.line_num, record, when)
    if names is None:
        raise FileError("CSV: the file is empty; the first row must name the columns")


def plan(items: Iterable[Entry | Rejection]) -> Plan:
    """Split parsed records; a later record for a key already named is a Repeat of the first."""
    entries: list[Entry] = []
    rejections: list[Rejection] = []
    repeats: list[Repeat] = []
    first: dict[str, int] = {}
    for item in items:
        if isinstance(item, Rejection):
            rejections.append(item)
        elif item.digest in first:
            repeats.append(Repeat(item.line, first[item.digest]))
        else:
            first[item.digest] = item.line
            entries.append(item)
    return Plan(entries, rejections, repeats)


def parse(lines: Iterable[str], fmt: str, now: float | None = None) -> Plan:
    if fmt == "csv":
        return plan(parse_csv(lines, now))
    return plan(parse_jsonl(lines, now))
