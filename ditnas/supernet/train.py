"""Supernet training: max + sampled subnets + in-place distillation + ground-truth flow loss on every subnet.

One step (SnapGen++ Eqs. 4-5; the subnets per `train.sampler`, default max + 2 uniform random since the
sandwich rule's every-step `min` was measured to skew the search's quality signal, docs/training.md):
  1. one shared batch (x0, eps, t, y); the max arch gets the flow-matching loss;
  2. each sampled subnet s gets   L_diff(s) + lambda_d * ||v_s - sg(v_max)||^2;
  3. gradients of all of them accumulate into ONE optimizer step; EMA of the weights follows.
Samplers: `uniform` (max + k random), `sandwich` (max + min + k random), `attentive` (max + min +
k picked from `attentive_trials` random candidates by minibatch loss, BestUp or WorstUp; AttentiveNAS).

Checkpoints are written atomically every `checkpoint_every` steps with model, optimizer, EMA, every RNG
state and the data sampler's position, so a resumed run equals an uninterrupted one.

Devices: `train.device` (auto | cpu | cuda | mps) and `train.precision` (fp32 | bf16 autocast); data and
RNGs stay on the CPU, so the batches are the same on every device. Under `torchrun` every rank trains the
same subnets on its shard of the global batch, gradients averaged once per step (distributed.py).
"""

from __future__ import annotations

import copy
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from ditnas.arch import Arch, SearchSpace
from ditnas.config import RunConfig, config_from_dict
from ditnas.data import BatchSampler, DatasetSplit, load_split
from ditnas.device import autocast, check_precision, resolve_device
from ditnas.errors import ConfigFieldError, DitnasError
from ditnas.io import atomic_torch_save, torch_load
from ditnas.supernet.distributed import Group, env_ranks, join
from ditnas.supernet.fair_sampling import FairDraw
from ditnas.supernet.flow import interpolate, mse, sample_time, velocity_target
from ditnas.supernet.model import ElasticDiT
from ditnas.supernet.token_drop import DropSchedule

SAMPLERS = ("uniform", "sandwich", "attentive")
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
GRAFTED_NAME, GRAFTED_KIND = "grafted.pt", "ditnas.grafted"  # a step-0 checkpoint `ditnas graft` writes


def build_space(cfg: RunConfig, split: DatasetSplit) -> SearchSpace:
    return cfg.space.to_space(cfg.data, split.num_classes, split.latent_shape, cfg.sample.steps)


def build_supernet(cfg: RunConfig, space: SearchSpace) -> ElasticDiT:
    return ElasticDiT(space, cfg.model)


