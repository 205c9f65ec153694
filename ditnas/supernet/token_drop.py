"""Token dropping (SPRINT, structured 75% drop) and path drop: the middle of an arch on a quarter of the tokens.

SPRINT (Snap, ICLR 2026; shared/reference/grafting-sprint.md): the first and last blocks of a DiT see every
token; the middle blocks see one token of every 2x2 group, at a random offset per group. Here:

- `dense` slots at EACH end of the arch are the dense encoder/decoder; the slots between them are the middle;
- right before the first middle slot the token grid (T, H, W) is gathered to its kept sub-grid (T, H/2, W/2)
  (`keep` = one offset in {0,1}^2 per 2x2 group, drawn by `draw_keep`); the middle slots -- their stage
  transitions and the U-Net skip tensors saved inside the middle included -- run on the sub-grid as on any
  grid; after the last middle slot the kept tokens are scattered back to their positions and the dropped
  positions keep the value they had before the middle (residual pass-through, TREAD-style reinsertion);
- path drop: every middle slot skipped (stage transitions still run, as for any skipped slot): the
  "dense-only" network, which Path-Drop Guidance's unconditional branch runs (flow.euler_sample, guidance=pdg).

# assumption: no fusion Linear (SPRINT concatenates the sparse output, mask tokens at dropped positions, with
# the encoder output and projects 2D -> D): it would change every deployed/exported arch; the lead chose
# residual reinsertion (TREAD) instead, so a token-drop-trained model has exactly the usual weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ditnas.errors import ConfigFieldError, DitnasError

Grid = tuple[int, int, int]
DROP_RATIO = 0.75  # SPRINT: keep 1 token of every 2x2 group; the only ratio a 2x2 structured drop gives


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
def check_token_drop(tc, depth: int) -> bool:
    """Validate the train.token_drop* / train.path_drop fields for a space of `depth` slots; True if any is on."""
    if tc.token_drop not in (0.0, DROP_RATIO):
        raise ConfigFieldError("train.token_drop", f"{tc.token_drop:g}: only 0 (off) and {DROP_RATIO} (SPRINT's "
                               "structured drop: one token of every 2x2 group kept) are supported")
    if not 0.0 <= tc.token_drop_finetune <= 1.0:
        raise ConfigFieldError("train.token_drop_finetune", f"{tc.token_drop_finetune:g} must lie in [0, 1] (the share "
                               "of the last steps trained on every token)")
    if not 0.0 <= tc.path_drop <= 1.0:
        raise ConfigFieldError("train.path_drop", f"{tc.path_drop:g} must lie in [0, 1] (probability per step that the "
                               "middle slots are skipped)")
    active = tc.token_drop > 0 or tc.path_drop > 0
    if active:
        # assumption: at least one dense slot per end: the dense ends are what predicts the dropped tokens
        if tc.token_drop_dense < 1:
            raise ConfigFieldError("train.token_drop_dense", f"{tc.token_drop_dense} must be >= 1 dense slot at each end")
        if 2 * tc.token_drop_dense >= depth:
            raise ConfigFieldError("train.token_drop_dense", f"{tc.token_drop_dense} dense slots at each end of a depth-"
                                   f"{depth} arch leave no middle slot to drop tokens from; use at most {(depth - 1) // 2}")
    return active


# ----------------------------------------------------------------------------------------------
# the keep pattern: draw, gather, scatter
# ----------------------------------------------------------------------------------------------
def half(grid: Grid) -> Grid:
    return (grid[0], grid[1] // 2, grid[2] // 2)


def gather_grid(stages: list[int], dense: int, grid0: Grid) -> Grid:
    """The token grid right before the first middle slot (the stage of slot dense-1), given the stage-0 grid."""
    return grid0 if stages[dense - 1] == 0 else half(grid0)


def draw_keep(generator: torch.Generator, batch: int, grid: Grid) -> Tensor:
    """Offsets (B, T, H/2, W/2) in 0..3 (= 2*di + dj): which token of each 2x2 group of `grid` is kept.

    # assumption: drawn independently per sample, per frame and per group (SPRINT draws per group; a
    # per-sample pattern gives the middle blocks more position variety per batch than one per batch)."""
    t, h, w = grid
    return torch.randint(0, 4, (batch, t, h // 2, w // 2), generator=generator)


def keep_index(offsets: Tensor, grid: Grid) -> Tensor:
    """Flat token positions (B, T*H/2*W/2) of the kept tokens of `grid`, in the sub-grid's row-major order.

    Each frame's groups keep tokens of that frame only, so a frame-causal model stays frame-causal."""
    t, h, w = grid
    b = offsets.shape[0]
    if tuple(offsets.shape[1:]) != (t, h // 2, w // 2) or h % 2 or w % 2:
        raise ValueError(f"keep offsets of shape {tuple(offsets.shape)} do not fit the token grid {tuple(grid)} "
                         f"(need (B, {t}, {h // 2}, {w // 2}) on an even grid)")
    dev = offsets.device
    ti = torch.arange(t, device=dev).reshape(1, t, 1, 1)
    hi = 2 * torch.arange(h // 2, device=dev).reshape(1, 1, -1, 1) + offsets // 2
    wi = 2 * torch.arange(w // 2, device=dev).reshape(1, 1, 1, -1) + offsets % 2
    return ((ti * h + hi) * w + wi).reshape(b, -1)


def gather_tokens(h: Tensor, index: Tensor) -> Tensor:
    """(B, N, D) -> (B, K, D): the tokens at `index` (B, K)."""
    return torch.gather(h, 1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))


def scatter_tokens(full: Tensor, sub: Tensor, index: Tensor) -> Tensor:
    """`full` (B, N, D) with the tokens at `index` (B, K) replaced by `sub` (B, K, D); out of place."""
    return full.scatter(1, index.unsqueeze(-1).expand(-1, -1, full.shape[-1]), sub.to(full.dtype))  # bf16 autocast


# ----------------------------------------------------------------------------------------------
# plans (model._walk's list of slot entries): can the middle run on the sub-grid; the dense-only plan
# ----------------------------------------------------------------------------------------------
def mixer_runs_on(mixer: torch.nn.Module, grid: Grid) -> bool:
    """Whether a token mixer accepts `grid` (SSA pools by its stride; ASSA compresses 2x2 and splits blocks)."""
    from ditnas.supernet.ops import ASSA, SSA

    t, h, w = grid
    if isinstance(mixer, SSA) and mixer.stride > 1:
        return h % mixer.stride == 0 and w % mixer.stride == 0
    if isinstance(mixer, ASSA):
        if h % 2 or w % 2 or (t * h * w) % mixer.bna_blocks:
            return False
        return not mixer.causal or (h * w) % mixer.bna_blocks == 0
    return True


def sparse_plan_ok(plan: list, dense: int, grid0: Grid) -> bool:
    """Whether the middle of `plan` can run on the kept sub-grid. False (the forward then runs dense) if there
    is no middle, the grid at the drop point has an odd side, a 2x2 merge inside the middle meets an odd
    sub-grid, the middle would pop a U-Net skip tensor saved before it (or end at another stage than it
    started), or a middle op cannot run on its sub-grid (SSA stride, ASSA blocks)."""
    n = len(plan)
    lo, hi = dense, n - dense
    if dense < 1 or lo >= hi:
        return False
    start = plan[lo - 1][0]
    grid = gather_grid([e[0] for e in plan], dense, grid0)
    if grid[1] % 2 or grid[2] % 2:
        return False
    grid, stage, pushed = half(grid), start, 0
    for i in range(lo, hi + 1):  # entry hi's transition still runs on the sub-grid (the scatter follows it)
        slot_stage, block, op = plan[i][:3]
        if slot_stage != stage:
            if slot_stage == 1:
                if grid[1] % 2 or grid[2] % 2:
                    return False
                grid, pushed = half(grid), pushed + 1
            else:
                if pushed == 0:
                    return False
                grid, pushed = (grid[0], 2 * grid[1], 2 * grid[2]), pushed - 1
            stage = slot_stage
        if i < hi and block is not None and not mixer_runs_on(block.mixers[op], grid):
            return False
    return pushed == 0 and stage == start


def dense_only_plan(plan: list, dense: int) -> list:
    """`plan` with every middle slot replaced by a skip at its stage (transitions still run): path drop.

    A forward flag rather than a dense-only `Arch`: SearchSpace.validate refuses skips in non-skippable
    slots, and an Arch without its middle would have another residual-stream width (its widest block)."""
    n = len(plan)
    return [(e[0], None, None, 0, 0, "") if dense <= i < n - dense else e for i, e in enumerate(plan)]


# ----------------------------------------------------------------------------------------------
# trainers: when to drop, and the per-step options of model.run / SubDiT.forward
# ----------------------------------------------------------------------------------------------
class DropSchedule:
    """train.token_drop / token_drop_dense / token_drop_finetune / path_drop for one training run.

    `options(step, batch, stages_of, shard)` draws this step's pattern from `generator` (a trainer's seeded,
    checkpointed RNG) and returns a function arch -> keyword arguments of `run`/`forward` ({} = dense, so
    with everything off the trainers call the model exactly as before)."""

    def __init__(self, tc, depth: int, grid0: Grid, generator: torch.Generator):
        self.active = check_token_drop(tc, depth)
        self.tc, self.grid0, self.generator = tc, grid0, generator
        self.dense = tc.token_drop_dense
        # SPRINT: long pre-training with the drop, then a short full-token fine-tune (the last share of the steps)
        self.drop_until = round((1.0 - tc.token_drop_finetune) * tc.steps) if tc.token_drop > 0 else 0

    def options(self, step: int, batch: int, shard: Callable[[Tensor], Tensor] = lambda t: t,
                device: torch.device | str = "cpu") -> Callable[[list[int]], dict]:
        if not self.active:
            return lambda stages: {}
        # assumption: one path-drop draw per step, for every pass of the step (max and subnets, whole batch:
        # conditional and null labels alike), so the in-place distillation target is the max net's dense-only
        # velocity when the students run dense-only; applied in the full-token fine-tune too (PDG needs it)
        if self.tc.path_drop > 0 and torch.rand(1, generator=self.generator).item() < self.tc.path_drop:
            return lambda stages: {"dense": self.dense, "path_drop": True}
        if step >= self.drop_until:
            return lambda stages: {}
        patterns: dict[Grid, Tensor] = {}

        def for_arch(stages: list[int]) -> dict:
            grid = gather_grid(stages, self.dense, self.grid0)
            if grid not in patterns:  # one pattern per drop grid per step: the max net and its subnets share it
                patterns[grid] = shard(draw_keep(self.generator, batch, grid)).to(device)
            return {"keep": patterns[grid], "dense": self.dense}

        return for_arch


def check_pdg_dense(dense: int, depth: int, field: str) -> None:
    """DitnasError unless `dense` slots at each end of a depth-`depth` arch leave a middle for PDG to skip."""
    if not 1 <= dense < depth - dense:
        raise DitnasError(f"{field}: {dense} dense slots at each end of a depth-{depth} arch leave no middle slot for "
                          f"Path-Drop Guidance to skip; give 1 <= dense < depth / 2")


def dense_only_fn(model: torch.nn.Module, dense: int, arch=None) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """A (x_t, t, y) -> v function of `model` (a supernet's `arch`, or a standalone SubDiT) with every middle
    slot skipped: Path-Drop Guidance's unconditional branch."""
    if hasattr(model, "space"):  # ElasticDiT
        target = arch or model.space.max_arch()
        return lambda x, t, y: model.run(target, x, t, y, dense=dense, path_drop=True)
    return lambda x, t, y: model(x, t, y, dense=dense, path_drop=True)
