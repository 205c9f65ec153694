"""FLOPs, parameters and peak memory of sub-DiTs: counts where exact, estimates where not.

Counting convention (one for the whole project):
- **MACs** are the multiply-accumulates of the matmul-like ops fvcore knows (linear, addmm, mm, bmm,
  matmul, einsum, convolution) plus `scaled_dot_product_attention` (our handle: QK^T + AV).
- **FLOPs = 2 * MACs + elementwise FLOPs.** fvcore itself reports MACs as "flops" (1 fused multiply-add
  = 1, toolchain.md §5); every MAC handle here is wrapped to return 2 * MACs so totals, `by_operator`
  and `by_module` are all in FLOPs.
- **Elementwise FLOPs** are counted per output element (reductions and pooling per input element) with
  the costs in `ELEMENTWISE_COST` -- fvcore warns about and skips every one of these (softmax, gelu,
  silu, add, mul, ...). They matter little for FLOPs but they are where adaLN, gating, norms and
  RoPE live.
  # assumption: costs are nominal op counts (softmax 5 = max, sub, exp, sum, div; tanh-GELU 8;
  # sigmoid 4; silu 5; every other pointwise op 1); integer/bool tensors (mask construction) are free.

Our attention is hand-written (`torch.bmm` + explicit softmax, ops.py), which fvcore's bmm handle
already counts; the SDPA handle is for completeness (and fvcore without it counts SDPA as 0, tested).

`block_macs_analytic` / `arch_macs_analytic` are closed forms of the same MACs (tests: equal to the
fvcore count exactly for every op), fast enough to price every candidate of a search.

Peak memory (`memory_estimate`) is an analytic **estimate**, not a measurement: see its docstring.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

with warnings.catch_warnings():
    # fvcore decorates helpers with torch.jit.script at import (deprecated since torch 2.11, still works)
    warnings.simplefilter("ignore", DeprecationWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS
    from fvcore.nn.jit_handles import get_shape

from ditnas.arch import Arch
from ditnas.errors import DitnasError
from ditnas.latency_models.programs import (
    Cell,
    build_program,
    cells_for_arch,
    model_program,
)
from ditnas.supernet.model import ElasticDiT

__all__ = [
    "ELEMENTWISE_COST",
    "FlopReport",
    "MemoryEstimate",
    "arch_bytes_moved",
    "arch_flops",
    "arch_macs_analytic",
    "block_macs_analytic",
    "block_memory_elements",
    "bna_band_entries",
    "cell_macs_analytic",
    "count_flops",
    "memory_estimate",
    "peak_memory_bytes",
    "sdpa_macs",
]

Handle = Callable[[list, list], Any]

# fvcore's own handles that count multiply-accumulates (we double them to FLOPs)
MAC_OPS = ("aten::addmm", "aten::bmm", "aten::_convolution", "aten::einsum", "aten::matmul", "aten::mm", "aten::linear")
SDPA_OP = "aten::scaled_dot_product_attention"
SOFTMAX_COST = 5  # assumption: max, subtract, exp, sum, divide per element

# FLOPs per output element (per input element for reductions/pooling: see _INPUT_COUNTED)
ELEMENTWISE_COST: dict[str, int] = {
    **{
        f"aten::{op}": 1
        for op in (
            "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "abs", "reciprocal",
            "rsqrt", "sqrt", "exp", "log", "log1p", "pow", "tanh", "cos", "sin", "relu", "relu_", "clamp",
            "clamp_", "clamp_min", "maximum", "minimum", "where", "mean", "sum", "avg_pool2d", "avg_pool3d",
        )
    },
    "aten::softmax": SOFTMAX_COST,
    "aten::sigmoid": 4,  # neg, exp, add, reciprocal
    "aten::silu": 5,  # sigmoid + mul
    "aten::gelu": 8,  # tanh form: x^3, fma, scale, tanh, +1, *0.5x (assumption: erf form costed the same)
    "aten::softplus": 3,  # exp, add, log
}
_INPUT_COUNTED = {"aten::mean", "aten::sum", "aten::avg_pool2d", "aten::avg_pool3d"}


def _is_float(value: Any) -> bool:
    try:
        kind = value.type().scalarType()
    except (AttributeError, RuntimeError):
        return False
    return kind in ("Float", "Half", "BFloat16", "Double")


def _numel(value: Any) -> int:
    shape = get_shape(value)
    return math.prod(shape) if shape else 0


def _doubled(handle: Handle) -> Handle:
    def flops(inputs: list, outputs: list) -> int | Counter:
        macs = handle(inputs, outputs)
        if isinstance(macs, Counter):  # fvcore's conv handle names its op ("conv")
            return Counter({k: 2 * int(v) for k, v in macs.items()})
        return 2 * int(macs)

    return flops


def _elementwise(op: str, cost: int) -> Handle:
    use_input = op in _INPUT_COUNTED

    def flops(inputs: list, outputs: list) -> int:
        value = inputs[0] if use_input else outputs[0]
        # scalar arithmetic on sizes and integer/bool mask building trace as aten ops too: free
        if not _is_float(value):
            return 0
        return cost * _numel(value)

    return flops


def sdpa_macs(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> int:
    """MACs of softmax(QK^T)V on (..., L, E) x (..., S, E) x (..., S, Ev): batch*heads*L*S*(E+Ev)."""
    batch = math.prod(q_shape[:-2])
    return batch * q_shape[-2] * k_shape[-2] * (q_shape[-1] + v_shape[-1])


def _sdpa_handle(inputs: list, outputs: list) -> Counter:
    q, k, v = (get_shape(i) for i in inputs[:3])
    scores = math.prod(q[:-2]) * q[-2] * k[-2]
    # the matmuls under SDPA's own name, the softmax it contains under softmax (as our bmm attention)
    return Counter({"scaled_dot_product_attention": 2 * sdpa_macs(q, k, v), "softmax": SOFTMAX_COST * scores})


# data movement and mask building: no arithmetic (None = count nothing, and do not report them)
ZERO_COST_OPS = (
    "aten::pad", "aten::constant_pad_nd", "aten::embedding", "aten::repeat", "aten::repeat_interleave",
    "aten::le", "aten::lt", "aten::ne", "aten::logical_not", "aten::meshgrid", "aten::clone",
)  # fmt: skip


def _handles(elementwise: bool) -> dict[str, Handle | None]:
    handles: dict[str, Handle | None] = {op: _doubled(_DEFAULT_SUPPORTED_OPS[op]) for op in MAC_OPS}
    handles.update(dict.fromkeys(ZERO_COST_OPS))
    handles[SDPA_OP] = _sdpa_handle
    for op, cost in ELEMENTWISE_COST.items():
        handles[op] = _elementwise(op, cost) if elementwise else None  # None: ignore, no warning
    return handles


_MAC_NAMES = {op.split("::")[1] for op in MAC_OPS} | {"conv", "scaled_dot_product_attention"}


@dataclass
class FlopReport:
    """FLOPs (= 2*MACs + elementwise), MACs and parameters of one module call or one arch."""

    flops: int
    macs: int
    elementwise_flops: int
    params: int
    by_operator: dict[str, int] = field(default_factory=dict)  # FLOPs per aten op (short name)
    by_module: dict[str, int] = field(default_factory=dict)  # FLOPs per submodule path (or cell key)
    unsupported: dict[str, int] = field(default_factory=dict)  # ops still uncounted: name -> calls
    note: str = ""

    def __add__(self, other: FlopReport) -> FlopReport:
        by_op = Counter(self.by_operator)
        by_op.update(other.by_operator)
        uns = Counter(self.unsupported)
        uns.update(other.unsupported)
        return FlopReport(
            self.flops + other.flops,
            self.macs + other.macs,
            self.elementwise_flops + other.elementwise_flops,
            self.params + other.params,
            dict(by_op),
            {**self.by_module, **other.by_module},
            dict(uns),
            self.note or other.note,
        )


def count_flops(
    module: nn.Module,
    inputs: tuple[Tensor, ...] | Tensor,
    *,
    elementwise: bool = True,
    depth: int = 2,
) -> FlopReport:
    """Trace `module(*inputs)` with fvcore (TorchScript) and count FLOPs with our handles.

    `depth` limits the per-module breakdown to module paths with at most that many dots-separated parts.
    """
    inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    fca = FlopCountAnalysis(module, inputs)
    for op, handle in _handles(elementwise).items():
        fca.set_op_handle(op, handle)
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    logging.getLogger("fvcore").setLevel(logging.ERROR)  # silence "unsupported operator" chatter
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fvcore's TorchScript tracing (toolchain.md §5)
        total = int(fca.total())
        by_op = {k: int(v) for k, v in fca.by_operator().items()}
        by_module = {k: int(v) for k, v in fca.by_module().items() if k and k.count(".") < depth and v}
        unsupported = {k: int(v) for k, v in fca.unsupported_ops().items()}
    mac_flops = sum(v for k, v in by_op.items() if k in _MAC_NAMES)
    return FlopReport(
        flops=total,
        macs=mac_flops // 2,
        elementwise_flops=total - mac_flops,
        params=sum(p.numel() for p in module.parameters()),
        by_operator=by_op,
        by_module=by_module,
        unsupported=unsupported,
    )


# ----------------------------------------------------------------------------------------------
# arch level (fvcore)
# ----------------------------------------------------------------------------------------------
_CELL_CACHE: dict[tuple[str, str, bool], FlopReport] = {}


def _net_key(supernet: ElasticDiT) -> str:
    # counts depend on shapes only, never on weight values: the config identifies them
    return repr(supernet.config_dict())


def cell_flops(supernet: ElasticDiT, cell: Cell, *, elementwise: bool = True) -> FlopReport:
    """fvcore count of one cell's standalone program (cached per supernet config and cell key)."""
    key = (_net_key(supernet), cell.key(), elementwise)
    if key not in _CELL_CACHE:
        program = build_program(supernet, cell)
        _CELL_CACHE[key] = count_flops(program.module, program.inputs, elementwise=elementwise)
    return _CELL_CACHE[key]


