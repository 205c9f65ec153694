"""End-to-end generation latency (latency_models/generation_latency.py, generation_profile.py):
the fit recovers a known law exactly and inverts to the DP's per-step budget; a profile times whole
generations of its model archs (host-torch and the XNNPACK runtime), resumes without re-timing, and
the predictor prices a generation within the measured spread."""

import numpy as np
import pandas as pd
import pytest

from ditnas.config import LatencyConfig, load_config
from ditnas.errors import DitnasError
from ditnas.latency_models.generation_latency import GenerationFit, GenerationPricing
from ditnas.latency_models.generation_profile import read_generation_samples
from ditnas.latency_models.profile import profile_space, sample_archs, supernet_for_profiling
from ditnas.latency_models.stage import build_table, load_predictor

TINY = ["model.max_heads=2", "model.head_dim=8", "model.cond_dim=16", "model.cond_tokens=1", "space.depth=3",
        "space.stage_pattern=[0,1,0]", "space.skippable=[1]", "space.widths=[0.5,1.0]", "space.mlp_ratios=[2,4]",
        "space.ops=[sa,lcha]"]


def test_fit_recovers_a_known_law_and_inverts_to_the_per_step_budget():
    rng = np.random.default_rng(0)
    per_step = rng.uniform(0.5, 3.0, 12)
    steps = np.array([4, 28] * 6)
    measured = 0.62 * steps * per_step + 0.05 * steps + 1.3
    fit = GenerationFit.fit("cfg", per_step, steps, measured)
    assert fit.method == "linear" and fit.n == 12
    assert (fit.alpha, fit.beta, fit.gamma) == pytest.approx((0.62, 0.05, 1.3), rel=1e-9)
    for p, s in zip(per_step, steps):
        total = fit.apply(p, s)
        assert fit.per_step_budget(total, s) == pytest.approx(p, rel=1e-12)  # the DP's budget is the exact inverse
    # too few rows: the median ratio, still exact on a pure ratio law
    ratio = GenerationFit.fit("none", per_step[:3], steps[:3], 0.7 * steps[:3] * per_step[:3])
    assert ratio.method == "ratio_median" and ratio.alpha == pytest.approx(0.7)


def test_a_table_without_generations_prices_none_uncalibrated_and_refuses_cfg():
    pricing = GenerationPricing()
    assert pricing.generation_ms(2.0, 28, "none") == pytest.approx(56.0)
    assert "uncalibrated" in pricing.definition("none", 28)
    with pytest.raises(DitnasError, match="no measured cfg generations"):
        pricing.generation_ms(2.0, 28, "cfg")
    assert pricing.fit_for("pdg").method == "uncalibrated"  # steps x (full + dense-only), labelled so
    with pytest.raises(DitnasError, match="guidance 'pag' is not one of"):
        pricing.fit_for("pag")


def _profile(root, backend, kinds=("block", "patch_embed", "final", "down", "up"), **kw):
    cfg = load_config(None, TINY)
    supernet = supernet_for_profiling(cfg)
    lat = LatencyConfig(backend=backend, warmup=1, iters=3, **kw)
    return supernet, lat, profile_space(supernet, lat, root, kinds=kinds)


def test_host_profile_times_generations_resumes_and_prices_them(tmp_path):
    supernet, lat, session = _profile(tmp_path, "host-torch", models=5, generation_steps=(2, 6), generation_iters=3)
    samples = read_generation_samples(session.root)
    archs = sample_archs(supernet.space, 5, lat.seed)
    assert samples.groupby("key").size().to_dict() == {k: 3 for k in samples["key"].unique()}
    assert len(samples["key"].unique()) == 5 * 2 * 2  # archs x guidance x steps
    # rerun: nothing timed twice
    again = profile_space(supernet, lat, tmp_path)
    pd.testing.assert_frame_equal(read_generation_samples(again.root), samples)
    table, predictor = build_table(session, supernet)
    for guidance in ("none", "cfg"):
        fit = predictor.generation.fits[guidance]
        assert fit.n == 10 and fit.method in ("linear", "ratio_median")
    # a generation is priced near its measured p50, and more steps cost more
    summary = samples.groupby(["arch", "steps", "guidance"])["ms"].median()
    errs = []
    for arch in archs:
        for g in ("none", "cfg"):
            lo, hi = predictor.predict_generation(arch, 2, g), predictor.predict_generation(arch, 6, g)
            assert hi > lo
            errs.append(abs(hi - summary[(str(arch), 6, g)]) / summary[(str(arch), 6, g)])
    assert np.median(errs) < 0.5, errs  # eager loops on a shared VM: a sanity bound only; the bench measures the figure
    # the pricing survives a reload and a refit of a stale predictor
    (table.root / "predictor.json").unlink()
    _, reloaded = load_predictor(table.root)
    assert reloaded.generation.fits["cfg"] == predictor.generation.fits["cfg"]


@pytest.mark.slow  # ~100 s idle, minutes under load: four lowerings plus timing processes
def test_xnnpack_profile_times_pte_generations(tmp_path):
    """On the runtime: `none` reuses the profiled model .pte, `cfg` lowers the exported sampler's
    batch-2 denoiser; a cfg generation costs more than a none one of the same arch and steps."""
    supernet, lat, session = _profile(tmp_path, "executorch-xnnpack", models=2, generation_steps=(4,), generation_iters=3,
                                      kinds=())
    samples = read_generation_samples(session.root)
    assert len(samples["key"].unique()) == 2 * 2 and (samples.groupby("key").size() == 3).all()
    assert (session.root / "generations").is_dir() and len(list((session.root / "generations").glob("*.pte"))) == 2
    med = samples.groupby(["arch", "guidance"])["ms"].median().unstack()
    assert (med["cfg"] > med["none"]).all(), med


def test_each_round_times_every_key_repeats_times_and_keeps_their_median(tmp_path, monkeypatch):
    """latency.generation_repeats: every round's process times each key that many times back to back (after one
    warm-up) and the round's sample is their median; rounds stay separate samples, in a new order each."""
    from types import SimpleNamespace

    import ditnas.latency_models.generation_profile as gp
    from ditnas.arch import SearchSpace

    space = SearchSpace(depth=2, stage_pattern=(0, 0), ops=("sa",), widths=(1.0,), mlp_ratios=(2.0,))
    archs = [space.max_arch()]
    todo = [(archs[0], g, s) for g in ("none", "cfg") for s in (4, 28)]
    calls = []

    def fake_timer(jobs, threads, warmup, iters):
        r = len(calls)
        calls.append(([j[0] for j in jobs], warmup, iters))
        return {key: [1.0 + r, 2.0 + r, 3.0 + r, 100.0 + r] for key, *_ in jobs}

    monkeypatch.setattr(gp, "_pte_for", lambda *a, **k: tmp_path / "x.pte")
    monkeypatch.setattr(gp, "time_generations_in_fresh_process", fake_timer)
    cfg = LatencyConfig(generation_iters=3, generation_repeats=4)
    empty = pd.DataFrame(columns=["key", "arch", "steps", "guidance", "threads", "run", "ms"])
    samples = gp._time_in_rounds(None, todo, cfg, SimpleNamespace(root=tmp_path), empty, 1, 2.0, None)
    assert [(w, i) for _, w, i in calls] == [(1, 4)] * 3
    assert len({tuple(k) for k, _, _ in calls}) > 1  # a new order each round
    for key, group in samples.groupby("key"):
        assert list(group.sort_values("run")["ms"]) == [2.5, 3.5, 4.5]  # medians of the repeats, one per round
    assert len(samples) == 4 * 3 and read_generation_samples(tmp_path).equals(samples)
