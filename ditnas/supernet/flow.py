"""Rectified flow: interpolation, shifted time, the flow-matching loss and an Euler sampler with CFG.

x_t = (1 - t) x0 + t eps, target velocity v = eps - x0 (SnapGen++ Eq. 4); t = 1 is pure noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ditnas.errors import DitnasError

VelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t, y) -> v
# guidance modes of the sampler (`ditnas sample --guidance`); the latency tables price config.GUIDANCE (none + these)
SAMPLER_GUIDANCE = ("cfg", "pdg")


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3-style time shift t' = s t / (1 + (s - 1) t); s > 1 spends more time at high noise."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_time(n: int, generator: torch.Generator, shift: float = 1.0) -> Tensor:
    # assumption: uniform t, then shifted; SnapGen++ names the shift (3 for K-DMD), not the base law
    return shift_time(torch.rand(n, generator=generator), shift)


def interpolate(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    tt = t.reshape(-1, *([1] * (x0.dim() - 1)))
    return (1 - tt) * x0 + tt * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    return eps - x0


def mse(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).mean()


@dataclass(frozen=True)
class EvalBatch:
    """A fixed (x0, eps, t, y) set, so every arch is scored on exactly the same noise."""

    x0: Tensor
    eps: Tensor
    t: Tensor
    y: Tensor

    @property
    def x_t(self) -> Tensor:
        return interpolate(self.x0, self.eps, self.t)

    @property
    def target(self) -> Tensor:
        return velocity_target(self.x0, self.eps)


# The one validation protocol: `ditnas train` reports, and the search scores, the flow-matching loss on
# this many validation items with noise and t drawn from this seed (so their numbers are comparable).
VAL_BATCH = 512
EVAL_SEED = 1234


def fixed_eval_batch(x0: Tensor, y: Tensor | None, n: int, seed: int, null_label: int) -> EvalBatch:
    """`n` validation items (cycled if needed) with noise and t drawn from `seed`; t stratified on [0,1]."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(n) % x0.shape[0]
    labels = y[idx] if y is not None else torch.full((n,), null_label, dtype=torch.long)
    eps = torch.randn((n, *x0.shape[1:]), generator=g)
    # stratified t lowers the variance of the loss estimate (assumption: same effect as many draws)
    t = (torch.arange(n, dtype=torch.float32) + torch.rand(n, generator=g)) / n
    t = t[torch.randperm(n, generator=g)]
    return EvalBatch(x0[idx], eps, t, labels)


@torch.no_grad()
def eval_flow_loss(fn: VelocityFn, batch: EvalBatch, chunk: int = 256) -> float:
    """Mean flow-matching loss of `fn` on a fixed batch (the SnapGen++ validation-loss protocol)."""
    total, n = 0.0, batch.x0.shape[0]
    x_t, target = batch.x_t, batch.target
    for i in range(0, n, chunk):
        v = fn(x_t[i : i + chunk], batch.t[i : i + chunk], batch.y[i : i + chunk])
        total += (v - target[i : i + chunk]).pow(2).sum().item()
    return total / target.numel()


def time_grid(steps: int, shift: float = 1.0) -> Tensor:
    """Decreasing times 1 = t_0 > ... > t_steps = 0 for the Euler sampler."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1), shift)


@torch.no_grad()
def euler_sample(
    fn: VelocityFn,
    labels: Tensor,
    shape: tuple[int, ...],
    *,
    steps: int,
    cfg_scale: float = 1.0,
    null_label: int,
    generator: torch.Generator,
    shift: float = 1.0,
    noise: Tensor | None = None,
    guidance: str = "cfg",
    uncond_fn: VelocityFn | None = None,
) -> Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to 0; when g = cfg_scale != 1:
    cfg: v = v_null + g (v_cond - v_null), one batch-2 call of `fn`;
    pdg (Path-Drop Guidance, SPRINT): v = v_u + g (v_cond - v_u), v_cond = fn(labels) and v_u = uncond_fn(null
    label) -- the dense-only net (token_drop.dense_only_fn): two batch-1 calls, the second over the dense slots only."""
    if guidance not in SAMPLER_GUIDANCE:
        raise DitnasError(f"guidance {guidance!r} unknown; choose one of {', '.join(SAMPLER_GUIDANCE)}")
    if guidance == "pdg" and uncond_fn is None and cfg_scale != 1.0:
        raise ValueError("guidance pdg needs uncond_fn, the dense-only velocity (token_drop.dense_only_fn)")
    n = labels.shape[0]
    x = noise if noise is not None else torch.randn((n, *shape), generator=generator)
    times = time_grid(steps, shift)
    null = torch.full_like(labels, null_label)
    for i in range(steps):
        t, t_next = times[i], times[i + 1]
        tt = torch.full((n,), float(t))
        if cfg_scale == 1.0:
            v = fn(x, tt, labels)
        elif guidance == "pdg":
            v_cond, v_u = fn(x, tt, labels), uncond_fn(x, tt, null)
            v = v_u + cfg_scale * (v_cond - v_u)
        else:
            both = fn(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
            v_cond, v_null = both[:n], both[n:]
            v = v_null + cfg_scale * (v_cond - v_null)
        x = x + (t_next - t) * v
    return x
