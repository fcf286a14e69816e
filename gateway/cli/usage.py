"""`gateway keys usage ID`: a key's usage (GET /v1/keys/{id}/usage) as a small text chart.

Pure formatting: the command itself is in keys.py with the other `keys` commands. One row a bucket
(for the 1h window, one row per 5 minutes), a bar scaled to the busiest row: `#` for requests that
passed (forwarded or verified), `x` for refusals; then the totals by outcome, the distinct client
addresses over the window and the last use. ASCII only, so it reads the same in any terminal.
"""

from __future__ import annotations

from typing import Any, Final

BAR_WIDTH: Final = 40
PASSED: Final = frozenset({"forwarded", "verified"})
_ROWS_PER_WINDOW: Final = {"1h": 12, "24h": 24, "30d": 30}


def _rows(data: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(label, passed, refused) per row: buckets grouped so a window has a screen's worth of rows."""
    buckets = [b for b in data.get("buckets") or [] if isinstance(b, dict)]
    rows = _ROWS_PER_WINDOW.get(str(data.get("window")), len(buckets)) or 1
    per = max(1, len(buckets) // rows)
    unit = data.get("bucket_seconds")
    out = []
    for i in range(0, len(buckets), per):
        group = buckets[i : i + per]
        start = str(group[0].get("start") or "")
        label = start[5:10] if unit == 86400 else start[11:16] if len(start) >= 16 else start  # MM-DD or HH:MM
        passed = refused = 0
        for bucket in group:
            for outcome, n in (bucket.get("outcomes") or {}).items():
                if isinstance(n, int):
                    if outcome in PASSED:
                        passed += n
                    else:
                        refused += n
        out.append((label, passed, refused))
    return out


def usage_chart(data: dict[str, Any]) -> str:
    rows = _rows(data)
    most = max((p + r for _, p, r in rows), default=0)
    lines = [f"{data.get('key_id')}: usage over {data.get('window')} (UTC; # passed, x refused)"]
    for label, passed, refused in rows:
        bar = ""
        if most:
            wide = round((passed + refused) * BAR_WIDTH / most)
            hashes = round(passed * BAR_WIDTH / most)
            bar = "#" * hashes + "x" * max(0, wide - hashes)
            if passed + refused and not bar:
                bar = "#" if passed else "x"  # a row with requests never shows empty
        lines.append(f"{label:>5} |{bar:<{BAR_WIDTH}} {passed + refused}")
    totals = data.get("totals") or {}
    outcomes = totals.get("outcomes") or {}
    by = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items(), key=lambda kv: -int(kv[1])))
    lines.append(f"requests: {totals.get('requests', 0)}" + (f" ({by})" if by else ""))
    lines.append(f"distinct client addresses: {data.get('distinct_addresses', 0)}")
    if data.get("last_used_at"):
        route = f" on route {data['last_used_route']}" if data.get("last_used_route") else ""
        lines.append(f"last used: {data['last_used_at']} from {data.get('last_used_ip') or '-'}{route}")
    else:
        lines.append("last used: never (or not since usage counting began)")
    if data.get("flush_seconds") is not None:
        lines.append(f"(figures lag real use by up to {data['flush_seconds']:g} s)")
    return "\n".join(lines)
