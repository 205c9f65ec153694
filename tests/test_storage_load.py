"""Several `ditnas search` processes writing ONE study at once (a journal file, and a real PostgreSQL
server): what happens when drivers on several machines share a storage.

Each writer is the real CLI (`ditnas search --storage <shared>`, its own `--out`), so the study is
opened by `study.open_study` (create-or-load, DP seeds enqueued with `skip_if_exists`, stale trials
recovered) and every trial goes through the real objective path (`run_search` -> `run_study` ->
`EvalContext.evaluate` on a tiny trained supernet and host-torch table, ~35 ms a trial here). The
writers import everything, then wait at a barrier file, so they really write at the same time.

Promise: no trial lost, duplicated or corrupted: the study holds processes × trials trials, numbers
0..n-1 once each, every trial COMPLETE with both objectives and its latency constraint, each writer
owns exactly the trials it asked, and the study loads cleanly afterwards. `bench/storage_load.py`
runs the full ≥ 200-trial load and reports trials/s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from test_search_objectives import build_env
from test_search_optuna import postgres_url  # noqa: F401  (the module-scoped PostgreSQL server fixture)

from ditnas.search.objectives import torch_threads
from ditnas.search.optuna_search import DRIVER_ATTR, open_storage, trials_frame

# a writer: heavy imports first, then wait for the barrier file, then the real CLI in this process
WRITER = r"""
import sys, time
from pathlib import Path
import torch, optuna, ditnas.cli, ditnas.config, ditnas.latency_models, ditnas.latency_models.stage  # noqa
import ditnas.search.stage, ditnas.search.objectives, ditnas.search.study, ditnas.search.sensitivity  # noqa
go = Path(sys.argv[1])
Path(sys.argv[2]).write_text("ready")
while not go.exists():
    time.sleep(0.005)
ditnas.cli.main(sys.argv[3:])
"""

# a cheap writer: the same storage and study code (`open_storage`, `open_study` with two enqueued seeds,
# `run_study`'s ask/tell loop), but a cheap deterministic objective in place of the supernet forward
CHEAP_WRITER = r"""
import hashlib, json, sys, time
from pathlib import Path
from ditnas.arch import Arch, SearchSpace
from ditnas.config import SearchConfig
from ditnas.search.optuna_search import open_storage, run_study
from ditnas.search.space import SearchChoices
from ditnas.search.study import open_study
go, ready, phases = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
space = SearchSpace.from_dict(phases[0]["space"])
choices = SearchChoices.from_space(space)

def evaluate(arch, steps):  # deterministic in the arch: a retried or duplicated trial gets the same values
    h = int(hashlib.sha256(str(arch).encode()).hexdigest()[:8], 16)
    return {"latency_ms": steps * (1.0 + h % 997 / 997), "quality": 1.0 + (h >> 10) % 991 / 991, "arch": str(arch)}

ready.write_text("ready")
for i, spec in enumerate(phases):  # one storage after the other, each released by its own barrier file
    while not Path(f"{go}.{i}").exists():
        time.sleep(0.005)
    store, _ = open_storage(spec["storage"], Path(spec["out"]))
    cfg = SearchConfig(steps=(4,), sampler="nsga2", population=8)
    seeds = [(Arch.parse(a), 4) for a in spec["seeds"]]
    study = open_study(cfg, choices, store, spec["name"], 1e6, seeds)
    run_study(study, evaluate, choices, steps=[4], budget_ms=1e6, n_trials=spec["trials"])
    Path(f"{ready}.done{i}").write_text("done")
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with torch_threads(1):
        e = build_env(tmp_path_factory.mktemp("storage_load"))
    return e


def _spawn(code: str, args: list[str], root: Path, k: int) -> tuple[subprocess.Popen, Any]:
    err = (root / f"w{k}.err").open("w")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root / "go"), str(root / f"w{k}.ready"), *args],
                            stdout=subprocess.DEVNULL, stderr=err,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    return proc, err


def _wait_files(procs, files: list[Path], timeout: float) -> None:
    """Until every file exists, or a writer has exited (its error is reported by the caller)."""
    deadline = time.time() + timeout
    while time.time() < deadline and not all(f.exists() for f in files):
        if any(p.poll() is not None for p, _ in procs):
            return
        time.sleep(0.02)


def _finish(procs, root: Path, timeout: float) -> tuple[list[int], dict]:
    codes = []
    for p, err in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
        finally:
            err.close()
    errors = {k: (root / f"w{k}.err").read_text()[-2000:] for k, c in enumerate(codes) if c != 0}
    return codes, errors


