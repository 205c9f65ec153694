"""Real fault injection on `ditnas search`: the process is SIGKILLed at random points (journal file
storage and a real PostgreSQL server), then the same command is rerun. Promise: zero completed
trials lost or changed, no trial left RUNNING, and a trial the kill interrupted is evaluated again."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState
from test_search_objectives import build_env
from test_search_optuna import postgres_url  # noqa: F401  (the module-scoped PostgreSQL server fixture)

from cli_helpers import run

from ditnas.config import SearchConfig
from ditnas.search.optuna_search import open_storage
from ditnas.search.space import SearchChoices
from ditnas.search.study import open_study, recover_interrupted


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("fault_search"))


def _args(env, out, trials, storage=None):
    args = ["search", "--checkpoint", str(env["ckpt"]), "--table", str(env["table_dir"]), "--budget-ms", "1e6",
            "--steps", "4", "--trials", str(trials), "--seeds", "2", "--out", str(out), "--no-progress"]
    return args + (["--storage", storage] if storage else [])


def _study(out, storage=None):
    store, _ = open_storage(storage, out)
    names = optuna.get_all_study_names(store)
    assert len(names) == 1
    return optuna.load_study(study_name=names[0], storage=store)


def _kill_after(env, out, trials_seen: int, storage=None, timeout=240.0) -> None:
    cmd = [sys.executable, "-m", "ditnas.cli", *_args(env, out, 400, storage)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"search exited ({proc.returncode}) before it was killed: {proc.stderr.read().decode()[-1500:]}")
            try:
                if len(_study(out, storage).get_trials(deepcopy=False)) >= trials_seen:
                    break
            except (AssertionError, Exception):  # noqa: BLE001 - the study may not exist yet
                pass
            time.sleep(0.05)
        else:
            pytest.fail(f"search did not reach {trials_seen} trials within {timeout} s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _check_rerun_keeps_everything(env, out, capsys, storage=None) -> dict:
    before = _study(out, storage).get_trials(deepcopy=False)
    complete = {t.number: (t.values, t.params) for t in before if t.state == TrialState.COMPLETE}
    running = [t.number for t in before if t.state == TrialState.RUNNING]
    code, _, err = run(_args(env, out, 3, storage), capsys)
    assert code == 0, err
    after = {t.number: t for t in _study(out, storage).get_trials(deepcopy=False)}
    # zero completed trials lost or changed
    assert all(after[n].state == TrialState.COMPLETE and (after[n].values, after[n].params) == v
               for n, v in complete.items())
    assert not [t for t in after.values() if t.state == TrialState.RUNNING]
    # what the kill interrupted is failed and evaluated again with the same parameters
    for n in running:
        assert after[n].state == TrialState.FAIL
        retries = [t for t in after.values() if t.user_attrs.get("retry_of") == n]
        # a kill inside `ask` can leave only some parameters recorded: the retry keeps every one of them
        assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
        assert {k: retries[0].params[k] for k in after[n].params} == after[n].params
    return {"complete_before": len(complete), "running_at_kill": len(running), "trials_after": len(after)}


@pytest.mark.timeout(900)
def test_sigkill_mid_search_on_a_journal_loses_nothing(env, tmp_path, capsys):
    rng = random.Random(3)
    out = tmp_path / "journal"
    seen, records = 0, []
    for _ in range(3):  # three kills into the same study, each at a random point
        seen += rng.randint(3, 12)
        _kill_after(env, out, seen)
        records.append(_check_rerun_keeps_everything(env, out, capsys))
        seen = len(_study(out).get_trials(deepcopy=False))
    with capsys.disabled():
        print(records)  # the figures for docs/reliability.md (pytest -s)


@pytest.mark.timeout(900)
def test_sigkill_mid_search_on_postgresql_loses_nothing(env, tmp_path, capsys, postgres_url):  # noqa: F811
    out = tmp_path / "pg"
    _kill_after(env, out, random.Random(5).randint(4, 12), storage=postgres_url)
    record = _check_rerun_keeps_everything(env, out, capsys, storage=postgres_url)
    with capsys.disabled():
        print(record)


def test_a_trial_left_running_by_a_dead_driver_is_retried_but_a_live_ones_is_not(env, tmp_path):
    """Deterministic: a trial asked and never told (what SIGKILL leaves) by a process that is gone."""
    choices = SearchChoices.from_space(env["ctx"].space)
    storage = optuna.storages.InMemoryStorage()
    cfg = SearchConfig(steps=(4,))
    study = open_study(cfg, choices, storage, "s", 10.0, seeds=())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from ditnas.search.optuna_search import distributions

    dists = distributions(choices, [4])
    orphan, live, untagged = (study.ask(dists) for _ in range(3))
    orphan.set_user_attr("driver", f"{__import__('socket').gethostname()}:{dead.pid}")
    live.set_user_attr("driver", f"{__import__('socket').gethostname()}:{os.getppid()}")  # a live process
    assert sorted(recover_interrupted(study)) == sorted([orphan.number, untagged.number])
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[orphan.number] == states[untagged.number] == TrialState.FAIL and states[live.number] == TrialState.RUNNING
    waiting = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs["retry_of"] for t in waiting) == sorted([orphan.number, untagged.number])
    queued = {t.user_attrs["retry_of"]: t.system_attrs["fixed_params"] for t in waiting}  # enqueue_trial's params
    assert queued[orphan.number] == orphan.params
