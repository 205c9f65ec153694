"""Quality signals of a candidate arch: how the search estimates what an arch is worth.

Every signal is a validation flow-matching loss on the same fixed eval batch (`fixed_eval_batch`: the
same (x0, ε, t, y) for every arch), so lower is better and values are comparable across archs:

- **supernet**: the supernet's weight-sharing loss, `supernet.run(arch)` with its (EMA) shared weights.
  Free once the supernet is trained (one forward), but it measures how often an arch's weights were
  trained as much as how good the arch is (bench/fidelity.py: its rank agreement with standalone
  training is the figure to check before trusting it).
- **proxy**: the arch trained alone *from scratch* for `steps` steps with `StandaloneTrainer` — the same
  optimiser, lr schedule, data order, noise stream and init seed for every arch (the run config's
  `train` section, seed `train.seed` unless given) — then the loss of its EMA weights (or raw weights,
  `weights="raw"`). No supernet needed; costs `steps` plain training steps per arch.
- **finetune**: the arch extracted from the supernet (`supernet.extract(arch)`, numerically equal to
  `run(arch)`) and fine-tuned for `steps` steps with the same trainer recipe (`StandaloneTrainer(init=…)`).
  At 0 steps it equals the supernet signal.

Trained signals are cached on disk, one atomic JSON per (signal, arch key, steps, weights source, seed,
eval batch) under `<cache_dir>/signals/<signal>/`: the weights source is the checkpoint's sha256 for
`finetune` and a hash of the data + model/space/train config for `proxy`. A rerun or a resumed search
does not retrain. One training run can fill several step counts at once (`curve(arch, [200, 1000])`
evaluates on the way; the first 200 steps of a 1000-step run are exactly a 200-step run).

The supernet signal is not written to disk: it is one forward pass (~10 ms here), memoised in memory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ditnas.arch import Arch
from ditnas.config import QUALITY_SIGNALS as SIGNALS  # supernet | proxy | finetune
from ditnas.errors import DitnasError
from ditnas.io import write_json
from ditnas.search.threads import torch_threads
from ditnas.supernet.flow import EvalBatch, eval_flow_loss

WEIGHTS = ("ema", "raw")
CACHE_FORMAT = 1


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's weights live on (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def batch_on(batch: EvalBatch, device: torch.device) -> EvalBatch:
    if batch.x0.device == device:
        return batch
    return EvalBatch(batch.x0.to(device), batch.eps.to(device), batch.t.to(device), batch.y.to(device))


def recipe_hash(cfg: Any, split: Any) -> str:
    """sha256 of what a from-scratch run depends on: the data and the data/space/model/train config
    (train.seed excluded: the seed is its own part of a cache key; train.threads and train.device excluded:
    they do not change the numbers beyond float rounding)."""
    d = cfg.to_dict()
    train = {k: v for k, v in d["train"].items() if k not in ("seed", "threads", "device", "checkpoint_every", "sample_every", "steps")}
    payload = {"data": d["data"], "space": d["space"], "model": d["model"], "train": train,
               "sample_steps": d["sample"]["steps"], "data_fingerprint": split.fingerprint()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def flow_losses(model: torch.nn.Module, ema_state: dict | None, batch: EvalBatch) -> dict[str, float]:
    """{'raw': loss of `model`, 'ema': loss with `ema_state` loaded into a copy} on `batch`."""
    batch = batch_on(batch, model_device(model))
    was_training = model.training
    model.eval()
    out = {"raw": eval_flow_loss(lambda x, t, y: model(x, t, y), batch)}
    if ema_state is not None:
        shadow = copy.deepcopy(model)
        shadow.load_state_dict(ema_state)
        out["ema"] = eval_flow_loss(lambda x, t, y: shadow(x, t, y), batch)
    else:
        out["ema"] = out["raw"]
    model.train(was_training)
    return out


@dataclass
class SignalCache:
    """One atomic JSON file per entry; a damaged or mismatching file is ignored (recomputed)."""

    root: Path | None

    def path(self, key: dict[str, Any]) -> Path:
        assert self.root is not None
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.root / "signals" / str(key["signal"]) / f"{digest}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        if self.root is None:
            return None
        path = self.path(key)
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if entry.get("format") != CACHE_FORMAT or entry.get("key") != key:
            return None
        return entry

    def put(self, key: dict[str, Any], value: dict[str, Any]) -> None:
        if self.root is not None:
            write_json(self.path(key), {"format": CACHE_FORMAT, "key": key, **value})


@dataclass
class QualitySignal:
    """One quality signal (`kind` in SIGNALS) of archs under one supernet / run config / eval batch.

    `__call__(arch)` is the search's quality (lower is better). `cfg` and `split` (the checkpoint's run
    config and data) are needed by `proxy` and `finetune`; `checkpoint_sha256` by `finetune`'s cache
    key. `seed`: the training seed (data order, noise, init); None = `cfg.train.seed`.
    `trained_steps` counts the optimiser steps this object ran (cache hits add none)."""

    kind: str
    supernet: Any | None  # ElasticDiT (EMA weights): supernet runs it, finetune extracts from it; proxy may pass None
    batch: EvalBatch
    steps: int = 200
    cfg: Any | None = None  # RunConfig
    split: Any | None = None  # DatasetSplit
    cache_dir: Path | None = None
    checkpoint_sha256: str | None = None
    eval_n: int | None = None
    eval_seed: int | None = None
    seed: int | None = None
    weights: str = "ema"
    threads: int | None = 1
    on_train: Callable[[str, int, int], None] | None = None  # (arch layout, step, total) after each step
    trained_steps: int = 0
    _memo: dict[Arch, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in SIGNALS:
            raise DitnasError(f"quality signal {self.kind!r} unknown; choose one of {', '.join(SIGNALS)}")
        if self.weights not in WEIGHTS:
            raise DitnasError(f"weights={self.weights!r} unknown; use ema or raw")
        self.steps = int(self.steps)
        if self.steps < 0:
            raise DitnasError(f"quality steps={self.steps} must be >= 0")
        if self.kind != "supernet" and (self.cfg is None or self.split is None):
            raise DitnasError(f"the {self.kind} signal trains, so it needs the run config and data of the checkpoint")
        if self.supernet is None and self.kind != "proxy":
            raise DitnasError(f"the {self.kind} signal needs the supernet")
        if self.kind == "finetune" and self.cache_dir is not None and not self.checkpoint_sha256:
            raise DitnasError("the finetune signal's cache needs the checkpoint's sha256")
        if self.eval_n is None:
            self.eval_n = int(self.batch.x0.shape[0])
        self._cache = SignalCache(Path(self.cache_dir) if self.cache_dir is not None else None)

    @property
    def space(self):
        if self.supernet is not None:
            return self.supernet.space
        from ditnas.supernet.train import build_space

        return build_space(self.cfg, self.split)

    @cached_property
    def source(self) -> str | None:
        """What a trained result depends on besides the arch: the checkpoint (finetune) or the data and
        train recipe (proxy). Hashed once: the data fingerprint reads every array."""
        return self.checkpoint_sha256 if self.kind == "finetune" else recipe_hash(self.cfg, self.split)

    @property
    def train_seed(self) -> int:
        return int(self.cfg.train.seed if self.seed is None else self.seed) if self.cfg is not None else 0

    def describe(self) -> dict[str, Any]:
        """What a manifest records about this signal."""
        out: dict[str, Any] = {"signal": self.kind}
        if self.kind != "supernet":
            out.update({"steps": self.steps, "weights": self.weights, "seed": self.train_seed,
                        "cache": None if self.cache_dir is None else str(Path(self.cache_dir) / "signals" / self.kind)})
        return out

    # ----- the signal ---------------------------------------------------------------------------
    def __call__(self, arch: Arch) -> float:
        key = replace(arch, steps=1)  # denoising steps are a separate search dimension
        if key not in self._memo:
            if self.kind == "supernet":
                self._memo[key] = self.supernet_loss(arch)
            else:
                self._memo[key] = self.curve(arch, [self.steps])[self.steps][self.weights]
        return self._memo[key]

    def supernet_loss(self, arch: Arch) -> float:
        self.supernet.space.validate(arch)
        self.supernet.eval()
        with torch_threads(self.threads):
            batch = batch_on(self.batch, model_device(self.supernet))
            return eval_flow_loss(lambda x, t, y: self.supernet.run(arch, x, t, y), batch)

    def cache_key(self, arch: Arch, steps: int) -> dict[str, Any]:
        return {"signal": self.kind, "arch_key": replace(arch, steps=1).key(), "arch": replace(arch, steps=1).layout(),
                "steps": int(steps), "source": self.source, "seed": self.train_seed,
                "eval_n": int(self.eval_n), "eval_seed": self.eval_seed}

    def curve(self, arch: Arch, steps: Iterable[int]) -> dict[int, dict[str, float]]:
        """{steps: {'ema', 'raw', 'seconds'}} for each requested step count, from the cache or from ONE
        training run to the largest missing count (evaluated on the way; each result cached).
        `seconds` is the wall time of training to that step (0 for a cache hit's recorded value)."""
        if self.kind == "supernet":
            raise DitnasError("the supernet signal does not train; call it directly")
        arch = self.space.validate(arch)
        wanted = sorted({int(s) for s in steps})
        if any(s < 0 for s in wanted):
            raise DitnasError(f"steps {wanted} must be >= 0")
        out: dict[int, dict[str, float]] = {}
        for s in wanted:
            hit = self._cache.get(self.cache_key(arch, s))
            if hit is not None:
                out[s] = {"ema": float(hit["ema"]), "raw": float(hit["raw"]), "seconds": float(hit["seconds"]), "cached": True}
        missing = [s for s in wanted if s not in out]
        if missing:
            out.update(self._train(arch, missing))
        return out

    def _trainer(self, arch: Arch):
        from ditnas.supernet.train import StandaloneTrainer

        cfg = self.cfg if self.seed is None else replace(self.cfg, train=replace(self.cfg.train, seed=int(self.seed)))
        init = self.supernet.extract(arch) if self.kind == "finetune" else None
        return StandaloneTrainer(arch, cfg, self.split, init=init)

    def _train(self, arch: Arch, at: list[int]) -> dict[int, dict[str, float]]:
        results: dict[int, dict[str, float]] = {}
        with torch_threads(self.threads):
            trainer = self._trainer(arch)
            targets = set(at)
            seconds = 0.0
            for step in range(max(at) + 1):
                if step in targets:
                    losses = flow_losses(trainer.model, trainer.ema.state_dict(), self.batch)
                    value = {"ema": losses["ema"], "raw": losses["raw"], "seconds": seconds,
                             "train_seconds_per_step": seconds / step if step else None}
                    self._cache.put(self.cache_key(arch, step), value)
                    results[step] = {**value, "cached": False}
                if step == max(at):
                    break
                start = time.perf_counter()
                trainer.train_step()
                seconds += time.perf_counter() - start
                self.trained_steps += 1
                if self.on_train is not None:
                    self.on_train(arch.layout(), step + 1, max(at))
        return {s: {k: v for k, v in r.items() if k != "train_seconds_per_step"} for s, r in results.items()}


def make_signal(kind: str, steps: int, supernet: Any, batch: EvalBatch, *, cfg: Any | None = None, split: Any | None = None,
                cache_dir: Path | None = None, checkpoint_sha256: str | None = None, eval_seed: int | None = None,
                seed: int | None = None, weights: str = "ema", threads: int | None = 1) -> QualitySignal:
    """The signal `kind` (one of SIGNALS) with its training steps (ignored by `supernet`)."""
    return QualitySignal(kind, supernet, batch, steps, cfg, split, cache_dir, checkpoint_sha256, None, eval_seed, seed,
                         weights, threads)
