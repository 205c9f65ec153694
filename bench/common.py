"""What every benchmark script shares: the machine record in its JSON and the printed table."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ditnas.io import write_json


def machine(*packages: str, **extra: Any) -> dict[str, Any]:
    """Host, CPU count, load average at start, Python, platform, the given packages' versions, extra."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    versions = {}
    for name in packages:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_at_start": None if load is None else [round(x, 2) for x in load],
            **versions, **extra}


def report(rows: list[tuple[str, Any]], result: dict[str, Any], out: Path) -> None:
    """Print `rows` as an aligned two-column table, then write `result` to `out`."""
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    write_json(out, result)
    print(f"wrote {out}")
