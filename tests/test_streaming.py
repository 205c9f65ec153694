"""Streaming inference of a frame-causal extracted model: chunked output == whole-clip causal forward,
pure steps (denoising without committing), per-chunk timings, cache memory per kind, and the errors."""

from __future__ import annotations

import pytest
import torch

from ditnas.arch import SearchSpace
from ditnas.config import ModelConfig
from ditnas.errors import DitnasError
from ditnas.supernet.model import ElasticDiT
from ditnas.supernet.streaming import Streamer, stream

torch.set_num_threads(1)

SPACE = SearchSpace(depth=7, stage_pattern=(0, 0, 1, 1, 0, 0, 0), skippable=(6,), free_stages=True,
                    latent=(1, 4, 8, 8))
CFG = ModelConfig(max_heads=4, head_dim=8, cond_dim=32, cond_tokens=2)
# every op, a narrow block inside a wider stream, both resolutions and a skip
ARCH = "lcha:1:2 assa:0.5:2 | ssa:1:2 gqa:1:2 | sa:0.75:2 lcha:0.5:2 skip"


def _supernet(seed: int = 0) -> ElasticDiT:
    torch.manual_seed(seed)
    model = ElasticDiT(SPACE, CFG)
    with torch.no_grad():  # leave adaLN-Zero's identity blocks, or the parity is trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def causal_sub():
    return _supernet().set_causal(True).extract(SPACE.parse(ARCH)).eval()


def _inputs(n: int = 2, frames: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, frames, 8, 8, generator=g), torch.rand(n, generator=g),
            torch.randint(0, 11, (n,), generator=g))


@pytest.mark.parametrize("chunk", [1, 2, 4])
@torch.no_grad()
def test_streamed_output_equals_the_whole_clip_causal_forward(causal_sub, chunk):
    x, t, y = _inputs()
    whole = causal_sub(x, t, y)
    run = Streamer(causal_sub, chunk).run(x, t, y)
    assert run.output.shape == whole.shape
    assert (run.output - whole).abs().max().item() <= 1e-5
    assert run.cache.frames == 4 and len(run.stats.chunk_seconds) == 4 // chunk
    out, _ = stream(causal_sub, x, t, y, chunk)
    assert torch.equal(out, run.output)


@torch.no_grad()
def test_streaming_is_not_trivially_per_frame(causal_sub):
    """Teeth for the test above: dropping the caches (each chunk alone) gives another output."""
    x, t, y = _inputs()
    streamer = Streamer(causal_sub, 1)
    alone = torch.cat([streamer.step(x[:, :, i : i + 1], t, y, streamer.new_cache(2))[0] for i in range(4)], dim=2)
    assert (alone - causal_sub(x, t, y)).abs()[:, :, 1:].max().item() > 1e-3


@torch.no_grad()
def test_denoising_steps_without_commit_leave_the_cache_unchanged(causal_sub):
    x, t, y = _inputs()
    streamer = Streamer(causal_sub, 2)
    cache = streamer.commit(x[:, :, :2], y, streamer.new_cache(2), t=0.3)
    before = {k: v.clone() for k, v in cache.tensors().items()}
    g = torch.Generator().manual_seed(7)
    noisy = torch.randn(2, 1, 2, 8, 8, generator=g)
    first, _ = streamer.step(noisy, torch.full((2,), 0.9), y, cache)
    for level in (0.9, 0.6, 0.3):  # a few Euler steps, none committed
        v, pending = streamer.step(noisy, torch.full((2,), level), y, cache)
        noisy = noisy - 0.3 * v
        assert pending.frames == 4
    assert cache.frames == 2
    assert cache.tensors().keys() == before.keys()
    assert all(torch.equal(cache.tensors()[k], before[k]) for k in before)
    again, _ = streamer.step(torch.randn(2, 1, 2, 8, 8, generator=torch.Generator().manual_seed(7)),
                             torch.full((2,), 0.9), y, cache)
    assert torch.equal(first, again)  # no hidden state moved either
    # committing the clean chunk gives the cache of streaming those frames in one go
    clean = x[:, :, 2:]
    committed = streamer.commit(clean, y, cache, t=0.3)
    straight = streamer.run(x, torch.full((2,), 0.3), y).cache
    assert committed.frames == straight.frames == 4
    assert all(torch.allclose(committed.tensors()[k], straight.tensors()[k], atol=1e-6) for k in straight.tensors())


