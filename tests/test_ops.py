"""Tests for ditnas.supernet.ops: elastic token mixers, FFN, norms, RoPE.

References are built independently where practical: F.scaled_dot_product_attention, F.layer_norm,
F.conv3d, explicit slicing sums for the 2x2 KV compression, and masks built with Python loops.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from tensor_helpers import randomize, tokens

from ditnas.supernet.ops import (
    ASSA,
    LCHA,
    SSA,
    TOKEN_MIXERS,
    Attention,
    CrossAttention,
    FeedForward,
    Rope3D,
    bna_mask,
    layer_norm,
    linear_attention,
    linear_attention_quadratic,
    rms_norm,
    softplus,
)

HD = 8  # head_dim used throughout: small but gives RoPE 1 t-pair, 1 h-pair, 2 w-pairs


_randomize, _x = randomize, tokens  # tests/tensor_helpers.py


def _heads4(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads*hd) -> (B, heads, N, hd)."""
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def _merge4(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _ref_qkv(op: Attention, x: torch.Tensor, grid, heads: int, rope: bool = True):
    """q (B,h,N,hd), k and v (B,kvh,N,hd) straight from the weights, with F.layer_norm QK-norm."""
    c = heads * HD
    kvh = heads // op.kv_group
    q = _heads4(x @ op.q.weight[:c, :c].T + op.q.bias[:c], heads)
    k = _heads4(x @ op.k.weight[: kvh * HD, :c].T + op.k.bias[: kvh * HD], kvh)
    v = _heads4(x @ op.v.weight[: kvh * HD, :c].T + op.v.bias[: kvh * HD], kvh)
    q = F.layer_norm(q, (HD,), op.q_norm.weight, op.q_norm.bias, eps=1e-6)
    k = F.layer_norm(k, (HD,), op.k_norm.weight, op.k_norm.bias, eps=1e-6)
    if rope:
        q, k = op.rope.apply(q, grid), op.rope.apply(k, grid)
    return q, k, v


def _out(op, y4: torch.Tensor) -> torch.Tensor:
    y = _merge4(y4)
    c = y.shape[-1]
    return y @ op.o.weight[:c, :c].T + op.o.bias[:c]


# ------------------------------------------------------------------------------------------------
# norms and RoPE
# ------------------------------------------------------------------------------------------------


def test_layer_norm_and_rms_norm_match_reference():
    x = torch.randn(2, 5, 3, 16) * 3 + 1
    assert torch.allclose(layer_norm(x), F.layer_norm(x, (16,), eps=1e-6), atol=1e-5)
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(rms_norm(x), ref, atol=1e-5)
    x3 = torch.randn(2, 7, 16)
    assert torch.allclose(layer_norm(x3), F.layer_norm(x3, (16,), eps=1e-6), atol=1e-5)


def test_rope_pair_split():
    r = Rope3D(64)
    assert (r.t_pairs, r.h_pairs, r.w_pairs) == (8, 12, 12)
    r = Rope3D(HD)
    assert (r.t_pairs, r.h_pairs, r.w_pairs) == (1, 1, 2)
    assert r.t_pairs + r.h_pairs + r.w_pairs == HD // 2
    with pytest.raises(ValueError):
        Rope3D(7)


@pytest.mark.parametrize("grid", [(1, 1, 12), (1, 12, 1), (12, 1, 1)])
def test_rope_relative_property(grid):
    """On a 1-D line of the grid, rotated q.k depends only on the position difference."""
    hd = 32
    rope = Rope3D(hd)
    n = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, hd, generator=g, dtype=torch.float64).expand(n, hd)
    k = torch.randn(1, hd, generator=g, dtype=torch.float64).expand(n, hd)
    s = rope.apply(q, grid) @ rope.apply(k, grid).T  # (n, n)
    for d in range(-(n - 1), n):
        diag = torch.diagonal(s, offset=d)
        assert torch.allclose(diag, diag[0].expand_as(diag), atol=1e-10), d
    # and it really rotates: the score changes with the offset
    offsets = torch.stack([torch.diagonal(s, offset=d)[0] for d in range(n)])
    assert (offsets - offsets[0]).abs().max() > 1e-2
    # norms are preserved
    assert torch.allclose(rope.apply(q, grid).norm(dim=-1), q.norm(dim=-1))


