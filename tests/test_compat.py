"""gateway/h1/compat.py: the import-time check of aiohttp's private members, and the supported range.

- With any one BaseProtocol member missing, importing the module fails with an ImportError that names
  the member, the installed aiohttp version and the supported range (a fresh copy of the module is
  executed against a stand-in BaseProtocol; the real module and aiohttp itself are left alone).
- The installed aiohttp is inside `SUPPORTED`; pyproject.toml declares the same range; the lowest-
  dependencies job (constraints/lowest.txt) pins aiohttp at its lower bound.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
import types
from pathlib import Path

import aiohttp
import aiohttp.base_protocol
import aiohttp.streams
import pytest

from gateway.h1 import compat as aiohttp_compat

ROOT = Path(__file__).resolve().parent.parent


def _version(text: str) -> tuple[int, ...]:
    """The release numbers of a version ("3.14.4" -> (3, 14, 4); "3.15.0rc1" -> (3, 15, 0))."""
    numbers = re.match(r"\d+(?:\.\d+)*", text.strip())
    assert numbers is not None, text
    parts = [int(p) for p in numbers.group(0).split(".")]
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


def _satisfies(version: str, specifier: str) -> bool:
    """`version` inside `specifier`: with packaging when installed (pytest brings it), else the
    comparisons this project uses (>=, <, ==) on release numbers."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:  # pragma: no cover - pytest depends on packaging
        ops = {">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "==": lambda a, b: a == b}
        for clause in specifier.split(","):
            match = re.fullmatch(r"\s*(>=|<|==)\s*(\S+)\s*", clause)
            assert match is not None, f"unsupported clause {clause!r}"
            if not ops[match.group(1)](_version(version), _version(match.group(2))):
                return False
        return True
    return Version(version) in SpecifierSet(specifier)


def _bounds(specifier: str) -> tuple[str, str]:
    """(lower, upper) of a ">=a,<b" range."""
    clauses: dict[str, str] = {}
    for clause in specifier.split(","):
        match = re.fullmatch(r"\s*(>=|<)\s*(\S+)\s*", clause)
        assert match is not None, f"{specifier!r}: expected >=lower,<upper"
        clauses[match.group(1)] = match.group(2)
    return clauses[">="], clauses["<"]


# (module, class, the members aiohttp_compat checks on it): every private member the check guards.
_GUARDED: list[tuple[types.ModuleType, str, tuple[str, ...]]] = [
    (aiohttp.base_protocol, "BaseProtocol", aiohttp_compat._PROTOCOL_MEMBERS),
    (aiohttp.streams, "StreamReader", getattr(aiohttp_compat, "_READER_MEMBERS", ())),
]
_CASES = [(module, cls, members, missing) for module, cls, members in _GUARDED for missing in members]


def _load_copy(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Execute gateway/h1/compat.py afresh under a name of its own, against whatever the test
    put into aiohttp's modules (the real gateway.h1.compat in sys.modules is not touched)."""
    name = "gateway.h1._compat_probe"
    spec = importlib.util.spec_from_file_location(name, aiohttp_compat.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def _stand_in(cls: str, members: tuple[str, ...], without: set[str]) -> type:
    """A class with the same name that has `members` except `without` (all the check looks at)."""
    return type(cls, (), {m: None for m in members if m not in without})


@pytest.mark.parametrize(("module", "cls", "members", "missing"), _CASES, ids=[f"{c}.{m}" for _, c, _, m in _CASES])
def test_import_fails_naming_the_missing_member_and_the_range(
    monkeypatch: pytest.MonkeyPatch, module: types.ModuleType, cls: str, members: tuple[str, ...], missing: str
) -> None:
    monkeypatch.setattr(module, cls, _stand_in(cls, members, {missing}))
    with pytest.raises(ImportError) as caught:
        _load_copy(monkeypatch)
    assert type(caught.value).__name__ == "UnsupportedAiohttp"
    message = str(caught.value)
    assert f"{cls}.{missing}" in message
    assert aiohttp_compat.SUPPORTED in message
    assert aiohttp.__version__ in message
    for present in members:  # only the missing one is named
        if present != missing:
            assert not re.search(rf"\.{present}\b", message), message


def test_import_names_every_missing_protocol_member(monkeypatch: pytest.MonkeyPatch) -> None:
    members = aiohttp_compat._PROTOCOL_MEMBERS
    monkeypatch.setattr(aiohttp.base_protocol, "BaseProtocol", _stand_in("BaseProtocol", members, set(members)))
    with pytest.raises(ImportError) as caught:
        _load_copy(monkeypatch)
    message = str(caught.value)
    for member in members:
        assert re.search(rf"\.{member}\b", message), (member, message)


def test_a_copy_loads_against_the_real_aiohttp(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe itself is sound: the same loading succeeds when nothing is missing."""
    module = _load_copy(monkeypatch)
    assert module.SUPPORTED == aiohttp_compat.SUPPORTED


def test_the_real_module_was_left_alone() -> None:
    assert sys.modules["gateway.h1.compat"] is aiohttp_compat
    assert aiohttp_compat.BaseProtocol is aiohttp.base_protocol.BaseProtocol
    assert aiohttp_compat.StreamReader is aiohttp.streams.StreamReader
    for module, cls, members in _GUARDED:
        for member in members:
            assert hasattr(getattr(module, cls), member), f"{cls}.{member}"


def test_installed_aiohttp_is_supported() -> None:
    assert _satisfies(aiohttp.__version__, aiohttp_compat.SUPPORTED), (
        f"aiohttp {aiohttp.__version__} is installed; the gateway supports aiohttp {aiohttp_compat.SUPPORTED}"
    )


def test_the_range_has_both_bounds() -> None:
    lower, upper = _bounds(aiohttp_compat.SUPPORTED)
    assert _version(lower) < _version(upper)
    assert _satisfies(lower, aiohttp_compat.SUPPORTED)
    assert not _satisfies(upper, aiohttp_compat.SUPPORTED)


def test_pyproject_declares_the_same_range() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = [d for d in dependencies if re.match(r"aiohttp\s*[<>=!~\[;]", d)]
    assert len(declared) == 1, declared
    specifier = re.sub(r"^aiohttp\s*", "", declared[0].split(";", 1)[0]).replace(" ", "")
    assert sorted(specifier.split(",")) == sorted(aiohttp_compat.SUPPORTED.replace(" ", "").split(","))


def test_lowest_job_pins_aiohttp_at_the_lower_bound() -> None:
    pins = {}
    for raw in (ROOT / "constraints" / "lowest.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    lower, _ = _bounds(aiohttp_compat.SUPPORTED)
    assert pins["aiohttp"] == lower