class Ema:
    """Exponential moving average of every floating-point tensor of a model."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # warm-up (as timm's ModelEmaV2 / DiT practice): short runs must not average in the random init
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        device = {k: v.device for k, v in self.shadow.items()}  # a checkpoint loads on the CPU
        self.shadow = {k: v.to(device.get(k, v.device), copy=True) for k, v in state.items()}


@dataclass
class StepStats:
    step: int
    loss_max: float
    loss_subnets: float
    distill: float
    seconds: float
    archs: list[str]


class SubnetSampler:
    """Chooses the subnets trained next to the max arch in one step."""

    def __init__(self, space: SearchSpace, kind: str, num_random: int, trials: int, mode: str, fair: bool = False,
                 ops_from: int = 0):
        if kind not in SAMPLERS:
            raise DitnasError(f"train.sampler={kind!r} unknown; use one of {', '.join(SAMPLERS)}")
        if mode not in ("bestup", "worstup"):
            raise DitnasError(f"train.attentive_mode={mode!r} unknown; use bestup or worstup")
        self.space, self.kind, self.k, self.trials, self.mode = space, kind, num_random, trials, mode
        self.fair = FairDraw(space) if fair else None  # train.fair_sampling (fair_sampling.py)
        # train.progressive_ops: steps before `ops_from` draw from the space cut to each stage's reference op
        # assumption: a skippable slot is then skipped with probability 1/2 (uniform over {op, skip}, as sample does)
        self.ops_from = ops_from
        refs = {s: space.ops_for(s)[0] for s in (0, 1)}  # the two resolution stages
        self.reference_ops = replace(space, ops=tuple(dict.fromkeys(refs.values())),
                                     stage_ops={s: (op,) for s, op in refs.items()})

    def _draw(self, rng: random.Random, step: int) -> Arch:
        if step < self.ops_from:
            return self.reference_ops.sample(rng)
        return self.fair.sample(rng) if self.fair is not None else self.space.sample(rng)

    def choose(self, rng: random.Random, score: Callable[[Arch], float], step: int = 0) -> list[Arch]:
        """The subnets of the step with index `step` (0-based; it decides the progressive phase)."""
        archs: list[Arch] = []
        for _ in range(self.k):
            if self.kind == "attentive":
                candidates = [self._draw(rng, step) for _ in range(self.trials)]
                losses = [score(a) for a in candidates]
                pick = max if self.mode == "worstup" else min
                archs.append(candidates[losses.index(pick(losses))])
            else:
                archs.append(self._draw(rng, step))
        if self.kind in ("sandwich", "attentive"):
            archs.append(self.space.min_arch())  # sandwich rule: the smallest child every step
        return archs


def flow_batch(batches: BatchSampler, noise: torch.Generator, tc, null_label: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Next training batch as (x_t, t, labels with CFG dropout, target velocity); draws from `noise`."""
    x0, y = batches.next()
    n = x0.shape[0]
    if y is None:
        y = torch.full((n,), null_label, dtype=torch.long)
    drop = torch.rand(n, generator=noise) < tc.class_dropout
    y = torch.where(drop, torch.full_like(y, null_label), y)
    t = sample_time(n, noise, tc.time_shift)
    eps = torch.randn(x0.shape, generator=noise)
    return interpolate(x0, eps, t), t, y, velocity_target(x0, eps)


def set_lr(optimizer: torch.optim.Optimizer, tc, step: int) -> None:
    """Linear warm-up to `lr`, then constant (assumption: short runs on tiny data need no decay)."""
    lr = tc.lr * min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps > 0 else tc.lr
    for group in optimizer.param_groups:
        group["lr"] = lr


