"""Typed configs, loaded from YAML with `section.field=value` overrides and dumped next to outputs."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ditnas.arch import SearchSpace
from ditnas.errors import ConfigFieldError, DitnasError


@dataclass(frozen=True)
class DataConfig:
    source: str = "digits"  # "digits" (embedded), "moving_digits" (clips made from them), an image folder, or a .npy
    image_size: int = 16  # moving_digits: the canvas edge (8x8 glyphs on 16, 12x12 on 32)
    channels: int = 1
    val_fraction: float = 0.15
    seed: int = 0
    # moving_digits only (ditnas/video_data.py): clip length T, digits bouncing per clip, clips made
    frames: int = 8
    digits_per_clip: int = 1
    clips: int = 2000

    def check(self) -> DataConfig:
        if self.frames < 1:
            raise ConfigFieldError("data.frames", f"{self.frames} must be >= 1 frame per clip")
        if self.digits_per_clip not in (1, 2):
            raise ConfigFieldError("data.digits_per_clip", f"{self.digits_per_clip}: choose 1 or 2 digits per clip")
        if self.clips < 2:
            raise ConfigFieldError("data.clips", f"{self.clips} must be >= 2 (one train and one validation clip)")
        return self


@dataclass(frozen=True)
class ModelConfig:
    max_heads: int = 4  # 64-wide at full width: trains to >= 90% label accuracy in minutes on 2 cores
    head_dim: int = 16
    cond_dim: int = 128  # width of the (unsliced) timestep/class conditioning
    cond_tokens: int = 4  # class -> this many cross-attention tokens
    assa_blocks: int = 4  # assumption: SnapGen++ uses b=16 at 4096 tokens; 4 blocks at 64 tokens keeps ~the same share
    assa_radius: int = 1  # SnapGen++ supp.: r = 1
    ssa_stride: int = 2  # assumption: S2DiT's stride is not public; 2 gives 4x fewer tokens
    lcha_kernel: tuple[int, int, int] = (3, 3, 3)  # assumption: S2DiT's kernel is not public
    gqa_group: int = 2  # query heads per KV head for the `gqa` op
    # frame-causal token mixers (video streaming, supernet/streaming.py): frames never attend to later frames;
    # a no-op on still images (T = 1). Train, extract and sample a model in the mode it will stream in
    causal: bool = False
    # per-op private adaLN modulation: every (op, width) of a slot gets its own shift/scale/gate Linear instead
    # of one per width shared by the ops (the norms themselves carry no weights); a fidelity lever (issue:
    # ops of a slot fight over one modulation under weight sharing). An extracted model is the same either way
    private_mod: bool = False


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # ~4 min on 2 cores for the default space; max net reaches >= 99% label accuracy
    batch_size: int = 64
    lr: float = 1e-3  # assumption: tiny DiT on digits; SnapGen++ uses 1e-4 at scale
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0  # AttentiveNAS clips at 1.0
    ema_decay: float = 0.999
    # uniform | sandwich | attentive. Default max + 2 random (no min every step): at the same 3 subnets
    # per step it ranked 12 archs against standalone training with Kendall tau 0.55 where the sandwich
    # rule gave 0.18 -- training min every step makes its weight-sharing loss look far better than its
    # worth (bench/results/fidelity_levers.json, docs/benchmarks.md "Fidelity levers")
    sampler: str = "uniform"
    num_random: int = 2  # random subnets per step besides max (and min for sandwich / attentive)
    fair_sampling: bool = False  # random subnets' per-slot ops, widths, MLP ratios drawn from shuffled decks (FairNAS)
    # progressive shrinking (OFA): for this share of the steps the random subnets use only each slot's reference
    # op (elastic width, MLP ratio and depth first); every op of the space after it. 0 = off
    progressive_ops: float = 0.0
    attentive_trials: int = 3  # AttentiveNAS num_trials
    attentive_mode: str = "worstup"  # bestup | worstup
    distill_weight: float = 1.0  # lambda_d on ||v_s - sg(v_max)||^2 (SnapGen++ Eq. 5; weight [NF], 1 assumed)
    class_dropout: float = 0.1  # CFG training: share of labels replaced by the null class (assumption)
    time_shift: float = 1.0  # SD3-style shift of t for training; 1 = uniform logit-free sampling
    checkpoint_every: int = 250
    sample_every: int = 0  # 0 = only at the end
    seed: int = 0
    threads: int = 0  # 0 = leave torch's default
    # samples per reference arch of the quality check after training (FD; label accuracy on half):
    # judged at the sampler's 28 steps, so this is most of the stage's time after the steps themselves
    eval_samples: int = 1000
    # which reference subnets (supernet/run.py reference_archs) that check samples: each costs
    # eval_samples x 28 steps with CFG; `ditnas run` needs only max (the student's FD is read against it)
    quality_archs: tuple[str, ...] = ("max", "narrowest", "min")
    # where the supernet trains (ditnas/device.py): auto takes a CUDA GPU, then Apple MPS, then the CPU;
    # under torchrun each rank takes its LOCAL_RANK's GPU and batch_size is the global batch
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 (autocast of the forward passes; weights, optimiser and EMA stay fp32)
    # start weights: '' = fresh init; a path = a grafted supernet (`ditnas graft`'s grafted.pt, supernet/graft.py)
    init: str = ""
    # token dropping (SPRINT, supernet/token_drop.py): the middle slots see one token of every 2x2 group (0.75 is
    # the only drop ratio; 0 = off); `token_drop_dense` slots at EACH end of the arch always see every token; the
    # last `token_drop_finetune` share of the steps runs every token (SPRINT's short full-token fine-tune)
    token_drop: float = 0.0
    token_drop_dense: int = 1  # assumption: SPRINT keeps 2 of 28 blocks per end; 1 of 6 at our depth
    token_drop_finetune: float = 0.1  # assumption: "short" fine-tune = the last 10% of the steps
    # probability per step that every middle slot is skipped (the dense-only net Path-Drop Guidance's unconditional
    # branch runs, `ditnas sample --guidance pdg`); SPRINT: 0.1 with its token drop
    path_drop: float = 0.0


@dataclass(frozen=True)
class GraftConfig:
    """`ditnas graft`: every op but the teacher's starts from a trained teacher by per-slot activation
    distillation (Grafting, Chandrasegaran et al. 2025; shared/reference/grafting-sprint.md)."""

    # max: train the supernet's max arch alone first (a plain DiT) for teacher_steps; or the path of a ditnas
    # supernet checkpoint whose (EMA) max net is the teacher (same model dims and space depth)
    teacher: str = "max"
    teacher_steps: int = 300  # assumption: 10% of a default supernet's 3000 subnet-steps
    steps: int = 150  # distillation steps per grafted op (one slot, one op, every width at once)
    batches: int = 8  # teacher activation batches cached per slot (train.batch_size each; the last is held out)
    lr: float = 5e-4  # Grafting's attention recipe (AdamW, lr 5e-4)
    ops: tuple[str, ...] = ()  # ops grafted; () = every op of the space but each slot's teacher op
    ffn: bool = True  # also distil the narrower MLP ratios to the teacher's full FFN (L2)
    # `ditnas run`: graft first (into <run>/train/graft) and train the supernet from the grafted start. Off by
    # default: on the 12-arch fidelity set a grafted supernet ranked archs worse (Kendall tau 0.42 vs 0.55)
    in_run: bool = False

    def check(self) -> GraftConfig:
        for name, least in (("teacher_steps", 0), ("steps", 1), ("batches", 2)):
            if getattr(self, name) < least:
                raise ConfigFieldError(f"graft.{name}", f"{getattr(self, name)} must be >= {least}")
        if self.teacher == "max" and self.teacher_steps < 1:
            raise ConfigFieldError("graft.teacher_steps", "teacher=max trains the teacher for this many steps; set it >= 1 "
                                   "or give graft.teacher a supernet checkpoint")
        if not self.lr > 0:
            raise ConfigFieldError("graft.lr", f"{self.lr} must be > 0")
        return self


@dataclass(frozen=True)
class SampleConfig:
    steps: int = 28
    cfg_scale: float = 2.0  # assumption: moderate guidance for 10-class digits
    time_shift: float = 1.0


@dataclass(frozen=True)
class SpaceConfig:
    depth: int = 6
    ops: tuple[str, ...] = ("sa", "gqa", "assa", "lcha", "ssa")
    widths: tuple[float, ...] = (0.5, 0.75, 1.0)
    mlp_ratios: tuple[float, ...] = (2.0, 3.0, 4.0)
    skippable: tuple[int, ...] = (1, 4)
    stage_pattern: tuple[int, ...] = (0, 1, 1, 1, 1, 0)  # SnapGen++-style: half the blocks in the half-resolution middle
    free_stages: bool = False
    stage_ops: dict[int, tuple[str, ...]] = field(default_factory=dict)

    def to_space(self, data: DataConfig, num_classes: int, latent: tuple[int, int, int, int], steps: int) -> SearchSpace:
        return SearchSpace(
            depth=self.depth,
            ops=self.ops,
            widths=self.widths,
            mlp_ratios=self.mlp_ratios,
            skippable=self.skippable,
            stage_pattern=self.stage_pattern,
            free_stages=self.free_stages,
            patch_size=2,
            latent=latent,
            num_classes=num_classes,
            steps=steps,
            stage_ops=self.stage_ops,
        )


GUIDANCE = ("none", "cfg", "pdg")  # = ditnas.latency_models.generation_latency.GUIDANCE


@dataclass(frozen=True)
class LatencyConfig:
    """`ditnas profile`: how a session measures (what it measures comes from the space section)."""

    backend: str = "executorch-xnnpack"
    models: int = 12  # whole-model programs (the predictor's calibration rows)
    warmup: int = 10
    iters: int = 200  # timed runs per program, interleaved across programs
    threads: int = 1  # a table is valid for the thread count it was measured at
    seed: int = 0  # which random archs become whole-model programs
    guidance: tuple[str, ...] = ("none", "cfg")  # sampler modes whose whole generations are timed (calibration)
    pdg_dense: int = 1  # pdg generations: dense slots at each end of the dense-only net (train.token_drop_dense's)
    generation_steps: tuple[int, ...] = (4, 28)  # step counts of the timed generations (every guidance mode at each)
    generation_iters: int = 5  # timed generations / streams per (arch, steps[, guidance]); xnnpack: rounds of fresh processes
    # xnnpack: generations / streams of each key timed back to back in every round (after one warm-up); the round's
    # figure is their median. One timed generation per round varied 42% p10-p90 between rounds on a 2-core VM
    generation_repeats: int = 1
    workers: int = 0  # processes lowering programs in parallel (0 = one per core, at most 4); timing stays serial
    lowering_cache: bool = True  # reuse programs lowered by earlier sessions on this machine (lowered_cache.py)
    # executorch-xnnpack: per program an ETRecord (op names) + an ETDump of a few runs (per-op events), for
    # `ditnas profile ingest`-style op breakdowns. The ETRecord is ~30% of each lowering (measured: a block
    # 8.3 s with it, 5.7 s without); the table and the predictor never read either
    op_events: bool = True
    # clips: also price streaming (latency_models/stream_latency.py): every block at every chunk position of a
    # clip streamed `stream_chunk` latent frames at a time (stream_block cells), and whole streams of the
    # calibration models timed at each of `stream_steps` denoising steps per chunk; 0 = off
    stream_chunk: int = 0
    stream_steps: tuple[int, ...] = (1, 4)  # two step counts: the calibration separates per-call from per-clip costs
    # chunk positions whose stream_block cells are timed: all, or ends (first and last; the predictor interpolates
    # the others linearly in the cached frames, which is how attention over a cache grows)
    stream_positions: str = "all"
    # calibration archs whose chunk programs are exported and streamed: the first of the same seeded sequence as
    # latency.models' (max, mid, min, then random), any number (8+ rows, i.e. 4 archs at 2 stream_steps, fit the
    # per-program term, stream_latency.py)
    stream_models: int = 3

    def check(self) -> LatencyConfig:
        if self.models < 0:
            raise ConfigFieldError("latency.models", f"{self.models} must be >= 0")
        if self.warmup < 0:
            raise ConfigFieldError("latency.warmup", f"{self.warmup} must be >= 0")
        if self.iters < 1:
            raise ConfigFieldError("latency.iters", f"{self.iters} must be >= 1")
        if self.threads < 1:
            raise ConfigFieldError("latency.threads", f"{self.threads} must be >= 1")
        if self.pdg_dense < 1:
            raise ConfigFieldError("latency.pdg_dense", f"{self.pdg_dense} must be >= 1 dense slot at each end")
        bad = [g for g in self.guidance if g not in GUIDANCE]
        if bad:
            raise ConfigFieldError("latency.guidance", f"{list(self.guidance)}: choose from {', '.join(GUIDANCE)}")
        if not self.generation_steps or min(self.generation_steps) < 1:
            raise ConfigFieldError("latency.generation_steps", f"{list(self.generation_steps)}: give step counts >= 1")
        if self.generation_iters < 1:
            raise ConfigFieldError("latency.generation_iters", f"{self.generation_iters} must be >= 1")
        if self.generation_repeats < 1:
            raise ConfigFieldError("latency.generation_repeats", f"{self.generation_repeats} must be >= 1")
        if self.workers < 0:
            raise ConfigFieldError("latency.workers", f"{self.workers} must be >= 0 (0 = one per core)")
        if self.stream_chunk < 0:
            raise ConfigFieldError("latency.stream_chunk", f"{self.stream_chunk} must be >= 0 (0 = no streaming cells)")
        if self.stream_positions not in ("all", "ends"):
            raise ConfigFieldError("latency.stream_positions", f"{self.stream_positions!r}: choose all or ends")
        if self.stream_models < 0:
            raise ConfigFieldError("latency.stream_models", f"{self.stream_models} must be >= 0")
        if not self.stream_steps or min(self.stream_steps) < 1:
            raise ConfigFieldError("latency.stream_steps", f"{list(self.stream_steps)}: give step counts >= 1")
        return self


SAMPLERS = ("nsga2", "tpe", "gp")
QUALITY_SIGNALS = ("supernet", "proxy", "finetune")  # = ditnas.search.signals.SIGNALS (config is the ground floor)


@dataclass(frozen=True)
class SearchConfig:
    """`ditnas search` (and each study of a sweep): budget, steps, searcher and DP seeding."""

    budget_ms: float | None = None  # latency budget of one whole generation (steps x per step), ms
    steps: tuple[int, ...] = (28,)  # denoising steps; several = a joint dimension of the search
    trials: int = 64  # Optuna trials added by one call (a sweep: finished trials per study)
    sampler: str = "nsga2"  # nsga2 | tpe | gp
    seed: int = 0  # sampler seed
    dp_seeds: int = 16  # exact-DP layouts enqueued as the first trials
    dp_buckets: int = 2000  # latency buckets of the DP (its resolution: budget / buckets)
    population: int = 24  # NSGA-II population size
    memory_mb: float | None = None  # peak-memory limit (a constraint), MB
    storage: str | None = None  # Optuna storage URL; None = a journal file in the results folder
    eval_items: int | None = None  # items of the fixed eval batch; None = the validation batch of `ditnas train`
    quality: str = "supernet"  # supernet | proxy | finetune: the quality signal (ditnas/search/signals.py)
    quality_steps: int = 200  # training steps per arch of the proxy / finetune signal (ignored by supernet)
    # after the search: this many of its feasible archs (spread over the signal's ranking) trained standalone
    # for fidelity_steps (None = the checkpoint's train.steps), and the signal's rank agreement with them
    # reported (search/fidelity.py); 0 = off: each costs one standalone training run
    fidelity_archs: int = 0
    fidelity_steps: int | None = None
    # multi-fidelity final pick (search/rerank.py): the top `rerank_top` feasible archs by the signal are trained
    # (rerank_signal: proxy = from scratch | finetune = from the supernet's weights) in successive-halving rungs
    # of rerank_steps, and the best by the trained loss is the search's pick; 0 = pick by the signal
    rerank_top: int = 0
    rerank_signal: str = "proxy"
    rerank_steps: tuple[int, ...] = (200, 500)
    # the sampler priced: none (one batch-1 call per step: the shipped distilled student) | cfg (one batch-2 call
    # per step, as `ditnas sample --cfg-scale 2` runs; a table without measured cfg generations refuses it) | pdg
    # (Path-Drop Guidance: the full net + its dense-only net per step, `ditnas sample --guidance pdg`)
    guidance: str = "none"
    pdg_dense: int | None = None  # pdg: dense slots at each end of the dense-only net; None = the table's pdg rows' (1)
    threads: int | None = None  # the thread count the budget is for; None = the table's (a mismatch is refused)
    # clips: search streamed generation instead of whole-clip calls (latency_models/stream_latency.py). The latency
    # priced is one clip streamed `stream_chunk` latent frames at a time, `steps` (one value) denoiser calls per chunk
    # + one commit; `target_fps` (latent frames per second) sets the budget: budget_ms = frames / target_fps x 1000
    stream_chunk: int = 0
    target_fps: float | None = None

    def check(self) -> SearchConfig:
        if self.budget_ms is not None and not (math.isfinite(self.budget_ms) and self.budget_ms > 0):
            raise ConfigFieldError("search.budget_ms", f"{self.budget_ms:g}: give a positive total latency budget in ms")
        if not self.steps or min(self.steps) < 1:
            raise ConfigFieldError("search.steps", f"{list(self.steps)}: give one or more denoising step counts >= 1")
        if self.trials < 0:
            raise ConfigFieldError("search.trials", f"{self.trials} must be >= 0")
        if self.sampler not in SAMPLERS:
            raise ConfigFieldError("search.sampler", f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.dp_seeds < 0:
            raise ConfigFieldError("search.dp_seeds", f"{self.dp_seeds} must be >= 0")
        if self.dp_buckets < 1:
            raise ConfigFieldError("search.dp_buckets", f"{self.dp_buckets} must be >= 1")
        if self.population < 2:
            raise ConfigFieldError("search.population", f"{self.population} must be >= 2")
        if self.memory_mb is not None and not self.memory_mb > 0:
            raise ConfigFieldError("search.memory_mb", f"{self.memory_mb:g} must be a positive number of MB")
        if self.eval_items is not None and self.eval_items < 1:
            raise ConfigFieldError("search.eval_items", f"{self.eval_items} must be >= 1")
        if self.quality not in QUALITY_SIGNALS:
            raise ConfigFieldError("search.quality", f"unknown quality signal {self.quality!r}; choose one of {', '.join(QUALITY_SIGNALS)}")
        if self.fidelity_archs != 0 and self.fidelity_archs < 3:
            raise ConfigFieldError("search.fidelity_archs", f"{self.fidelity_archs}: give 0 (off) or >= 3 archs (a rank "
                                   "correlation of fewer says nothing)")
        if self.rerank_top != 0 and self.rerank_top < 2:
            raise ConfigFieldError("search.rerank_top", f"{self.rerank_top}: give 0 (pick by the signal) or >= 2 candidates")
        if self.rerank_signal not in ("proxy", "finetune"):
            raise ConfigFieldError("search.rerank_signal", f"{self.rerank_signal!r}: choose proxy or finetune (signals that train)")
        if not self.rerank_steps or min(self.rerank_steps) < 1 or list(self.rerank_steps) != sorted(set(self.rerank_steps)):
            raise ConfigFieldError("search.rerank_steps", f"{list(self.rerank_steps)}: give increasing step counts >= 1, e.g. [200, 500]")
        if self.fidelity_steps is not None and self.fidelity_steps < 1:
            raise ConfigFieldError("search.fidelity_steps", f"{self.fidelity_steps} must be >= 1")
        if self.quality_steps < 0:
            raise ConfigFieldError("search.quality_steps", f"{self.quality_steps} must be >= 0 training steps per arch")
        if self.guidance not in GUIDANCE:
            raise ConfigFieldError("search.guidance", f"unknown guidance {self.guidance!r}; choose one of {', '.join(GUIDANCE)}")
        if self.pdg_dense is not None and self.pdg_dense < 1:
            raise ConfigFieldError("search.pdg_dense", f"{self.pdg_dense} must be >= 1 dense slot at each end (or null)")
        if self.threads is not None and self.threads < 1:
            raise ConfigFieldError("search.threads", f"{self.threads} must be >= 1")
        self._check_stream()
        return self

    def _check_stream(self) -> None:
        if self.stream_chunk < 0:
            raise ConfigFieldError("search.stream_chunk", f"{self.stream_chunk} must be >= 0 (0 = price whole-clip calls)")
        if self.target_fps is not None:
            if not (math.isfinite(self.target_fps) and self.target_fps > 0):
                raise ConfigFieldError("search.target_fps", f"{self.target_fps:g}: give a positive frames-per-second target")
            if not self.stream_chunk:
                raise ConfigFieldError("search.target_fps", "is a streaming target: set search.stream_chunk (latent frames "
                                       "per chunk) too, or give search.budget_ms for whole-clip generation")
            if self.budget_ms is not None:
                raise ConfigFieldError("search.target_fps", f"and search.budget_ms={self.budget_ms:g} both set the budget; "
                                       "give one")
        if self.stream_chunk:
            if len(set(self.steps)) != 1:
                raise ConfigFieldError("search.steps", f"{list(self.steps)}: a streaming search prices one step count per "
                                       "chunk; give one value (e.g. [4])")
            if self.guidance != "none":
                raise ConfigFieldError("search.guidance", f"{self.guidance!r}: streamed chunks are priced without guidance "
                                       "(the streaming student is distilled); use none")

    def needs_budget(self, frames: int | None = None) -> float:
        """The budget of one whole generation in ms; a streaming target FPS is converted with the clip's `frames`."""
        if self.target_fps is not None and frames is not None:
            return frames / float(self.target_fps) * 1000.0
        if self.budget_ms is None:
            raise ConfigFieldError("search.budget_ms", "missing: give the latency budget of one whole generation in ms")
        return float(self.budget_ms)

    @property
    def sorted_steps(self) -> list[int]:
        return sorted({int(s) for s in self.steps})


