"""FLOPs via fvcore with our handles, against closed-form MACs; peak-memory estimate on a hand case."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ditnas.arch import Arch, SearchSpace
from ditnas.config import ModelConfig
from ditnas.errors import DitnasError
from ditnas.latency_models.flops import (
    SOFTMAX_COST,
    FlopCountAnalysis,
    arch_bytes_moved,
    arch_flops,
    arch_macs_analytic,
    block_macs_analytic,
    bna_band_entries,
    cell_flops,
    cell_macs_analytic,
    count_flops,
    memory_estimate,
    peak_memory_bytes,
    sdpa_macs,
)
from ditnas.latency_models.programs import Cell
from ditnas.supernet.model import ElasticDiT
from ditnas.supernet.ops import bna_mask

CFG = ModelConfig(max_heads=2, head_dim=8, cond_dim=16, cond_tokens=1)
OPS = ("sa", "gqa", "assa", "lcha", "ssa")


def _net(latent=(1, 1, 16, 16), cfg: ModelConfig = CFG, **kw) -> ElasticDiT:
    space = SearchSpace(
        **{"depth": 2, "ops": OPS, "widths": (0.5, 1.0), "mlp_ratios": (2.0, 4.0), "stage_pattern": (0, 1), "skippable": (1,), **kw},
        latent=latent,
    )
    torch.manual_seed(0)
    return ElasticDiT(space, cfg)


@pytest.fixture(scope="module")
def net() -> ElasticDiT:
    return _net()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("width,ratio,stage", [(1.0, 4.0, 0), (0.5, 2.0, 1)])
def test_block_macs_equal_analytic(net: ElasticDiT, op: str, width: float, ratio: float, stage: int) -> None:
    tokens = 64 >> (2 * stage)
    cell = Cell("block", op, width, ratio, tokens, stage)
    rep = cell_flops(net, cell)
    heads = net.heads_for(width)
    d = heads * CFG.head_dim
    terms = block_macs_analytic(
        op, tokens=tokens, dim=d, heads=heads, hidden=round(ratio * d), cond_dim=16, cond_tokens=1,
        assa_blocks=CFG.assa_blocks,
    )  # fmt: skip
    assert rep.macs == terms["total"] == cell_macs_analytic(net, cell)
    assert rep.flops == 2 * rep.macs + rep.elementwise_flops
    assert rep.unsupported == {}  # every op is counted or explicitly free


def test_sa_formula_by_hand() -> None:
    # N=64, d=16, r=4, 1 cond token of width 16: 4Nd^2 + 2N^2d + 2Nd*rd + cross + modulation
    n, d, cd = 64, 16, 16
    t = block_macs_analytic("sa", tokens=n, dim=d, heads=2, hidden=4 * d, cond_dim=cd, cond_tokens=1)
    cross = 2 * n * d * d + 2 * 1 * cd * d + 2 * n * 1 * d
    assert t["total"] == 4 * n * d * d + 2 * n * n * d + 2 * n * d * 4 * d + cross + cd * 6 * d
    # SSA = SA on N / s^2 tokens in the mixer
    s = block_macs_analytic("ssa", tokens=n, dim=d, heads=2, hidden=4 * d, cond_dim=cd, cond_tokens=1, ssa_stride=2)
    assert s["mixer_proj"] + s["mixer_attn"] == 4 * 16 * d * d + 2 * 16 * 16 * d


def test_lcha_is_linear_in_tokens() -> None:
    kw = {"dim": 16, "heads": 2, "hidden": 64, "cond_dim": 16, "cond_tokens": 1}
    a = block_macs_analytic("lcha", tokens=64, **kw)
    b = block_macs_analytic("lcha", tokens=256, **kw)
    mixer = lambda t: sum(v for k, v in t.items() if k.startswith("mixer"))
    assert mixer(b) == 4 * mixer(a)  # no N^2 term
    sa = lambda n: block_macs_analytic("sa", tokens=n, **kw)
    assert mixer(sa(256)) > 4 * mixer(sa(64))


def test_video_grid_counts(net: ElasticDiT) -> None:
    video = _net(latent=(1, 2, 8, 8), ops=("lcha", "ssa"))  # T=2: the causal conv runs every temporal tap
    for op in ("lcha", "ssa"):
        cell = Cell("block", op, 1.0, 4.0, 32, 0)
        assert cell_flops(video, cell).macs == cell_macs_analytic(video, cell)


def test_elementwise_terms(net: ElasticDiT) -> None:
    rep = cell_flops(net, Cell("block", "sa", 1.0, 4.0, 64, 0))
    n, h, d, m = 64, 2, 16, 1
    assert rep.by_operator["softmax"] == SOFTMAX_COST * (h * n * n + h * n * m)  # self + cross attention
    assert rep.by_operator["gelu"] == 8 * n * 4 * d
    assert rep.by_operator["silu"] == 5 * CFG.cond_dim  # adaLN input
    assert rep.by_operator["bmm"] == 2 * (2 * n * n * d + 2 * n * m * d)


def test_sdpa_handle_and_fvcore_undercount() -> None:
    class SdpaBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(32, 96)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).reshape(1, 50, 3, 4, 8).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v)

    block, x = SdpaBlock().eval(), torch.randn(1, 50, 32)
    linear = 50 * 32 * 96
    attn = sdpa_macs((1, 4, 50, 8), (1, 4, 50, 8), (1, 4, 50, 8))
    assert attn == 4 * 50 * 50 * 16
    plain = FlopCountAnalysis(block, (x,)).unsupported_ops_warnings(False)
    assert plain.total() == linear  # fvcore alone: SDPA counts 0
    assert "aten::scaled_dot_product_attention" in plain.unsupported_ops()
    rep = count_flops(block, x)
    assert rep.macs == linear + attn
    assert rep.by_operator["softmax"] == SOFTMAX_COST * 4 * 50 * 50


def test_arch_flops_cells_equal_model(net: ElasticDiT) -> None:
    space = net.space
    for text in ("sa:0.5:2 | lcha:1:4 |", "assa:1:4 | ssa:0.5:4 |", "gqa:0.5:2 | skip |"):
        arch = Arch.parse(text, defaults=space.max_arch())
        cells = arch_flops(net, arch)
        whole = arch_flops(net, arch, mode="model")
        assert cells.flops == whole.flops and cells.macs == whole.macs == arch_macs_analytic(net, arch)
        assert cells.params == whole.params == net.extract(arch).num_params()
        assert sum(cells.by_module.values()) == cells.flops
    with pytest.raises(DitnasError, match="mode"):
        arch_flops(net, space.max_arch(), mode="nope")


def test_bna_band_matches_mask() -> None:
    for n, b, r in ((64, 4, 1), (4096, 16, 1), (64, 8, 2), (16, 4, 5)):
        assert bna_band_entries(n, b, r) == int(bna_mask(n, b, r).sum())
    sparse = block_macs_analytic("assa", tokens=64, dim=16, heads=2, hidden=32, cond_dim=16, cond_tokens=1, sparse_bna=True)
    dense = block_macs_analytic("assa", tokens=64, dim=16, heads=2, hidden=32, cond_dim=16, cond_tokens=1)
    assert sparse["mixer_attn_local"] == 2 * bna_band_entries(64, 4, 1) * 16 < dense["mixer_attn_local"]


# ----------------------------------------------------------------------------------------------
# peak memory (estimate)
# ----------------------------------------------------------------------------------------------
def test_peak_memory_hand_case() -> None:
    space = SearchSpace(depth=1, ops=("sa",), widths=(1.0,), mlp_ratios=(2.0,), latent=(1, 1, 4, 4))
    torch.manual_seed(0)
    net = ElasticDiT(space, CFG)
    arch = space.max_arch()
    # params: patch 4*16+16=80; t_mlp 256*16+16 + 16*16+16 = 4384; y/ctx embeddings 2 * 11*16 = 352;
    # block: sa 4*272 + 2 qk-norms*16 = 1120, cross 1120, ffn 16*32+32 + 32*16+16 = 1072, adaLN 16*96+96 = 1632;
    # final adaLN 16*32+32 = 544, final 16*4+4 = 68
    params = 80 + 4384 + 352 + (1120 + 1120 + 1072 + 1632) + 544 + 68
    assert net.extract(arch).num_params() == params == 10372
    # N=4 tokens, d=16, hidden 32: base 4*16 + 2*4*16 = 192; SA phase: q 64 + k,v 128 + 2 heads*4*4 = 224
    # (cross: 64 + 2*16 + 2*4 = 104; ffn: 128; patch embed 80; final 144) -> peak = 192 + 224
    est = memory_estimate(net, arch)
    assert est.activation_bytes == (192 + 224) * 4
    assert est.weights_bytes == params * 4
    assert est.peak_bytes == peak_memory_bytes(net, arch) == 43152
    assert est.peak_at.endswith(":mixer") and est.label == "estimate"
    assert peak_memory_bytes(net, arch, batch=3, dtype_bytes=2) == params * 2 + 3 * 416 * 2
    with pytest.raises(DitnasError, match="batch"):
        peak_memory_bytes(net, arch, batch=0)


def test_peak_memory_monotone(net: ElasticDiT) -> None:
    space = net.space
    narrow = Arch.parse("sa:0.5:4 | sa:0.5:4 |", defaults=space.max_arch())
    wide = Arch.parse("sa:1:4 | sa:1:4 |", defaults=space.max_arch())
    assert peak_memory_bytes(net, narrow) < peak_memory_bytes(net, wide)
    assert arch_bytes_moved(net, narrow) < arch_bytes_moved(net, wide)
    big = _net(latent=(1, 1, 32, 32))
    wide_big = Arch.parse("sa:1:4 | sa:1:4 |", defaults=big.space.max_arch())
    assert peak_memory_bytes(net, wide) < peak_memory_bytes(big, wide_big)
    assert arch_bytes_moved(net, wide) < arch_bytes_moved(big, wide_big)
    # LCHA holds no N x N matrix: at 1024 tokens it needs less than SA
    lcha = Arch.parse("lcha:1:4 | lcha:1:4 |", defaults=big.space.max_arch())
    assert memory_estimate(big, lcha).activation_bytes < memory_estimate(big, wide_big).activation_bytes