def arch_flops(supernet: ElasticDiT, arch: Arch, *, mode: str = "cells", elementwise: bool = True) -> FlopReport:
    """FLOPs of one velocity call of `arch` (batch 1).

    mode="cells": sum over the `cells_for_arch` programs (by_module is keyed by cell key; cached per
    cell, so a search re-traces nothing twice); mode="model": one trace of the whole SubDiT.
    `params` is always the SubDiT's own parameter count (cell programs share conditioning weights).
    """
    if mode not in ("cells", "model"):
        raise DitnasError(f"arch_flops: mode {mode!r} unknown; use 'cells' or 'model'")
    if mode == "model":
        program = model_program(supernet, arch)
        return count_flops(program.module, program.inputs, elementwise=elementwise)
    total: FlopReport | None = None
    for cell in cells_for_arch(supernet.space, arch):
        rep = cell_flops(supernet, cell, elementwise=elementwise)
        part = FlopReport(rep.flops, rep.macs, rep.elementwise_flops, 0, rep.by_operator, {cell.key(): rep.flops}, rep.unsupported)
        if total is None:
            total = part
        else:
            # the same cell can occur twice (repeated blocks): sum, do not overwrite
            merged = dict(total.by_module)
            merged[cell.key()] = merged.get(cell.key(), 0) + rep.flops
            total = total + part
            total.by_module = merged
    assert total is not None  # cells_for_arch always yields patch_embed and final
    total.params = supernet.extract(arch).num_params()
    return total


