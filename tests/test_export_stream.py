"""Streaming chunk programs (latency_models/stream_programs.py): each exported chunk program equals the eager
Streamer's step on the same inputs, a whole streamed generation on the ExecuTorch runtime equals the
eager one, every program is one XNNPACK delegate, and the errors a user can cause -- plus the image
latency table refusing a video arch (latency_models/predictor.py)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from ditnas.arch import SearchSpace
from ditnas.latency_models.stream_programs import (
    KIND,
    StreamPrograms,
    export_stream_programs,
    run_stream_pte,
    stream_generate_eager,
)
from ditnas.config import ModelConfig
from ditnas.errors import DitnasError
from ditnas.latency_models import cells_for_space
from ditnas.latency_models.lowering import read_sidecar
from ditnas.latency_models.predictor import LatencyPredictor
from ditnas.latency_models.table import LatencyTable
from ditnas.supernet.model import ElasticDiT
from ditnas.supernet.streaming import Streamer

torch.set_num_threads(1)

FRAMES, CHUNK = 2, 1  # two chunk programs (t0 = 0 and 1); chunk 1 also covers LCHA's full-range state slice
SPACE = SearchSpace(depth=3, stage_pattern=(0, 0, 0), skippable=(2,), free_stages=True, latent=(1, FRAMES, 8, 8),
                    widths=(0.5, 1.0))
CFG = ModelConfig(max_heads=2, head_dim=8, cond_dim=16, cond_tokens=2)
ARCH = "lcha:1:2 assa:1:2 skip"  # every cache kind: linear state, conv frames, k/v (+ ASSA's compressed k/v)


def _causal_sub(seed: int = 0, arch: str = ARCH):
    torch.manual_seed(seed)
    model = ElasticDiT(SPACE, CFG)
    with torch.no_grad():  # leave adaLN-Zero's identity blocks, or the parity is trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval().set_causal(True).extract(SPACE.parse(arch)).eval()


# the programs these tests share take ~40 s to lower: slow (the default run stays under ~15 min);
# tests/test_video_run.py (slow too) exports chunk programs through the pipeline
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    sub = _causal_sub()
    folder = tmp_path_factory.mktemp("stream")
    manifest = export_stream_programs(sub, CHUNK, FRAMES, folder)
    return sub, folder, manifest, StreamPrograms(folder)


def _clip(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1, FRAMES, 8, 8, generator=g), torch.tensor([3])


@torch.no_grad()
@SLOW
def test_every_chunk_program_equals_the_eager_streamer_step(exported):
    sub, _, manifest, programs = exported
    streamer = Streamer(sub, CHUNK)
    clip, y = _clip(1)
    eager_cache, checked = streamer.new_cache(1), 0
    for t0 in range(0, FRAMES, CHUNK):
        x = clip[:, :, t0 : t0 + CHUNK]
        for level in (0.9, 0.3):  # a noisy step and a later one, the same cache
            t = torch.tensor([level])
            want_v, want_cache = streamer.step(x, t, y, eager_cache)
            got_v, got_cache = programs.step(x, t, y, eager_cache)  # the eager cache, fed to the .pte
            assert (got_v - want_v).abs().max().item() <= 1e-4
            assert want_v.abs().max().item() > 1e-2  # not a trivially zero output
            assert got_cache.tensors().keys() == want_cache.tensors().keys()
            for name, tensor in want_cache.tensors().items():
                assert got_cache.tensors()[name].shape == tensor.shape
                assert (got_cache.tensors()[name] - tensor).abs().max().item() <= 1e-4, name
            checked += 1
        eager_cache = streamer.commit(x, y, eager_cache)
    assert checked == 2 * FRAMES // CHUNK == 2 * len(manifest["stream"]["programs"])


@torch.no_grad()
@SLOW
def test_streamed_generation_on_the_runtime_equals_the_eager_one(exported):
    sub, folder, _, programs = exported
    noise, y = _clip(2)
    streamer = Streamer(sub, CHUNK)
    want, _ = stream_generate_eager(streamer, noise, y, steps=3)
    got, seconds = run_stream_pte(folder / "manifest.json", noise, y, steps=3)
    assert got.shape == noise.shape and len(seconds) == FRAMES // CHUNK and all(s > 0 for s in seconds)
    assert (got - want).abs().max().item() <= 1e-3
    # teeth: without the committed cache (each chunk generated alone) the second chunk differs
    alone = torch.cat([stream_generate_eager(streamer, noise[:, :, i : i + 1], y, steps=3)[0]
                       for i in range(FRAMES)], dim=2)
    assert (alone - want)[:, :, 1:].abs().max().item() > 1e-3
    assert torch.equal(run_stream_pte(programs, noise, y, steps=3)[0], got)  # deterministic, loaded or by path
    assert (_brute_force_generation(streamer, noise, y, steps=3) - want).abs().max().item() <= 1e-6


def _brute_force_generation(streamer: Streamer, noise, y, steps: int):
    """streaming.py's documented loop, written out: Euler steps per chunk, the clean chunk committed."""
    cache, chunks = streamer.new_cache(1), []
    times = torch.linspace(1.0, 0.0, steps + 1)
    for start in range(0, FRAMES, CHUNK):
        x = noise[:, :, start : start + CHUNK]
        for i in range(steps):
            v, _ = streamer.step(x, torch.full((1,), float(times[i])), y, cache)
            x = x - (times[i] - times[i + 1]) * v
        cache = streamer.commit(x, y, cache)
        chunks.append(x)
    return torch.cat(chunks, dim=2)


