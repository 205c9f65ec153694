"""Real faults injected into `ditnas sweep` on a real local multi-node Ray cluster (`ray start`).

The sweep is the real one (`ditnas.search.sweep.sweep`): a tiny supernet trained for real, a host-torch
latency table, DP seeds, one study per budget in one journal file, and every candidate evaluated by
`evaluate_arch_task` inside a Ray worker. Faults, injected from outside while the sweep runs:

- a worker process SIGKILLed while it runs an evaluation task (found by its process title
  `ray::_call`, which Ray sets while a worker executes `ray_driver._call`);
- a whole worker node stopped: the process group of a second `ray start --block` node (its raylet,
  object store and workers) SIGKILLed while one of its workers holds a task.

Promise: the task is re-run (`sweep.retries`), every study ends with exactly `search.trials` trials,
all COMPLETE with both objectives, unique trial numbers, none RUNNING, and the sweep writes its tables.

A fresh worker's first task loads torch, the checkpoint and the table (seconds), so a worker seen
running `ray::_call` early is mid-trial; the kill is checked to land on a live task process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState
from test_search_distributed import _free_port, _start, _stop, _wait_for
from test_search_objectives import build_env

from ditnas.config import SearchConfig, SweepConfig
from ditnas.search import sweep as sweeps
from ditnas.search.objectives import torch_threads
from ditnas.search.optuna_search import open_storage

ray = pytest.importorskip("ray")
TASK_TITLE = "ray::_call"  # the process title of a Ray worker while it runs ray_driver._call


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with torch_threads(1):
        yield build_env(tmp_path_factory.mktemp("fault_ray"))


@pytest.fixture(scope="module")
def cluster():
    """A head node with 1 CPU in its own temporary HOME (token auth on). Tests that stop a node add one."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="dnrf", dir="/tmp"))  # short: Ray's unix socket paths must fit 107 chars
    home, temp = root / "home", root / "t"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    subprocess.run([shutil.which("ray") or "ray", "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=60)
    token = home / ".ray" / "auth_token"
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS")}
    try:
        log = root / "head.log"
        procs.append(_start(["--head", f"--port={port}", "--include-dashboard=false", *common], env, log))
        _wait_for(lambda: "Ray runtime started" in log.read_text(), 90, "the head node", log)
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
        os.environ.pop("RAY_AUTH_MODE", None)
        os.environ.pop("RAY_ADDRESS", None)

        def add_node(name: str) -> subprocess.Popen:
            nlog = root / f"{name}.log"
            proc = _start([f"--address={address}", *common], env, nlog)
            procs.append(proc)
            _wait_for(lambda: "Ray runtime started" in nlog.read_text(), 90, f"node {name}", nlog)
            return proc

        yield {"address": address, "head": procs[0], "add_node": add_node, "root": root}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for p in reversed(procs):
            _stop(p)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        # connect() switched this process's cached RayConfig to token mode; with the env restored and the
        # token deleted, a later local cluster in this process would wait for a token-mode GCS forever
        from ray._raylet import AuthenticationTokenLoader, Config

        AuthenticationTokenLoader.instance().reset_cache()
        Config.initialize("")
        shutil.rmtree(root, ignore_errors=True)


def _ps() -> list[tuple[int, int, str]]:
    """(pid, session id, args) of every process."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            rows.append((int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else ""))
    return rows


def _task_processes(sessions: set[int]) -> list[int]:
    """PIDs of Ray workers of the given sessions (a `ray start --block` node each; Ray puts every worker
    in its own process group but they stay in the node's session) running an evaluation task now."""
    return [pid for pid, sid, args in _ps() if sid in sessions and args.startswith(TASK_TITLE)]


def _kill_session(sid: int) -> int:
    """SIGKILL every process of a session at once (a node losing power): raylet, GCS client, object
    store, agents and every worker. Returns how many processes were signalled."""
    n = 0
    for pid, s, _ in _ps():
        if s == sid:
            try:
                os.kill(pid, signal.SIGKILL)
                n += 1
            except ProcessLookupError:
                pass
    return n


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


class Killer(threading.Thread):
    """Polls for task-running workers of the sessions `pgids` and SIGKILLs `kills` of them (distinct PIDs),
    each only once `after(kills so far)` holds; with `group_proc` it kills that node's whole session instead."""

    def __init__(self, pgids: set[int], kills: int, *, group_proc: subprocess.Popen | None = None,
                 after=lambda k: True, timeout: float = 240.0):
        super().__init__(daemon=True)
        self.pgids, self.kills, self.group_proc, self.after, self.timeout = pgids, kills, group_proc, after, timeout
        self.killed: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        end = time.time() + self.timeout
        seen: set[int] = set()
        while not self.stop.is_set() and len(self.killed) < self.kills and time.time() < end:
            if self.after(len(self.killed)):
                for pid in _task_processes(self.pgids):
                    if pid in seen:
                        continue
                    title = _title(pid)
                    if not title.startswith(TASK_TITLE):
                        continue  # finished between ps and now
                    seen.add(pid)
                    record = {"pid": pid, "title": title, "t": time.time()}
                    if self.group_proc is not None:
                        record["processes"] = _kill_session(self.group_proc.pid)  # the whole node at once
                    else:
                        os.kill(pid, signal.SIGKILL)
                    self.killed.append(record)
                    break
            time.sleep(0.02)


def _cfgs(trials: int, budgets: tuple[float, ...], retries: int, address: str, storage: str | None = None):
    search = SearchConfig(steps=(4,), trials=trials, dp_seeds=2, population=4, eval_items=48, storage=storage)
    return search, SweepConfig(budgets_ms=budgets, retries=retries, prefix="fault", ray_address=address)


def _check_consistent(manifest: dict, out: Path, trials: int, storage: str | None = None) -> dict:
    store, _ = open_storage(storage or str(out / sweeps.JOURNAL), out)
    names = sorted(optuna.get_all_study_names(store))
    assert names == sorted(s["study_name"] for s in manifest["studies"])
    counts = {}
    for info in manifest["studies"]:
        study = optuna.load_study(study_name=info["study_name"], storage=store)
        ts = study.get_trials(deepcopy=False)
        # trial counts as asked, none lost or left RUNNING, every one COMPLETE with both objectives
        assert len(ts) == trials, (info["study_name"], [(t.number, t.state) for t in ts])
        assert sorted(t.number for t in ts) == list(range(trials))
        assert [t for t in ts if t.state != TrialState.COMPLETE] == [], [(t.number, t.state, t.user_attrs.get("error")) for t in ts]
        assert all(t.values is not None and len(t.values) == 2 and "latency" in t.constraints for t in ts)
        assert info["complete"] + info["failed"] <= trials and info["failed"] == 0 and info["errors"] == []
        # the tables the sweep wrote hold the same trials
        df = pd.read_parquet(Path(info["dir"]) / "trials.parquet")
        assert len(df) == trials and (df["state"] == "COMPLETE").all()
        counts[info["study_name"]] = len(ts)
    assert not list(out.rglob("*.tmp*"))
    return counts


def _sweep_with(env, out, search, sweep_cfg, killer: Killer) -> tuple[dict, float]:
    killer.start()
    t0 = time.time()
    try:
        manifest = sweeps.sweep(search, sweep_cfg, env["ckpt"], [env["table_dir"]], out)
    finally:
        killer.stop.set()
        killer.join(5)
    return manifest, time.time() - t0


@pytest.mark.timeout(400)
def test_worker_sigkilled_then_node_stopped_mid_sweep(env, cluster, tmp_path, capsys):
    """The default-run variant, both faults in one sweep (two studies, one journal): first a head worker
    SIGKILLed mid-task, then a second node's every process SIGKILLed while its worker holds a task."""
    node = cluster["add_node"]("n0")
    search, sweep_cfg = _cfgs(trials=5, budgets=(1e5, 2e5), retries=2, address=cluster["address"])
    worker = Killer({cluster["head"].pid}, kills=1)
    whole_node = Killer({node.pid}, kills=1, group_proc=node, after=lambda k: bool(worker.killed))
    whole_node.start()
    manifest, seconds = _sweep_with(env, tmp_path, search, sweep_cfg, worker)
    whole_node.stop.set()
    whole_node.join(5)
    assert len(worker.killed) == 1 and len(whole_node.killed) == 1, (worker.killed, whole_node.killed)
    assert not Path(f"/proc/{worker.killed[0]['pid']}").exists() and whole_node.killed[0]["processes"] >= 3
    counts = _check_consistent(manifest, tmp_path, 5)
    with capsys.disabled():
        print({"worker_kills": 1, "node_processes_killed": whole_node.killed[0]["processes"], "studies": counts,
               "seconds": round(seconds, 1)})


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_worker_sigkilled_mid_trial_is_retried_and_the_sweep_finishes(env, cluster, tmp_path, capsys):
    """Two evaluation workers SIGKILLed mid-task (two studies, one journal): both tasks re-run."""
    search, sweep_cfg = _cfgs(trials=8, budgets=(1e5, 2e5), retries=2, address=cluster["address"])
    killer = Killer({cluster["head"].pid}, kills=2)
    manifest, seconds = _sweep_with(env, tmp_path, search, sweep_cfg, killer)
    assert len(killer.killed) == 2, "no evaluation task was caught running"
    for k in killer.killed:
        assert k["title"].startswith(TASK_TITLE)
        assert not Path(f"/proc/{k['pid']}").exists()  # it really died
    counts = _check_consistent(manifest, tmp_path, 8)
    with capsys.disabled():
        print({"kills": len(killer.killed), "studies": counts, "seconds": round(seconds, 1)})


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_worker_node_stopped_mid_sweep_is_survived(env, cluster, tmp_path, capsys):
    """A second node joins; its every process is SIGKILLed while one of its workers runs a task.
    The task is re-run on the head, the sweep finishes with every trial complete."""
    node = cluster["add_node"]("n1")
    search, sweep_cfg = _cfgs(trials=8, budgets=(1e5, 2e5), retries=2, address=cluster["address"])
    killer = Killer({node.pid}, kills=1, group_proc=node)
    manifest, seconds = _sweep_with(env, tmp_path, search, sweep_cfg, killer)
    assert len(killer.killed) == 1, "no task ran on the second node"
    node.wait(10)
    assert node.poll() is not None
    assert killer.killed[0]["processes"] >= 3  # raylet, agents, workers: the whole node, not one worker
    counts = _check_consistent(manifest, tmp_path, 8)
    with capsys.disabled():
        print({"node_processes_killed": killer.killed[0]["processes"], "studies": counts,
               "seconds": round(seconds, 1), "after_kill_s": round(time.time() - killer.killed[0]["t"], 1)})