@torch.no_grad()
def test_stats_have_one_entry_per_chunk_and_fps_is_frames_over_time(causal_sub):
    x, t, y = _inputs()
    lines = []
    run = Streamer(causal_sub, 2).run(x, t, y, log=lines.append)
    stats = run.stats
    assert stats.chunk_frames == [2, 2] and len(stats.chunk_seconds) == 2 and len(lines) == 2
    assert all(s > 0 for s in stats.chunk_seconds)
    assert stats.fps == pytest.approx([2 / s for s in stats.chunk_seconds], rel=1e-12)
    assert stats.to_dict()["fps"] == stats.fps


@torch.no_grad()
def test_kv_cache_grows_linearly_and_linear_state_stays_constant(causal_sub):
    x, t, y = _inputs(frames=4)
    streamer = Streamer(causal_sub, 1)
    cache, sizes = streamer.new_cache(2), []
    for i in range(4):
        cache = streamer.step(x[:, :, i : i + 1], t, y, cache)[1]
        sizes.append(cache.nbytes())
    kv = [s["kv_cache"] for s in sizes]
    assert kv == [kv[0] * (i + 1) for i in range(4)] and kv[0] > 0
    assert len({s["linear_state"] for s in sizes}) == 1 and sizes[0]["linear_state"] > 0
    assert len({s["conv_buffer"] for s in sizes}) == 1 and sizes[0]["conv_buffer"] > 0
    # the exact sizes of two blocks, from their shapes: SA at 3 heads, full resolution (16 tokens a frame)
    b, hd = 2, 8
    assert cache.blocks[4]["kv.k"].shape == (b * 3, 4 * 16, hd)
    # LCHA at 4 heads: mean k v^T (d x d) and mean k (d) per batch x head, + 2 conv frames of (C=32, 4, 4)
    lcha = {k: v.numel() * v.element_size() for k, v in cache.blocks[0].items()}
    assert lcha == {"linear.kv": b * 4 * hd * hd * 4, "linear.k": b * 4 * hd * 4, "conv.x": b * 2 * 32 * 16 * 4}
    assert cache.blocks[6] is None  # the skip slot holds nothing


def test_chunk_that_does_not_divide_the_clip_is_refused(causal_sub):
    x, t, y = _inputs(frames=4)
    with pytest.raises(DitnasError, match=r"4 latent frames.*chunk size 3"):
        Streamer(causal_sub, 3).run(x, t, y)


def test_cache_from_another_model_or_chunk_size_is_refused(causal_sub):
    x, t, y = _inputs()
    streamer = Streamer(causal_sub, 2)
    _, cache = streamer.step(x[:, :, :2], t, y, streamer.new_cache(2))
    other_arch = _supernet().set_causal(True).extract(SPACE.parse("sa:1:2*6 skip"))
    with pytest.raises(DitnasError, match="another model"):
        Streamer(other_arch, 2).step(x[:, :, 2:], t, y, cache)
    same_arch_other_weights = _supernet(seed=1).set_causal(True).extract(SPACE.parse(ARCH))
    with pytest.raises(DitnasError, match="another model"):
        Streamer(same_arch_other_weights, 2).step(x[:, :, 2:], t, y, cache)
    with pytest.raises(DitnasError, match="chunk size 2.*chunk size 1"):
        Streamer(causal_sub, 1).step(x[:, :, 2:3], t, y, cache)
    with pytest.raises(DitnasError, match="batch 1"):
        streamer.step(x[:1, :, 2:], t[:1], y[:1], cache)
    with pytest.raises(DitnasError, match=r"\(B, 1, 2, 8, 8\)"):
        streamer.step(x[:, :, 1:], t, y, cache)


def test_non_causal_model_is_refused():
    sub = _supernet().extract(SPACE.parse(ARCH))
    with pytest.raises(DitnasError, match="not frame-causal"):
        Streamer(sub, 2)
    with pytest.raises(DitnasError, match="extracted model"):
        Streamer(_supernet().set_causal(True), 2)
