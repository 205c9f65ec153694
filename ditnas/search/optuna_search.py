"""Optuna 5 ask/tell multi-objective search over (layout, denoising steps).

Objectives, both minimised: total latency (ms = steps × per-step) and quality (weight-sharing
validation flow loss). Constraints via `trial.set_constraint(key, value)` (Optuna 5: feasible iff every
value <= 0; checked against the installed 5.0.0: `Trial.set_constraint(self, key: str, value: float)`,
stored as system attr `constraints:<key>`, read by NSGA-II, TPE and GP samplers and by
`study.best_trials`, which returns only feasible Pareto trials). The deprecated `constraints_func`
is not used.

- `latency`: latency_ms − budget_ms (always set, so every complete trial has the same keys — the GP
  sampler refuses mixed constraint sets);
- `memory`: memory_bytes − limit (only when a memory limit is given).

Parameters: `SearchChoices.distributions()` as `CategoricalDistribution`s, passed to
`study.ask(fixed_distributions)` (a fixed-length categorical encoding, optuna#3363), plus `steps` as a
categorical of ints when more than one step count is searched. A decoded arch the space rejects is told
as `TrialState.FAIL` (user attr `error`). DP layouts are seeded with `study.enqueue_trial(params,
skip_if_exists=True)`, so a rerun does not enqueue them again.

Storage: by default a journal file `<out>/study.journal`
(`JournalStorage(JournalFileBackend(path))`, import path `optuna.storages.journal`); rerunning the same
command continues the study (same study name, `load_if_exists=True`): each run adds `trials` trials.
A URL (`postgresql://user@host:port/db`, `sqlite:///file.db`, …) opens an `RDBStorage`.

Dashboard (optuna-dashboard 0.21; `manifest.json` field `dashboard` holds the exact command):
    optuna-dashboard <out>/study.journal                            # a file path is read as a journal file
    optuna-dashboard postgresql+psycopg2://user@127.0.0.1:5432/db   # an RDB URL, with the installed driver
(SQLAlchemy 2.1 sends a bare `postgresql://` to psycopg 3, which is not installed: name the driver.)
(`--storage-class JournalFileStorage` forces the journal reading; `--host`/`--port`, default localhost:8080.)
"""

from __future__ import annotations

import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from ditnas.arch import Arch
from ditnas.config import SAMPLERS, SearchConfig  # the names and defaults of the search config section
from ditnas.errors import DitnasError
from ditnas.io import atomic_write_bytes, atomic_write_text
from ditnas.search.space import SearchChoices

JOURNAL = "study.journal"
STEPS_PARAM = "steps"
DIRECTIONS = ["minimize", "minimize"]  # latency_ms (total), quality (validation flow loss)
Progress = Callable[[int, int, str], None]
EvaluateFn = Callable[[Arch, int], dict]  # (arch, steps) -> {"latency_ms", "quality", ["memory_bytes"], ...}


