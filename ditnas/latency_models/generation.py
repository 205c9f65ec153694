"""The sampler as it runs on a device: a denoiser program + a host loop of Euler steps.

Design (compress-export-notes.md: `torch.while_loop` exports but ExecuTorch's emitter rejects it,
issue #8769; the ExecuTorch LCM example runs the steps from the host, PR #15075):

- `DenoiserProgram(sub, cfg_scale)`: forward(x, t, y) -> v at the caller's batch (1 on a phone).
  With guidance (cfg_scale not 0 or 1) the program itself runs the batch-2 [cond, null] call and
  combines v = v_u + s (v_c - v_u), exactly as `flow.euler_sample` does. Chosen *inside* the
  program: the host loop stays the same 3-line loop with or without guidance, one call per step,
  and the device never sees the doubled batch. Cost: the scale is baked in (another scale = another
  export), recorded in the .pte's sidecar.
  ExportConfig's convention: cfg_scale 0 means "no guidance" (as 1 does: v_u + 1 (v_c - v_u) = v_c).
- The host loop (`run_generation`): x <- x + (t_next - t) v on `flow.time_grid(steps, shift)`, the
  arithmetic of `euler_sample` step for step (tested equal to 1e-6 in eager).
- `UnrolledSampler`: all `steps` denoiser calls in one graph (the loop unrolled by torch.export),
  forward(noise, y) -> x_0; an option to measure, not the default.
- `time_generation(pte, ...)`: ms per WHOLE generation (steps back to back, x fed back each step)
  in a fresh interpreter, as pte_timer.py times programs (a .pte lowered in the timing process ran
  ~8% slower). Run as `python -m ditnas.latency_models.generation <request.pt> <result.pt>`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ditnas.errors import DitnasError
from ditnas.supernet.flow import time_grid
from ditnas.supernet.token_drop import check_pdg_dense

VelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def guided(cfg_scale: float) -> bool:
    """Whether `cfg_scale` asks for guidance (0 = none, ExportConfig; 1 = v_c, no null call needed)."""
    return cfg_scale not in (0.0, 1.0)


class DenoiserProgram(nn.Module):
    """forward(x, t, y) -> velocity; with guidance its calls and the combination run inside (see the module
    docstring): `cfg` one batch-2 [cond, null] call; `pdg` (Path-Drop Guidance) the full net on the labels and
    its dense-only net (`pdg_dense` slots at each end, every middle slot skipped: token_drop.dense_only_plan) on
    the null label, two batch-1 calls. `null_label` defaults to the arch's class count."""

    def __init__(self, sub: nn.Module, cfg_scale: float = 0.0, null_label: int | None = None, *,
                 guidance: str = "cfg", pdg_dense: int = 1) -> None:
        super().__init__()
        if not math.isfinite(cfg_scale) or cfg_scale < 0:
            raise DitnasError(f"denoiser: cfg_scale={cfg_scale!r} must be a finite number >= 0 (0 = no guidance)")
        if guidance not in ("none", "cfg", "pdg"):
            raise DitnasError(f"denoiser: guidance {guidance!r} is not none, cfg or pdg")
        self.sub = sub
        self.cfg_scale = float(cfg_scale)
        self.guided = guided(cfg_scale) and guidance != "none"
        self.guidance = guidance if self.guided else "none"
        arch = getattr(sub, "arch", None)
        if self.guidance == "pdg":
            check_pdg_dense(int(pdg_dense), len(arch.slots), "denoiser: pdg_dense")
        self.pdg_dense = int(pdg_dense)
        self.null_label = int(null_label if null_label is not None else arch.num_classes)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        if not self.guided:
            return self.sub(x, t, y)
        null = torch.full_like(y, self.null_label)
        if self.guidance == "pdg":
            v_cond, v_u = self.sub(x, t, y), self.sub(x, t, null, dense=self.pdg_dense, path_drop=True)
            return v_u + self.cfg_scale * (v_cond - v_u)
        n = x.shape[0]
        both = self.sub(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        v_cond, v_null = both[:n], both[n:]
        return v_null + self.cfg_scale * (v_cond - v_null)

    def describe(self) -> dict[str, Any]:
        out = {"kind": "denoiser", "cfg_scale": self.cfg_scale, "guided": self.guided, "cfg_inside": True,
               "guidance": self.guidance, "null_label": self.null_label}
        return {**out, "pdg_dense": self.pdg_dense} if self.guidance == "pdg" else out


class UnrolledSampler(nn.Module):
    """All `steps` Euler steps of `denoiser` in one graph: forward(noise, y) -> x_0."""

    def __init__(self, denoiser: DenoiserProgram, steps: int, shift: float = 1.0) -> None:
        super().__init__()
        if steps < 1:
            raise DitnasError(f"unrolled sampler: steps={steps} must be >= 1")
        self.denoiser, self.steps, self.shift = denoiser, int(steps), float(shift)
        self.times = [float(v) for v in time_grid(steps, shift)]

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        grid = time_grid(self.steps, self.shift)  # float32 tensor: the same dt as the host loop
        for i in range(self.steps):
            tt = torch.full((x.shape[0],), self.times[i], dtype=x.dtype)
            x = x + (grid[i + 1] - grid[i]) * self.denoiser(x, tt, y)
        return x

    def describe(self) -> dict[str, Any]:
        return {**self.denoiser.describe(), "kind": "unrolled", "steps": self.steps, "shift": self.shift}


def as_velocity_fn(fn: Any) -> VelocityFn:
    """An eager module/callable, or a loaded ExecuTorch `Method` (has `.execute(list) -> outputs`)."""
    if hasattr(fn, "execute") and not isinstance(fn, nn.Module):
        method = fn
        return lambda x, t, y: method.execute([x, t, y])[0]
    if callable(fn):
        return fn
    raise DitnasError(f"run_generation: {type(fn).__name__} is neither a callable nor an ExecuTorch method")


@torch.no_grad()
def run_generation(
    fn: Any,
    x: Tensor,
    y: Tensor,
    steps: int,
    cfg_scale: float = 0.0,
    shift: float = 1.0,
    *,
    cfg_inside: bool = True,
    null_label: int | None = None,
) -> Tensor:
    """Integrate dx/dt = v from t = 1 (x = noise) to 0 in `steps` Euler steps; returns the samples.

    `fn` is a velocity program (eager module or loaded Method). With `cfg_inside` (a DenoiserProgram,
    or no guidance) each step is one call; otherwise a guided step calls `fn` on (x, y) and on
    (x, null_label) and combines them here, for plain velocity programs (profiling model programs).
    """
    if steps < 1:
        raise DitnasError(f"run_generation: steps={steps} must be >= 1")
    velocity = as_velocity_fn(fn)
    n = x.shape[0]
    times = time_grid(steps, shift)
    host_cfg = guided(cfg_scale) and not cfg_inside
    if host_cfg and null_label is None:
        raise DitnasError("run_generation: guidance on the host needs null_label (the class count of the model)")
    null = torch.full_like(y, null_label) if host_cfg else None
    for i in range(steps):
        t, t_next = times[i], times[i + 1]
        tt = torch.full((n,), float(t))
        if host_cfg:
            v_cond, v_null = velocity(x, tt, y), velocity(x, tt, null)
            v = v_null + cfg_scale * (v_cond - v_null)
        else:
            v = velocity(x, tt, y)
        x = x + (t_next - t) * v
    return x


# ----------------------------------------------------------------------------------------------
# timing whole generations of a .pte
# ----------------------------------------------------------------------------------------------
def generation_spec(pte: Path, steps: int, cfg_scale: float | None) -> dict[str, Any]:
    """What one generation of `pte` is: its input shapes/dtypes and how many calls it takes."""
    from ditnas.latency_models.lowering import read_sidecar

    side = read_sidecar(pte)
    gen = side.get("generation") or {"kind": "velocity", "cfg_inside": False}
    inputs = side.get("inputs") or []
    kind = gen.get("kind", "velocity")
    if kind == "unrolled":
        if steps != gen["steps"]:
            raise DitnasError(f"{pte} is an unrolled {gen['steps']}-step sampler; time it with steps={gen['steps']}, "
                              f"not {steps}")
        if len(inputs) != 2:
            raise DitnasError(f"{pte}: an unrolled sampler takes (noise, y), its sidecar records {len(inputs)} inputs")
    elif len(inputs) != 3:
        raise DitnasError(f"{pte} takes {len(inputs)} inputs, not (x, t, y); it is not a ditnas denoiser program")
    if gen.get("cfg_inside") and cfg_scale is not None:
        if guided(cfg_scale) != gen["guided"] or (gen["guided"] and cfg_scale != gen["cfg_scale"]):
            raise DitnasError(f"{pte} computes guidance cfg_scale={gen['cfg_scale']:g} inside; time it with that "
                              f"cfg_scale (or None), not {cfg_scale:g} -- another scale needs another export")
    scale = gen.get("cfg_scale", 0.0) if cfg_scale is None else cfg_scale
    return {"kind": kind, "inputs": inputs, "steps": steps, "cfg_scale": scale,
            "cfg_inside": bool(gen.get("cfg_inside", False)), "null_label": gen.get("null_label")}


def _example_inputs(spec: dict[str, Any], seed: int = 0) -> tuple[Tensor, Tensor]:
    """Realistic start values: unit Gaussian noise of the recorded latent shape and label 0."""
    x_spec, y_spec = spec["inputs"][0], spec["inputs"][-1]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_spec["shape"], generator=g, dtype=getattr(torch, x_spec["dtype"]))
    y = torch.zeros(y_spec["shape"], dtype=getattr(torch, y_spec["dtype"]))
    return x, y


