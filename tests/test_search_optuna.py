"""Optuna search stage: DP seeds first, constraints, resumable journal, feasible Pareto front, bad input,
and a real PostgreSQL server as the study storage."""

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState
from test_search_objectives import build_env

from ditnas.arch import SearchSpace
from ditnas.config import SearchConfig
from ditnas.errors import DitnasError
from ditnas.search.objectives import torch_threads
from ditnas.search.optuna_search import (
    SAMPLERS,
    dominated,
    make_sampler,
    open_storage,
    rdb_url,
    run_study,
    trials_frame,
)
from ditnas.search.problem import min_reachable_ms
from ditnas.search.space import SearchChoices
from ditnas.search.stage import run_search
from ditnas.search.study import open_study

STEPS = [4, 8]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("search_optuna")
    e = build_env(root)
    ctx = e["ctx"]
    predictor = ctx.objectives.predictor
    from ditnas.search.sensitivity import slot_sensitivity

    sens = slot_sensitivity(ctx.supernet, ctx.objectives.batch, checkpoint_sha256=ctx.checkpoint_sha256, n=ctx.n,
                            seed=ctx.seed, cache_dir=root / "cache")
    low = min_reachable_ms(SearchChoices.from_space(ctx.space), predictor, sens)
    high = predictor.predict(ctx.space.max_arch())
    # binding for 8 steps, loose for 4: some trials are infeasible, some feasible
    e.update(cache=root / "cache", low=low, budget=8 * (low + 0.5 * (high - low)))
    return e


def _cfg(env, **kw) -> SearchConfig:
    return SearchConfig(**{"budget_ms": env["budget"], "steps": tuple(STEPS), "dp_seeds": 3, **kw})


def _search(env, out, trials, progress=None, **kw):
    return run_search(_cfg(env, trials=trials, **kw), env["ckpt"], env["table_dir"], out, context=env["ctx"],
                      cache_dir=env["cache"], progress=progress)


def test_seeds_first_constraints_resume_and_pareto(env, tmp_path):
    out = tmp_path / "run"
    phases = []
    first = _search(env, out, 8, progress=lambda ph, d, t, w: phases.append(ph))
    assert {"search"} <= set(phases)
    journal = out / "study.journal"
    assert journal.exists() and first["storage"] == str(journal)
    assert first["dashboard"] == f"optuna-dashboard {journal}"
    df = pd.read_parquet(out / "trials.parquet")
    assert len(df) == 8 and (out / "trials.csv").exists() and (out / "pareto.csv").exists()
    seeds = first["dp"]["seeds"]
    assert 1 <= len(seeds) <= 3
    # enqueued DP seeds are the first trials, in order
    head = df.sort_values("number").head(len(seeds))
    assert list(head["source"]) == ["dp"] * len(seeds)
    assert [(a, s) for a, s in zip(head["arch"], head["steps"])] == [(d["arch"], d["steps"]) for d in seeds]
    assert (df.sort_values("number")["source"].iloc[len(seeds):] == "sampler").all()
    # feasibility is exactly latency <= budget
    done = df[df["state"] == "COMPLETE"]
    assert len(done) == 8
    np.testing.assert_array_equal(done["feasible"].to_numpy(), (done["latency_ms"] <= env["budget"]).to_numpy())
    np.testing.assert_allclose(done["latency_ms"], done["steps"] * done["latency_ms_step"])
    assert set(done["steps"]) <= set(STEPS)

    # rerunning the same command continues the study: more trials, unique numbers, seeds not re-enqueued
    second = _search(env, out, 5)
    assert second["study_name"] == first["study_name"]
    df2 = pd.read_parquet(out / "trials.parquet")
    assert len(df2) == 13 and second["trials_total"] == 13
    assert df2["number"].is_unique and sorted(df2["number"]) == list(range(13))
    assert (df2["source"] == "dp").sum() == len(seeds)
    pd.testing.assert_frame_equal(df2.sort_values("number").head(8).reset_index(drop=True),
                                  df.sort_values("number").reset_index(drop=True))

    # best_trials: feasible and non-dominated among the feasible completed trials (brute force)
    study = optuna.load_study(study_name=second["study_name"], storage=open_storage(None, out)[0])
    best = {t.number for t in study.best_trials}
    feasible = df2[df2["feasible"]].reset_index(drop=True)
    assert best and best <= set(feasible["number"])
    mask = dominated(feasible[["latency_ms", "quality"]].to_numpy())
    assert set(feasible["number"][~mask]) == best
    front = pd.read_parquet(out / "pareto.parquet")
    assert set(front["number"]) == best and front["feasible"].all()
    assert second["best"]["number"] in best
    assert second["best"]["quality"] == front["quality"].min()
    assert second["inputs"]["checkpoint_sha256"] == env["ctx"].checkpoint_sha256
    assert second["inputs"]["table_id"] == env["ctx"].table_id