def test_rope_identity_on_time_axis_for_images():
    rope = Rope3D(16)
    a = rope.angles((1, 3, 4))
    assert torch.all(a[:, : rope.t_pairs] == 0)
    assert a[:, rope.t_pairs :].abs().max() > 0


# ------------------------------------------------------------------------------------------------
# SA / GQA
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [None, 3])
def test_attention_matches_sdpa(heads):
    torch.manual_seed(0)
    op = _randomize(Attention(4, HD))
    h = heads or 4
    grid = (2, 3, 4)
    x = _x(2, 24, h * HD)
    q, k, v = _ref_qkv(op, x, grid, h)
    ref = _out(op, F.scaled_dot_product_attention(q, k, v))
    out = op(x, grid, heads=heads)
    assert out.shape == (2, 24, h * HD)
    assert torch.allclose(out, ref, atol=1e-5)


def test_attention_without_rope_and_norm_matches_sdpa():
    torch.manual_seed(0)
    op = _randomize(Attention(2, HD, qk_norm=False, rope=False))
    x = _x(1, 12, 2 * HD)
    q = _heads4(op.q(x), 2)
    k = _heads4(op.k(x), 2)
    v = _heads4(op.v(x), 2)
    ref = _out(op, F.scaled_dot_product_attention(q, k, v))
    assert torch.allclose(op(x, (1, 3, 4)), ref, atol=1e-5)


@pytest.mark.parametrize("heads", [None, 2])
def test_gqa_matches_repeated_kv_heads(heads):
    torch.manual_seed(0)
    op = _randomize(Attention(4, HD, kv_group=2))
    assert op.k.weight.shape == (2 * HD, 4 * HD)
    h = heads or 4
    grid = (1, 4, 4)
    x = _x(2, 16, h * HD)
    q, k, v = _ref_qkv(op, x, grid, h)
    assert k.shape[1] == h // 2
    k = k.repeat_interleave(2, dim=1)  # query head i uses kv head i // 2
    v = v.repeat_interleave(2, dim=1)
    ref = _out(op, F.scaled_dot_product_attention(q, k, v))
    assert torch.allclose(op(x, grid, heads=heads), ref, atol=1e-5)


def test_gqa_with_a_partial_last_group():
    """3 query heads over kv_group=2: heads 0,1 share KV head 0, head 2 alone uses KV head 1."""
    op = _randomize(Attention(4, HD, kv_group=2))
    x, grid = _x(2, 4, 3 * HD), (1, 2, 2)
    q, k, v = op.project(x, grid, 3)
    q, k, v = (t.reshape(2, -1, 4, HD) for t in (q, k, v))
    k, v = k.repeat_interleave(2, dim=1)[:, :3], v.repeat_interleave(2, dim=1)[:, :3]
    ref = _out(op, F.scaled_dot_product_attention(q, k, v))
    assert torch.allclose(op(x, grid, heads=3), ref, atol=1e-5)
    assert torch.allclose(op.sliced(3)(x, grid), op(x, grid, heads=3), atol=1e-6)
    with pytest.raises(ValueError):
        ASSA(3, HD, kv_group=2)


def test_width_and_grid_checks():
    op = Attention(4, HD)
    with pytest.raises(ValueError):
        op(_x(1, 4, 3 * HD), (1, 2, 2), heads=2)  # features do not match heads
    with pytest.raises(ValueError):
        op(_x(1, 4, 4 * HD), (1, 2, 3))  # N != T*H*W
    with pytest.raises(ValueError):
        op(_x(1, 4, 5 * HD), (1, 2, 2), heads=5)  # more heads than built


# ------------------------------------------------------------------------------------------------
# sliced parity for every op
# ------------------------------------------------------------------------------------------------

_MIXER_CASES = [
    ("sa", {}, (2, 4, 4)),
    ("gqa", {}, (2, 4, 4)),
    ("assa", {"kv_group": 2, "bna_blocks": 4, "bna_radius": 1}, (2, 4, 4)),
    ("lcha", {}, (3, 4, 4)),
    ("ssa", {}, (2, 4, 4)),
]


