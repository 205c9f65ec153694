"""Ray-distributed search against a real 2-node cluster started with `ray start` on this machine.

The cluster (head + a worker node with a custom `phone` resource) runs in a temporary HOME, so its
auth token (token auth stays on) never touches the user's ~/.ray, and in its own temp dir. It is
stopped by signalling the process groups of the two `ray start --block` processes this module
started — not with `ray stop`, which kills every Ray process on the machine (it matches by name).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ditnas.errors import DitnasError
from ditnas.config import SearchConfig, SweepConfig
from ditnas.search import ray_cluster, ray_driver
from ditnas.search import sweep as sweeps

ray = pytest.importorskip("ray")
BUDGET = 6.0


# ----- toy evaluators (pickled by value, so Ray workers need not import this test module) --------
def toy_eval(x: int, y: int) -> dict:
    return {"latency_ms": float(x + y), "quality": float((x - 3) ** 2 + (y - 4) ** 2), "steps": 1}


def crash_once(marker_dir: str, number: int, x: int) -> dict:
    marker = Path(marker_dir) / f"trial{number}"
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)  # the worker process dies mid-trial; Ray must re-run the task elsewhere
    return toy_eval(x, 1)


def crash_always(x: int) -> dict:
    os._exit(1)


def raise_error(x: int) -> dict:
    raise ValueError("bad candidate")


def node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def xy_params(trial) -> tuple[int, int]:
    return trial.suggest_int("x", 0, 5), trial.suggest_int("y", 0, 5)


def constraints(result) -> dict[str, float]:
    return {"latency": result["latency_ms"] - BUDGET}


# ----- the cluster ---------------------------------------------------------------------------
def _free_port() -> int:
    # outside Ray's default worker-port range 10002-19999 (the OS picks from the ephemeral range)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    # --block keeps `ray start` in the foreground; a new session makes every Ray process it spawns
    # part of one process group that we can signal by id
    return subprocess.Popen([shutil.which("ray") or "ray", "start", "--block", *args], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(pred, timeout: float, what: str, log: Path | None = None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.5)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"timed out waiting for {what}\n{tail}")


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 4), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            # children (gcs_server, raylet, workers) may outlive the leader; finish the group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="dnray", dir="/tmp"))  # short: Ray's unix socket paths must fit 107 chars
    home, temp = root / "home", root / "t"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    subprocess.run([shutil.which("ray") or "ray", "get-auth-token", "--generate"], env=env, check=True,
                   capture_output=True, timeout=60)
    token = home / ".ray" / "auth_token"
    assert token.exists()
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS")}
    try:
        head_log, worker_log = root / "head.log", root / "worker.log"
        procs.append(_start(["--head", f"--port={port}", "--include-dashboard=false", *common], env, head_log))
        _wait_for(lambda: "Ray runtime started" in head_log.read_text(), 90, "the head node", head_log)
        procs.append(_start([f"--address={address}", "--resources={\"phone\": 1}", *common], env, worker_log))
        _wait_for(lambda: "Ray runtime started" in worker_log.read_text(), 90, "the worker node", worker_log)
        # the driver (this process) finds the token through RAY_AUTH_TOKEN_PATH; connect() must switch
        # it to token mode by itself, so RAY_AUTH_MODE stays unset here
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
        os.environ.pop("RAY_AUTH_MODE", None)
        os.environ.pop("RAY_ADDRESS", None)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        conn = ray_cluster.connect(address)
        _wait_for(lambda: ray.cluster_resources().get("phone") == 1.0 and len([n for n in ray.nodes() if n["Alive"]]) == 2,
                  60, "two alive nodes", worker_log)
        yield {"address": address, "conn": conn, "root": root}
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
        shutil.rmtree(root, ignore_errors=True)


def _study(name: str, storage=None) -> optuna.Study:
    return optuna.create_study(directions=["minimize", "minimize"], study_name=name, storage=storage,
                               sampler=optuna.samplers.NSGAIISampler(population_size=4, seed=0))


# ----- tests ---------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_attach_sees_both_nodes_and_phone_resource(cluster):
    conn = cluster["conn"]
    assert not conn.started_local and conn.token_auth and conn.address == cluster["address"]
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 2
    assert ray.cluster_resources()["phone"] == 1.0 and ray.cluster_resources()["CPU"] == 2.0
    phone_node = next(n["NodeID"] for n in alive if n["Resources"].get("phone"))
    # a task pinned with the custom resource lands on the worker node
    pinned = ray.remote(node_id).options(num_cpus=0, resources={"phone": 1})
    assert ray.get(pinned.remote(), timeout=120) == phone_node


@pytest.mark.timeout(300)
def test_constrained_two_objective_study_runs_on_cluster(cluster):
    study = _study("toy")
    summary = ray_driver.distributed_ask_tell(study, toy_eval, xy_params, n_trials=8, max_in_flight=2,
                                        constraints_fn=constraints, retries=1)
    trials = study.get_trials()
    assert summary.complete == 8 and summary.failed == 0
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        x, y = t.params["x"], t.params["y"]
        assert t.values == [x + y, (x - 3) ** 2 + (y - 4) ** 2]
        assert t.constraints == {"latency": x + y - BUDGET}  # Optuna 5: {name: value}
        assert t.user_attrs["steps"] == 1
    assert study.best_trials and all(t.constraints["latency"] <= 0 for t in study.best_trials)  # Optuna's front is feasible-only


@pytest.mark.timeout(300)
def test_worker_killed_mid_trial_is_retried(cluster, tmp_path):
    study = _study("crash", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "s.journal"))))

    def params(trial):
        return str(tmp_path), trial.number, trial.suggest_int("x", 0, 5)

    summary = ray_driver.distributed_ask_tell(study, crash_once, params, n_trials=3, max_in_flight=2,
                                        constraints_fn=constraints, retries=2)
    trials = study.get_trials()
    assert len(trials) == 3 and summary.complete == 3
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.user_attrs for t in trials]
    assert not study.get_trials(states=(TrialState.RUNNING,))
    # every trial's first attempt really died
    assert sorted(p.name for p in tmp_path.glob("trial*")) == ["trial0", "trial1", "trial2"]


@pytest.mark.timeout(300)
def test_failures_after_retries_are_told_fail(cluster):
    study = _study("fails")
    ray_driver.distributed_ask_tell(study, crash_always, lambda t: t.suggest_int("x", 0, 5), n_trials=1, retries=0)
    ray_driver.distributed_ask_tell(study, raise_error, lambda t: t.suggest_int("x", 0, 5), n_trials=1, retries=0)

    def bad_params(trial):
        raise DitnasError("slot 3 cannot be skip")

    ray_driver.distributed_ask_tell(study, toy_eval, bad_params, n_trials=1)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    errors = [t.user_attrs["error"] for t in trials]
    assert "WorkerCrashedError" in errors[0] or "Crash" in errors[0], errors[0]
    assert "bad candidate" in errors[1] and "slot 3" in errors[2]


@pytest.mark.timeout(300)
def test_run_sweep_layout(cluster, tmp_path):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "sweep.journal")))
    cells = []
    for table in ("pixel8", "iphone15"):
        for budget in (4.0, 7.5):
            def cons(result, b=budget):
                return {"latency": result["latency_ms"] - b}
            study = _study(sweeps.study_name("sweep", table, budget), storage)
            job = ray_driver.StudyJob(study, toy_eval, xy_params, 3, constraints_fn=cons, label=f"{table}/{budget}")
            cells.append(sweeps.SweepStudy(table, budget, job, tmp_path / table / sweeps.budget_dir(budget)))
    manifest = sweeps.run_sweep(cells, tmp_path, storage_desc=str(tmp_path / "sweep.journal"), max_in_flight=2)
    assert sorted(optuna.get_all_study_names(storage)) == sorted(c.job.study.study_name for c in cells)
    assert len(manifest["studies"]) == 4 and manifest["cluster"]["nodes"] == 2
    for c in cells:
        # the same atomic parquet/CSV tables as `ditnas search` writes
        assert all((c.out_dir / f"{name}.{ext}").exists() for name in ("trials", "pareto") for ext in ("csv", "parquet"))
        assert len(c.job.study.get_trials(states=(TrialState.COMPLETE,))) == 3
    import pandas as pd

    front = pd.read_csv(tmp_path / "front.csv")
    assert {"table", "budget_ms", "number", "latency_ms", "quality", "feasible", "constraint_latency"} <= set(front.columns)
    assert (front["latency_ms"] <= front["budget_ms"]).all()
    assert (tmp_path / "7.5ms").exists() is False and (tmp_path / "pixel8" / "7.5ms" / "study.json").exists()
    assert manifest["versions"]["optuna"] == optuna.__version__ and manifest["versions"]["ray"] == ray.__version__
    assert not list(tmp_path.rglob("*.tmp*"))  # atomic writes leave no temporary files


@pytest.mark.timeout(300)
def test_attach_without_token_says_how_to_provide_it(cluster, tmp_path, monkeypatch):
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    for k in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(empty_home))
    t0 = time.time()
    try:
        with pytest.raises(DitnasError) as err:
            ray_cluster.connect(cluster["address"])
        msg = str(err.value)
        assert "\n" not in msg and cluster["address"] in msg and "RAY_AUTH_TOKEN" in msg
        assert time.time() - t0 < 60  # Ray gives up after ~20 s on an auth failure
    finally:
        monkeypatch.undo()
        ray_cluster.connect(cluster["address"])  # later tests keep a connected driver


@pytest.mark.timeout(60)
def test_unreachable_address_is_quick_one_line_error():
    port = _free_port()  # nothing listens here (ray.init alone would retry for minutes)
    t0 = time.time()
    with pytest.raises(DitnasError) as err:
        ray_cluster.connect(f"127.0.0.1:{port}", probe_timeout=3)
    assert time.time() - t0 < 15
    msg = str(err.value)
    assert "\n" not in msg and f"127.0.0.1:{port}" in msg and "ray start --head" in msg
    with pytest.raises(DitnasError, match="port"):
        ray_cluster.connect("127.0.0.1:notaport")


def test_sweep_rejects_missing_inputs(tmp_path):
    search = SearchConfig(trials=4)
    with pytest.raises(DitnasError, match="does not exist"):
        sweeps.sweep(search, SweepConfig(budgets_ms=(10.0,)), tmp_path / "missing.pt", [tmp_path / "pixel8.json"], tmp_path / "out")
    with pytest.raises(DitnasError, match=r"sweep.budgets_ms.*positive"):
        sweeps.sweep(search, SweepConfig(budgets_ms=(0.0,)), tmp_path, [tmp_path], tmp_path / "out")
    with pytest.raises(DitnasError, match=r"sweep.budgets_ms: missing"):
        sweeps.sweep(search, SweepConfig(), tmp_path, [tmp_path], tmp_path / "out")
