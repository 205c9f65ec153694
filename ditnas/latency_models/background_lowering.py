"""Lower a space's profiling programs in a background process while something else runs.

Latency depends on the space and the model's dimensions, not on trained weights, so `ditnas run`
builds every program of the profile stage from a freshly initialised supernet while the supernet
trains on the other core; the profile stage then finds them built (`backend.reuse`) and only times
them. Timing is never done here: it would share the machine with training.

The child writes its progress and everything the toolchain prints to `<session>/lowering.log`.
Stopping it (training finished first, an error, Ctrl-C) is safe: every file is written atomically
and a program's delegation report last, so a half-built program is built again, never reused.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import replace
from pathlib import Path

from ditnas.config import RunConfig

LOG = "lowering.log"


def _child(cfg: RunConfig, folder: Path) -> None:
    from ditnas.console import redirect_output

    redirect_output(Path(folder) / LOG)  # the toolchain's prints (C++ too) go to the log, not the terminal
    import torch

    torch.set_num_threads(1)  # one core lowers; the other trains
    from ditnas.console import quiet_third_party
    from ditnas.latency_models.profile import lower_space, supernet_for_profiling

    quiet_third_party()
    started = time.time()
    n = lower_space(supernet_for_profiling(cfg), replace(cfg.latency, workers=1), folder,
                    progress=lambda i, total, key: print(f"{time.time() - started:7.1f} s  {i}/{total}  {key}"))
    print(f"done: {n} programs built or reused in {time.time() - started:.1f} s")


class BackgroundLowering:
    """One child process lowering `cfg`'s profiling programs into the session folder `folder`."""

    def __init__(self, cfg: RunConfig, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.process = multiprocessing.get_context("spawn").Process(target=_child, args=(cfg, self.folder),
                                                                    name="ditnas-lowering", daemon=True)
        self.process.start()

    @property
    def log_path(self) -> Path:
        return self.folder / LOG

    def finish(self) -> str:
        """Stop the child if it is still lowering; one line saying how far it got."""
        running = self.process.is_alive()
        if running:
            self.process.terminate()
        self.process.join(timeout=30)
        wall = time.time() - self.started
        last = _last_line(self.log_path)
        if running:
            return f"background lowering stopped after {wall:.0f} s ({last}); the profile stage builds the rest"
        if self.process.exitcode == 0:
            return f"background lowering finished in {wall:.0f} s ({last})"
        return (f"background lowering failed (exit {self.process.exitcode}; see {self.log_path}); the profile "
                "stage builds what is missing")


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    progress = [ln for ln in lines if " s  " in ln or ln.startswith("done:")]
    return (progress or lines or ["no output"])[-1]