@pytest.mark.parametrize("name,kwargs,grid", _MIXER_CASES)
@pytest.mark.parametrize("heads", [2, 4])
def test_sliced_parity_mixers(name, kwargs, grid, heads):
    torch.manual_seed(0)
    op = _randomize(TOKEN_MIXERS[name](6, HD, **kwargs)).eval()
    n = grid[0] * grid[1] * grid[2]
    x = _x(2, n, heads * HD)
    small = op.sliced(heads)
    assert type(small) is type(op)
    assert small.max_heads == heads
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in op.parameters())
    full = op(x, grid, heads=heads)
    out = small(x, grid)
    assert out.shape == (2, n, heads * HD)
    assert (out - full).abs().max().item() <= 1e-6
    # standalone: editing the copy leaves the supernet untouched
    with torch.no_grad():
        next(small.parameters()).add_(1.0)
    assert torch.equal(op(x, grid, heads=heads), full)


def test_sliced_parity_cross_attention():
    torch.manual_seed(0)
    op = _randomize(CrossAttention(6, HD, cond_dim=20))
    x = _x(2, 10, 3 * HD)
    cond = _x(2, 7, 20, seed=5)
    small = op.sliced(3)
    assert small.k.weight.shape == (3 * HD, 20)  # K/V input side is never sliced
    assert (small(x, cond) - op(x, cond, heads=3)).abs().max().item() <= 1e-6


def test_sliced_parity_feedforward():
    torch.manual_seed(0)
    ff = _randomize(FeedForward(48, 192))
    x = _x(2, 10, 24)
    small = ff.sliced(24, 96)
    assert small.fc1.weight.shape == (96, 24) and small.fc2.weight.shape == (24, 96)
    assert (small(x) - ff(x, hidden=96)).abs().max().item() <= 1e-6


# ------------------------------------------------------------------------------------------------
# cross-attention and FFN against references
# ------------------------------------------------------------------------------------------------


def test_cross_attention_matches_sdpa():
    torch.manual_seed(0)
    op = _randomize(CrossAttention(4, HD, cond_dim=12))
    h, c = 2, 2 * HD
    x = _x(2, 9, c)
    cond = _x(2, 5, 12, seed=3)
    q = _heads4(x @ op.q.weight[:c, :c].T + op.q.bias[:c], h)
    k = _heads4(cond @ op.k.weight[:c].T + op.k.bias[:c], h)
    v = _heads4(cond @ op.v.weight[:c].T + op.v.bias[:c], h)
    q = F.layer_norm(q, (HD,), op.q_norm.weight, op.q_norm.bias, eps=1e-6)
    k = F.layer_norm(k, (HD,), op.k_norm.weight, op.k_norm.bias, eps=1e-6)
    ref = _out(op, F.scaled_dot_product_attention(q, k, v))
    assert torch.allclose(op(x, cond, heads=h), ref, atol=1e-5)
    with pytest.raises(ValueError):
        op(x, cond[..., :10], heads=h)