@dataclass(frozen=True)
class SweepConfig:
    """`ditnas sweep`: a search (the search section) per (budget, device table) over a Ray cluster."""

    budgets_ms: tuple[float, ...] = ()
    ray_address: str | None = None  # an existing cluster; None = start a local one
    max_in_flight: int | None = None  # evaluations running at once; None = the cluster's CPU slots
    retries: int = 2  # re-runs of a task whose worker process died
    num_cpus: float = 1.0  # CPUs one evaluation task holds
    prefix: str = "sweep"  # study names: <prefix>-<table>-<budget>ms

    def check(self) -> SweepConfig:
        if not self.budgets_ms:
            raise ConfigFieldError("sweep.budgets_ms", "missing: give one or more total latency budgets in ms")
        bad = [b for b in self.budgets_ms if not (math.isfinite(b) and b > 0)]
        if bad:
            raise ConfigFieldError("sweep.budgets_ms", f"{list(self.budgets_ms)}: every budget must be a positive number of ms")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ConfigFieldError("sweep.max_in_flight", f"{self.max_in_flight} must be >= 1")
        if self.retries < 0:
            raise ConfigFieldError("sweep.retries", f"{self.retries} must be >= 0")
        if not self.num_cpus > 0:
            raise ConfigFieldError("sweep.num_cpus", f"{self.num_cpus:g} must be > 0")
        return self