# ----------------------------------------------------------------------------------------------
# analytic MACs (closed forms of what the code computes; tested equal to fvcore)
# ----------------------------------------------------------------------------------------------
def block_macs_analytic(
    op: str,
    *,
    tokens: int,
    dim: int,
    heads: int,
    hidden: int,
    cond_dim: int,
    cond_tokens: int,
    grid: tuple[int, int, int] | None = None,
    kv_group: int = 2,
    ssa_stride: int = 2,
    lcha_kernel: tuple[int, int, int] = (3, 3, 3),
    assa_blocks: int = 4,
    assa_radius: int = 1,
    sparse_bna: bool = False,
) -> dict[str, int]:
    """MACs of one DiT block (batch 1) by term; `total` is their sum.

    N tokens, width d = heads * hd, FFN hidden units, M conditioning tokens of width cd:
    - modulation: cd * 6d (adaLN Linear on the conditioning vector, once per sample)
    - sa:   4 N d^2 (q, k, v, o) + 2 N^2 d (QK^T, AV)
    - gqa:  2 N d^2 + 2 N d d_kv + 2 N^2 d, d_kv = ceil(heads / kv_group) * hd (fold or repeat: same MACs)
    - ssa:  sa over N' = N / s^2 pooled tokens (x is pooled before the projections)
    - assa: 4 N d^2 + N d heads (gate) + 2 N d (2x2/2 depthwise K/V compression) + 2 N (N/4) d (global)
            + local: 2 N^2 d as the reference code computes it (a dense masked matrix), or with
            sparse_bna=True the 2 * band * d a BNA kernel would do, band = bna_band_entries(...)
    - lcha: 5 N d^2 (q, k, v, mix, o) + 2 N d hd (phi on q, k) + 2 N d hd + N d (linear attention: K^T V,
            Q (K^T V), Q mean(K)) + kt kh kw N d (causal depthwise conv: every temporal tap runs)
    - cross: 2 N d^2 (q, o) + 2 M cd d (k, v) + 2 N M d
    - ffn: 2 N d hidden
    """
    n, d, h, m, cd = tokens, dim, heads, cond_tokens, cond_dim
    if h < 1 or d % h:
        raise DitnasError(f"block_macs_analytic: width {d} is not a whole number of {h} heads")
    hd = d // h
    terms = {"modulation": cd * 6 * d}
    if op in ("sa", "gqa"):
        kv_heads = -(-h // kv_group) if op == "gqa" else h
        dkv = kv_heads * hd
        terms["mixer_proj"] = 2 * n * d * d + 2 * n * d * dkv
        terms["mixer_attn"] = 2 * n * n * d
    elif op == "ssa":
        if grid is not None and (grid[1] % ssa_stride or grid[2] % ssa_stride):
            raise DitnasError(f"block_macs_analytic: grid {grid} not divisible by SSA stride {ssa_stride}")
        ns = n // (ssa_stride * ssa_stride)
        terms["mixer_proj"] = 4 * ns * d * d
        terms["mixer_attn"] = 2 * ns * ns * d
    elif op == "assa":
        terms["mixer_proj"] = 4 * n * d * d + n * d * h
        terms["mixer_compress"] = 2 * n * d  # per output token (N/4): 4 taps per channel, for k and v
        terms["mixer_attn_global"] = 2 * n * (n // 4) * d
        local = bna_band_entries(n, assa_blocks, assa_radius) if sparse_bna else n * n
        terms["mixer_attn_local"] = 2 * local * d
    elif op == "lcha":
        kt, kh, kw = lcha_kernel
        terms["mixer_proj"] = 5 * n * d * d
        terms["mixer_features"] = 2 * n * d * hd
        terms["mixer_attn"] = 2 * n * d * hd + n * d
        terms["mixer_conv"] = kt * kh * kw * n * d
    else:
        raise DitnasError(f"block_macs_analytic: unknown op {op!r}; known: sa, gqa, assa, lcha, ssa")
    terms["cross"] = 2 * n * d * d + 2 * m * cd * d + 2 * n * m * d
    terms["ffn"] = 2 * n * d * hidden
    terms["total"] = sum(terms.values())
    return terms


def bna_band_entries(n_tokens: int, blocks: int, radius: int) -> int:
    """Allowed (query, key) pairs of blockwise neighbourhood attention (= bna_mask(...).sum()), clipped ends."""
    nb = n_tokens // blocks
    neighbours = sum(min(b + radius, blocks - 1) - max(b - radius, 0) + 1 for b in range(blocks))
    return nb * nb * neighbours


def _block_kwargs(supernet: ElasticDiT) -> dict:
    cfg = supernet.cfg
    return {
        "cond_dim": cfg.cond_dim,
        "cond_tokens": cfg.cond_tokens,
        "kv_group": cfg.gqa_group,
        "ssa_stride": cfg.ssa_stride,
        "lcha_kernel": tuple(cfg.lcha_kernel),
        "assa_blocks": cfg.assa_blocks,
        "assa_radius": cfg.assa_radius,
    }


def _grid(supernet: ElasticDiT, stage: int) -> tuple[int, int, int]:
    space = supernet.space
    _, t, h, w = space.latent
    return (t, (h // space.patch_size) >> stage, (w // space.patch_size) >> stage)


def cell_macs_analytic(supernet: ElasticDiT, cell: Cell) -> int:
    """Closed-form MACs of one cell's program (batch 1)."""
    space, cfg = supernet.space, supernet.cfg
    d = supernet.heads_for(cell.width) * cfg.head_dim
    patch_in = space.patch_size**2 * space.latent[0]
    if cell.kind == "block":
        heads = supernet.heads_for(cell.width)
        hidden = round(cell.mlp_ratio * d)
        grid = _grid(supernet, cell.stage)
        return block_macs_analytic(
            cell.op, tokens=cell.tokens, dim=d, heads=heads, hidden=hidden, grid=grid, **_block_kwargs(supernet)
        )["total"]
    if cell.kind == "patch_embed":  # patch Linear + timestep MLP (256 -> cd -> cd); embeddings are lookups
        return cell.tokens * patch_in * d + 256 * cfg.cond_dim + cfg.cond_dim * cfg.cond_dim
    if cell.kind == "final":  # final adaLN (cd -> 2d) + output Linear
        return cfg.cond_dim * 2 * d + cell.tokens * d * patch_in
    if cell.kind == "down":  # merged 2x2 (4d) -> d on N/4 tokens
        return (cell.tokens // 4) * 4 * d * d
    if cell.kind == "up":  # d -> 4d on the half-resolution tokens
        return cell.tokens * d * 4 * d
    raise DitnasError(f"cell_macs_analytic: kind {cell.kind!r} has no closed form; use arch_macs_analytic")


def arch_macs_analytic(supernet: ElasticDiT, arch: Arch) -> int:
    """Closed-form MACs of one velocity call of `arch` (batch 1); equals `arch_flops(...).macs`."""
    return sum(cell_macs_analytic(supernet, cell) for cell in cells_for_arch(supernet.space, arch))


# ----------------------------------------------------------------------------------------------
# peak memory and bytes moved (estimates)
# ----------------------------------------------------------------------------------------------
STREAM_TENSORS = 2  # assumption: besides the residual stream, a block holds its normalised/modulated
# input and its branch output (both at the block's own width) while a branch runs


def block_memory_elements(
    op: str,
    *,
    tokens: int,
    dim: int,
    stream_dim: int,
    heads: int,
    hidden: int,
    cond_dim: int,
    cond_tokens: int,
    kv_group: int = 2,
    ssa_stride: int = 2,
    assa_blocks: int = 4,
    assa_radius: int = 1,
    head_dim: int | None = None,
) -> dict[str, int]:
    """Live activation elements of one block, per phase (batch 1). An estimate, see memory_estimate.

    base = N * stream_dim (residual) + STREAM_TENSORS * N * d; each phase adds its own tensors:
    - sa/gqa: q, k, v + the attention matrix heads * N * N
    - ssa: pooled input + q, k, v at N' = N / s^2 + heads * N'^2
    - assa: q, k, v + compressed k, v (N/4) + global scores heads * N * N/4 + local band heads * band
      (assumption: a BNA kernel that materialises only the band, as SnapGen++'s per-block loop; the
      reference PyTorch code materialises a dense masked N x N instead)
    - lcha: q, k, v + phi(q), phi(k) + conv branch output + the heads * hd^2 K^T V state (no N x N)
    - cross: q + k, v of the M conditioning tokens + heads * N * M
    - ffn: N * hidden
    """
    n, d, h = tokens, dim, heads
    hd = head_dim or d // h
    dkv = (-(-h // kv_group) if op == "gqa" else h) * hd
    if op in ("sa", "gqa"):
        mixer = n * d + 2 * n * dkv + h * n * n
    elif op == "ssa":
        ns = n // (ssa_stride * ssa_stride)
        mixer = ns * d + 3 * ns * d + h * ns * ns
    elif op == "assa":
        mixer = 3 * n * d + 2 * (n // 4) * d + h * n * (n // 4) + h * bna_band_entries(n, assa_blocks, assa_radius)
    elif op == "lcha":
        mixer = 6 * n * d + h * hd * hd
    else:
        raise DitnasError(f"block_memory_elements: unknown op {op!r}")
    return {
        "base": n * stream_dim + STREAM_TENSORS * n * d,
        "mixer": mixer,
        "cross": n * d + 2 * cond_tokens * d + h * n * cond_tokens,
        "ffn": n * hidden,
    }


@dataclass
class MemoryEstimate:
    """Peak memory of one velocity call: weights + the largest live activation set. An **estimate**."""

    weights_bytes: int
    activation_bytes: int  # the largest live set
    peak_bytes: int
    peak_at: str  # which cell / phase holds the largest live set
    label: str = "estimate"
    note: str = (
        "analytic estimate: weights + largest live activation set (no allocator overhead, no runtime "
        "workspace, softmax assumed in place); not a measurement"
    )


def _block_parts(supernet: ElasticDiT, cell: Cell, stream: int) -> dict[str, int]:
    kw = _block_kwargs(supernet)
    kw.pop("lcha_kernel")
    heads = supernet.heads_for(cell.width)
    d = heads * supernet.cfg.head_dim
    return block_memory_elements(
        cell.op, tokens=cell.tokens, dim=d, stream_dim=stream, heads=heads,
        hidden=round(cell.mlp_ratio * d), head_dim=supernet.cfg.head_dim, **kw,
    )  # fmt: skip


def _cell_phases(supernet: ElasticDiT, arch: Arch, cell: Cell) -> list[tuple[str, int]]:
    """(where, live activation elements) of each phase of one cell of `arch`, batch 1, without the
    U-Net skip tensor (added by the caller where it is live)."""
    space, cfg = supernet.space, supernet.cfg
    stream = supernet.stream_heads(arch) * cfg.head_dim
    patch_in = space.patch_size**2 * space.latent[0]
    n0 = arch.tokens(0)
    if cell.kind == "block":
        parts = _block_parts(supernet, cell, stream)
        return [(f"{cell.key()}:{phase}", parts["base"] + parts[phase]) for phase in ("mixer", "cross", "ffn")]
    if cell.kind == "patch_embed":
        return [(cell.key(), n0 * patch_in + n0 * stream)]
    if cell.kind == "final":
        return [(cell.key(), 2 * n0 * stream + n0 * patch_in)]
    if cell.kind == "down":  # stream (kept as the skip) + merged copy + half-resolution output
        return [(cell.key(), 2 * n0 * stream + (n0 // 4) * stream)]
    if cell.kind == "up":  # input + 4d expansion + skip + sum
        n1 = cell.tokens
        return [(cell.key(), n1 * stream + n1 * 4 * stream + 2 * n0 * stream)]
    raise DitnasError(f"memory estimate: cell kind {cell.kind!r} has no activation model")


def _phases(supernet: ElasticDiT, arch: Arch) -> list[tuple[str, int]]:
    """Every phase of every cell of `arch` with its live activation elements, batch 1."""
    stream = supernet.stream_heads(arch) * supernet.cfg.head_dim
    saved = arch.tokens(0) * stream  # the U-Net long skip is live all through stage 1
    out: list[tuple[str, int]] = []
    for cell in cells_for_arch(supernet.space, arch):
        extra = saved if cell.kind == "block" and cell.stage == 1 else 0
        out.extend((where, extra + elements) for where, elements in _cell_phases(supernet, arch, cell))
    return out


def memory_estimate(supernet: ElasticDiT, arch: Arch, *, batch: int = 1, dtype_bytes: int = 4) -> MemoryEstimate:
    """Weights (the extracted SubDiT's parameters) + the largest live activation set, in bytes.

    An analytic estimate per cell and phase (`block_memory_elements`): every activation scales with the
    batch, weights do not. # assumption: conditioning vectors and RoPE/mask tables are negligible.
    """
    if batch < 1 or dtype_bytes < 1:
        raise DitnasError(f"memory estimate: batch ({batch}) and dtype_bytes ({dtype_bytes}) must be >= 1")
    supernet.space.validate(arch)
    weights = supernet.extract(arch).num_params() * dtype_bytes
    where, elements = max(_phases(supernet, arch), key=lambda p: p[1])
    activations = elements * batch * dtype_bytes
    return MemoryEstimate(weights, activations, weights + activations, where)


def peak_memory_bytes(supernet: ElasticDiT, arch: Arch, batch: int = 1, dtype_bytes: int = 4) -> int:
    """Estimated peak memory in bytes (see memory_estimate)."""
    return memory_estimate(supernet, arch, batch=batch, dtype_bytes=dtype_bytes).peak_bytes


def arch_bytes_moved(
    supernet: ElasticDiT, arch: Arch, *, dtype_bytes: int = 2, weight_bits: float | None = None
) -> int:
    """Estimated DRAM traffic of one velocity call (batch 1): every weight read once, every activation
    tensor of every phase written once and read once. An **estimate** for the roofline.

    # assumption: no fusion and no cache reuse across ops (an upper-ish bound on traffic); weights at
    # `weight_bits` (default: the activation precision).
    """
    params = supernet.extract(arch).num_params()
    bits = weight_bits if weight_bits is not None else 8 * dtype_bytes
    stream = supernet.stream_heads(arch) * supernet.cfg.head_dim
    traffic = 0
    for cell in cells_for_arch(supernet.space, arch):
        if cell.kind == "block":  # every tensor of every phase once (the base tensors once, not per phase)
            traffic += sum(_block_parts(supernet, cell, stream).values())
        else:
            traffic += sum(e for _, e in _cell_phases(supernet, arch, cell))
    return math.ceil(params * bits / 8) + 2 * traffic * dtype_bytes
