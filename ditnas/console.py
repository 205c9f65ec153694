"""What a user's terminal or log file shows while a long verb runs.

- `progress_bar(enabled)`: a rich bar on a terminal; on a pipe or a log file (CI, `nohup`, `> log`)
  rich would print nothing until the end, so the same calls write one line per ~5% of the work (or
  per minute, whichever comes first) with the elapsed time and an ETA (`LineProgress`).
- `quiet_third_party()`: torch/executorch/coremltools emit the same deprecation warnings hundreds of
  times during lowering (one per exported program, e.g. pytree's `LeafSpec` FutureWarning); those
  are dropped, and so are the UserWarnings ExecuTorch's devtools (ETDump inspector, debug-format
  schema) print for every timed program ("Unsupported kwarg encountered", "Output Buffer not found":
  debug data ditnas does not read); ditnas's own warnings and every other category are kept.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

import ditnas

NOISY = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
OWN = str(Path(ditnas.__file__).parent)
NOISY_USER_WARNING_SOURCES = (f"executorch{os.sep}devtools{os.sep}",)


def _fmt_s(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class LineProgress:
    """rich.Progress's add_task/update/advance as log lines, for output that is not a terminal."""

    def __init__(self, stream: TextIO | None = None, *, fraction: float = 0.05, interval_s: float = 60.0) -> None:
        self.stream = stream or sys.stderr
        self.fraction, self.interval_s = fraction, interval_s
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task in self.tasks.values():
            if task["completed"] != task["printed"]:
                self._line(task)

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        tid = len(self.tasks)
        now = time.monotonic()
        self.tasks[tid] = {"name": fields.get("phase") or description, "total": total, "completed": 0,
                           "info": fields.get("info", ""), "start": now, "printed": 0, "printed_at": now}
        return tid

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, completed: float | None = None, total: float | None = None,
               advance: float | None = None, **fields: Any) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task["total"] = total
        if completed is not None:
            task["completed"] = completed
        if advance is not None:
            task["completed"] += advance
        if fields.get("phase"):
            if fields["phase"] != task["name"]:
                task["start"], task["printed"] = time.monotonic(), 0  # a new phase: its own ETA
            task["name"] = fields["phase"]
        if "info" in fields:
            task["info"] = fields["info"]
        done, total_now = task["completed"], task["total"]
        step = max(1.0, (total_now or 0) * self.fraction)
        due = time.monotonic() - task["printed_at"] >= self.interval_s
        if done - task["printed"] >= step or (total_now and done >= total_now and done != task["printed"]) or (due and done != task["printed"]):
            self._line(task)

    def _line(self, task: dict[str, Any]) -> None:
        done, total = task["completed"], task["total"]
        elapsed = time.monotonic() - task["start"]
        if total:
            pct = f"{int(done)}/{int(total)} ({100 * done / total:.0f}%)"
            eta = f", ETA {_fmt_s(elapsed * (total - done) / done)}" if 0 < done < total else ""
        else:
            pct, eta = f"{int(done)}", ""
        info = f": {task['info']}" if task["info"] else ""
        print(f"[{task['name']}] {pct} elapsed {_fmt_s(elapsed)}{eta}{info}", file=self.stream, flush=True)
        task["printed"], task["printed_at"] = done, time.monotonic()


def progress_bar(enabled: bool, stream: TextIO | None = None):
    """The one progress display of every long verb: phase, bar, done/total, what runs now, time left."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = Console(file=stream) if stream is not None else Console()
    if enabled and not console.is_terminal:
        return LineProgress(sys.stderr if stream is None else stream)
    return Progress(TextColumn("[bold]{task.fields[phase]}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console, disable=not enabled)


# `scheme://user:secret@` (also `scheme:/user:secret@`, as a URL passed where a path was expected prints)
_CREDENTIALS = re.compile(r"([A-Za-z][\w+.-]*:/{1,2}[^\s:/@]+):[^\s@/]+@")


def redact_secrets(text: str) -> str:
    """`text` with every URL password replaced by *** (user:secret@host -> user:***@host): the last guard
    before a message reaches the terminal, whatever path or field the user put a storage URL in."""
    return _CREDENTIALS.sub(r"\1:***@", text)


def redirect_output(log_path: str | Path) -> None:
    """Send this process's stdout and stderr, C++ prints included, to `log_path` (appending): for the
    background processes of a run, whose output belongs in a log beside their artifacts."""
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 -- lives as long as the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log


def _is_own(filename: str) -> bool:
    return str(filename).startswith(OWN)


def quiet_third_party() -> None:
    """Drop third-party deprecation noise (see module doc); idempotent."""
    if getattr(warnings.showwarning, "_ditnas_quiet", False):
        return
    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 -- warnings' signature
        if issubclass(category, NOISY) and not _is_own(filename):
            return
        if issubclass(category, UserWarning) and any(src in str(filename) for src in NOISY_USER_WARNING_SOURCES):
            return
        shown(message, category, filename, lineno, file, line)

    showwarning._ditnas_quiet = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning
    # torch logs "<enum ...> is an Enum subclass ..." through logging, once per import of torchao
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
