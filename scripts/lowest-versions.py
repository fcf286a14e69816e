"""Print the installed version of every pinned dependency and check it is the lowest one allowed.

`make test-lowest` runs this in .venv-lowest/ before the suite. It fails (exit 1) when
- an installed version differs from its pin in constraints/lowest.txt (the job would test something else), or
- a pin differs from the lower bound pyproject.toml declares for the same name (the two files drifted), or
- a dependency pyproject.toml declares with a lower bound has no pin.

Usage: python scripts/lowest-versions.py [constraints/lowest.txt]
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            sys.exit(f"{path}: {raw!r} is not a `name==version` pin")
        pins[canonical(name.strip())] = version.strip()
    return pins


def declared_lower_bounds() -> tuple[dict[str, str], set[str]]:
    """name -> the version after `>=` in pyproject.toml, for runtime and dev dependencies; and the runtime names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime: list[str] = project["dependencies"]
    dev: list[str] = project.get("optional-dependencies", {}).get("dev", [])
    bounds: dict[str, str] = {}
    for requirement in [*runtime, *dev]:
        spec = requirement.split(";", 1)[0]
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)", spec)
        if match is None:
            continue
        lower = re.search(r">=\s*([0-9][^,\s]*)", match.group(3))
        if lower is not None:
            bounds[canonical(match.group(1))] = lower.group(1)
    runtime_names = {canonical(re.split(r"[\[<>=!~;\s]", r.strip(), maxsplit=1)[0]) for r in runtime}
    return bounds, runtime_names


def same_version(a: str, b: str) -> bool:
    """3.9 == 3.9.0: compare release numbers with trailing zeros dropped."""

    def key(v: str) -> tuple[int | str, ...]:
        parts: list[int | str] = [int(p) if p.isdigit() else p for p in v.split(".")]
        while parts and parts[-1] == 0:
            parts.pop()
        return tuple(parts)

    return key(a) == key(b)


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "constraints" / "lowest.txt"
    pins = read_pins(path)
    bounds, runtime = declared_lower_bounds()
    problems: list[str] = []
    print(f"{'dependency':<20} {'pinned':<10} {'installed':<10}")
    for name, pinned in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "-"
        marker = "  (runtime)" if name in runtime else ""
        print(f"{name:<20} {pinned:<10} {installed:<10}{marker}")
        if installed != pinned:
            problems.append(f"{name}: installed {installed}, pinned {pinned}")
        declared = bounds.get(name)
        if declared is not None and not same_version(declared, pinned):
            problems.append(f"{name}: pyproject.toml says >={declared}, {path.name} pins {pinned}")
    for name in sorted(set(bounds) - set(pins)):
        problems.append(f"{name}: pyproject.toml says >={bounds[name]} but {path.name} has no pin")
    for problem in problems:
        print(f"lowest-versions: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