# ----- sampler and storage ---------------------------------------------------------------------
def make_sampler(name: str, seed: int, *, population_size: int = SearchConfig.population, constant_liar: bool = False) -> optuna.samplers.BaseSampler:
    """`nsga2` (NSGAIISampler), `tpe` (multivariate TPESampler; `constant_liar` — Optuna 5 defaults it to
    True, we default to False for the sequential loop and let a parallel driver turn it on) or `gp`
    (GPSampler; multi-objective logEHVI with constraints in Optuna 5)."""
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=population_size, seed=seed)
    if name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=constant_liar)
    if name == "gp":
        if not hasattr(optuna.samplers, "GPSampler"):
            raise DitnasError("sampler 'gp' needs optuna.samplers.GPSampler (Optuna >= 3.6); use nsga2 or tpe")
        return optuna.samplers.GPSampler(seed=seed)
    raise DitnasError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def _redact(url: str) -> str:
    """The URL without a password (user:secret@host -> user:***@host)."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            cred = cred.split(":", 1)[0] + ":***"
        return f"{scheme}://{cred}@{host}"
    return url


def open_storage(storage: str | None, out: Path) -> tuple[Any, str]:
    """(storage object, description). None: the journal file in `out`. A URL: RDBStorage, probed now
    (an unreachable server is one DitnasError line, not a traceback later)."""
    if storage is None or "://" not in str(storage):
        path = Path(storage) if storage else Path(out) / JOURNAL
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        try:
            return JournalStorage(JournalFileBackend(str(path))), str(path)
        except Exception as exc:  # noqa: BLE001
            raise DitnasError(f"cannot open journal storage {path}: {type(exc).__name__}: {_first_line(exc)}; if the file "
                              "was damaged, restore it from a copy or choose a new --storage/--out (it is left as it is)") from None
    url = rdb_url(str(storage))
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith(("postgresql", "postgres")):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rdb = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
            break
        except Exception as exc:  # noqa: BLE001 - sqlalchemy/psycopg2 raise many types
            if attempt < SCHEMA_RACE_RETRIES and _lost_schema_race(exc):
                time.sleep(0.2 * (attempt + 1))  # the winner's CREATE TABLEs commit; the retry finds them
                continue
            raise DitnasError(
                f"cannot open storage {_redact(url)}: {type(exc).__name__}: {_first_line(exc)}; "
                "check the server is running and the URL (e.g. postgresql://user@127.0.0.1:5432/db)"
            ) from None
    return rdb, _redact(url)


# Drivers started together against a fresh database all run Optuna's schema creation (SQLAlchemy's
# check-then-CREATE, not atomic): on PostgreSQL the losers fail with IntegrityError on
# "pg_type_typname_nsp_index" (or "already exists"). Found by tests/test_storage_load.py: 3 of 4
# writers died that way. # assumption: 5 retries (0.2-1 s apart) outlast the winner's schema transaction
SCHEMA_RACE_RETRIES = 5


def _lost_schema_race(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return ("IntegrityError" in text or "ProgrammingError" in text or "UniqueViolation" in text) and (
        "already exists" in text or "duplicate key" in text or "pg_type_typname_nsp_index" in text
        or "pg_class_relname_nsp_index" in text)


def rdb_url(url: str) -> str:
    """The URL SQLAlchemy should open. SQLAlchemy 2.1 maps a bare `postgresql://` to the psycopg (v3)
    driver; the project installs psycopg2-binary, so a driver-less PostgreSQL URL gets the driver that
    is importable (`postgresql+psycopg://` if psycopg 3 is, else `postgresql+psycopg2://`).
    `postgres://` (Heroku style) is read as `postgresql://`."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres"):
        if importlib.util.find_spec("psycopg") is not None:
            return f"postgresql+psycopg://{rest}"
        if importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
    return url


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# ----- encoding --------------------------------------------------------------------------------
def distributions(choices: SearchChoices, steps: Sequence[int]) -> dict[str, CategoricalDistribution]:
    out = {name: CategoricalDistribution(values) for name, values in choices.distributions().items()}
    if len(steps) > 1:
        out[STEPS_PARAM] = CategoricalDistribution([int(s) for s in steps])
    return out


def encode(choices: SearchChoices, arch: Arch, steps: int, steps_set: Sequence[int]) -> dict[str, Any]:
    params: dict[str, Any] = dict(choices.encode(arch))
    if len(steps_set) > 1:
        params[STEPS_PARAM] = int(steps)
    return params


def decode(choices: SearchChoices, params: dict[str, Any], base: Arch, steps_set: Sequence[int]) -> tuple[Arch, int]:
    steps = int(params[STEPS_PARAM]) if len(steps_set) > 1 else int(steps_set[0])
    arch = choices.decode({k: v for k, v in params.items() if k != STEPS_PARAM}, base=base)
    from dataclasses import replace

    return replace(arch, steps=steps), steps


# ----- the loop --------------------------------------------------------------------------------
DRIVER_ATTR = "driver"  # user attr of a trial: "<host>:<pid>" of the process that asked it