def _generation_call(method: Any, spec: dict[str, Any]) -> Callable[[], Tensor]:
    x, y = _example_inputs(spec)
    if spec["kind"] == "unrolled":
        return lambda: method.execute([x, y])[0]
    # assumption: a plain profiling program records no null label; the label's value does not change
    # the time (one embedding row), so the digits' null label 10 stands in
    null = spec["null_label"] if spec["null_label"] is not None else 10
    return lambda: run_generation(method, x, y, spec["steps"], spec["cfg_scale"], cfg_inside=spec["cfg_inside"],
                                  null_label=null)


def time_generation_here(pte: Path, spec: dict[str, Any], threads: int, warmup: int, iters: int) -> list[float]:
    from ditnas.latency_models.backends.executorch_xnnpack import (
        ExecuTorchXnnpackBackend,
        load_method,
        set_et_threads,
    )

    set_et_threads(threads)
    try:
        program = ExecuTorchXnnpackBackend.load(pte)
    except RuntimeError as exc:
        raise DitnasError(f"{pte} is not a loadable .pte ({exc}); export it again") from None
    method = load_method(program, str(pte), pte)
    call = _generation_call(method, spec)
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter_ns()
        out = call()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    if not bool(torch.isfinite(out).all()):
        raise DitnasError(f"{pte}: a timed generation produced non-finite samples; the program is broken, export it again")
    del call, method, program
    return times