def run_load(env: dict, storage: str, root: Path, *, processes: int, trials: int, seeds: int = 2,
             budget_ms: float = 1e6, timeout: float = 900.0, cheap: bool = False, name: str = "load") -> dict:
    """Start `processes` writers on one storage (the real CLI search, or with `cheap` the cheap-objective
    writer), release them together, wait; return what ran."""
    if cheap:
        return run_cheap(env, [(storage, name)], root, processes=processes, trials=trials, timeout=timeout)[0]
    root.mkdir(parents=True, exist_ok=True)
    procs = []
    for k in range(processes):
        args = ["search", "--checkpoint", str(env["ckpt"]), "--table", str(env["table_dir"]), "--budget-ms",
                f"{budget_ms:g}", "--steps", "4", "--trials", str(trials), "--seeds", str(seeds), "--out",
                str(root / f"w{k}"), "--storage", storage, "--no-progress"]
        procs.append(_spawn(WRITER, args, root, k))
    _wait_files(procs, [root / f"w{k}.ready" for k in range(processes)], 180)
    t0 = time.time()
    (root / "go").write_text("go")
    codes, errors = _finish(procs, root, timeout)
    return {"pids": [p.pid for p, _ in procs], "codes": codes, "errors": errors, "wall_s": time.time() - t0,
            "processes": processes, "trials_each": trials, "objective": "real (ditnas search)"}


def run_cheap(env: dict, storages: list[tuple[str, str]], root: Path, *, processes: int, trials: int,
              timeout: float = 900.0) -> list[dict]:
    """The cheap-objective writers: the same `processes` processes write each (storage, study name) in
    turn, all released together per storage (one import cost for several storages)."""
    root.mkdir(parents=True, exist_ok=True)
    space = env["ctx"].space
    phases = [{"space": space.to_dict(), "out": str(root), "trials": trials, "name": name, "storage": storage,
               "seeds": [str(space.max_arch()), str(space.min_arch())]} for storage, name in storages]
    procs = [_spawn(CHEAP_WRITER, [json.dumps(phases)], root, k) for k in range(processes)]
    _wait_files(procs, [root / f"w{k}.ready" for k in range(processes)], 180)
    walls = []
    for i in range(len(phases)):
        t0 = time.time()
        Path(f"{root / 'go'}.{i}").write_text("go")
        _wait_files(procs, [Path(f"{root / f'w{k}.ready'}.done{i}") for k in range(processes)], timeout)
        walls.append(time.time() - t0)
    codes, errors = _finish(procs, root, 60)
    return [{"pids": [p.pid for p, _ in procs], "codes": codes, "errors": errors, "wall_s": w,
             "processes": processes, "trials_each": trials, "objective": "cheap"} for w in walls]


def check_study(storage: str, out: Path, run: dict, name: str | None = None) -> dict:
    """Every correctness check of a load run; returns the figures (lost, duplicated, trials/s, ...).
    `name`: the study (else the storage must hold exactly one)."""
    store, _ = open_storage(storage, out)
    names = optuna.get_all_study_names(store)
    if name is None:
        assert len(names) == 1, names  # every writer joined the same study (create-or-load raced cleanly)
    else:
        assert name in names, names
        names = [name]
    study = optuna.load_study(study_name=names[0], storage=store)  # loads cleanly afterwards
    ts = study.get_trials(deepcopy=False)
    expected = run["processes"] * run["trials_each"]
    numbers = Counter(t.number for t in ts)
    duplicated = sum(c - 1 for c in numbers.values())
    states = Counter(t.state.name for t in ts)
    complete = [t for t in ts if t.state == TrialState.COMPLETE and t.values is not None and len(t.values) == 2
                and "latency" in t.constraints]
    owners = Counter(t.user_attrs.get(DRIVER_ATTR, "").rpartition(":")[2] for t in ts)
    dp = Counter(json.dumps(t.params, sort_keys=True) for t in ts if t.user_attrs.get("source") == "dp")
    frame = trials_frame(study)
    span = (max(t.datetime_complete for t in complete) - min(t.datetime_start for t in complete)).total_seconds() \
        if complete else float("nan")
    return {
        "study": names[0], "trials": len(ts), "expected": expected, "lost": max(0, expected - len(set(numbers))),
        "duplicated": duplicated, "states": dict(states), "complete_with_values": len(complete),
        "numbers_ok": sorted(numbers) == list(range(len(ts))), "per_writer": {p: owners.get(str(p), 0) for p in run["pids"]},
        "dp_seed_trials": sum(dp.values()), "dp_seed_layouts": len(dp), "frame_rows": len(frame),
        "trials_per_s": len(complete) / span if span > 0 else float("nan"), "span_s": span, "wall_s": run["wall_s"],
        "overlap": _overlap(ts),
    }


def _overlap(ts) -> bool:
    """True when at least two writers were writing at the same time."""
    spans: dict[str, list] = {}
    for t in ts:
        if t.datetime_complete is None:
            continue
        d = t.user_attrs.get(DRIVER_ATTR, "")
        lo, hi = spans.get(d, [t.datetime_start, t.datetime_complete])
        spans[d] = [min(lo, t.datetime_start), max(hi, t.datetime_complete)]
    # assumption: concurrency is shown when at least two writers' spans overlap (all four at once is not
    # guaranteed for 10 cheap trials each: one writer's imports can outlast another's whole run)
    items = list(spans.values())
    return any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(items) for b in items[i + 1:])


