"""Quality signals (ditnas/search/signals.py) on a tiny trained supernet: proxy == an independent
standalone run, finetune at 0 steps == the weight-sharing loss, the disk cache, the config field and
the search manifest."""

import json
from dataclasses import replace

import pandas as pd
import pytest
from cli_helpers import run
from test_search_objectives import build_env

from ditnas.config import SearchConfig, load_config
from ditnas.errors import ConfigFieldError, DitnasError
from ditnas.search.objectives import torch_threads
from ditnas.search.problem import min_reachable_ms
from ditnas.search.signals import QualitySignal, flow_losses, recipe_hash
from ditnas.search.space import SearchChoices
from ditnas.search.stage import run_search
from ditnas.supernet.train import StandaloneTrainer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    e = build_env(tmp_path_factory.mktemp("signals"))
    ctx = e["ctx"]
    ctx.use_quality("supernet")
    from ditnas.data import load_dataset

    e["split"] = load_dataset("digits")
    e["cfg"] = ctx.config
    return e


def _signal(env, kind, steps, cache, **kw):
    ctx = env["ctx"]
    return QualitySignal(kind, ctx.supernet, ctx.objectives.batch, steps, env["cfg"], env["split"], cache,
                         ctx.checkpoint_sha256, ctx.n, ctx.seed, **kw)


def _independent(env, arch, steps, *, init=None, seed=None):
    cfg = env["cfg"] if seed is None else replace(env["cfg"], train=replace(env["cfg"].train, seed=seed))
    trainer = StandaloneTrainer(arch, cfg, env["split"], init=init)
    for _ in range(steps):
        trainer.train_step()
    return flow_losses(trainer.model, trainer.ema.state_dict(), env["ctx"].objectives.batch)


def test_proxy_equals_an_independent_standalone_run(env, tmp_path):
    space = env["ctx"].space
    for arch in (space.mid_arch(), space.min_arch()):
        sig = _signal(env, "proxy", 5, tmp_path)
        ref = _independent(env, arch, 5)
        assert abs(sig(arch) - ref["ema"]) <= 1e-6
        raw = _signal(env, "proxy", 5, tmp_path, weights="raw")
        assert abs(raw(arch) - ref["raw"]) <= 1e-6
        assert ref["ema"] != ref["raw"]  # the two weight sources are told apart
    # another seed is another run (data order, noise, init)
    arch = space.mid_arch()
    other = _signal(env, "proxy", 5, tmp_path, seed=7)(arch)
    assert abs(other - _independent(env, arch, 5, seed=7)["ema"]) <= 1e-6
    assert abs(other - _signal(env, "proxy", 5, tmp_path)(arch)) > 1e-6


def test_finetune_at_zero_steps_is_the_supernet_signal_and_trains_from_the_extracted_weights(env, tmp_path):
    ctx, space = env["ctx"], env["ctx"].space
    supernet = _signal(env, "supernet", 0, None)
    for arch in (space.max_arch(), space.mid_arch(), space.min_arch()):
        zero = _signal(env, "finetune", 0, tmp_path)
        assert abs(zero(arch) - supernet(arch)) <= 1e-5
        assert zero.trained_steps == 0
    arch = space.mid_arch()
    tuned = _signal(env, "finetune", 4, tmp_path)(arch)
    ref = _independent(env, arch, 4, init=ctx.supernet.extract(arch))
    assert abs(tuned - ref["ema"]) <= 1e-6
    scratch = _independent(env, arch, 4)["ema"]
    assert abs(tuned - scratch) > 1e-3  # fine-tuning did not start from a fresh init


def test_cache_is_hit_on_a_rerun_and_keyed_by_steps_seed_and_source(env, tmp_path):
    arch = env["ctx"].space.mid_arch()
    first = _signal(env, "proxy", 4, tmp_path)
    curve = first.curve(arch, [2, 4])  # one run fills both step counts
    assert first.trained_steps == 4
    again = _signal(env, "proxy", 4, tmp_path)
    assert again(arch) == curve[4]["ema"] and again.trained_steps == 0
    two = _signal(env, "proxy", 2, tmp_path)
    assert two(arch) == curve[2]["ema"] and two.trained_steps == 0
    assert abs(curve[2]["ema"] - _independent(env, arch, 2)["ema"]) <= 1e-6
    assert len(list((tmp_path / "signals" / "proxy").glob("*.json"))) == 2
    # a new seed, a new step count or another signal retrains
    seeded = _signal(env, "proxy", 4, tmp_path, seed=3)
    seeded(arch)
    assert seeded.trained_steps == 4
    ft = _signal(env, "finetune", 4, tmp_path)
    ft(arch)
    assert ft.trained_steps == 4
    # another data/config recipe is another key
    other = replace(env["cfg"], train=replace(env["cfg"].train, lr=5e-4))
    assert recipe_hash(other, env["split"]) != recipe_hash(env["cfg"], env["split"])
    # a damaged cache file is recomputed, not trusted
    for f in (tmp_path / "signals" / "proxy").glob("*.json"):
        f.write_text("{torn")
    redo = _signal(env, "proxy", 4, tmp_path)
    assert redo(arch) == curve[4]["ema"] and redo.trained_steps == 4