def test_budget_below_the_cheapest_arch_names_the_minimum(env, tmp_path):
    low = env["low"]
    with pytest.raises(DitnasError, match="below the cheapest reachable arch") as err:
        run_search(_cfg(env, budget_ms=0.5 * 4 * low, trials=3), env["ckpt"], env["table_dir"], tmp_path,
                   context=env["ctx"], cache_dir=env["cache"])
    text = str(err.value)
    assert text.startswith("search.budget_ms: ") and "\n" not in text  # names the config field (the CLI: its flag)
    for steps in STEPS:  # the minimum for each steps value, never rounded below the true one
        shown = float(re.search(rf"([0-9.]+) ms at {steps} steps", text).group(1))
        assert steps * low <= shown <= steps * low * 1.001
    assert not (tmp_path / "trials.parquet").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_storage_url_is_one_error(env, tmp_path):
    url = f"postgresql://nobody:secret@127.0.0.1:{_free_port()}/none"
    with pytest.raises(DitnasError, match="cannot open storage") as err:
        run_search(_cfg(env, trials=3, storage=url), env["ckpt"], env["table_dir"], tmp_path,
                   context=env["ctx"], cache_dir=env["cache"])
    assert "\n" not in str(err.value) and "secret" not in str(err.value)


def test_invalid_layouts_are_failed_trials_and_samplers_build():
    # a free stage layout with a stage-dependent op subset: lcha at half resolution decodes to an error
    space = SearchSpace(depth=4, ops=("lcha", "ssa"), widths=(1.0,), mlp_ratios=(4.0,), free_stages=True,
                        skippable=(3,), stage_ops={1: ("ssa",)})
    choices = SearchChoices.from_space(space)
    bad = {**choices.encode(space.max_arch()), "stage1": "1"}
    bad["slot1"] = "lcha:1:4"

    def evaluate(arch, steps):
        return {"latency_ms": steps * arch.depth, "quality": 1.0 / arch.depth, "arch": str(arch), "memory_bytes": 0}

    storage = optuna.storages.InMemoryStorage()
    study = open_study(SearchConfig(steps=(2,)), choices, storage, "x", 6.0, seeds=())
    study.enqueue_trial(bad)
    study = run_study(study, evaluate, choices, steps=[2], budget_ms=6, n_trials=6, memory_limit_bytes=1.0)
    df = trials_frame(study)
    assert df.loc[0, "state"] == "FAIL" and "not allowed at stage 1" in df.loc[0, "error"]
    done = df[df["state"] == "COMPLETE"]
    assert len(done) >= 1
    assert (done["feasible"] == (done["latency_ms"] <= 6)).all()
    assert all(t.constraints.keys() == {"latency", "memory"} for t in study.get_trials(states=(TrialState.COMPLETE,)))
    expected = {"nsga2": optuna.samplers.NSGAIISampler, "tpe": optuna.samplers.TPESampler, "gp": optuna.samplers.GPSampler}
    assert set(SAMPLERS) == set(expected)
    for name in SAMPLERS:
        assert isinstance(make_sampler(name, 0), expected[name])
    assert make_sampler("nsga2", 0, population_size=7)._population_size == 7
    with pytest.raises(DitnasError, match="unknown sampler"):
        make_sampler("cmaes", 0)


# ----- a real PostgreSQL server ----------------------------------------------------------------
def _pg_bindir() -> Path | None:
    candidates = [os.environ.get("DITNAS_PG_BIN", "")]
    if shutil.which("pg_ctl"):
        candidates.append(str(Path(os.path.realpath(shutil.which("pg_ctl"))).parent))
    candidates += sorted((str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")), reverse=True)
    for c in candidates:
        if c and all((Path(c) / b).exists() for b in ("initdb", "pg_ctl", "createdb")):
            return Path(c)
    return None


@pytest.fixture(scope="module")
def postgres_url():
    """initdb + pg_ctl start on a free port in a temp dir, one database, stopped afterwards.

    PostgreSQL refuses to run as root: as root the server runs as the `postgres` OS user via `runuser`
    (the temp dir is chowned to it)."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl, createdb) not found; install the OS package (postgresql)")
    prefix: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="ditnas-pg-"))  # not under pytest's 0700 root-owned tmp tree
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip("running as root and no 'postgres' OS user to run the server as (PostgreSQL refuses root)")
        runuser = shutil.which("runuser")
        if runuser is None:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip("running as root without `runuser` to start PostgreSQL as a non-root user")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = [runuser, "-u", "postgres", "--"]
    port = _free_port()
    data = root / "data"

    def run(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120)

    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        started = True
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "ditnas")
        yield f"postgresql://postgres@127.0.0.1:{port}/ditnas"
    finally:
        if started:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_search_against_a_real_postgresql_server(env, tmp_path, postgres_url):
    manifest = _search(env, tmp_path, 6, storage=postgres_url, sampler="tpe")
    url = rdb_url(postgres_url)  # SQLAlchemy 2.1: a bare postgresql:// means psycopg 3; name the installed driver
    assert manifest["storage"] == url and manifest["trials_total"] == 6
    assert manifest["dashboard"] == f"optuna-dashboard {url}"
    study = optuna.load_study(study_name=manifest["study_name"], storage=url)
    assert len(study.trials) == 6
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 6
    assert not (tmp_path / "study.journal").exists()
    again = _search(env, tmp_path, 2, storage=postgres_url, sampler="tpe")  # continues in the database
    assert again["trials_total"] == 8