def assert_sound(run: dict, fig: dict) -> None:
    assert run["codes"] == [0] * run["processes"], run["errors"]
    assert fig["trials"] == fig["expected"] and fig["lost"] == 0 and fig["duplicated"] == 0, fig
    assert fig["numbers_ok"], fig
    assert fig["states"] == {"COMPLETE": fig["expected"]}, fig
    assert fig["complete_with_values"] == fig["expected"] and fig["frame_rows"] == fig["expected"]
    # each writer asked (and owns) exactly its own trials
    assert sorted(fig["per_writer"].values()) == [run["trials_each"]] * run["processes"], fig["per_writer"]
    assert fig["overlap"], "the writers did not write at the same time; the load test proves nothing"


def _journal(env, tmp_path, processes, trials, cheap=False):
    storage = str(tmp_path / "shared" / "study.journal")
    run = run_load(env, storage, tmp_path, processes=processes, trials=trials, cheap=cheap)
    fig = check_study(storage, tmp_path, run)
    assert_sound(run, fig)
    return fig


def _postgres(env, tmp_path, url, processes, trials, budget_ms, cheap=False):
    # one database for the module: the budget (CLI) or the name (cheap) makes the study unique per test
    run = run_load(env, url, tmp_path, processes=processes, trials=trials, budget_ms=budget_ms, cheap=cheap,
                   name=f"load-{budget_ms:g}")
    fig = check_study(url, tmp_path, run, name=None if not cheap else f"load-{budget_ms:g}")
    assert_sound(run, fig)
    return fig


FIGS = ("trials", "lost", "duplicated", "dp_seed_trials", "dp_seed_layouts", "trials_per_s", "wall_s")


@pytest.mark.timeout(600)
def test_four_writers_on_one_journal_then_one_postgresql_study_lose_nothing(env, tmp_path, capsys, postgres_url):  # noqa: F811
    """The default-run variant: 4 cheap-objective writers x 10 trials on a journal, then the same 4
    processes on a fresh PostgreSQL database (the schema race happens there)."""
    stores = [(str(tmp_path / "shared" / "study.journal"), "load"), (postgres_url, "load-pg")]
    runs = run_cheap(env, stores, tmp_path, processes=4, trials=10)
    figs = {}
    for (storage, name), run in zip(stores, runs, strict=True):
        figs[name] = check_study(storage, tmp_path, run, name=name)
        assert_sound(run, figs[name])
    with capsys.disabled():
        print({n: {k: f[k] for k in FIGS} for n, f in figs.items()})


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_full_load_200_trials_journal_and_postgresql(env, tmp_path, capsys, postgres_url):  # noqa: F811
    """The real `ditnas search` CLI as the writer (the real objective path), 4 x 50 trials per storage."""
    figs = {"journal": _journal(env, tmp_path / "j", processes=4, trials=50),
            "postgres": _postgres(env, tmp_path / "pg", postgres_url, processes=4, trials=50, budget_ms=2e6)}
    with capsys.disabled():
        print({k: {x: f[x] for x in FIGS} for k, f in figs.items()})


def test_a_just_asked_untagged_trial_of_a_live_writer_is_not_failed(tmp_path):
    """The race the 4-writer test found, made deterministic: writer A has asked a trial and not yet
    tagged it when writer B opens the study. B must leave it alone (A tags it 0.3 s later), yet a trial
    that stays untagged (a driver killed inside `ask`) is still recovered once the grace has passed."""
    import threading

    from ditnas.search.study import recover_interrupted

    store, _ = open_storage(str(tmp_path / "s.journal"), tmp_path)
    study = optuna.create_study(storage=store, study_name="race", directions=["minimize", "minimize"])
    live, orphan = study.ask(), study.ask()  # both RUNNING and untagged, as right after `ask`
    tagger = threading.Timer(0.3, lambda: live.set_user_attr(DRIVER_ATTR, f"{__import__('socket').gethostname()}:{os.getpid()}"))
    tagger.start()
    t0 = time.monotonic()
    recovered = recover_interrupted(optuna.load_study(study_name="race", storage=store), untagged_grace_s=1.5)
    tagger.join()
    assert recovered == [orphan.number] and time.monotonic() - t0 >= 1.5
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[live.number] == TrialState.RUNNING and states[orphan.number] == TrialState.FAIL
    study.tell(live, [1.0, 2.0])  # the live writer can still finish its trial (before the fix: UpdateFinishedTrialError)
    assert study.get_trials(deepcopy=False)[live.number].state == TrialState.COMPLETE
