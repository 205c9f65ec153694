"""Frame-causal mode of every token mixer and of the whole model (supernet `run` and extracted SubDiT).

The invariance tests change the input frames > t and require the output of frames <= t to stay put;
each has a twin in non-causal mode that must move, so the mask is what makes them pass. References
are built independently: masks from Python loops, the causal linear branch as a masked O(L^2) sum.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tensor_helpers import randomize, tokens

from ditnas.arch import SearchSpace
from ditnas.config import ModelConfig
from ditnas.supernet.model import ElasticDiT
from ditnas.supernet.ops import (
    LCHA,
    SSA,
    TOKEN_MIXERS,
    Rope3D,
    bna_causal_mask,
    bna_mask,
    causal_linear_attention,
    frame_causal_mask,
    linear_attention_quadratic,
)

torch.set_num_threads(1)

HD = 8
GRID = (4, 4, 4)  # T=4 latent frames of a (C=1, 8x8) latent at patch 2
PER_FRAME = GRID[1] * GRID[2]
N = GRID[0] * PER_FRAME
# (op, heads): gqa at 3 heads runs the partial-group (repeated k/v) path, sa at 2 a sliced width
OP_CASES = [("sa", None), ("sa", 2), ("gqa", None), ("gqa", 3), ("assa", None), ("lcha", None), ("ssa", None)]


_randomize, _x = randomize, tokens  # tests/tensor_helpers.py


def _op(name: str, causal: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return _randomize(TOKEN_MIXERS[name](4, HD, causal=causal)).eval()


def _change_after(x: torch.Tensor, t: int, per_frame: int, seed: int = 5) -> torch.Tensor:
    """x with every token of frames > t replaced by fresh noise (token layout)."""
    x2 = x.clone()
    tail = x2[:, (t + 1) * per_frame :]
    x2[:, (t + 1) * per_frame :] = torch.randn(tail.shape, generator=torch.Generator().manual_seed(seed)) * 2
    return x2


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------


def _loop_causal(qf: int, qn: int, kf: int, kn: int, offset: int = 0) -> torch.Tensor:
    return torch.tensor([[j // kn <= i // qn + offset for j in range(kf * kn)] for i in range(qf * qn)])


@pytest.mark.parametrize("args", [(4, 16, 4, 16, 0), (2, 16, 5, 16, 3), (4, 16, 4, 4, 0), (1, 4, 3, 1, 2)])
def test_frame_causal_mask_matches_loops(args):
    assert torch.equal(frame_causal_mask(*args), _loop_causal(*args))


def test_bna_causal_mask_is_band_block_and_frame_causal():
    f, blocks, r = 16, 4, 1
    size = f // blocks
    ref = torch.tensor([[abs(i // size - j // size) <= r and j // f <= i // f for j in range(3 * f)]
                        for i in range(3 * f)])
    assert torch.equal(bna_causal_mask(3, 3, f, blocks, r), ref)
    # one frame: the image BNA mask; a chunk of frames 1..2 after frame 0: the last rows of the clip's mask
    assert torch.equal(bna_causal_mask(1, 1, f, blocks, r), bna_mask(f, blocks, r))
    assert torch.equal(bna_causal_mask(2, 3, f, blocks, r, q_offset=1), ref[f:])


def test_rope_time_axis_is_frame_index_and_offset_chunks_match_the_clip():
    rope = Rope3D(32)
    full = rope.angles((5, 2, 3))
    chunk = rope.angles((2, 2, 3), t0=3)
    assert torch.equal(chunk, full[3 * 6 :])  # a chunk of frames 3..4 gets the clip's rows
    # only the t pairs move with t0, by t0 * freq (axis 0 of the grid is time)
    shift = rope.angles((2, 2, 3), t0=3) - rope.angles((2, 2, 3))
    tp = rope.t_pairs
    freqs = 10000.0 ** (-torch.arange(tp, dtype=torch.float64) / tp)
    assert torch.allclose(shift[:, :tp], (3 * freqs).expand(12, tp))
    assert torch.equal(shift[:, tp:], torch.zeros(12, 16 - tp))
    cos, sin = rope.tables((2, 2, 3), t0=3)
    cos_full, sin_full = rope.tables((5, 2, 3))
    assert torch.equal(cos, cos_full[18:]) and torch.equal(sin, sin_full[18:])


# ------------------------------------------------------------------------------------------------
# every op
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,heads", OP_CASES)
def test_op_output_at_frames_up_to_t_ignores_later_frames(name, heads):
    op, twin = _op(name, causal=True), _op(name, causal=False)
    c = (heads or 4) * HD
    x = _x(2, N, c)
    base, base_twin = op(x, GRID, heads=heads), twin(x, GRID, heads=heads)
    for t in range(GRID[0] - 1):
        x2 = _change_after(x, t, PER_FRAME)
        keep = (t + 1) * PER_FRAME
        out = op(x2, GRID, heads=heads)
        assert (out[:, :keep] - base[:, :keep]).abs().max().item() <= 1e-6, (name, t)
        assert (out[:, keep:] - base[:, keep:]).abs().max().item() > 1e-3  # later frames do see the change
        # teeth: without the mask the earlier frames move too
        moved = (twin(x2, GRID, heads=heads)[:, :keep] - base_twin[:, :keep]).abs().max().item()
        assert moved > 1e-3, (name, t)


@pytest.mark.parametrize("name", sorted(TOKEN_MIXERS))
def test_causal_mode_on_an_image_equals_the_bidirectional_op(name):
    """For one frame every mask is all-true: causal mode is a strict generalisation."""
    grid = (1, 4, 4)
    x = _x(2, 16, 4 * HD)
    assert torch.allclose(_op(name, True)(x, grid), _op(name, False)(x, grid), atol=1e-6)


@pytest.mark.parametrize("name", sorted(TOKEN_MIXERS))
def test_sliced_and_step_carry_causal_mode(name):
    op = _op(name, causal=True)
    small = op.sliced(2)
    assert small.causal and not _op(name, causal=False).sliced(2).causal
    x = _x(2, N, 2 * HD)
    assert torch.allclose(small(x, GRID), op(x, GRID, heads=2), atol=1e-6)
    # two chunks through step == one whole-clip forward
    y0, cache = small.step(x[:, : 2 * PER_FRAME], (2, 4, 4), {}, 0)
    y1, _ = small.step(x[:, 2 * PER_FRAME :], (2, 4, 4), cache, 2)
    assert torch.allclose(torch.cat([y0, y1], dim=1), small(x, GRID), atol=1e-5)
    with pytest.raises(ValueError, match="causal"):
        _op(name, causal=False).step(x, GRID, {}, 0, heads=2)


def test_ssa_masks_the_pooled_grid():
    op = _op("ssa", causal=True)
    seen = []
    inner = op.attend

    def spy(q, k, v, bias=None):
        seen.append(bias)
        return inner(q, k, v, bias)

    op.attend = spy
    op(_x(1, N, 4 * HD), GRID)
    (bias,) = seen  # pooled grid (4, 2, 2): 16 tokens, 4 per frame
    assert torch.equal(bias == 0, _loop_causal(4, 4, 4, 4))


# ------------------------------------------------------------------------------------------------
# LCHA's chunk-causal linear branch
# ------------------------------------------------------------------------------------------------


def test_causal_lcha_linear_branch_equals_masked_quadratic_reference():
    op = _randomize(LCHA(4, HD, causal=True))
    h, c = 3, 3 * HD
    x = _x(2, N, c)

    def heads4(t):  # (B, N, h*hd) -> (B*h, N, hd)
        return t.reshape(2, N, h, HD).transpose(1, 2).reshape(2 * h, N, HD)

    q, k, v = (heads4(x @ lin.weight[:c, :c].T + lin.bias[:c]) for lin in (op.q, op.k, op.v))
    feats = [F.softplus((z / z.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()) @ op.phi.weight.T + op.phi.bias)
             for z in (q, k)]
    rot = [op.rope.apply(f, GRID) for f in feats]
    mask = _loop_causal(4, PER_FRAME, 4, PER_FRAME)
    y = linear_attention_quadratic(feats[0], feats[1], v, rot[0], rot[1], mask=mask)
    ref = y.reshape(2, h, N, HD).transpose(1, 2).reshape(2, N, c)
    out = op.linear_branch(x, GRID, h)
    assert (out - ref).abs().max().item() <= 1e-5
    # teeth: the unmasked (bidirectional) reference is far from it
    full = linear_attention_quadratic(feats[0], feats[1], v, rot[0], rot[1]).reshape(2, h, N, HD).transpose(1, 2)
    assert (out - full.reshape(2, N, c)).abs().max().item() > 1e-3


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_causal_linear_attention_state_carries_across_chunks(chunk):
    g = torch.Generator().manual_seed(0)
    frames, f, d = 6, 5, 4
    qf, kf = torch.rand(3, frames * f, d, generator=g) + 0.1, torch.rand(3, frames * f, d, generator=g) + 0.1
    qr, kr, v = (torch.randn(3, frames * f, d, generator=g) for _ in range(3))
    whole, (s_all, z_all) = causal_linear_attention(qf, kf, v, frames, qr, kr)
    ref = linear_attention_quadratic(qf, kf, v, qr, kr, mask=_loop_causal(frames, f, frames, f))
    assert torch.allclose(whole, ref, atol=1e-5, rtol=1e-5)
    state, parts = None, []
    for t0 in range(0, frames, chunk):
        sl = slice(t0 * f, (t0 + chunk) * f)
        y, state = causal_linear_attention(qf[:, sl], kf[:, sl], v[:, sl], chunk, qr[:, sl], kr[:, sl], state, t0)
        parts.append(y)
    assert torch.allclose(torch.cat(parts, dim=1), whole, atol=1e-6)
    # the state is the clip mean of k_rot v^T and of k_feat: constant size, whatever the frames
    assert state[0].shape == (3, d, d) and torch.allclose(state[0], s_all, atol=1e-6)
    assert torch.allclose(state[1], kf.mean(dim=1).reshape(3, d, 1), atol=1e-6) and torch.allclose(state[1], z_all)


# ------------------------------------------------------------------------------------------------
# the whole model
# ------------------------------------------------------------------------------------------------

SPACE = SearchSpace(depth=6, stage_pattern=(0, 0, 1, 1, 0, 0), free_stages=True, latent=(1, 4, 8, 8))
CFG = ModelConfig(max_heads=4, head_dim=HD, cond_dim=32, cond_tokens=2)
ARCH = "lcha:1:2 assa:0.5:2 | ssa:1:2 gqa:1:2 | sa:0.75:2 lcha:0.5:2"


def _video_model() -> ElasticDiT:
    torch.manual_seed(0)
    model = ElasticDiT(SPACE, CFG)
    with torch.no_grad():  # leave adaLN-Zero's identity blocks, or the check is trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _video_inputs(n: int = 2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 4, 8, 8, generator=g), torch.rand(n, generator=g), torch.randint(0, 11, (n,), generator=g)


def _check_model_causality(forward, x: torch.Tensor) -> list[float]:
    """Max change of output frames <= t when input frames > t change, for t = 0..T-2."""
    base = forward(x)
    changes = []
    for t in range(x.shape[2] - 1):
        x2 = x.clone()
        x2[:, :, t + 1 :] = torch.randn(x2[:, :, t + 1 :].shape, generator=torch.Generator().manual_seed(t))
        changes.append((forward(x2)[:, :, : t + 1] - base[:, :, : t + 1]).abs().max().item())
    return changes


@torch.no_grad()
def test_supernet_and_extracted_model_are_frame_causal():
    model = _video_model()
    arch = SPACE.parse(ARCH)
    x, t, y = _video_inputs()
    bidirectional = _check_model_causality(lambda z: model.run(arch, z, t, y), x)
    assert min(bidirectional) > 1e-4  # teeth: the same weights without the mask leak the future
    assert not model.causal
    assert model.set_causal(True) is model and model.causal
    assert max(_check_model_causality(lambda z: model.run(arch, z, t, y), x)) <= 1e-6
    sub = model.extract(arch)
    assert sub.causal  # extract carries the flag
    assert max(_check_model_causality(lambda z: sub(z, t, y), x)) <= 1e-6
    assert (sub(x, t, y) - model.run(arch, x, t, y)).abs().max().item() <= 1e-5
    assert not sub.set_causal(False).causal
    assert min(_check_model_causality(lambda z: sub(z, t, y), x)) > 1e-4


@torch.no_grad()
def test_causal_model_on_images_equals_the_bidirectional_model():
    space = SearchSpace(depth=6, stage_pattern=(0, 0, 1, 1, 0, 0), free_stages=True, latent=(1, 1, 8, 8))
    torch.manual_seed(0)
    model = ElasticDiT(space, CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    arch = space.parse(ARCH)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 1, 1, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([3, 10])
    ref = model.run(arch, x, t, y)
    assert (model.set_causal(True).run(arch, x, t, y) - ref).abs().max().item() <= 1e-5