class Trainer:
    """Holds everything a run needs, and exactly the state a checkpoint must restore."""

    def __init__(self, cfg: RunConfig, out: Path, split: DatasetSplit | None = None):
        self.cfg, self.out = cfg, Path(out)
        tc = cfg.train
        self.device = resolve_device(tc.device, local_rank=env_ranks()[2])
        check_precision(tc.precision, self.device)
        self.group: Group = join(self.device, tc.batch_size)
        self.split = split or load_split(cfg.data)
        self.space = build_space(cfg, self.split)
        torch.manual_seed(tc.seed)  # weight init, on the CPU: the same start on every device and rank
        self.model = build_supernet(cfg, self.space)
        if tc.init:  # a grafted start (graft.py); a resumed checkpoint overwrites it in restore()
            load_grafted(self.model, Path(tc.init), cfg)
        self.model.to(self.device)
        self.null_label = self.space.num_classes
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.ema = Ema(self.model, tc.ema_decay)
        self.noise = torch.Generator().manual_seed(tc.seed + 1)
        self.arch_rng = random.Random(tc.seed + 2)
        self.batches = BatchSampler(self.split, tc.batch_size, seed=tc.seed + 3)
        if not 0.0 <= tc.progressive_ops < 1.0:
            raise ConfigFieldError("train.progressive_ops", f"{tc.progressive_ops} must lie in [0, 1): the share of the "
                                   "steps trained on the reference ops only")
        self.subnets = SubnetSampler(self.space, tc.sampler, tc.num_random, tc.attentive_trials, tc.attentive_mode,
                                     fair=tc.fair_sampling, ops_from=round(tc.progressive_ops * tc.steps))
        # token dropping / path drop (token_drop.py): its own seeded RNG, checkpointed, so a resumed run draws the
        # same keep patterns as an uninterrupted one (and the other streams are untouched when it is off)
        self.drop_rng = torch.Generator().manual_seed(tc.seed + 4)
        self.drop = DropSchedule(tc, self.space.depth, self.space.max_arch().grid(0), self.drop_rng)
        self.step = 0
        self.history: list[dict] = []
        self.max_arch = self.space.max_arch()

    # ----- one step ---------------------------------------------------------------------------
    def train_step(self) -> StepStats:
        tc = self.cfg.train
        start = time.perf_counter()
        self.model.train()
        group, device = self.group, self.device
        # the global batch on every rank (same RNG draws), then this rank's shard of it
        batch = group.shard(*flow_batch(self.batches, self.noise, tc, self.null_label))
        x_t, t, y, target = (a.to(device) for a in batch)
        set_lr(self.optimizer, tc, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        drop = self.drop.options(self.step, tc.batch_size, lambda k: group.shard(k)[0], device)

        def run(arch: Arch) -> Tensor:
            with autocast(device, tc.precision):  # losses in fp32, on every token (dropped ones via the dense ends)
                return self.model.run(arch, x_t, t, y, **drop([s.stage for s in arch.slots])).float()

        v_max = run(self.max_arch)
        loss_max = mse(v_max, target)
        loss_max.backward()
        # in-place distillation target: no gradient flows through it. Under token dropping it is the max net's
        # velocity with the step's keep pattern, the one the subnets run with too.
        # assumption: same-pattern teacher rather than dense: it costs no extra forward (L_max needs it anyway)
        # and the students are distilled to what the max net computes from the same kept tokens
        teacher = v_max.detach()

        def score(arch: Arch) -> float:  # the global batch's loss, so every rank picks the same subnet
            with torch.no_grad():
                return group.mean([mse(run(arch), target).item()], device)[0]

        archs = self.subnets.choose(self.arch_rng, score, self.step)
        group.check_same(f"the subnets of step {self.step + 1}", " ".join(a.layout() for a in archs), device)
        sub_losses, distill_losses = [], []
        for arch in archs:
            v = run(arch)
            diff, dist = mse(v, target), mse(v, teacher)
            (diff + tc.distill_weight * dist).backward()  # SnapGen++ keeps L_diff on subnets too
            sub_losses.append(diff.item())
            distill_losses.append(dist.item())
        group.average_gradients(self.model.parameters())  # one all-reduce for all the step's backward passes
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model, self.step)
        self.step += 1
        loss_max_mean, sub_mean, distill_mean = group.mean(
            [loss_max.item(), sum(sub_losses) / max(len(sub_losses), 1), sum(distill_losses) / max(len(distill_losses), 1)],
            device)
        stats = StepStats(self.step, loss_max_mean, sub_mean, distill_mean, time.perf_counter() - start,
                          [a.layout() for a in archs])
        self.history.append(
            {"step": stats.step, "loss_max": stats.loss_max, "loss_subnets": stats.loss_subnets, "distill": stats.distill}
        )
        return stats

    # ----- checkpoints ------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "space": self.space.to_dict(),
            "data_fingerprint": self.split.fingerprint(),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "noise_rng": self.noise.get_state(),
            "torch_rng": torch.get_rng_state(),
            "arch_rng": _encode_py_rng(self.arch_rng.getstate()),
            "drop_rng": self.drop_rng.get_state(),
            "batches": self.batches.state_dict(),
            "subnet_decks": self.subnets.fair.state_dict() if self.subnets.fair is not None else {},
            "history": self.history,
        }

    def save(self, path: Path | None = None) -> Path:
        """Rank 0 writes (every rank holds the same state); the others wait until the file is there."""
        path = Path(path or self.out / CHECKPOINT_NAME)
        if self.group.is_main:
            atomic_torch_save(path, self.state())
        self.group.barrier()
        return path

    def weights_digest(self) -> str:
        """sha256 of the weights (rank agreement at start: same init or the same checkpoint restored)."""
        h = hashlib.sha256()
        for name, value in self.model.state_dict().items():
            h.update(name.encode())
            h.update(value.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def restore(self, path: Path) -> None:
        state = torch_load(path)
        check_checkpoint(state, path)
        stored = config_from_dict(state["config"], where=f"{path}:config").to_dict()  # new fields at their defaults
        if stored["model"] != self.cfg.to_dict()["model"] or stored["space"] != self.cfg.to_dict()["space"]:
            raise DitnasError(
                f"checkpoint {path} was trained with another model/space config; use a new --out or the same config"
            )
        if state["data_fingerprint"] != self.split.fingerprint():
            raise DitnasError(f"checkpoint {path} was trained on other data; use a new --out to train on this data")
        load_weights(self.model, state["model"], path)
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.arch_rng.setstate(_decode_py_rng(state["arch_rng"]))
        if "drop_rng" in state:  # checkpoints from before token dropping have none (and never drew from it)
            self.drop_rng.set_state(state["drop_rng"])
        self.batches.load_state_dict(state["batches"])
        if self.subnets.fair is not None:
            self.subnets.fair.load_state_dict(state.get("subnet_decks", {}))
        self.step = int(state["step"])
        self.history = list(state["history"])


def _encode_py_rng(state: tuple) -> dict:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _decode_py_rng(state: dict) -> tuple:
    return (state["version"], tuple(int(v) for v in state["internal"].tolist()), state["gauss"])


REQUIRED_KEYS = ("format", "config", "space", "step", "model", "ema")


def check_checkpoint(state: object, path: Path) -> None:
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise DitnasError(f"checkpoint {path} is not a ditnas supernet checkpoint (missing keys); pass the train output's checkpoint.pt")
    if state["format"] != CHECKPOINT_FORMAT:
        raise DitnasError(f"checkpoint {path} has format {state['format']}, this ditnas reads {CHECKPOINT_FORMAT}")


def load_weights(model: torch.nn.Module, weights: dict[str, Tensor], path: Path) -> None:
    """load_state_dict with a one-line error naming the first mismatching tensor."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    wrong = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or extra or wrong:
        first = (
            f"{wrong[0]} has shape {tuple(weights[wrong[0]].shape)} but the model needs {tuple(own[wrong[0]].shape)}"
            if wrong
            else f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        )
        raise DitnasError(f"checkpoint {path} does not match the model ({first}); use the config it was trained with")
    model.load_state_dict(weights)


def load_grafted(model: ElasticDiT, path: Path, cfg: RunConfig) -> None:
    """Start `model` from a grafted.pt (train.init, written by supernet/graft.py); it must be of this
    model and space config."""
    path = Path(path)
    if not path.is_file():
        raise DitnasError(f"train.init {path} does not exist; run `ditnas graft --out DIR` and pass DIR/{GRAFTED_NAME}")
    state = torch_load(path)
    if not isinstance(state, dict) or state.get("kind") != GRAFTED_KIND:
        raise DitnasError(f"train.init {path} is not a grafted supernet ({GRAFTED_NAME} from `ditnas graft`); "
                          "to continue a training run, pass its folder as --out with --resume")
    here = cfg.to_dict()
    # through the typed config: a field added since the graft compares at its default
    stored = config_from_dict(state["config"], where=f"{path}:config").to_dict()
    for section in ("model", "space"):
        if stored[section] != here[section]:
            diff = sorted(k for k in here[section] if stored[section].get(k) != here[section][k])
            raise DitnasError(f"train.init {path} was grafted with another {section} config (differs in {diff}); "
                              "graft again with this config")
    load_weights(model, state["model"], path)


def load_supernet(path: Path, *, use_ema: bool = True) -> tuple[ElasticDiT, RunConfig, dict]:
    """Rebuild the supernet a checkpoint was trained as and load its (EMA) weights."""
    path = Path(path)
    state = torch_load(path)
    check_checkpoint(state, path)
    cfg = config_from_dict(state["config"], where=f"{path}:config")
    model = ElasticDiT(SearchSpace.from_dict(state["space"], source=f"{path}: field 'space'"), cfg.model)
    load_weights(model, state["ema"] if use_ema else state["model"], path)
    model.eval()
    return model, cfg, state


def train_supernet(
    cfg: RunConfig,
    out: Path,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    on_step: Callable[[StepStats, Trainer], None] | None = None,
    split: DatasetSplit | None = None,
) -> Trainer:
    """Train (or resume) the supernet into `out`; stop early after `stop_after` steps of this call."""
    out = Path(out)
    trainer = Trainer(cfg, out, split)
    ckpt = out / CHECKPOINT_NAME
    if ckpt.exists():
        if not resume:
            raise DitnasError(f"{ckpt} exists; pass --resume to continue it or choose a new --out")
        trainer.restore(ckpt)
    if trainer.group.active:  # hashing every weight is for rank agreement only
        trainer.group.check_same("the starting weights", f"{trainer.step} {trainer.weights_digest()}", trainer.device)
    target = cfg.train.steps if stop_after is None else min(cfg.train.steps, trainer.step + stop_after)
    threads = cfg.train.threads
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        while trainer.step < target:
            stats = trainer.train_step()
            if on_step:
                on_step(stats, trainer)
            if cfg.train.checkpoint_every and trainer.step % cfg.train.checkpoint_every == 0:
                trainer.save()
        trainer.save()
    finally:
        torch.set_num_threads(previous_threads)
    return trainer


class StandaloneTrainer:
    """One arch trained alone from scratch (plain flow matching) with the supernet trainer's optimiser,
    data order and noise stream: the baseline the supernet's subnets are compared with.

    `init`: start from these weights instead of a fresh init (e.g. `supernet.extract(arch)` to fine-tune
    an extracted subnet); it is copied, never changed, and training runs on its device. Optimiser, EMA,
    data order and noise are the same as from scratch. None (default): fresh init as before."""

    def __init__(self, arch: Arch, cfg: RunConfig, split: DatasetSplit, init: torch.nn.Module | None = None):
        tc = self.tc = cfg.train
        space = build_space(cfg, split)
        arch = space.validate(arch)
        if init is None:
            torch.manual_seed(tc.seed)
            self.model = ElasticDiT(space, cfg.model).extract(arch)  # fresh init, adaLN-Zero kept
            self.model.to(resolve_device(tc.device))
        else:
            init_arch = getattr(init, "arch", None)
            if init_arch is not None and init_arch.layout() != arch.layout():
                raise DitnasError(f"init weights are of arch {init_arch.layout()!r}, not {arch.layout()!r}; "
                                  "pass the model extracted for this arch")
            self.model = copy.deepcopy(init)
        self.device = next(self.model.parameters()).device
        check_precision(tc.precision, self.device)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.ema = Ema(self.model, tc.ema_decay)
        self.noise = torch.Generator().manual_seed(tc.seed + 1)
        self.batches = BatchSampler(split, tc.batch_size, seed=tc.seed + 3)
        self.null = space.num_classes
        self.step = 0
        self.drop_rng = torch.Generator().manual_seed(tc.seed + 4)  # token dropping / path drop (token_drop.py)
        self.drop = DropSchedule(tc, space.depth, arch.grid(0), self.drop_rng)
        self.stages = [s.stage for s in arch.slots]

    def train_step(self) -> float:
        tc = self.tc
        x_t, t, y, target = (a.to(self.device) for a in flow_batch(self.batches, self.noise, tc, self.null))
        set_lr(self.optimizer, tc, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        drop = self.drop.options(self.step, tc.batch_size, device=self.device)(self.stages)
        with autocast(self.device, tc.precision):
            v = self.model(x_t, t, y, **drop).float()
        loss = mse(v, target)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.ema.update(self.model, self.step)
        return loss.item()


def train_standalone(arch: Arch, cfg: RunConfig, split: DatasetSplit, steps: int) -> tuple[torch.nn.Module, Ema]:
    """Train `arch` alone for `steps` steps; returns the model and its EMA."""
    trainer = StandaloneTrainer(arch, cfg, split)
    for _ in range(steps):
        trainer.train_step()
    return trainer.model, trainer.ema