def test_unknown_quality_is_one_error_naming_the_field(capsys):
    with pytest.raises(ConfigFieldError) as err:
        load_config(None, ["search.quality=bogus"]).search.check()
    assert err.value.field == "search.quality" and "bogus" in str(err.value) and "proxy" in str(err.value)
    with pytest.raises(ConfigFieldError) as err:
        SearchConfig(quality_steps=-1).check()
    assert err.value.field == "search.quality_steps"
    code, _, text = run(["search", "--checkpoint", "nowhere.pt", "--table", "nowhere", "--budget-ms", "5",
                         "--quality", "bogus", "--no-progress"], capsys)
    assert code == 2 and "--quality (search.quality): unknown quality signal 'bogus'" in text
    assert len(text.strip().splitlines()) == 1
    code, _, text = run(["search", "--checkpoint", "nowhere.pt", "--table", "nowhere", "--budget-ms", "5",
                         "--quality", "proxy", "--quality-steps", "-1", "--no-progress"], capsys)
    assert code == 2 and "--quality-steps (search.quality_steps): -1 must be >= 0" in text
    with pytest.raises(DitnasError, match="quality signal 'bogus' unknown"):
        QualitySignal("bogus", None, None)


def test_search_with_the_proxy_signal_records_it_and_scores_with_it(env, tmp_path):
    ctx = env["ctx"]
    predictor = ctx.objectives.predictor
    low = min_reachable_ms(SearchChoices.from_space(ctx.space), predictor)
    high = predictor.predict(ctx.space.max_arch())
    cfg = SearchConfig(budget_ms=4 * (low + 0.35 * (high - low)), steps=(4,), trials=3, dp_seeds=1,
                       quality="proxy", quality_steps=3)
    try:
        manifest = run_search(cfg, env["ckpt"], env["table_dir"], tmp_path / "s", context=ctx, cache_dir=tmp_path / "cache")
        assert manifest["quality"]["signal"] == "proxy" and manifest["quality"]["steps"] == 3
        assert manifest["quality"]["trained_steps_this_call"] == 3 * manifest["trials_complete"] > 0
        assert manifest["config"]["quality"] == "proxy" and manifest["config"]["quality_steps"] == 3
        assert "from scratch for 3 steps" in manifest["eval"]["quality"]
        assert manifest["study_name"].endswith("-proxy3")
        trials = pd.read_parquet(tmp_path / "s" / "trials.parquet")
        row = trials[trials["state"] == "COMPLETE"].iloc[0]
        arch = ctx.space.parse(str(row["arch"]), source="test")
        assert abs(float(row["quality"]) - _independent(env, arch, 3)["ema"]) <= 1e-6
        # the supernet signal of the same arch is another number
        assert abs(float(row["quality"]) - _signal(env, "supernet", 0, None)(arch)) > 1e-4
        on_disk = json.loads((tmp_path / "s" / "manifest.json").read_text())
        assert on_disk["quality"]["signal"] == "proxy"
    finally:
        ctx.use_quality("supernet")
    # a default search on the same context is back to the weight-sharing loss
    default = run_search(replace(cfg, quality="supernet", trials=1), env["ckpt"], env["table_dir"], tmp_path / "d",
                         context=ctx, cache_dir=tmp_path / "cache")
    assert default["quality"] == {"signal": "supernet", "trained_steps_this_call": 0}


def test_standalone_trainer_init_is_copied_and_must_match_the_arch(env):
    space, supernet = env["ctx"].space, env["ctx"].supernet
    arch = space.mid_arch()
    init = supernet.extract(arch)
    before = {k: v.clone() for k, v in init.state_dict().items()}
    trainer = StandaloneTrainer(arch, env["cfg"], env["split"], init=init)
    trainer.train_step()
    assert all((init.state_dict()[k] == v).all() for k, v in before.items())  # the caller's weights are untouched
    assert any((trainer.model.state_dict()[k] != v).any() for k, v in before.items())
    with pytest.raises(DitnasError, match="init weights are of arch"):
        StandaloneTrainer(space.min_arch(), env["cfg"], env["split"], init=init)


