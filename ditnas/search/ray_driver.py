"""Ray Core fan-out of Optuna studies: ask/tell in the driver, one Ray task per candidate.

Why not Ray Tune's OptunaSearch: it only calls `study.tell(values)`, so constraints cannot be passed
(toolchain.md §4.3). Here the driver owns the study (any storage, `enqueue_trial` seeds, the dashboard
still works) and Ray only runs evaluations, places them (CPU, or a custom resource such as
`{"phone": 1}` for a node that has the device) and retries them when a worker process dies
(`max_retries` re-runs a task whose worker died: os._exit, SIGKILL, OOM kill, node death; an
exception raised by the function is retried only with `retry_exceptions=True`).

- `run_studies([...])` / `distributed_ask_tell(study, ...)` is the generic driver loop: the evaluator
  is any picklable top-level function, so this module does not depend on `objectives.py`.
- `evaluate_arch_task(checkpoint, table, n, seed, guidance, quality, quality_steps, arch_text, steps)` is the real
  evaluator: it builds one `EvalContext` per worker process and reuses it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ditnas.errors import DitnasError
from ditnas.search.optuna_search import DRIVER_ATTR, driver_id
from ditnas.search.ray_cluster import first_line as _first_line
from ditnas.search.study import recover_interrupted

# Result of one evaluation: a flat dict of numbers/strings (latency_ms, quality, memory_bytes, ...).
Result = Mapping[str, Any]
MakeParams = Callable[[Any], tuple]  # (optuna.Trial) -> positional args appended to eval_args
ConstraintsFn = Callable[[Result], Mapping[str, float]]  # {name: value}; feasible iff value <= 0


def _task_error(exc: BaseException) -> str:
    """One line for a failed task: the evaluator's own exception when it raised (RayTaskError.cause),
    else Ray's (WorkerCrashedError, NodeDiedError, ...)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {_first_line(cause)}"
    return f"{type(exc).__name__}: {_first_line(exc)}"


# ----- the evaluator task ----------------------------------------------------------------------
_CONTEXTS: dict[tuple, Any] = {}  # per worker process: (checkpoint, table, n, seed, guidance, quality, steps) -> EvalContext


def evaluate_arch_task(checkpoint: str, table: str | None, n: int, seed: int, guidance: str, quality: str,
                       quality_steps: int, arch_text: str, steps: int) -> dict:
    """Evaluate one candidate inside a Ray worker; the EvalContext (supernet, eval batch, predictor, the
    quality signal `search.quality`) is loaded on the first call in a process and reused, since Ray keeps
    workers alive between tasks. A trained signal (proxy, finetune) caches beside the checkpoint
    (`<checkpoint folder>/search_cache`, as `ditnas search` does), so a retried task trains nothing twice."""
    # lazy: torch is only needed on workers
    from ditnas.search.objectives import EvalContext

    key = (str(checkpoint), None if table is None else str(table), int(n), int(seed), str(guidance), str(quality),
           int(quality_steps))
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        ctx = _CONTEXTS[key] = EvalContext.from_paths(checkpoint, table, n, seed, guidance=guidance, quality=quality,
                                                      quality_steps=quality_steps)
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
        raise DitnasError("Ray is not connected; call ditnas.search.ray_cluster.connect() first")
    task = ray.remote(_call).options(
        num_cpus=num_cpus, resources=dict(resources or {}), max_retries=int(retries), retry_exceptions=bool(retry_exceptions)
    )
    limit = max_in_flight or _cluster_slots(num_cpus, resources)
    summaries = [JobSummary(j.label or j.study.study_name, j.study.study_name) for j in jobs]
    if fail_stale:
        # trials a killed driver left RUNNING: told FAIL and queued again (study.recover_interrupted)
        for job, s in zip(jobs, summaries):
            s.stale_failed += len(recover_interrupted(job.study))
    driver = driver_id()
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
        trial.set_user_attr(DRIVER_ATTR, driver)
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
