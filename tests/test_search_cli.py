"""`ditnas search` end to end: a tiny trained supernet, a host-torch table, DP seeds, Optuna, rerun."""

import json

import pandas as pd
import pytest
from test_search_objectives import build_env

from cli_helpers import run



@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("search_cli"))


def test_search_writes_results_and_rerun_continues(env, tmp_path, capsys):
    args = ["search", "--checkpoint", str(env["ckpt"]), "--table", str(env["table_dir"]), "--budget-ms", "1e6",
            "--steps", "4", "--trials", "6", "--seeds", "2", "--out", str(tmp_path / "s"), "--no-progress"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["trials_total"] == 6 and manifest["pareto_size"] >= 1
    trials = pd.read_csv(tmp_path / "s" / "trials.csv")
    assert trials["feasible"].all()  # a huge budget: everything fits
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["trials_total"] == 12


def test_budget_below_the_cheapest_arch(env, tmp_path, capsys):
    code, _, err = run(["search", "--checkpoint", str(env["ckpt"]), "--table", str(env["table_dir"]), "--budget-ms",
                        "0.001", "--steps", "4", "--trials", "2", "--out", str(tmp_path / "s"), "--no-progress"], capsys)
    assert code == 2 and "below the cheapest reachable arch" in err and "Traceback" not in err


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
    code, _, err = run(["sweep", "--checkpoint", str(env["ckpt"]), "--budgets", "1e6,2e6", "--tables",
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
    assert set(front["budget_ms"]) == {1e6, 2e6}
    import ray

    ray.shutdown()