def test_feedforward_matches_reference():
    torch.manual_seed(0)
    ff = FeedForward(32, 64)
    x = _x(2, 5, 16)
    hid = 40
    y = F.gelu(x @ ff.fc1.weight[:hid, :16].T + ff.fc1.bias[:hid], approximate="tanh")
    ref = y @ ff.fc2.weight[:16, :hid].T + ff.fc2.bias[:16]
    out = ff(x, hidden=hid)
    assert out.shape == x.shape
    assert torch.allclose(out, ref, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# ASSA
# ------------------------------------------------------------------------------------------------


def _band_block_loops(n: int, blocks: int, radius: int) -> torch.Tensor:
    size = n // blocks
    m = torch.zeros(n, n, dtype=torch.bool)
    for b in range(blocks):
        for nb in range(max(0, b - radius), min(blocks - 1, b + radius) + 1):
            m[b * size : (b + 1) * size, nb * size : (nb + 1) * size] = True
    return m


@pytest.mark.parametrize("blocks,radius", [(4, 1), (8, 3), (8, 1), (16, 3)])
def test_bna_mask_band_block_pattern(blocks, radius):
    n = 64
    m = bna_mask(n, blocks, radius)
    assert m.dtype == torch.bool and m.shape == (n, n)
    assert torch.equal(m, _band_block_loops(n, blocks, radius))


def test_bna_mask_explicit_small_case():
    # 4 blocks of 2 tokens, radius 1: block-tridiagonal
    expected = torch.tensor(
        [
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 1, 1, 1, 1],
            [0, 0, 0, 0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(bna_mask(8, 4, 1), expected)
    with pytest.raises(ValueError):
        bna_mask(10, 4, 1)


def _compress_ref(t: torch.Tensor, conv: torch.nn.Conv2d, grid) -> torch.Tensor:
    """(B, kvh, T*H*W, hd) -> (B, kvh, T*H/2*W/2, hd): explicit sum of the four 2x2 taps per channel."""
    b, kvh, _, hd = t.shape
    tt, h, w = grid
    c = kvh * hd
    wt = conv.weight[:c, 0].reshape(kvh, hd, 2, 2)
    bias = conv.bias[:c].reshape(kvh, hd)
    g = t.reshape(b, kvh, tt, h, w, hd)
    out = bias.reshape(1, kvh, 1, 1, 1, hd).clone()
    for a in range(2):
        for bb in range(2):
            out = out + g[:, :, :, a::2, bb::2, :] * wt[:, :, a, bb].reshape(1, kvh, 1, 1, 1, hd)
    return out.reshape(b, kvh, tt * (h // 2) * (w // 2), hd)


def _assa_refs(op: ASSA, x, grid, heads):
    q, k, v = _ref_qkv(op, x, grid, heads)
    g = op.kv_group
    n = x.shape[1]
    mask = _band_block_loops(n, op.bna_blocks, op.bna_radius)
    local = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)
    kc = _compress_ref(k, op.k_compress, grid).repeat_interleave(g, 1)
    vc = _compress_ref(v, op.v_compress, grid).repeat_interleave(g, 1)
    glob = F.scaled_dot_product_attention(q, kc, vc)
    full = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
    return local, glob, full


@pytest.mark.parametrize("kv_group,heads", [(1, None), (2, 2)])
@pytest.mark.parametrize("grid", [(1, 8, 8), (2, 4, 4)])
def test_assa_forced_gate_equals_each_branch(kv_group, heads, grid):
    torch.manual_seed(0)
    op = _randomize(ASSA(4, HD, kv_group=kv_group, bna_blocks=4, bna_radius=1))
    h = heads or 4
    n = grid[0] * grid[1] * grid[2]
    x = _x(2, n, h * HD)
    local, glob, full = _assa_refs(op, x, grid, h)
    op.gate_override = 1.0
    assert torch.allclose(op(x, grid, heads=heads), _out(op, local), atol=1e-5)
    op.gate_override = 0.0
    assert torch.allclose(op(x, grid, heads=heads), _out(op, glob), atol=1e-5)
    # the two branches really differ (else the test above could not tell them apart)
    assert (local - glob).abs().max() > 1e-2 and (local - full).abs().max() > 1e-2


def test_assa_learned_gate_interpolates_per_head():
    torch.manual_seed(0)
    op = _randomize(ASSA(4, HD, kv_group=2, bna_blocks=4, bna_radius=1))
    grid, h = (1, 8, 8), 4
    x = _x(2, 64, h * HD)
    local, glob, _ = _assa_refs(op, x, grid, h)
    w = torch.sigmoid(x @ op.gate.weight.T + op.gate.bias)  # (B, N, heads)
    w = w.transpose(1, 2).unsqueeze(-1)  # (B, heads, N, 1)
    assert w.std() > 0.05  # input-dependent and not saturated
    ref = _out(op, w * local + (1 - w) * glob)
    assert torch.allclose(op(x, grid), ref, atol=1e-5)


@pytest.mark.parametrize("blocks,radius", [(1, 0), (4, 4), (4, 3)])
def test_assa_local_branch_is_full_attention_when_mask_is_full(blocks, radius):
    torch.manual_seed(0)
    op = _randomize(ASSA(4, HD, kv_group=2, bna_blocks=blocks, bna_radius=radius))
    grid = (1, 4, 8)
    x = _x(2, 32, 4 * HD)
    _, _, full = _assa_refs(op, x, grid, 4)
    op.gate_override = 1.0
    assert torch.allclose(op(x, grid), _out(op, full), atol=1e-5)


def test_assa_radius_below_blocks_is_not_full():
    torch.manual_seed(0)
    op = _randomize(ASSA(4, HD, bna_blocks=4, bna_radius=2))  # block 0 cannot see block 3
    grid = (1, 4, 8)
    x = _x(1, 32, 4 * HD)
    _, _, full = _assa_refs(op, x, grid, 4)
    op.gate_override = 1.0
    assert (op(x, grid) - _out(op, full)).abs().max() > 1e-3


def test_assa_global_kv_length_is_quarter():
    op = ASSA(4, HD, bna_blocks=4)
    seen = []
    inner = op.attend

    def spy(q, k, v, bias=None):
        seen.append((q.shape[1], k.shape[1], bias is not None))
        return inner(q, k, v, bias)

    op.attend = spy
    grid = (2, 8, 8)
    op(_x(1, 128, 4 * HD), grid)
    assert sorted(seen) == [(128, 32, False), (128, 128, True)]


def test_assa_grid_errors():
    op = ASSA(2, HD, bna_blocks=4)
    with pytest.raises(ValueError):
        op(_x(1, 30, 2 * HD), (1, 5, 6))  # odd H
    op3 = ASSA(2, HD, bna_blocks=3)
    with pytest.raises(ValueError):
        op3(_x(1, 16, 2 * HD), (1, 4, 4))  # 16 tokens, 3 blocks


# ------------------------------------------------------------------------------------------------
# LCHA
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rope", [False, True])
def test_linear_attention_equals_quadratic_form(use_rope):
    torch.manual_seed(0)
    op = LCHA(2, 16)
    grid = (2, 4, 6)
    n = 48
    q, k = torch.randn(6, n, 16), torch.randn(6, n, 16)
    v = torch.randn(6, n, 16)
    qf, kf = op.features(q), op.features(k)
    qr = kr = None
    if use_rope:
        qr, kr = op.rope.apply(qf, grid), op.rope.apply(kf, grid)
    fast = linear_attention(qf, kf, v, qr, kr)
    slow = linear_attention_quadratic(qf, kf, v, qr, kr)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5)
    if use_rope:  # RoPE changed the numerator
        assert (fast - linear_attention(qf, kf, v)).abs().max() > 1e-3


def test_linear_attention_explicit_loop():
    # the quadratic reference itself, against a per-token loop on one small example
    g = torch.Generator().manual_seed(0)
    qf = torch.rand(1, 5, 4, generator=g) + 0.1
    kf = torch.rand(1, 5, 4, generator=g) + 0.1
    v = torch.randn(1, 5, 3, generator=g)
    rows = []
    for i in range(5):
        num = sum((qf[0, i] @ kf[0, j]) * v[0, j] for j in range(5))
        rows.append(num / sum(qf[0, i] @ kf[0, j] for j in range(5)))
    ref = torch.stack(rows)
    assert torch.allclose(linear_attention_quadratic(qf, kf, v)[0], ref, atol=1e-6)
    assert torch.allclose(linear_attention(qf, kf, v)[0], ref, atol=1e-5)


def test_softplus_matches_torch_and_stays_positive():
    x = torch.linspace(-13, 30, 2001)
    assert torch.allclose(softplus(x), F.softplus(x), atol=1e-6, rtol=1e-6)
    far = torch.tensor([-200.0, -60.0, -20.0])
    assert torch.all(F.softplus(far)[:1] == 0)  # torch's own softplus underflows to 0 here ...
    assert torch.all(softplus(far) > 0)  # ... ours does not


def test_lcha_features_positive():
    torch.manual_seed(0)
    op = _randomize(LCHA(2, 16), scale=1.0)
    t = torch.randn(4, 50, 16) * 10
    assert torch.all(op.features(t) > 0)
    with torch.no_grad():  # drive W x + b far negative: still > 0
        op.phi.weight.fill_(-5.0)
        op.phi.bias.fill_(-50.0)
    t = torch.rand(4, 50, 16) + 0.1
    assert torch.all(op.features(t) > 0)


def test_lcha_linear_branch_matches_quadratic_reference():
    torch.manual_seed(0)
    op = _randomize(LCHA(4, HD))
    grid, h = (2, 3, 4), 3
    c = h * HD
    x = _x(2, 24, c)
    q = _heads4(x @ op.q.weight[:c, :c].T + op.q.bias[:c], h).reshape(6, 24, HD)
    k = _heads4(x @ op.k.weight[:c, :c].T + op.k.bias[:c], h).reshape(6, 24, HD)
    v = _heads4(x @ op.v.weight[:c, :c].T + op.v.bias[:c], h).reshape(6, 24, HD)
    qf = F.softplus((q / q.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()) @ op.phi.weight.T + op.phi.bias)
    kf = F.softplus((k / k.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()) @ op.phi.weight.T + op.phi.bias)
    y = linear_attention_quadratic(qf, kf, v, op.rope.apply(qf, grid), op.rope.apply(kf, grid))
    ref = _merge4(y.reshape(2, h, 24, HD))
    assert torch.allclose(op.linear_branch(x, grid, h), ref, atol=1e-5)


def test_lcha_conv_branch_matches_causal_conv3d():
    torch.manual_seed(0)
    op = _randomize(LCHA(4, HD, conv_kernel=(2, 3, 5)))
    grid, h = (3, 4, 6), 2
    c = h * HD
    x = _x(2, 72, c)
    x5 = x.reshape(2, 3, 4, 6, c).permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)
    y = F.conv3d(F.pad(x5, (2, 2, 1, 1, 1, 0)), op.conv.weight[:c], op.conv.bias[:c], groups=c)
    y = y.permute(0, 2, 3, 4, 1).reshape(2, 72, c)
    ref = y @ op.mix.weight[:c, :c].T + op.mix.bias[:c]
    assert torch.allclose(op.conv_branch(x, grid, h), ref, atol=1e-5)
    assert op.conv.weight.shape == (4 * HD, 1, 2, 3, 5)


def test_lcha_conv_branch_is_temporally_causal():
    torch.manual_seed(0)
    op = _randomize(LCHA(2, HD))
    grid = (3, 4, 4)
    x = _x(1, 48, 2 * HD)
    x2 = x.clone()
    x2[:, 32:] += torch.randn(1, 16, 2 * HD)  # frame 2 = tokens 32..47
    a, b = op.conv_branch(x, grid, 2), op.conv_branch(x2, grid, 2)
    assert torch.equal(a[:, :32], b[:, :32])
    assert (a[:, 32:] - b[:, 32:]).abs().max() > 1e-3
    # and the previous frame does reach the current one (kt = 3 taps into the past)
    x3 = x.clone()
    x3[:, :16] += 1.0
    assert (op.conv_branch(x3, grid, 2)[:, 16:32] - a[:, 16:32]).abs().max() > 1e-3


def test_lcha_saturated_gate_reproduces_each_branch():
    torch.manual_seed(0)
    op = _randomize(LCHA(4, HD))
    grid, h = (2, 4, 4), 3
    c = h * HD
    x = _x(2, 32, c)
    lin, conv = op.linear_branch(x, grid, h), op.conv_branch(x, grid, h)

    def proj(t):
        return t @ op.o.weight[:c, :c].T + op.o.bias[:c]

    op.gate_override = 1.0
    assert torch.allclose(op(x, grid, heads=h), proj(lin), atol=1e-6)
    op.gate_override = 0.0
    assert torch.allclose(op(x, grid, heads=h), proj(conv), atol=1e-6)
    op.gate_override = None
    with torch.no_grad():
        op.alpha.fill_(60.0)
    assert torch.allclose(op(x, grid, heads=h), proj(lin), atol=1e-6)
    with torch.no_grad():
        op.alpha.fill_(-60.0)
    assert torch.allclose(op(x, grid, heads=h), proj(conv), atol=1e-6)
    assert (proj(lin) - proj(conv)).abs().max() > 1e-2
    # at alpha = 0 the mix is the mean of the two
    with torch.no_grad():
        op.alpha.zero_()
    assert torch.allclose(op(x, grid, heads=h), proj(0.5 * lin + 0.5 * conv), atol=1e-6)


def test_lcha_gradients_reach_both_branches_at_init():
    torch.manual_seed(0)
    op = LCHA(2, HD)
    grid = (2, 4, 4)
    x = _x(2, 32, 2 * HD)
    target = torch.randn(2, 32, 2 * HD)
    ((op(x, grid) - target) ** 2).mean().backward()
    linear_branch = ["q.weight", "k.weight", "v.weight", "phi.weight"]
    conv_branch = ["conv.weight", "conv.bias", "mix.weight"]
    names = linear_branch + conv_branch + ["alpha", "o.weight"]
    for name in names:
        g = op.get_parameter(name).grad
        assert g is not None and g.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------------
# SSA
# ------------------------------------------------------------------------------------------------


def test_ssa_stride1_equals_attention():
    torch.manual_seed(0)
    ref = _randomize(Attention(4, HD))
    op = SSA(4, HD, stride=1)
    op.load_state_dict(ref.state_dict())
    grid = (2, 3, 4)
    x = _x(2, 24, 3 * HD)
    assert torch.equal(op(x, grid, heads=3), ref(x, grid, heads=3))


@pytest.mark.parametrize("stride,grid", [(2, (2, 4, 6)), (3, (1, 6, 3))])
def test_ssa_matches_pool_attend_upsample_reference(stride, grid):
    """The documented recipe, done literally: pool projected q,k,v -> norm -> RoPE(pooled grid) ->
    attention -> nearest upsample -> output projection."""
    torch.manual_seed(0)
    op = _randomize(SSA(4, HD, stride=stride))
    t, hh, ww = grid
    n, h, s = t * hh * ww, 3, stride
    c = h * HD
    x = _x(2, n, c)

    def pool(z):  # (B, N, C) -> (B, N/s^2, C)
        z = z.reshape(2, t, hh // s, s, ww // s, s, c).mean(dim=(3, 5))
        return z.reshape(2, -1, c)

    small = (t, hh // s, ww // s)
    q = _heads4(pool(x @ op.q.weight[:c, :c].T + op.q.bias[:c]), h)
    k = _heads4(pool(x @ op.k.weight[:c, :c].T + op.k.bias[:c]), h)
    v = _heads4(pool(x @ op.v.weight[:c, :c].T + op.v.bias[:c]), h)
    q = op.rope.apply(F.layer_norm(q, (HD,), op.q_norm.weight, op.q_norm.bias, eps=1e-6), small)
    k = op.rope.apply(F.layer_norm(k, (HD,), op.k_norm.weight, op.k_norm.bias, eps=1e-6), small)
    y = _merge4(F.scaled_dot_product_attention(q, k, v)).reshape(2, t, hh // s, ww // s, c)
    y = y.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3).reshape(2, n, c)
    ref = y @ op.o.weight[:c, :c].T + op.o.bias[:c]
    out = op(x, grid, heads=h)
    assert out.shape == x.shape
    assert torch.allclose(out, ref, atol=1e-5)


def test_ssa_attention_runs_on_quarter_tokens():
    op = SSA(2, HD, stride=2)
    seen = []
    inner = op.attend

    def spy(q, k, v, bias=None):
        seen.append((q.shape[1], k.shape[1]))
        return inner(q, k, v, bias)

    op.attend = spy
    x = _x(1, 2 * 8 * 8, 2 * HD)
    out = op(x, (2, 8, 8))
    assert out.shape == x.shape
    assert seen == [(32, 32)]


def test_ssa_rejects_indivisible_grid():
    op = SSA(2, HD, stride=2)
    with pytest.raises(ValueError):
        op(_x(1, 12, 2 * HD), (1, 3, 4))


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------


def test_registry_builds_every_mixer_with_shared_signature():
    assert set(TOKEN_MIXERS) == {"sa", "gqa", "assa", "lcha", "ssa"}
    grid = (1, 4, 4)
    for name, factory in TOKEN_MIXERS.items():
        op = factory(4, HD)
        assert op.dim == 4 * HD
        for heads in (None, 2):
            h = heads or 4
            out = op(_x(2, 16, h * HD), grid, heads=heads)
            assert out.shape == (2, 16, h * HD), name
    assert TOKEN_MIXERS["gqa"](4, HD).kv_group == 2 and TOKEN_MIXERS["gqa"](4, HD).k.weight.shape == (2 * HD, 4 * HD)
    assert TOKEN_MIXERS["sa"](4, HD).kv_group == 1
    # five different computations, not one class under several names: same seed, same input, other outputs
    x = _x(2, 16, 4 * HD)
    outs = {}
    for name, factory in TOKEN_MIXERS.items():
        torch.manual_seed(0)
        outs[name] = _randomize(factory(4, HD)).eval()(x, grid)
    names = sorted(outs)
    assert min((outs[a] - outs[b]).abs().max().item() for i, a in enumerate(names) for b in names[i + 1:]) > 1e-3


def test_export_first_then_eager_keeps_constant_tables_real():
    """Tables built while torch.export traces must not be cached as fake tensors."""
    torch.manual_seed(0)
    op = ASSA(2, HD, bna_blocks=2).eval()
    grid = (1, 4, 4)

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.op = op

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.op(x, grid)

    x = _x(1, 16, 2 * HD)
    ep = torch.export.export(Wrap(), (x,))
    eager = op(x, grid)  # would raise / return a FakeTensor if the caches were poisoned
    assert type(eager) is torch.Tensor
    assert torch.allclose(ep.module()(x), eager, atol=1e-6)
