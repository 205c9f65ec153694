"""Ray Core fan-out for the search: Optuna ask/tell in the driver, one Ray task per candidate.

Why not Ray Tune's OptunaSearch: it only calls `study.tell(values)`, so constraints cannot be passed
(toolchain.md §4.3). Here the driver owns the study (any storage, `enqueue_trial` seeds, the dashboard
still works) and Ray only runs evaluations, places them (CPU, or a custom resource such as
`{"phone": 1}` for a node that has the device) and retries them when a worker process dies.

- `connect(address)` attaches to an existing cluster (`--ray-address` / `RAY_ADDRESS`) or starts a
  local one; an unreachable address is one DitnasError line within seconds.
- `distributed_ask_tell(study, ...)` / `run_studies([...])` is the generic driver loop: the evaluator
  is any picklable top-level function, so this module does not depend on `objectives.py`.
- `evaluate_arch_task(checkpoint, table, n, seed, arch_text, steps)` is the real evaluator: it builds
  one `EvalContext` per worker process and reuses it.
- `sweep(budgets, tables, checkpoint, trials, out)` runs one study per (budget, device table), all
  interleaved from one driver so the whole cluster stays busy.

Ray 2.60 facts this relies on (checked on this machine):
- Token auth: `ray.init()` (new local cluster) turns it on and writes `~/.ray/auth_token`;
  `ray start --head` turns it on only if a token exists. A client attaching with an *explicit*
  address does not switch token mode on by itself (only `address="auto"` does), so against a token
  cluster it fails after ~20 s with "Unauthenticated". `connect` therefore switches the client to
  token mode whenever a token is available (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`,
  `~/.ray/auth_token`); it never sets `RAY_AUTH_MODE=disabled`.
- `ray.init(address=<host:port with nothing listening>)` retries the GCS for minutes (> 2 min here),
  so `connect` probes the port with a plain socket first.
- Task retries: `max_retries` re-runs a task whose worker process died (os._exit, SIGKILL, OOM kill,
  node death); an exception raised by the function is retried only with `retry_exceptions=True`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from ditnas.errors import DitnasError

# Result of one evaluation: a flat dict of numbers/strings (latency_ms, quality, memory_bytes, ...).
Result = Mapping[str, Any]
MakeParams = Callable[[Any], tuple]  # (optuna.Trial) -> positional args appended to eval_args
ConstraintsFn = Callable[[Result], Mapping[str, float]]  # {name: value}; feasible iff value <= 0

DEFAULT_PORT = 6379
PROBE_TIMEOUT_S = 5.0
TOKEN_HINT = (
    "if the cluster uses token auth, provide its token via RAY_AUTH_TOKEN=<token>, "
    "RAY_AUTH_TOKEN_PATH=<file> or ~/.ray/auth_token (print it on the head with `ray get-auth-token`)"
)


# ----- connecting ------------------------------------------------------------------------------
@dataclass
class RayConnection:
    """The driver's Ray session: where it is attached and what the cluster offers."""

    address: str  # "local" for a cluster this process started
    started_local: bool
    token_auth: bool
    nodes: int
    resources: dict[str, float] = field(default_factory=dict)

    def close(self) -> None:
        import ray

        ray.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split_address(address: str) -> tuple[str, int]:
    """host and port of `host:port`, `ray://host:port` or `[v6]:port` (default port 6379)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.rstrip("/")
    if rest.startswith("["):  # [::1]:6379
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host, port = rest, ""
    if not host:
        raise DitnasError(f"bad Ray address {address!r}: expected host:port (e.g. 127.0.0.1:6379)")
    try:
        return host, int(port) if port else (10001 if address.startswith("ray://") else DEFAULT_PORT)
    except ValueError:
        raise DitnasError(f"bad Ray address {address!r}: the port {port!r} is not a number") from None


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise DitnasError unless something accepts TCP connections at `address` within `timeout`."""
    host, port = _split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise DitnasError(
            f"cannot reach the Ray cluster at {address} ({reason}); start one there with "
            f"`ray start --head --port={port}`, fix --ray-address/RAY_ADDRESS, or unset both to run on a local cluster"
        ) from None


