"""Run a timing job in a fresh interpreter (`python -m <module> request.pt result.pt`).

Why fresh: a .pte timed in the process that lowered it ran ~8% slower (pte_timer.py). The parent
side (`run_fresh`) writes the request, runs the module, and turns a failure into one DitnasError:
the child's own `error: ...` line when it printed one, else the last lines of its stderr. The child
side (`serve`) loads the request, calls the job, and prints a DitnasError as that `error:` line.
Requests and results are plain tensors/lists/dicts, loaded with `weights_only=True`.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ditnas.errors import DitnasError


def run_fresh(module: str, request: Any, *, what: str, debug: str, timeout_s: float | None = None) -> Any:
    """The result of `module`'s `serve` job on `request`; `what` names the job in errors, `debug` says
    how to run it in-process instead."""
    with tempfile.TemporaryDirectory(prefix="ditnas-fresh-") as tmp:
        req, res = Path(tmp) / "request.pt", Path(tmp) / "result.pt"
        torch.save(request, req)
        try:
            proc = subprocess.run([sys.executable, "-m", module, str(req), str(res)], capture_output=True, text=True,
                                  check=False, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise DitnasError(f"{what} took longer than {timeout_s:g} s; pass fewer iters or a larger timeout_s") from None
        if proc.returncode != 0 or not res.is_file():
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            message = next((ln[len("error: "):] for ln in lines if ln.startswith("error: ")), None)
            if message:
                raise DitnasError(message)
            tail = " | ".join(lines[-3:]) or f"exit code {proc.returncode}"
            raise DitnasError(f"{what} failed ({tail}); {debug}")
        return torch.load(res, weights_only=True)


def serve(job: Callable[[Any], Any], argv: list[str]) -> int:
    """The child's main: `job(request) -> result`; a DitnasError becomes the `error:` line, exit 2."""
    request, result = argv[:2]
    spec = torch.load(request, weights_only=True)
    try:
        out = job(spec)
    except DitnasError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.save(out, result)
    return 0