def time_generation(
    pte: Path,
    *,
    steps: int,
    cfg_scale: float | None,
    threads: int = 1,
    warmup: int = 2,
    iters: int = 10,
    fresh_process: bool = True,
    timeout_s: float | None = None,
) -> list[float]:
    """Milliseconds per WHOLE generation of the .pte (`steps` denoiser calls back to back, each fed
    the x of the previous step; or one call of an unrolled sampler), `iters` samples after `warmup`.

    `pte` must carry a ditnas sidecar (lowering.write_pte): a denoiser export (CFG inside, its
    recorded scale must equal `cfg_scale`, None = the recorded one), an unrolled sampler (`steps`
    must equal its own), or a plain (x, t, y) velocity program (guided steps then take two calls).
    """
    from ditnas.latency_models.backends.base import check_counts

    pte = Path(pte)
    if not pte.is_file():
        raise DitnasError(f"{pte} does not exist; pass a .pte written by ditnas export or profile")
    check_counts(warmup, iters)
    if steps < 1 or threads < 1:
        raise DitnasError(f"time_generation: steps={steps} and threads={threads} must be >= 1")
    spec = generation_spec(pte, steps, cfg_scale)
    if not fresh_process:
        return time_generation_here(pte, spec, threads, warmup, iters)
    return time_in_fresh_process(pte, [spec], threads, warmup, iters, timeout_s)[0]


def time_in_fresh_process(pte: Path, specs: list[dict[str, Any]], threads: int, warmup: int, iters: int,
                          timeout_s: float | None = None) -> list[list[float]]:
    """Time several generation specs of one .pte in one fresh interpreter (one start-up cost)."""
    from ditnas.latency_models.backends.fresh_process import run_fresh

    request = {"pte": str(pte), "specs": specs, "threads": threads, "warmup": warmup, "iters": iters}
    runs = run_fresh(__name__, request, what=f"the generation timing process for {pte}", timeout_s=timeout_s,
                     debug="re-run with fresh_process=False to debug")
    if len(runs) != len(specs) or any(len(t) != iters or not all(math.isfinite(v) and v > 0 for v in t) for t in runs):
        raise DitnasError(f"the generation timing process for {pte} returned bad samples; re-run it")
    return [[float(v) for v in t] for t in runs]


def _job(spec: dict[str, Any]) -> list[list[float]]:
    # assumption: specs are timed one after another, not interleaved: each is a whole generation,
    # long next to the drift interleaving guards against in the per-program tables
    return [time_generation_here(Path(spec["pte"]), one, spec["threads"], spec["warmup"], spec["iters"])
            for one in spec["specs"]]


if __name__ == "__main__":
    from ditnas.latency_models.backends.fresh_process import serve

    sys.exit(serve(_job, sys.argv[1:3]))