def driver_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_study(
    study: optuna.Study,
    evaluate: EvaluateFn,
    choices: SearchChoices,
    *,
    steps: Sequence[int],
    budget_ms: float,
    n_trials: int,
    memory_limit_bytes: float | None = None,
    base: Arch | None = None,
    progress: Progress | None = None,
) -> optuna.Study:
    """Run `n_trials` more ask/tell trials of `study` (opened by `study.open_study`, seeds enqueued)."""
    steps = [int(s) for s in steps]
    base = base or choices.space.max_arch()
    dists = distributions(choices, steps)
    driver = driver_id()  # lets a rerun tell this process's trials (if it dies) from a live driver's
    for k in range(n_trials):
        trial = study.ask()
        trial.set_user_attr(DRIVER_ATTR, driver)  # before the parameters: the untagged window stays short
        for name, d in dists.items():  # what study.ask(dists) does, after the tag
            trial.suggest_categorical(name, d.choices)
        try:
            arch, s = decode(choices, trial.params, base, steps)
        except DitnasError as exc:
            trial.set_user_attr("error", str(exc))
            study.tell(trial, state=TrialState.FAIL)
            if progress:
                progress(k + 1, n_trials, f"trial {trial.number}: invalid arch")
            continue
        result = evaluate(arch, s)
        for key in ("arch", "arch_key", "latency_ms_step", "memory_bytes", "params"):
            if key in result:
                trial.set_user_attr(key, result[key])
        trial.set_user_attr("steps", s)
        if "source" not in trial.user_attrs:
            trial.set_user_attr("source", "sampler")
        trial.set_constraint("latency", float(result["latency_ms"]) - float(budget_ms))
        if memory_limit_bytes is not None:
            trial.set_constraint("memory", float(result["memory_bytes"]) - float(memory_limit_bytes))
        study.tell(trial, [float(result["latency_ms"]), float(result["quality"])])
        if progress:
            progress(k + 1, n_trials, f"trial {trial.number}: {result['latency_ms']:.3g} ms, loss {result['quality']:.4g}")
    return study


# ----- results ---------------------------------------------------------------------------------
def _feasible(t: FrozenTrial) -> bool:
    return bool(t.constraints) and all(v <= 0 for v in t.constraints.values())


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, arch, steps, latency_ms, quality, feasible, source, params."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        done = t.state == TrialState.COMPLETE
        row = {
            "number": t.number,
            "state": t.state.name,
            "arch": t.user_attrs.get("arch", ""),
            "arch_key": t.user_attrs.get("arch_key", ""),
            "steps": int(t.user_attrs.get("steps", t.params.get(STEPS_PARAM, 0)) or 0),
            "latency_ms": float(t.values[0]) if done else math.nan,
            "quality": float(t.values[1]) if done else math.nan,
            "latency_ms_step": float(t.user_attrs.get("latency_ms_step", math.nan)),
            "memory_bytes": float(t.user_attrs.get("memory_bytes", math.nan)),
            "params": float(t.user_attrs.get("params", math.nan)),
            "feasible": done and _feasible(t),
            "source": t.user_attrs.get("source", ""),
            "error": t.user_attrs.get("error", ""),
            "retry_of": int(t.user_attrs.get("retry_of", -1)),
        }
        for key, value in t.constraints.items():
            row[f"constraint_{key}"] = float(value)
        rows.append(row)
    cols = ["number", "state", "arch", "arch_key", "steps", "latency_ms", "quality", "latency_ms_step",
            "memory_bytes", "params", "feasible", "source", "error", "retry_of"]
    df = pd.DataFrame(rows)
    return df if len(df) else pd.DataFrame(columns=cols)


def pareto_frame(study: optuna.Study) -> pd.DataFrame:
    """The feasible Pareto front (`study.best_trials`), by latency."""
    numbers = {t.number for t in study.best_trials}
    df = trials_frame(study)
    if not len(df):
        return df
    return df[df["number"].isin(numbers)].sort_values(["latency_ms", "quality"]).reset_index(drop=True)


def write_tables(df: pd.DataFrame, out: Path, name: str) -> list[str]:
    """`<name>.parquet` and `<name>.csv` (atomic)."""
    out = Path(out)
    atomic_write_bytes(out / f"{name}.parquet", df.to_parquet(index=False))
    atomic_write_text(out / f"{name}.csv", df.to_csv(index=False))
    return [f"{name}.parquet", f"{name}.csv"]


def dominated(points: np.ndarray) -> np.ndarray:
    """Bool mask: rows of (n, 2) minimised objectives dominated by another row (brute force)."""
    n = len(points)
    out = np.zeros(n, dtype=bool)
    for i in range(n):
        le = np.all(points <= points[i], axis=1)
        lt = np.any(points < points[i], axis=1)
        out[i] = bool(np.any(le & lt))
    return out