@SLOW
def test_every_program_is_one_delegate_and_only_the_label_lookup_stays_outside(exported):
    _, folder, manifest, _ = exported
    for entry in manifest["stream"]["programs"]:
        report = read_sidecar(folder / entry["file"])["delegation"]
        assert report["delegated_subgraphs"] == 1 and report["non_delegated_compute_ops"] == []
        assert report["delegated_share"] == 1.0
        outside = {op: b["non_delegated"] for op, b in report["by_op"].items() if b["non_delegated"]}
        # the only aten op outside: the two label-embedding row gathers (y_embed, ctx_embed); XNNPACK has no
        # fp32 embedding. dim-order copies of scalar constants and the delegate's getitems are not aten ops
        assert {op for op in outside if op.startswith("aten_")} == {"aten_embedding_default"}
        assert outside["aten_embedding_default"] == 2
        assert set(outside) <= {"aten_embedding_default", "dim_order_ops__to_dim_order_copy_default", "getitem"}
        assert read_sidecar(folder / entry["file"])["recipe"]["graph_edits"] == ["drop_noop_aliases"]


@SLOW
def test_manifest_names_the_cache_tensors_their_shapes_the_chunk_and_the_fingerprint(exported):
    sub, folder, manifest, _ = exported
    on_disk = json.loads((folder / "manifest.json").read_text())
    s = on_disk["stream"]
    assert on_disk["kind"] == KIND and s["chunk"] == CHUNK and s["frames"] == FRAMES
    assert s["arch_key"] == sub.arch.key() and s["fingerprint"] == Streamer(sub, CHUNK).fingerprint
    assert [p["t0"] for p in s["programs"]] == [0, 1]
    first, second = s["programs"]
    assert [i["name"] for i in first["inputs"]] == ["x", "t", "y"]  # the first chunk has no past
    caches = [o["name"] for o in first["outputs"][1:]]
    assert caches == [i["name"] for i in second["inputs"][3:]]  # outputs of one wire into the next
    assert set(caches) == {"block0.linear.kv", "block0.linear.k", "block0.conv.x", "block1.kv.k", "block1.kv.v",
                           "block1.kv.k_small", "block1.kv.v_small"}
    shapes = {o["name"]: o["shape"] for o in second["outputs"][1:]}
    assert shapes["block1.kv.k"] == [2, FRAMES * 16, 8]  # batch x heads, 2 frames x 16 tokens, head_dim
    assert shapes["block0.linear.kv"] == [2, 8, 8] and shapes["block0.conv.x"] == [1, 2, 16, 4, 4]
    assert sum(s["cache_nbytes_at_end"].values()) == 4 * sum(
        torch.Size(v).numel() for v in shapes.values())


def test_chunk_that_does_not_divide_the_clip_is_refused(tmp_path):
    with pytest.raises(DitnasError, match=r"chunk size 3 does not divide the clip length of 4 frames"):
        export_stream_programs(_causal_sub(), 3, 4, tmp_path)
    assert not any(tmp_path.iterdir())


def test_non_causal_model_is_refused(tmp_path):
    sub = _causal_sub().set_causal(False)
    with pytest.raises(DitnasError, match="not frame-causal"):
        export_stream_programs(sub, CHUNK, FRAMES, tmp_path)


@SLOW
def test_cache_of_another_program_and_bad_noise_are_refused(exported):
    _, _, _, programs = exported
    clip, y = _clip(3)
    other = Streamer(_causal_sub(seed=1), CHUNK)  # same arch, other weights: another fingerprint
    _, foreign = other.step(clip[:, :, :1], torch.tensor([0.5]), y, other.new_cache(1))
    with pytest.raises(DitnasError, match=r"cache belongs to another program .*fingerprint"):
        programs.step(clip[:, :, 1:], torch.tensor([0.5]), y, foreign)
    with pytest.raises(DitnasError, match=r"noise must have shape \(1, 1, 2, 8, 8\)"):
        run_stream_pte(programs, torch.zeros(1, 1, 4, 8, 8), y, steps=1)


def test_image_latency_table_refuses_a_video_arch():
    image = SearchSpace(depth=3, stage_pattern=(0, 0, 0), skippable=(2,), widths=(0.5, 1.0), latent=(1, 1, 16, 16))
    rows = pd.DataFrame([{**c.fields(), "p50": 1.0, "p10": 0.9, "p90": 1.1} for c in cells_for_space(image)])
    host = {"device_id": "test-host", "device_model": "cpu", "backend": "executorch-xnnpack", "precision": "fp32",
            "compute_unit": "cpu", "threads": 1}
    predictor = LatencyPredictor.fit(LatencyTable.from_frame(rows, host, space=image))
    still_image = image.parse("sa:1:2 lcha:1:2 skip")
    assert predictor.predict(still_image, calibrated=False) > 0
    video = SearchSpace.from_dict({**image.to_dict(), "latent": [1, 8, 16, 16]}).parse("sa:1:2 lcha:1:2 skip")
    with pytest.raises(DitnasError, match=r"latent 1x8x16x16, T=8 frames.*profiled on images \(latent 1x1x16x16, T=1\)"):
        predictor.predict(video)
    with pytest.raises(DitnasError, match="video arch"):
        predictor.predict_detail(video)