PRUNE_UNITS = ("blocks", "heads", "channels")
SENSITIVITY = ("masked", "taylor")
DISTILL_METHODS = ("kd", "kdmd", "adversarial")
EXPORT_BACKENDS = ("xnnpack", "coreml", "mlpackage")
EXPORT_SAMPLERS = ("host-loop", "unrolled", "fastest")


@dataclass(frozen=True)
class PruneConfig:
    """`ditnas prune`: tri-level structured pruning of an extracted subnet (compress/prune.py)."""

    budget_ms: float | None = None  # per-step latency budget on the target table (predicted; the result is measured)
    memory_mb: float | None = None  # parameter-memory budget, MB (fp32); either or both
    units: tuple[str, ...] = PRUNE_UNITS  # which unit kinds may be removed: blocks | heads | channels
    channel_group: int = 16  # FFN hidden channels removed together (one unit)
    sensitivity: str = "masked"  # masked (exact change of the KD loss) | taylor (first order, one backward)
    calib_items: int = 256  # calibration set for the sensitivity scores
    rescore_every: int = 4  # removals between re-scoring every unit
    recover_steps: int = 50  # KD recovery steps between rounds (0 = none)
    final_steps: int = 300  # KD steps after the last removal
    seed: int = 0

    def check(self) -> PruneConfig:
        for name in ("budget_ms", "memory_mb"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigFieldError(f"compress.prune.{name}", f"{value:g} must be a positive number")
        bad = [u for u in self.units if u not in PRUNE_UNITS]
        if bad or not self.units:
            raise ConfigFieldError("compress.prune.units", f"{list(self.units)}: choose one or more of {', '.join(PRUNE_UNITS)}")
        if self.sensitivity not in SENSITIVITY:
            raise ConfigFieldError("compress.prune.sensitivity", f"unknown {self.sensitivity!r}; choose one of {', '.join(SENSITIVITY)}")
        for name in ("channel_group", "calib_items", "rescore_every"):
            if getattr(self, name) < 1:
                raise ConfigFieldError(f"compress.prune.{name}", f"{getattr(self, name)} must be >= 1")
        for name in ("recover_steps", "final_steps"):
            if getattr(self, name) < 0:
                raise ConfigFieldError(f"compress.prune.{name}", f"{getattr(self, name)} must be >= 0")
        return self


@dataclass(frozen=True)
class KDConfig:
    """Knowledge distillation (compress/kd.py): L = L_diff + lambda_out L_out + lambda_feat L_feat."""

    steps: int = 500
    batch_size: int = 64
    lr: float = 5e-4  # assumption: half the supernet's rate, the student starts trained
    lambda_out: float = 1.0  # SnapGen++ Eq. 8 weights are [NF]; 1 assumed
    lambda_feat: float = 1.0
    checkpoint_every: int = 100
    seed: int = 0
    eval_items: int = 512  # validation items the before/after losses are measured on (flow.VAL_BATCH protocol)

    def check(self) -> KDConfig:
        for name in ("steps", "batch_size", "checkpoint_every", "eval_items"):
            if getattr(self, name) < (0 if name == "steps" else 1):
                raise ConfigFieldError(f"compress.kd.{name}", f"{getattr(self, name)} is out of range")
        for name in ("lr", "lambda_out", "lambda_feat"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0) or (name == "lr" and value == 0):
                raise ConfigFieldError(f"compress.kd.{name}", f"{value:g} must be a finite number >= 0 (lr > 0)")
        return self


@dataclass(frozen=True)
class DistillConfig:
    """Step distillation to a few-step student (compress/dmd.py, compress/adversarial.py; video_2in1:
    compress/video_distill.py, clips only)."""

    # kd | kdmd | adversarial | video_2in1 (S2DiT's 2-in-1 distillation into a 4-step frame-causal streaming student;
    # clips only; `ditnas run`'s distill stage -- its fields below, the shared ones as for kdmd)
    method: str = "kdmd"
    student_steps: int = 4  # SnapGen++ / Taming: 4 steps
    steps: int = 1000  # generator updates
    batch_size: int = 64
    lr: float = 1e-4
    critic_lr: float = 2e-4
    critic_updates: int = 5  # critic (fake score) updates per generator update (DMD2 uses 5)
    cfg_scale: float = 2.0  # teacher guidance inside the distribution-matching gradient
    lambda_out: float = 1.0  # few-step-teacher terms on the same x_t (SnapGen++ Eq. 10)
    lambda_feat: float = 1.0
    disc_blocks: int = 2  # frozen teacher blocks under the adversarial heads
    checkpoint_every: int = 100  # in generator updates
    seed: int = 0
    ttur_mode: str = "dmd2"  # dmd2: critic on every iteration (DMD2 train_sd.py) | exclusive: only between generator steps
    critic_init: str = "student"  # SnapGen++: critic from the student; DMD2: from the teacher
    shift: float = 3.0  # SnapGen++ supp. H: time shift 3 (re-noising tau and the student's time grid)
    eval_samples: int = 256  # assumption: 256 samples for the student's FD / label accuracy; 0 = skip
    # the few-step teacher ξ' of SnapGen++ Eq. 10 (theirs: a 4-step Lightning LoRA): "teacher" = ξ itself (no CFG);
    # "trajectory" = a copy of the teacher regressed onto its own ODE solutions at the student's timesteps.
    # assumption: "teacher" by default, measured better here (bench/distill.py: 4-step FD 24.98 vs 35.72)
    few_step_teacher: str = "teacher"
    teacher_kd_steps: int = 200  # assumption: regression steps of ξ'
    teacher_pairs: int = 512  # assumption: (noise, ODE solution) pairs generated once for ξ'
    teacher_substeps: int = 7  # assumption: Euler steps per student interval (7 x 4 = the teacher's 28)
    # video_2in1 only (compress/video_distill.py VideoDistillConfig, same defaults; the shared fields above map
    # onto it: steps, student_steps, batch_size, lr, critic_lr, critic_updates, cfg_scale, shift, teacher_substeps,
    # checkpoint_every, seed)
    chunk: int = 1  # latent frames per streamed chunk (assumption: 1 = frame-by-frame streaming)
    kd_steps: int = 200  # stage (a): KD into the causal student; 0 = the student is already KD-trained and causal
    kd_lr: float = 5e-4  # stage (a) rate, as compress.kd.lr
    kd_lambda_out: float = 1.0  # stage (a) output-KD weight (SnapGen++ Eq. 8 weights are [NF]; 1 assumed)
    kd_lambda_feat: float = 0.0  # assumption: stage (a) output KD only; > 0 adds kd.py's final-feature term
    stream_loss: str = "regression"  # stage (b) loss: regression (to the teacher's ODE solution) | dmd
    regression_pairs: int = 0  # regression: 0 = solve the teacher's ODE per batch; N = a pool of N pairs solved once
    class_dropout: float = 0.1  # stage (a): CFG label dropout, as train.class_dropout
    grad_clip: float = 10.0  # stage (b): DMD2 SDXL grad-norm clip 10
    gap_clips: int = 32  # fixed-noise clips the teacher gap (student stream vs teacher ODE) is measured on

    def check(self) -> DistillConfig:
        if self.ttur_mode not in ("dmd2", "exclusive"):
            raise ConfigFieldError("compress.distill.ttur_mode", f"unknown {self.ttur_mode!r}; choose dmd2 or exclusive")
        if self.critic_init not in ("student", "teacher"):
            raise ConfigFieldError("compress.distill.critic_init", f"unknown {self.critic_init!r}; choose student or teacher")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ConfigFieldError("compress.distill.shift", f"{self.shift:g} must be > 0")
        if self.eval_samples < 0:
            raise ConfigFieldError("compress.distill.eval_samples", f"{self.eval_samples} must be >= 0")
        if self.few_step_teacher not in ("trajectory", "teacher"):
            raise ConfigFieldError("compress.distill.few_step_teacher",
                                   f"unknown {self.few_step_teacher!r}; choose trajectory or teacher")
        for name in ("teacher_kd_steps", "teacher_pairs", "teacher_substeps"):
            if getattr(self, name) < (0 if name == "teacher_kd_steps" else 1):
                raise ConfigFieldError(f"compress.distill.{name}", f"{getattr(self, name)} is out of range")
        for name in ("cfg_scale", "lambda_out", "lambda_feat"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigFieldError(f"compress.distill.{name}", f"{getattr(self, name):g} must be a finite number >= 0")
        methods = (*DISTILL_METHODS, "video_2in1")  # video_2in1: the pipeline's distill stage only (clips)
        if self.method not in methods:
            raise ConfigFieldError("compress.distill.method", f"unknown {self.method!r}; choose one of {', '.join(methods)}")
        if self.stream_loss not in ("regression", "dmd"):
            raise ConfigFieldError("compress.distill.stream_loss", f"unknown {self.stream_loss!r}; choose regression or dmd")
        for name in ("student_steps", "batch_size", "critic_updates", "disc_blocks", "checkpoint_every", "chunk",
                     "gap_clips"):
            if getattr(self, name) < 1:
                raise ConfigFieldError(f"compress.distill.{name}", f"{getattr(self, name)} must be >= 1")
        for name in ("steps", "kd_steps", "regression_pairs"):
            if getattr(self, name) < 0:
                raise ConfigFieldError(f"compress.distill.{name}", f"{getattr(self, name)} must be >= 0")
        for name in ("kd_lambda_out", "kd_lambda_feat", "class_dropout", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigFieldError(f"compress.distill.{name}", f"{getattr(self, name):g} must be a finite number >= 0")
        for name in ("lr", "critic_lr", "kd_lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigFieldError(f"compress.distill.{name}", f"{getattr(self, name):g} must be > 0")
        return self


@dataclass(frozen=True)
class ExportConfig:
    """`ditnas export`: the shipped artifact (compress/export.py), lowered with latency_models' recipe."""

    backend: str = "xnnpack"  # xnnpack | coreml | mlpackage
    dtype: str = "fp32"  # fp32 | fp16 (Core ML: fp16)
    steps: int = 4  # denoising steps of the shipped sampler
    cfg_scale: float = 0.0  # guidance of the shipped sampler; 0 = none (a distilled student needs none)
    # how a guided sampler gets its unconditional velocity: cfg (one batch-2 [cond, null] call) | pdg (Path-Drop
    # Guidance: the dense-only net, `pdg_dense` slots at each end, on the null label); priced as search.guidance
    guidance: str = "cfg"
    pdg_dense: int = 1
    parity_rtol: float = 1e-3  # .pte vs eager relative error allowed
    threads: int = 1  # runtime threads for the post-export check
    time_shift: float = 1.0  # SD3 time shift of the shipped sampler's grid (flow.time_grid); 1 = uniform
    timing_iters: int = 20  # timed runs (after 3 warm-ups) of each eager / .pte timing after export
    # host-loop: the denoiser program + a host loop of Euler steps (any step count; what the tables price);
    # unrolled: all `steps` calls in one program (noise, y) -> x0; fastest: export both, time both on
    # this host's runtime, ship the faster (the manifest records both times and why)
    sampler: str = "fastest"
    # clips from a frame-causal student: also export the streaming chunk programs (latency_models/stream_programs.py),
    # one .pte per chunk position of `stream_chunk` latent frames, into <out>/stream/; 0 = off
    stream_chunk: int = 0

    def check(self) -> ExportConfig:
        if self.sampler not in EXPORT_SAMPLERS:
            raise ConfigFieldError("compress.export.sampler", f"unknown {self.sampler!r}; choose one of {', '.join(EXPORT_SAMPLERS)}")
        if self.sampler == "unrolled" and self.backend == "mlpackage":
            raise ConfigFieldError("compress.export.sampler", "an unrolled sampler is exported as a .pte only; use host-loop "
                                   "or fastest with backend mlpackage")
        if self.backend not in EXPORT_BACKENDS:
            raise ConfigFieldError("compress.export.backend", f"unknown {self.backend!r}; choose one of {', '.join(EXPORT_BACKENDS)}")
        if self.dtype not in ("fp32", "fp16"):
            raise ConfigFieldError("compress.export.dtype", f"unknown {self.dtype!r}; choose fp32 or fp16")
        # assumption: XNNPACK programs ship fp32 (the latency tables price fp32); Core ML ships FP16 (iOS 18 recipe)
        want = "fp32" if self.backend == "xnnpack" else "fp16"
        if self.dtype != want:
            raise ConfigFieldError("compress.export.dtype", f"{self.dtype} is not offered for backend {self.backend}; use {want}")
        if not (math.isfinite(self.time_shift) and self.time_shift > 0):
            raise ConfigFieldError("compress.export.time_shift", f"{self.time_shift:g} must be > 0")
        if self.timing_iters < 1:
            raise ConfigFieldError("compress.export.timing_iters", f"{self.timing_iters} must be >= 1")
        if self.steps < 1:
            raise ConfigFieldError("compress.export.steps", f"{self.steps} must be >= 1")
        if self.guidance not in ("cfg", "pdg"):
            raise ConfigFieldError("compress.export.guidance", f"unknown {self.guidance!r}; choose cfg or pdg")
        if self.pdg_dense < 1:
            raise ConfigFieldError("compress.export.pdg_dense", f"{self.pdg_dense} must be >= 1 dense slot at each end")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise ConfigFieldError("compress.export.cfg_scale", f"{self.cfg_scale:g} must be >= 0")
        if not self.parity_rtol > 0:
            raise ConfigFieldError("compress.export.parity_rtol", f"{self.parity_rtol:g} must be > 0")
        if self.threads < 1:
            raise ConfigFieldError("compress.export.threads", f"{self.threads} must be >= 1")
        if self.stream_chunk < 0:
            raise ConfigFieldError("compress.export.stream_chunk", f"{self.stream_chunk} must be >= 0 latent frames "
                                   "(0 = no streaming programs)")
        return self


@dataclass(frozen=True)
class CompressConfig:
    """Stage 4: prune, distill, export (ditnas/compress/)."""

    prune: PruneConfig = field(default_factory=PruneConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def check(self) -> CompressConfig:
        self.prune.check(), self.kd.check(), self.distill.check(), self.export.check()
        return self


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    graft: GraftConfig = field(default_factory=GraftConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DitnasError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and len(args) == 2 and args[1] is Ellipsis:
            value = [value]  # `--set search.steps=28` means (28,)
        if not isinstance(value, (list, tuple)):
            raise DitnasError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0]
        if len(args) != 2 or args[1] is not Ellipsis:
            if len(value) != len(args):
                raise DitnasError(f"{where}: expected {len(args)} values, got {list(value)}")
            return tuple(_coerce(a, v, where) for a, v in zip(args, value))
        return tuple(_coerce(item_tp, v, where) for v in value)
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise DitnasError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k_tp, k, where): _coerce(v_tp, v, where) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in typing.get_args(tp):
                return None
        if len(args) == 1:
            return _coerce(args[0], value, where)
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise DitnasError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str):
        if tp is not str and isinstance(value, bool):
            raise DitnasError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise DitnasError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def _build(cls: type, raw: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise DitnasError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in raw.items()})


def _set_path(tree: dict, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DitnasError(f"{where}: {dotted} goes through a non-mapping field")
    node[parts[-1]] = value


def load_config(path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a RunConfig from YAML (or defaults) and apply `section.field=value` overrides (YAML values)."""
    raw: dict = {}
    where = str(path) if path else "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DitnasError(f"config file {path} does not exist; pass an existing YAML file or omit --config")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DitnasError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
        if not isinstance(raw, dict):
            raise DitnasError(f"config file {path} must be a mapping of sections (data, space, model, train, graft, sample, latency, search, sweep, compress)")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DitnasError(f"override {item!r} must look like section.field=value, e.g. train.steps=500")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise DitnasError(f"override {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]}); "
                              "quote it, e.g. --set 'data.source=\"my folder\"'") from None
        _set_path(raw, key.strip(), parsed, f"override {item!r}")
    return _build(RunConfig, raw, where)


def config_from_dict(raw: dict, where: str = "config") -> RunConfig:
    return _build(RunConfig, raw, where)


def dump_config(config: RunConfig, path: Path) -> None:
    from ditnas.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
