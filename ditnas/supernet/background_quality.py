"""The supernet's reference quality (digits judge + FD / label accuracy of the max net's samples, and its
sample grid), computed in a background process while later stages run.

`ditnas run` needs it only for the report and to read the 4-step student's FD against the teacher's, and
the judge it trains is reused by the distillation stage's check. The search, KD and distillation run at
1 thread, so the other core is idle meanwhile: the ~55 s this takes after training (judge ~20-35 s, 256
samples x 28 CFG steps ~20 s on this 2-core VM) leave the critical path. It starts after the profile
stage, never beside a timing pass.

The child writes `quality.json` atomically (and the judge, atomically, into `judge/`); its prints go to
`quality.log`. Stopped early (Ctrl-C, an error), nothing half-written is left and the stage runs again.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from ditnas.config import RunConfig
from ditnas.errors import DitnasError
from ditnas.io import read_json, write_json

RESULT = "quality.json"
LOG = "quality.log"


def compute(cfg: RunConfig, checkpoint: Path, folder: Path, *, progress: bool = False) -> dict:
    """Load the checkpoint's EMA supernet and measure its reference quality into `folder`."""
    from ditnas.data import load_split
    from ditnas.supernet.run import SAMPLES, max_net_grid, reference_quality
    from ditnas.supernet.train import load_supernet

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    split = load_split(cfg.data)
    ema, _, _ = load_supernet(checkpoint)
    max_net_grid(ema, cfg, split, folder / SAMPLES)
    if not split.num_classes:  # the judge is a classifier: unlabelled data has no judge and no FD here
        result = {"judge_val_accuracy": None, "quality": {}, "skipped": "the data has no labels to train the judge on"}
    else:
        result = reference_quality(ema, cfg, split, folder / "judge", progress=progress)
    result["samples"] = SAMPLES  # clips: a frame strip per sample (every frame), and its animated GIF beside it
    gif = (folder / SAMPLES).with_suffix(".gif")
    if gif.is_file():
        result["samples_gif"] = gif.name
    result["seconds"] = round(time.time() - started, 1)
    write_json(folder / RESULT, result)
    return result


def _child(cfg: RunConfig, checkpoint: Path, folder: Path) -> None:
    from ditnas.console import quiet_third_party, redirect_output

    Path(folder).mkdir(parents=True, exist_ok=True)
    redirect_output(Path(folder) / LOG)
    import torch

    torch.set_num_threads(1)  # the other core runs the stages meanwhile
    quiet_third_party()
    compute(cfg, checkpoint, folder)
    print(f"done: {RESULT} written")


class BackgroundQuality:
    """One spawned child computing the reference quality of `checkpoint` into `folder`."""

    def __init__(self, cfg: RunConfig, checkpoint: Path, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / RESULT).unlink(missing_ok=True)  # a result of another checkpoint must not be read
        self.started = time.time()
        self.process = multiprocessing.get_context("spawn").Process(target=_child, args=(cfg, Path(checkpoint), self.folder),
                                                                    name="ditnas-quality", daemon=True)
        self.process.start()

    def result(self) -> dict:
        """Wait for the child; its result, or one error pointing at its log."""
        self.process.join()
        if self.process.exitcode != 0 or not (self.folder / RESULT).is_file():
            raise DitnasError(f"the reference quality check failed (exit {self.process.exitcode}); see "
                              f"{self.folder / LOG}, then rerun the same command")
        return read_json(self.folder / RESULT, missing="", damaged="rerun the same command")

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(timeout=30)
