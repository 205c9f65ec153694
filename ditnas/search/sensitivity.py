"""Per-slot replacement sensitivity: the additive score the DP maximises (method.md §1.4, option 2).

For every slot ℓ, every choice o of `SearchChoices.all_choices` the slot may take and every stage r the
slot may sit at, the supernet scores the max arch with slot ℓ alone replaced by (o, r):

    Δ(ℓ, o, r) = L(max arch with slot ℓ := o at stage r) − L(max arch),   score = −Δ

where L is the weight-sharing validation flow-matching loss on one fixed eval batch
(`fixed_eval_batch`, same (x0, ε, t, y) for every arch). Cells the space does not allow (a stage a
fixed layout does not give the slot, an op outside the stage's subset, `skip` on an unskippable slot)
are not evaluated; the DP prices them at inf. A replacement the space rejects as a whole arch is left
out the same way.

Summed Δ is not end-to-end loss (EvoPress): the score only ranks DP layouts; Optuna re-scores every
candidate with the real weight-sharing loss (`objectives.py`).

Results are cached on disk as parquet, keyed by the checkpoint file's sha256, the batch size, the
batch seed and the space key, so a rerun (another budget, another device table) reads the cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from ditnas.arch import Arch
from ditnas.errors import DitnasError
from ditnas.io import atomic_write_bytes
from ditnas.search.threads import torch_threads
from ditnas.search.space import SearchChoices
from ditnas.supernet.flow import EvalBatch, eval_flow_loss
from ditnas.supernet.model import ElasticDiT

Progress = Callable[[int, int, str], None]  # (done, total, what)
COLUMNS = ["slot", "choice", "choice_index", "stage", "loss", "delta", "score", "arch"]


def cache_key(checkpoint_sha256: str, n: int, seed: int, space_hash: str) -> str:
    text = f"sensitivity:v1:{checkpoint_sha256}:n{int(n)}:seed{int(seed)}:{space_hash}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(cache_dir: Path, checkpoint_sha256: str, n: int, seed: int, space_hash: str) -> Path:
    return Path(cache_dir) / f"sensitivity-{cache_key(checkpoint_sha256, n, seed, space_hash)}.parquet"


def replacement_archs(choices: SearchChoices, base: Arch | None = None) -> list[tuple[int, int, int, Arch]]:
    """(slot, choice index, stage, arch) for every allowed single-slot replacement of the max arch."""
    space = choices.space
    base = base or space.max_arch()
    out = []
    for i in range(choices.depth):
        for o, choice in enumerate(choices.all_choices):
            for r in choices.stages[i]:
                if not choices.allowed(i, choice, r):
                    continue
                slots = list(base.slots)
                slots[i] = choice.slot(r)
                arch = base.with_slots(slots)
                try:
                    space.validate(arch)
                except DitnasError:
                    continue  # e.g. the only block skipped; the DP prices the cell at inf
                out.append((i, o, r, arch))
    return out


def compute_sensitivity(
    supernet: ElasticDiT,
    batch: EvalBatch,
    choices: SearchChoices | None = None,
    *,
    progress: Progress | None = None,
    threads: int | None = 1,
) -> pd.DataFrame:
    """The tidy table (one row per evaluated cell): slot, choice (token), choice_index (on
    `all_choices`), stage, loss, delta, score, arch. No caching here (see `slot_sensitivity`)."""
    choices = choices or SearchChoices.from_space(supernet.space)
    base = supernet.space.max_arch()
    cells = replacement_archs(choices, base)
    losses: dict[Arch, float] = {}

    def loss(arch: Arch) -> float:
        if arch not in losses:
            losses[arch] = eval_flow_loss(lambda x, t, y: supernet.run(arch, x, t, y), batch)
        return losses[arch]

    was_training = supernet.training
    supernet.eval()
    try:
        with torch_threads(threads):
            base_loss = loss(base)
            rows = []
            for k, (i, o, r, arch) in enumerate(cells):
                if progress:
                    progress(k, len(cells), f"slot {i} {choices.all_choices[o].token()}@{r}")
                value = loss(arch)
                rows.append({"slot": i, "choice": choices.all_choices[o].token(), "choice_index": o, "stage": r,
                             "loss": value, "delta": value - base_loss, "score": -(value - base_loss), "arch": str(arch)})
            if progress:
                progress(len(cells), len(cells), "")
    finally:
        supernet.train(was_training)
    df = pd.DataFrame(rows, columns=COLUMNS)
    df.attrs["base_loss"] = base_loss
    return df


def slot_sensitivity(
    supernet: ElasticDiT,
    batch: EvalBatch,
    *,
    checkpoint_sha256: str,
    n: int,
    seed: int,
    cache_dir: Path | None,
    choices: SearchChoices | None = None,
    progress: Progress | None = None,
    threads: int | None = 1,
) -> pd.DataFrame:
    """`compute_sensitivity` behind an on-disk parquet cache keyed by (checkpoint sha256, n, seed,
    space key). `n`/`seed` must be the ones `batch` was drawn with. A damaged cache file is recomputed."""
    choices = choices or SearchChoices.from_space(supernet.space)
    path = None
    if cache_dir is not None:
        path = cache_path(cache_dir, checkpoint_sha256, n, seed, supernet.space.key())
        if path.exists():
            try:
                df = pd.read_parquet(path)
                if list(df.columns) == COLUMNS:
                    if progress:
                        progress(len(df), len(df), "cached")
                    return df
            except Exception:  # noqa: BLE001, S110 - a truncated cache is recomputed, never trusted
                pass
    df = compute_sensitivity(supernet, batch, choices, progress=progress, threads=threads)
    if path is not None:
        atomic_write_bytes(path, df.to_parquet(index=False))
    return df


def score_array(df: pd.DataFrame, choices: SearchChoices) -> np.ndarray:
    """(slots, len(all_choices), 2) scores; NaN where the cell was not evaluated (the DP forbids it)."""
    out = np.full((choices.depth, len(choices.all_choices), 2), np.nan)
    tokens = [c.token() for c in choices.all_choices]
    for row in df.itertuples(index=False):
        if row.choice not in tokens:
            raise DitnasError(f"sensitivity table: choice {row.choice!r} is not in the search space; delete the cache")
        out[int(row.slot), tokens.index(row.choice), int(row.stage)] = float(row.score)
    return out