def test_a_search_can_measure_how_well_its_signal_ranks_its_own_archs(env, tmp_path):
    """search.fidelity_archs: N of the search's feasible archs trained standalone; the manifest holds the
    signal's rank agreement with them, equal to a brute-force recomputation from independent runs."""
    from scipy.stats import kendalltau

    from ditnas.search.fidelity import pick_held_out

    ctx = env["ctx"]
    predictor = ctx.objectives.predictor
    low = min_reachable_ms(SearchChoices.from_space(ctx.space), predictor)
    high = predictor.predict(ctx.space.max_arch())
    cfg = SearchConfig(budget_ms=4 * (low + 0.6 * (high - low)), steps=(4,), trials=8, dp_seeds=2,
                       fidelity_archs=4, fidelity_steps=3)
    manifest = run_search(cfg, env["ckpt"], env["table_dir"], tmp_path / "s", context=ctx, cache_dir=tmp_path / "cache")
    fid = manifest["fidelity"]
    trials = pd.read_parquet(tmp_path / "s" / "trials.parquet")
    feasible = trials[(trials["state"] == "COMPLETE") & trials["feasible"]].sort_values("quality").drop_duplicates("arch")
    assert fid["archs"] == min(4, len(feasible)) >= 3 and fid["standalone_steps"] == 3
    archs = [r["arch"] for r in fid["rows"]]
    assert archs[0] == feasible["arch"].iloc[0] and archs[-1] == feasible["arch"].iloc[-1]  # best and worst included
    truth = [_independent(env, ctx.space.parse(a, source="test"), 3)["ema"] for a in archs]
    assert [r["standalone"] for r in fid["rows"]] == pytest.approx(truth, abs=1e-6)
    signal = [r["signal"] for r in fid["rows"]]
    assert fid["kendall_tau"] == pytest.approx(kendalltau(signal, truth).statistic)
    assert fid["trained_steps_this_call"] == 3 * fid["archs"]
    # the held-out picks: evenly spaced ranks, distinct layouts
    frame = pd.DataFrame({"state": "COMPLETE", "feasible": True, "arch": list("abcdefghij"), "quality": range(10)})
    assert pick_held_out(frame, 4) == ["a", "d", "g", "j"] and pick_held_out(frame.head(2), 4) == ["a", "b"]
    with pytest.raises(ConfigFieldError, match="search.fidelity_archs"):
        SearchConfig(fidelity_archs=2).check()


def test_rerank_trains_the_top_archs_in_rungs_and_picks_by_the_trained_loss(env, tmp_path):
    """search.rerank_top: the top-k feasible archs by the signal, successive halving over rerank_steps; the
    pick equals a brute-force recomputation with independent standalone runs."""
    ctx = env["ctx"]
    predictor = ctx.objectives.predictor
    low = min_reachable_ms(SearchChoices.from_space(ctx.space), predictor)
    high = predictor.predict(ctx.space.max_arch())
    cfg = SearchConfig(budget_ms=4 * (low + 0.6 * (high - low)), steps=(4,), trials=8, dp_seeds=2,
                       rerank_top=3, rerank_steps=(2, 4))
    manifest = run_search(cfg, env["ckpt"], env["table_dir"], tmp_path / "s", context=ctx, cache_dir=tmp_path / "cache")
    rr = manifest["rerank"]
    trials = pd.read_parquet(tmp_path / "s" / "trials.parquet")
    feasible = trials[(trials["state"] == "COMPLETE") & trials["feasible"]].sort_values(["quality", "latency_ms"])
    top = list(feasible.drop_duplicates("arch")["arch"].head(3))
    assert rr["candidates"] == top and rr["signal_pick"] == top[0]
    loss = {(a, s): _independent(env, ctx.space.parse(a, source="test"), s)["ema"] for a in top for s in (2, 4)}
    promoted = sorted(top, key=lambda a: loss[(a, 2)])[:2]  # ceil(3 / 2)
    assert [r["ranked"] for r in rr["rungs"]][0] == sorted(top, key=lambda a: loss[(a, 2)])
    assert set(rr["rungs"][1]["scores"]) == set(promoted)
    want = min(promoted, key=lambda a: loss[(a, 4)])
    assert rr["pick"] == want and manifest["best"]["arch"] == want and rr["pick_steps"] == 4
    assert rr["pick_loss"] == pytest.approx(loss[(want, 4)], abs=1e-6)
    assert manifest["best_by"] == "rerank: proxy loss after 4 steps"
    assert rr["trained_steps_this_call"] == 3 * 2 + 2 * 4
    with pytest.raises(ConfigFieldError, match="search.rerank_steps"):
        SearchConfig(rerank_steps=(500, 200)).check()
