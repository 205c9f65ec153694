"""The search objectives of one candidate (arch, denoising steps).

- **quality**: a validation flow-matching loss of the arch on one fixed eval batch (`fixed_eval_batch`:
  the same (x0, ε, t, y) for every arch, so it is deterministic and comparable across candidates; lower
  is better), from the chosen quality signal (`ditnas/search/signals.py`): `supernet` (default: the
  weight-sharing loss), `proxy` (trained from scratch N steps) or `finetune` (extracted, fine-tuned N
  steps). It does not depend on the number of denoising steps.
- **latency**: one whole generation (`LatencyPredictor.predict_generation(arch, steps, guidance)`:
  steps back to back with the sampler's guidance, fitted on measured generations; generation_latency.py
  defines it). Denoising steps are a joint dimension of the search.
- **memory**: `flops.peak_memory_bytes` (an estimate: weights + the largest live activations).
- **params**: the extracted sub-DiT's parameter count.

`EvalContext.from_paths(checkpoint, table, n, seed)` loads everything a worker needs (supernet,
validation split, fixed batch, table, predictor) and `EvalContext.evaluate(arch_text, steps)` is a pure
function of its arguments given that context, so a Ray task can call it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ditnas.arch import Arch
from ditnas.errors import DitnasError
from ditnas.search.threads import torch_threads  # noqa: F401  (re-exported: tests and benches use it from here)
from ditnas.io import file_sha256
from ditnas.search.signals import QualitySignal
from ditnas.supernet.flow import EVAL_SEED, VAL_BATCH, EvalBatch, fixed_eval_batch
from ditnas.supernet.model import ElasticDiT


@dataclass
class Objectives:
    """Objectives of archs under one supernet, eval batch and (optional) latency predictor.

    Results are memoised per arch (the supernet is frozen during a search)."""

    supernet: ElasticDiT
    batch: EvalBatch
    predictor: Any | None = None  # LatencyPredictor
    steps: tuple[int, ...] = (28,)
    threads: int | None = 1  # intra-op threads while evaluating (None/0: torch's setting)
    signal: QualitySignal | None = None  # the quality signal; None = the supernet's weight-sharing loss
    guidance: str = "none"  # the sampler priced: none | cfg (generation_latency.py)
    _step_ms: dict[Arch, float] = field(default_factory=dict, repr=False)
    _memory: dict[Arch, int] = field(default_factory=dict, repr=False)
    _params: dict[Arch, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.steps = tuple(int(s) for s in self.steps)
        if not self.steps or any(s < 1 for s in self.steps):
            raise DitnasError(f"steps {list(self.steps)}: give one or more denoising step counts >= 1")
        self.supernet.eval()
        if self.signal is None:
            self.signal = QualitySignal("supernet", self.supernet, self.batch, threads=self.threads)

    @staticmethod
    def _plain(arch: Arch) -> Arch:
        # steps is a separate search dimension: the arch's own header value must not split the caches
        return replace(arch, steps=1)

    def quality(self, arch: Arch) -> float:
        """Validation flow-matching loss (lower is better) from `self.signal` (supernet, proxy, finetune),
        which validates the arch and memoises its result per arch."""
        return float(self.signal(arch))

    def use_signal(self, signal: QualitySignal) -> None:
        """Score quality with `signal` from now on."""
        self.signal = signal

    def use_predictor(self, predictor: Any) -> None:
        """Price latency with `predictor` from now on (e.g. a StreamingPredictor); forgets earlier prices."""
        self.predictor = predictor
        self._step_ms.clear()

    def step_ms(self, arch: Arch) -> float:
        """Predicted latency of one denoising step (ms, calibrated p50)."""
        if self.predictor is None:
            raise DitnasError("latency: no latency table given; pass --table")
        key = self._plain(arch)
        if key not in self._step_ms:
            self._step_ms[key] = float(self.predictor.predict(arch))
        return self._step_ms[key]

    def latency_ms(self, arch: Arch, steps: int | None = None) -> float:
        """One whole generation of `steps` (default the arch's own) with `self.guidance`, ms."""
        steps = int(arch.steps if steps is None else steps)
        if steps < 1:
            raise DitnasError(f"steps={steps} must be >= 1")
        return float(self.predictor.generation.generation_ms(self.step_ms(arch), steps, self.guidance))

    def memory_bytes(self, arch: Arch) -> int:
        from ditnas.latency_models.flops import peak_memory_bytes

        key = self._plain(arch)
        if key not in self._memory:
            with torch_threads(self.threads):
                self._memory[key] = int(peak_memory_bytes(self.supernet, arch))
        return self._memory[key]

    def params(self, arch: Arch) -> int:
        key = self._plain(arch)
        if key not in self._params:
            with torch_threads(self.threads):
                self._params[key] = int(self.supernet.extract(arch).num_params())
        return self._params[key]

    def evaluate(self, arch: Arch, steps: int) -> dict[str, Any]:
        """Every objective of (arch, steps) as a flat dict (the arch's header steps set to `steps`)."""
        arch = replace(self.supernet.space.validate(arch), steps=int(steps))
        out: dict[str, Any] = {"arch": str(arch), "arch_key": arch.key(), "steps": int(steps),
                               "quality": self.quality(arch)}
        if self.predictor is not None:
            per_step = self.step_ms(arch)
            out["latency_ms_step"] = per_step
            out["latency_ms"] = self.latency_ms(arch, int(steps))
        out["memory_bytes"] = self.memory_bytes(arch)
        out["params"] = self.params(arch)
        return out


Evaluator = Objectives  # the name issue 5 uses


@dataclass
class EvalContext:
    """Everything an evaluation needs, loaded once per process (a Ray worker calls `from_paths`)."""

    objectives: Objectives
    checkpoint: Path
    checkpoint_sha256: str
    table_id: str | None
    n: int
    seed: int
    table: Any | None = None  # LatencyTable
    config: Any | None = None  # RunConfig of the checkpoint
    split: Any | None = None  # DatasetSplit of the checkpoint's data (the proxy / finetune signals train on it)

    @classmethod
    def from_paths(cls, checkpoint: Path | str, table: Path | str | None, n: int = VAL_BATCH, seed: int = EVAL_SEED,
                   steps: Iterable[int] = (28,), threads: int | None = 1, quality: str = "supernet",
                   quality_steps: int = 200, cache_dir: Path | str | None = None, guidance: str = "none") -> EvalContext:
        """Load the supernet (EMA weights), its validation split, the fixed eval batch of `n` items
        drawn with `seed`, and the latency table + predictor at `table` (None: no latency).
        `quality`/`quality_steps`: the quality signal (see `use_quality`)."""
        from ditnas.data import load_split
        from ditnas.supernet.train import load_supernet

        checkpoint = Path(checkpoint)
        supernet, cfg, _ = load_supernet(checkpoint)
        split = load_split(cfg.data)
        batch = fixed_eval_batch(split.val_x, split.val_y, int(n), int(seed), null_label=supernet.space.num_classes)
        lat_table = predictor = None
        if table is not None:
            from ditnas.latency_models.stage import load_predictor

            lat_table, predictor = load_predictor(Path(table))
        ctx = cls(Objectives(supernet, batch, predictor, tuple(steps), threads, guidance=guidance), checkpoint, file_sha256(checkpoint),
                  lat_table.table_id if lat_table is not None else None, int(n), int(seed), lat_table, cfg, split)
        if quality != "supernet":
            ctx.use_quality(quality, quality_steps, cache_dir)
        return ctx

    def use_quality(self, kind: str, steps: int = 200, cache_dir: Path | str | None = None,
                    seed: int | None = None) -> QualitySignal:
        """Score quality with signal `kind` (supernet | proxy | finetune) trained `steps` steps per arch
        with the checkpoint's train recipe; trained results cached in `cache_dir` (default
        `<checkpoint folder>/search_cache`, where the sensitivity cache lives)."""
        current = self.objectives.signal
        if current is not None and current.kind == kind and (kind == "supernet" or current.steps == int(steps)):
            return current
        signal = self.new_signal(kind, steps, cache_dir, seed)
        self.objectives.use_signal(signal)
        return signal

    def new_signal(self, kind: str, steps: int, cache_dir: Path | str | None = None, seed: int | None = None) -> QualitySignal:
        """A quality signal of this context (its supernet, eval batch, run config and data) that the search
        does not score with: the fidelity check's ground truth, the rerank's rungs."""
        if kind != "supernet" and self.split is None:
            from ditnas.data import load_split

            self.split = load_split(self.config.data)
        cache = Path(cache_dir) if cache_dir is not None else Path(self.checkpoint).parent / "search_cache"
        return QualitySignal(kind, self.supernet, self.objectives.batch, int(steps), self.config, self.split, cache,
                             self.checkpoint_sha256, self.n, self.seed, seed, threads=self.objectives.threads)

    @property
    def supernet(self) -> ElasticDiT:
        return self.objectives.supernet

    @property
    def space(self):
        return self.objectives.supernet.space

    def evaluate(self, arch_text: str, steps: int) -> dict[str, Any]:
        """Objectives of one candidate; `arch_text` is `str(Arch)` (header optional: the space's
        globals fill it in). Raises DitnasError when the space cannot run the arch."""
        arch = self.space.parse(arch_text, source="candidate")
        return self.objectives.evaluate(arch, int(steps))