def _enable_token_auth_if_available() -> bool:
    """Switch this client to token mode when a token is available and RAY_AUTH_MODE is unset.

    Ray does this itself only for address="auto"; with an explicit address the client would connect
    without a token and a token cluster rejects it. We only ever turn auth on, never off.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # assumption: a future Ray without these internals enables auth everywhere (2.61)
        return False
    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the env/HOME may have changed since the last look
    if not loader.has_token(ignore_auth_mode=True):
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")  # refresh the cached RayConfig so this process sees token mode
    return True


def connect(address: str | None = None, *, num_cpus: int | None = None, probe_timeout: float = PROBE_TIMEOUT_S,
            namespace: str = "ditnas") -> RayConnection:
    """Attach to the cluster at `address` (else `RAY_ADDRESS`), or start a local one.

    An unreachable address raises DitnasError within `probe_timeout` seconds (plus Ray's own ~20 s
    when something listens but refuses us, e.g. a missing or wrong auth token).
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address not in (None, "local", "auto"):
        probe(address, probe_timeout)  # before touching any existing connection
    if ray.is_initialized():
        ray.shutdown()  # assumption: one connection per driver process; reconnecting replaces it
    if address in (None, "local"):
        try:
            # address="local": never silently attach to someone else's `ray start` on this machine
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, namespace=namespace,
                     logging_level="WARNING", log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - ray raises many types
            raise DitnasError(f"cannot start a local Ray cluster: {type(exc).__name__}: {_first_line(exc)}") from None
        return _describe("local", True)
    token = _enable_token_auth_if_available()
    try:
        ray.init(address=address, namespace=namespace, logging_level="WARNING", log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, AuthenticationError, RuntimeError, ...
        text = f"{type(exc).__name__} {exc}"
        if "Authentication" in text or "Unauthenticated" in text or "token" in text.lower():
            why = "it requires an auth token and " + ("the one found here was rejected" if token else "none was found here")
        else:
            why = f"{type(exc).__name__}: {_first_line(exc)[:200]}"
        raise DitnasError(f"cannot attach to the Ray cluster at {address} ({why}); {TOKEN_HINT}") from None
    return _describe(address, False)


def _describe(address: str, local: bool) -> RayConnection:
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    return RayConnection(address=address, started_local=local, token_auth=os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
                         or local, nodes=len(alive), resources={k: float(v) for k, v in ray.cluster_resources().items()})


def _task_error(exc: BaseException) -> str:
    """One line for a failed task: the evaluator's own exception when it raised (RayTaskError.cause),
    else Ray's (WorkerCrashedError, NodeDiedError, ...)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {_first_line(cause)}"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


# ----- the evaluator task ----------------------------------------------------------------------
_CONTEXTS: dict[tuple, Any] = {}  # per worker process: (checkpoint, table, n, seed) -> EvalContext


def evaluate_arch_task(checkpoint: str, table: str | None, n: int, seed: int, arch_text: str, steps: int) -> dict:
    """Evaluate one candidate inside a Ray worker; the EvalContext (supernet, eval batch, predictor)
    is loaded on the first call in a process and reused, since Ray keeps workers alive between tasks."""
    # lazy: torch is only needed on workers
    from ditnas.search.objectives import EvalContext

    key = (str(checkpoint), None if table is None else str(table), int(n), int(seed))
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        ctx = _CONTEXTS[key] = EvalContext.from_paths(checkpoint, table, n, seed)
    return dict(ctx.evaluate(arch_text, int(steps)))


def _call(fn: Callable[..., Result], args: tuple) -> dict:
    """The body of every Ray task: run the evaluator and return a plain dict."""
    return dict(fn(*args))


# ----- the driver loop -------------------------------------------------------------------------
@dataclass
class StudyJob:
    """One study driven by `run_studies`: how to sample a candidate, evaluate it and score it."""

    study: Any  # optuna.Study
    evaluate: Callable[..., Result]  # picklable top-level function: evaluate(*eval_args, *make_params(trial))
    make_params: MakeParams
    n_trials: int
    objective_keys: Sequence[str] = ("latency_ms", "quality")
    eval_args: tuple = ()
    constraints_fn: ConstraintsFn | None = None
    keep_attrs: Sequence[str] = ("arch", "arch_key", "steps", "latency_ms_step", "memory_bytes", "params")
    label: str = ""


@dataclass
class JobSummary:
    label: str
    study_name: str
    complete: int = 0
    failed: int = 0
    stale_failed: int = 0
    errors: list[str] = field(default_factory=list)


def distributed_ask_tell(
    study: Any,
    evaluate_remote: Callable[..., Result],
    make_params: MakeParams,
    n_trials: int,
    max_in_flight: int | None = None,
    constraints_fn: ConstraintsFn | None = None,
    retries: int = 2,
    *,
    eval_args: tuple = (),
    objective_keys: Sequence[str] = ("latency_ms", "quality"),
    resources: Mapping[str, float] | None = None,
    num_cpus: float = 1.0,
    retry_exceptions: bool = False,
    on_result: Callable[[str, int, Result | None], None] | None = None,
) -> JobSummary:
    """Run `n_trials` more trials of `study`, each evaluated as one Ray task; see `run_studies`."""
    job = StudyJob(study, evaluate_remote, make_params, n_trials, objective_keys, eval_args, constraints_fn)
    return run_studies([job], max_in_flight=max_in_flight, retries=retries, resources=resources,
                       num_cpus=num_cpus, retry_exceptions=retry_exceptions, on_result=on_result)[0]


def _cluster_slots(num_cpus: float, resources: Mapping[str, float] | None) -> int:
    import ray

    total = ray.cluster_resources()
    slots = [total.get("CPU", 1.0) / num_cpus] if num_cpus > 0 else []
    slots += [total.get(k, 0.0) / v for k, v in (resources or {}).items() if v > 0]
    return max(1, int(min(slots))) if slots else 1


def run_studies(
    jobs: Sequence[StudyJob],
    *,
    max_in_flight: int | None = None,
    retries: int = 2,
    resources: Mapping[str, float] | None = None,
    num_cpus: float = 1.0,
    retry_exceptions: bool = False,
    fail_stale: bool = True,
    on_result: Callable[[str, int, Result | None], None] | None = None,
) -> list[JobSummary]:
    """Drive several studies at once from this process; each candidate is one Ray task.

    Studies take turns asking (round robin), so small studies do not starve the cluster. A result is
    told as soon as its task finishes (`ray.wait`): constraints via `trial.set_constraint` (Optuna 5's
    replacement of the deprecated `constraints_func`), objectives via `study.tell`. A task that still
    fails after `retries` re-runs, or whose result lacks a finite objective, is told FAIL with the
    error in `user_attrs["error"]`. Whatever happens (even Ctrl-C), no trial this call asked is left
    RUNNING: in-flight tasks are cancelled and their trials told FAIL.
    """
    import optuna
    import ray
    from optuna.trial import TrialState

    if not ray.is_initialized():
        raise DitnasError("Ray is not connected; call ditnas.search.distributed.connect() first")
    task = ray.remote(_call).options(
        num_cpus=num_cpus, resources=dict(resources or {}), max_retries=int(retries), retry_exceptions=bool(retry_exceptions)
    )
    limit = max_in_flight or _cluster_slots(num_cpus, resources)
    summaries = [JobSummary(j.label or j.study.study_name, j.study.study_name) for j in jobs]
    if fail_stale:
        # assumption: one driver per study; RUNNING trials left by a killed driver will never be told
        for job, s in zip(jobs, summaries):
            for t in job.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                job.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                s.stale_failed += 1
    asked = [0] * len(jobs)
    inflight: dict[Any, tuple[int, Any]] = {}  # ObjectRef -> (job index, optuna.Trial)

    def fail(i: int, trial: Any, message: str) -> None:
        trial.set_user_attr("error", message[:500])
        jobs[i].study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        summaries[i].failed += 1
        summaries[i].errors.append(f"trial {trial.number}: {message[:300]}")
        if on_result:
            on_result(summaries[i].label, trial.number, None)

    def submit_one(i: int) -> None:
        job = jobs[i]
        trial = job.study.ask()
        asked[i] += 1
        try:
            extra = job.make_params(trial)
        except Exception as exc:  # noqa: BLE001 - e.g. a DitnasError from decoding an impossible arch
            fail(i, trial, f"{type(exc).__name__}: {_first_line(exc)}")
            return
        extra = tuple(extra) if isinstance(extra, (tuple, list)) else (extra,)
        inflight[task.remote(job.evaluate, tuple(job.eval_args) + extra)] = (i, trial)

    def tell(i: int, trial: Any, result: Result) -> None:
        job = jobs[i]
        try:
            values = [float(result[k]) for k in job.objective_keys]
        except (KeyError, TypeError, ValueError) as exc:
            fail(i, trial, f"result lacks objective {exc}: keys {sorted(result)}")
            return
        if not all(math.isfinite(v) for v in values):
            fail(i, trial, f"non-finite objectives {dict(zip(job.objective_keys, values))}")
            return
        for k in job.keep_attrs:
            if k in result and isinstance(result[k], (int, float, str, bool)):
                trial.set_user_attr(k, result[k])
        if job.constraints_fn is not None:
            for name, value in job.constraints_fn(result).items():
                trial.set_constraint(name, float(value))
        job.study.tell(trial, values)
        summaries[i].complete += 1
        if on_result:
            on_result(summaries[i].label, trial.number, result)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    turn = 0
    try:
        while True:
            # top up: round robin over jobs that still have trials to ask
            while len(inflight) < limit:
                open_jobs = [i for i in range(len(jobs)) if asked[i] < jobs[i].n_trials]
                if not open_jobs:
                    break
                i = open_jobs[turn % len(open_jobs)]
                turn += 1
                submit_one(i)
            if not inflight:
                break
            done, _ = ray.wait(list(inflight), num_returns=1)
            ref = done[0]
            i, trial = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, NodeDiedError, ...
                fail(i, trial, _task_error(exc))
                continue
            try:
                tell(i, trial, result)
            except Exception as exc:  # noqa: BLE001 - a bad constraints_fn must not leave the trial RUNNING
                fail(i, trial, f"cannot record the result: {type(exc).__name__}: {_first_line(exc)}")
    finally:
        # leave the study consistent even on Ctrl-C or a driver-side error
        for ref, (i, trial) in list(inflight.items()):
            with contextlib.suppress(Exception):  # already finished or gone
                ray.cancel(ref, force=True)
            fail(i, trial, "cancelled: the driver stopped before this evaluation finished")
        inflight.clear()
    return summaries


# ----- sweep -----------------------------------------------------------------------------------
def budget_dir(budget_ms: float) -> str:
    """Folder name of a budget: 12.5 -> '12.5ms'."""
    return f"{float(budget_ms):g}ms"


def study_name(prefix: str, table_name: str, budget_ms: float) -> str:
    return f"{prefix}-{table_name}-{budget_dir(budget_ms)}"


@dataclass
class SweepStudy:
    """One (device table, budget) cell of a sweep and its prepared job."""

    table_name: str
    budget_ms: float
    job: StudyJob
    out_dir: Path


def _constraints(t: Any) -> dict[str, float]:
    """{name: value} of a FrozenTrial (Optuna 5: a dict from `set_constraint`; older: a list)."""
    c = getattr(t, "constraints", None) or {}
    return {str(k): float(v) for k, v in (c.items() if isinstance(c, Mapping) else enumerate(c))}


def write_study_results(cell: SweepStudy, summary: JobSummary) -> dict[str, Any]:
    """`trials.csv` and `front.csv` (feasible Pareto front) in the cell's folder; returns its manifest row."""
    import pandas as pd
    from optuna.trial import TrialState

    study = cell.job.study
    cell.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        row.update({k: v for k, v in zip(cell.job.objective_keys, t.values or [])})
        cons = _constraints(t)
        row.update({f"constraint_{k}": v for k, v in cons.items()})
        row["feasible"] = bool(t.state == TrialState.COMPLETE and all(v <= 0 for v in cons.values()))
        row.update({k: v for k, v in t.user_attrs.items() if k != "error"})
        row["error"] = t.user_attrs.get("error", "")
        rows.append(row)
    trials = pd.DataFrame(rows)
    front_numbers = {t.number for t in study.best_trials}  # Optuna: feasible Pareto front only
    front = trials[trials["number"].isin(front_numbers)] if len(trials) else trials
    trials.to_csv(cell.out_dir / "trials.csv", index=False)
    front.to_csv(cell.out_dir / "front.csv", index=False)
    info = {"table": cell.table_name, "budget_ms": cell.budget_ms, "study_name": study.study_name,
            "dir": str(cell.out_dir), "trials": len(trials), "complete": summary.complete,
            "failed": summary.failed, "stale_failed": summary.stale_failed, "front": len(front),
            "errors": summary.errors[:10]}
    (cell.out_dir / "study.json").write_text(json.dumps(info, indent=2))
    return info


def run_sweep(cells: Sequence[SweepStudy], out: Path, *, storage_desc: str, max_in_flight: int | None = None,
              retries: int = 2, resources: Mapping[str, float] | None = None, num_cpus: float = 1.0,
              extra_manifest: Mapping[str, Any] | None = None,
              on_result: Callable[[str, int, Result | None], None] | None = None) -> dict[str, Any]:
    """Run every cell's study interleaved, then write per-cell tables, `front.csv` (all feasible fronts,
    with table and budget columns) and `sweep.json`. Independent of how the cells were built (tests
    use toy evaluators)."""
    import pandas as pd
    import ray

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summaries = run_studies([c.job for c in cells], max_in_flight=max_in_flight, retries=retries,
                            resources=resources, num_cpus=num_cpus, on_result=on_result)
    seconds = time.time() - t0
    infos, fronts = [], []
    for cell, summary in zip(cells, summaries):
        infos.append(write_study_results(cell, summary))
        f = pd.read_csv(cell.out_dir / "front.csv") if (cell.out_dir / "front.csv").stat().st_size > 1 else pd.DataFrame()
        if len(f):
            f.insert(0, "budget_ms", cell.budget_ms)
            f.insert(0, "table", cell.table_name)
            fronts.append(f)
    combined = pd.concat(fronts, ignore_index=True) if fronts else pd.DataFrame(columns=["table", "budget_ms", "number"])
    combined.to_csv(out / "front.csv", index=False)
    manifest = {
        "kind": "ditnas.sweep", "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 2),
        "storage": storage_desc, "studies": infos,
        "cluster": {"nodes": len([n for n in ray.nodes() if n.get("Alive")]),
                    "resources": {k: float(v) for k, v in ray.cluster_resources().items()}},
        "task": {"num_cpus": num_cpus, "resources": dict(resources or {}), "retries": retries},
        **dict(extra_manifest or {}),
    }
    (out / "sweep.json").write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def sweep(
    budgets: Iterable[float],
    tables: Iterable[Path | str],
    checkpoint: Path | str,
    trials: int,
    out: Path | str,
    ray_address: str | None = None,
    *,
    steps: Sequence[int] = (28,),
    n: int | None = None,
    seed: int = 0,
    eval_seed: int | None = None,
    sampler: str = "nsga2",
    storage: str | None = None,
    memory_limit_bytes: float | None = None,
    max_in_flight: int | None = None,
    retries: int = 2,
    resources: Mapping[str, float] | None = None,
    num_cpus: float = 1.0,
    prefix: str = "sweep",
    n_seeds: int = 16,
    on_result: Callable[[str, int, Result | None], None] | None = None,
) -> dict[str, Any]:
    """(budget × device table) searches over a Ray cluster: one study per pair in one storage (the
    journal `out/sweep.journal` by default), results in `out/<table>/<budget>ms/`, plus `out/front.csv`
    and `out/sweep.json`. Each study first gets up to `n_seeds` exact-DP layouts under its budget on
    its table (as `ditnas search` does), priced in the driver. Rerunning the same command tops each
    study up to `trials` finished trials."""
    import optuna
    from optuna.trial import TrialState

    # lazy: these are the single-machine search's helpers (same encoding, sampler and storage)
    from ditnas.latency_models.stage import load_predictor, table_dir
    from ditnas.search import objectives as obj
    from ditnas.search import optuna_search as osr
    from ditnas.search.problem import check_coverage, min_reachable_ms
    from ditnas.search.sensitivity import slot_sensitivity
    from ditnas.search.space import SearchChoices
    from ditnas.search.stage import check_space_match, dp_seeds
    from ditnas.supernet.run import VAL_BATCH

    budgets = [float(b) for b in budgets]
    tables = [Path(t) for t in tables]
    checkpoint = Path(checkpoint)
    out = Path(out)
    steps = [int(s) for s in steps]
    if not budgets or not tables:
        raise DitnasError("sweep needs at least one --budgets value and one --tables file")
    if any(b <= 0 for b in budgets):
        raise DitnasError(f"budgets must be positive milliseconds, got {budgets}")
    for p in [checkpoint, *tables]:
        if not p.exists():
            raise DitnasError(f"{p} does not exist; pass an existing {'checkpoint' if p == checkpoint else 'latency table'}")
    # a table folder inside a session (`<session>/table`) is named after its session
    names = [t.parent.name if t.name == "table" else t.stem for t in tables]
    if len(set(names)) != len(names):
        raise DitnasError(f"device tables must have distinct file names (they name the result folders): {names}")
    conn = connect(ray_address)
    n_eval = int(n if n is not None else VAL_BATCH)  # the same fixed batch as `ditnas search`
    e_seed = int(eval_seed if eval_seed is not None else obj.EVAL_SEED)
    # the driver prices DP seeds: the supernet's replacement sensitivity (cached beside the checkpoint,
    # shared with `ditnas search`) and each table's predictor; candidates are evaluated on the workers
    ctx = obj.EvalContext.from_paths(checkpoint, None, n_eval, e_seed, steps)
    space = ctx.space
    choices = SearchChoices.from_space(space)
    base = space.max_arch()
    sens = slot_sensitivity(ctx.supernet, ctx.objectives.batch, checkpoint_sha256=ctx.checkpoint_sha256, n=ctx.n,
                            seed=ctx.seed, cache_dir=checkpoint.parent / "search_cache", choices=choices) if n_seeds else None
    del ctx
    store, storage_desc = osr.open_storage(storage or str(out / "sweep.journal"), out)
    dists = osr.distributions(choices, steps)

    def make_params(trial: Any) -> tuple[str, int]:
        for name, d in dists.items():
            trial.suggest_categorical(name, d.choices)
        arch, s = osr.decode(choices, trial.params, base, steps)
        return str(arch), s

    cells = []
    seeded: dict[str, list[dict[str, Any]]] = {}
    for table, tname in zip(tables, names):
        table_obj, predictor = load_predictor(table_dir(table))
        check_space_match(space, table_obj)
        check_coverage(table_obj, space)
        minimum = min_reachable_ms(choices, predictor, sens) if n_seeds else 0.0
        for b in budgets:
            name = study_name(prefix, tname, b)
            study = optuna.create_study(storage=store, study_name=name, load_if_exists=True,
                                        directions=list(osr.DIRECTIONS), sampler=osr.make_sampler(sampler, seed, constant_liar=True))
            study.set_user_attr("budget_ms", b)
            study.set_user_attr("table", str(table))
            reachable = [s for s in steps if b / s >= minimum]
            seeds = dp_seeds(choices, predictor, sens, b, reachable, n_seeds) if n_seeds and reachable else []
            for arch, s in seeds:
                study.enqueue_trial(osr.encode(choices, arch, s, steps), user_attrs={"source": "dp"}, skip_if_exists=True)
            seeded[f"{tname}/{budget_dir(b)}"] = [{"arch": str(a), "steps": s} for a, s in seeds]
            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)))

            def constraints(result: Result, b: float = b) -> dict[str, float]:
                c = {"latency": float(result["latency_ms"]) - b}
                if memory_limit_bytes is not None:
                    c["memory"] = float(result["memory_bytes"]) - float(memory_limit_bytes)
                return c

            job = StudyJob(study, evaluate_arch_task, make_params, max(0, int(trials) - done),
                           eval_args=(str(checkpoint), str(table), n_eval, e_seed), constraints_fn=constraints,
                           label=f"{tname}/{budget_dir(b)}")
            cells.append(SweepStudy(tname, b, job, out / tname / budget_dir(b)))
    extra = {"checkpoint": str(checkpoint), "tables": [str(t) for t in tables], "budgets_ms": budgets,
             "steps": steps, "trials": int(trials), "sampler": sampler, "seed": seed, "eval": {"n": n_eval, "seed": e_seed},
             "dp_seeds": seeded,
             "ray": {"address": conn.address, "token_auth": conn.token_auth}}
    return run_sweep(cells, out, storage_desc=storage_desc, max_in_flight=max_in_flight, retries=retries,
                     resources=resources, num_cpus=num_cpus, extra_manifest=extra, on_result=on_result)
