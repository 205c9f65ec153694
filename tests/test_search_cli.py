"""`ditnas search` end to end: a tiny trained supernet, a host-torch table, DP seeds, Optuna, rerun."""

import json

import pandas as pd
import pytest
from test_search_objectives import build_env

from cli_helpers import run

from ditnas.search.problem import min_reachable_ms
from ditnas.search.space import SearchChoices



@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = build_env(tmp_path_factory.mktemp("search_cli"))
    predictor = e["ctx"].objectives.predictor
    low = min_reachable_ms(SearchChoices.from_space(e["ctx"].space), predictor)
    high = predictor.predict(e["ctx"].space.max_arch())
    # a total budget for 4 steps between the cheapest and the largest arch: the constraint binds
    e["budget"] = 4 * (low + 0.35 * (high - low))
    return e


def test_search_writes_results_and_rerun_continues(env, tmp_path, capsys):
    args = ["search", "--checkpoint", str(env["ckpt"]), "--table", str(env["table_dir"]), "--budget-ms", str(env["budget"]),
            "--steps", "4", "--trials", "8", "--seeds", "2", "--out", str(tmp_path / "s"), "--no-progress"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["trials_total"] == 8 and manifest["pareto_size"] >= 1
    assert manifest["config"]["trials"] == 8 and manifest["config"]["dp_seeds"] == 2
    trials = pd.read_csv(tmp_path / "s" / "trials.csv")
    # feasible is exactly "fits the budget", and the budget binds: some trials fit, some do not
    assert (trials["feasible"] == (trials["latency_ms"] <= env["budget"])).all()
    assert 0 < trials["feasible"].sum() < len(trials)
    assert manifest["best"]["latency_ms"] <= env["budget"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["trials_total"] == 16


def test_search_reads_its_config_section(env, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"search:\n  budget_ms: {env['budget']}\n  steps: [4]\n  trials: 3\n  dp_seeds: 1\n")
    code, _, err = run(["search", "--checkpoint", str(env["ckpt"]), "--table", str(env["table_dir"]), "--config",
                        str(config), "--trials", "4", "--out", str(tmp_path / "s"), "--no-progress"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    # the flag wins over the file, the file over the default
    assert manifest["trials_total"] == 4 and len(manifest["dp"]["seeds"]) == 1 and manifest["steps"] == [4]
    config.write_text("search:\n  budget: 10\n")
    code, _, err = run(["search", "--checkpoint", str(env["ckpt"]), "--table", str(env["table_dir"]), "--config",
                        str(config), "--out", str(tmp_path / "t"), "--no-progress"], capsys)
    assert code == 2 and "search: unknown field(s) ['budget']" in err and str(config) in err
    config.write_text("search:\n  trials: many\n")
    code, _, err = run(["search", "--checkpoint", str(env["ckpt"]), "--table", str(env["table_dir"]), "--config",
                        str(config), "--budget-ms", "5", "--out", str(tmp_path / "t"), "--no-progress"], capsys)
    assert code == 2 and "search.trials: expected int, got 'many'" in err
    code, _, err = run(["search", "--checkpoint", str(env["ckpt"]), "--table", str(env["table_dir"]),
                        "--out", str(tmp_path / "t"), "--no-progress"], capsys)
    assert code == 2 and "--budget-ms (search.budget_ms): missing" in err
    assert not (tmp_path / "t" / "trials.csv").exists()


def test_budget_below_the_cheapest_arch(env, tmp_path, capsys):
    code, _, err = run(["search", "--checkpoint", str(env["ckpt"]), "--table", str(env["table_dir"]), "--budget-ms",
                        "0.001", "--steps", "4", "--trials", "2", "--out", str(tmp_path / "s"), "--no-progress"], capsys)
    assert code == 2 and "below the cheapest reachable arch" in err and "Traceback" not in err
    assert err.startswith("error: --budget-ms (search.budget_ms): 0.001 ms")  # the flag the user typed
    assert "per-step budget" not in err  # 0.001 ms is no plausible per-step figure either


def test_a_per_step_budget_is_named_as_such(env, tmp_path, capsys):
    """A budget above one step of the cheapest arch but below its whole generation: the error says the
    number was read as one whole generation and how to turn a per-step figure into one."""
    from ditnas.latency_models.stage import load_predictor
    from ditnas.search.problem import min_reachable_ms
    from ditnas.search.space import SearchChoices

    table, predictor = load_predictor(env["table_dir"])
    per_step = min_reachable_ms(SearchChoices.from_space(table.space), predictor)
    budget = round(per_step * 1.5, 3)  # > one step, < 4 steps
    code, _, err = run(["search", "--checkpoint", str(env["ckpt"]), "--table", str(env["table_dir"]), "--budget-ms",
                        str(budget), "--steps", "4", "--trials", "2", "--out", str(tmp_path / "s"), "--no-progress"], capsys)
    assert code == 2 and "read as ONE WHOLE GENERATION" in err and "multiply it by the steps" in err, err


def test_cfg_on_a_table_without_cfg_generations_is_refused(env, tmp_path, capsys):
    code, _, err = run(["search", "--checkpoint", str(env["ckpt"]), "--table", str(env["table_dir"]), "--budget-ms",
                        "1000", "--steps", "4", "--guidance", "cfg", "--trials", "2", "--out", str(tmp_path / "s"),
                        "--no-progress"], capsys)
    assert code == 2 and "no measured cfg generations" in err and "--guidance none" in err, err
    assert not (tmp_path / "s" / "trials.csv").exists()


def test_a_pdg_search_prices_every_trial_as_full_plus_dense_only_calls(env, tmp_path, capsys):
    """--guidance pdg: each step is the full net + its dense-only net (pdg_latency.py); on a table without
    generations that is steps x (P + P_dense-only), labelled; the DP seeds fit that budget too."""
    from ditnas.latency_models.pdg_latency import PathDropPricing
    from ditnas.latency_models.stage import load_predictor

    table, predictor = load_predictor(env["table_dir"])
    pricing = PathDropPricing(predictor, 1)
    budget = 4 * pricing.predict(table.space.max_arch()) * 0.8
    code, _, err = run(["search", "--checkpoint", str(env["ckpt"]), "--table", str(env["table_dir"]), "--budget-ms",
                        str(budget), "--steps", "4", "--guidance", "pdg", "--trials", "4", "--seeds", "2",
                        "--out", str(tmp_path / "s"), "--no-progress"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["guidance"] == "pdg" and manifest["path_drop"]["pdg_dense"] == 1
    assert "2 batch-1 calls per step (PDG" in manifest["latency_definition"] and "uncalibrated" in manifest["latency_definition"]
    trials = pd.read_csv(tmp_path / "s" / "trials.csv")
    done = trials[trials["state"] == "COMPLETE"]
    assert len(done) == 4
    for row in done.itertuples():
        arch = table.space.parse(row.arch)
        assert row.latency_ms == pytest.approx(4 * (predictor.predict(arch) + predictor.predict_dense_only(arch, 1)), rel=1e-9)
        assert row.latency_ms > 4 * predictor.predict(arch)  # the unconditional branch is priced, not free
    assert manifest["best"]["latency_ms"] <= budget
    code, _, err = run(["sweep", "--checkpoint", str(env["ckpt"]), "--budgets", str(budget), "--tables", str(env["table_dir"]),
                        "--steps", "4", "--set", "search.guidance=pdg", "--out", str(tmp_path / "sw"), "--no-progress"], capsys)
    assert code == 2 and "search.guidance" in err and "`ditnas search --guidance pdg`" in err, err


def test_a_table_of_another_thread_count_is_refused(env, tmp_path, capsys):
    code, _, err = run(["search", "--checkpoint", str(env["ckpt"]), "--table", str(env["table_dir"]), "--budget-ms",
                        "1000", "--steps", "4", "--threads", "4", "--trials", "2", "--out", str(tmp_path / "s"),
                        "--no-progress"], capsys)
    assert code == 2 and "--threads (search.threads): 4 threads asked" in err and "measured at 1" in err, err


def test_unreachable_storage(env, tmp_path, capsys):
    code, _, err = run(["search", "--checkpoint", str(env["ckpt"]), "--table", str(env["table_dir"]), "--budget-ms",
                        "1e6", "--steps", "4", "--trials", "2", "--out", str(tmp_path / "s"), "--no-progress",
                        "--storage", "postgresql://nobody@127.0.0.1:1/none"], capsys)
    assert code == 2 and "storage" in err and "Traceback" not in err


@pytest.mark.timeout(300)
def test_sweep_on_a_local_ray_cluster(env, tmp_path, capsys, monkeypatch):
    """Two budgets x one device table, evaluations as Ray tasks; results per study + combined front."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # Ray's token file stays out of the user's home
    budgets = [float(env["budget"]), 2 * float(env["budget"])]
    code, _, err = run(["sweep", "--checkpoint", str(env["ckpt"]), "--budgets", ",".join(map(repr, budgets)), "--tables",
                          str(env["table_dir"]), "--trials", "3", "--steps", "4", "--seeds", "2", "--out", str(tmp_path / "sw"),
                          "--no-progress"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert len(manifest["studies"]) == 2
    # every study starts from exact-DP layouts under its own budget, as `ditnas search` does
    assert sorted(len(v) for v in manifest["dp_seeds"].values()) == [2, 2]
    import optuna

    from ditnas.search.optuna_search import open_storage

    store, _ = open_storage(str(tmp_path / "sw" / "sweep.journal"), tmp_path / "sw")
    for name in optuna.get_all_study_names(store):
        trials = sorted(optuna.load_study(study_name=name, storage=store).trials, key=lambda t: t.number)
        assert [t.user_attrs.get("source") for t in trials[:2]] == ["dp", "dp"] and len(trials) == 3
    front = pd.read_csv(tmp_path / "sw" / "front.csv")
    assert set(front["budget_ms"]) == set(budgets) and (front["latency_ms"] <= front["budget_ms"]).all()
    assert manifest["versions"]["optuna"] == optuna.__version__
    # a budget below the cheapest arch is refused exactly as `ditnas search` refuses it, before Ray starts
    code, _, err = run(["sweep", "--checkpoint", str(env["ckpt"]), "--budgets", f"{env['budget']},0.001", "--tables",
                        str(env["table_dir"]), "--trials", "2", "--steps", "4", "--seeds", "0", "--out", str(tmp_path / "bad"),
                        "--no-progress"], capsys)
    assert code == 2 and "--budgets (sweep.budgets_ms): 0.001 ms is below the cheapest reachable arch" in err
    assert not (tmp_path / "bad" / "sweep.journal").exists()
    import ray

    ray.shutdown()


@pytest.mark.slow  # a local Ray cluster of its own and a trained signal on its workers: ~1 min on 2 cores
@pytest.mark.timeout(300)
def test_sweep_with_a_trained_signal_and_rerank(env, tmp_path, capsys, monkeypatch):
    """search.quality / rerank_top in a sweep: the workers score with the proxy signal (= an independent
    standalone run), and each study's pick is successive halving over its own top archs, as `ditnas search`."""
    import optuna
    import ray

    from ditnas.search.optuna_search import open_storage

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # Ray's token file stays out of the user's home
    budget = 2 * float(env["budget"])
    code, _, err = run(["sweep", "--checkpoint", str(env["ckpt"]), "--budgets", repr(budget), "--tables",
                        str(env["table_dir"]), "--trials", "5", "--steps", "4", "--seeds", "2", "--quality", "proxy",
                        "--quality-steps", "2", "--rerank-top", "3", "--set", "search.rerank_steps=[2,4]",
                        "--out", str(tmp_path / "q"), "--no-progress"], capsys)
    assert code == 0, err
    store, _ = open_storage(str(tmp_path / "q" / "sweep.journal"), tmp_path / "q")
    (name,) = optuna.get_all_study_names(store)
    assert name.endswith("-proxy2")  # never mixed with supernet-signal studies
    from ditnas.search.objectives import EvalContext
    from ditnas.supernet.flow import EVAL_SEED, VAL_BATCH

    ctx = EvalContext.from_paths(env["ckpt"], None, VAL_BATCH, EVAL_SEED)  # the sweep's eval batch
    proxy = {s: ctx.new_signal("proxy", s, tmp_path / "independent") for s in (2, 4)}  # its own cache
    trials = pd.read_parquet(next((tmp_path / "q").rglob("trials.parquet")))
    done = trials[trials["state"] == "COMPLETE"]
    for row in done.head(2).itertuples():
        assert row.quality == pytest.approx(proxy[2](ctx.space.parse(row.arch, source="test")), abs=1e-6)
    study = json.loads(next((tmp_path / "q").rglob("study.json")).read_text())
    top = list(done[done["feasible"]].sort_values(["quality", "latency_ms"]).drop_duplicates("arch")["arch"].head(3))
    assert study["rerank"]["candidates"] == top and len(top) == 3
    loss = {(a, s): proxy[s](ctx.space.parse(a, source="test")) for a in top for s in (2, 4)}
    want = min(sorted(top, key=lambda a: loss[(a, 2)])[:2], key=lambda a: loss[(a, 4)])
    assert study["rerank"]["pick"] == want and study["best"]["arch"] == want
    assert study["best_by"] == "rerank: proxy loss after 4 steps"
    assert json.loads((tmp_path / "q" / "sweep.json").read_text())["studies"][0]["rerank"]["pick"] == want
    ray.shutdown()
