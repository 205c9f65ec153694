"""One budget-aware, DP-seeded Optuna study: what `ditnas search` and every study of `ditnas sweep`
build, so the two cannot drift (same budget check, same seeds, same storage layout).

    check_budget(...)   -> which steps values the budget reaches (refuses an unreachable budget)
    dp_seeds(...)       -> up to n exact-DP layouts under the budget, best score first
    open_study(...)     -> create or continue the study in a storage, seeds enqueued once, and
                           trials a killed driver left RUNNING failed and queued again
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import optuna
from optuna.trial import TrialState

from ditnas.arch import Arch
from ditnas.config import SearchConfig
from ditnas.errors import ConfigFieldError, DitnasError
from ditnas.search.optuna_search import DIRECTIONS, DRIVER_ATTR, encode, make_sampler
from ditnas.search.problem import build_problem, dp_results, min_reachable_ms
from ditnas.search.dp import to_arch
from ditnas.search.space import SearchChoices


def fmt_ms(x: float) -> str:
    """Short text for ms that is never below x (the user copies a minimum as a budget)."""
    for digits in (4, 6, 8, 10):
        text = f"{x:.{digits}g}"
        if float(text) >= x:
            return text
    return repr(float(x))


@dataclass(frozen=True)
class BudgetCheck:
    budget_ms: float  # one whole generation (generation_latency.py defines it)
    min_ms_per_step: float  # the cheapest arch of the space on this table, per step
    reachable: list[int]  # steps values at which the budget fits that arch
    per_step_ms: dict[int, float]  # the per-step budget the DP gets at each steps value
    guidance: str = "none"
    definition: str = ""  # what the budget's milliseconds mean (printed by search and sweep)

    def per_step(self, steps: int) -> float:
        return self.per_step_ms[int(steps)]


def check_priced(cfg: SearchConfig, table: Any, predictor: Any, field: str = "search.threads") -> None:
    """Refuse, before any work, a table measured at another thread count than the one asked for, or
    one without measured generations of the guidance mode asked for."""
    predictor.generation.fit_for(cfg.guidance, table.describe())
    have = table.identity.get("threads")
    if cfg.threads is not None and have is not None and int(have) != int(cfg.threads):
        raise ConfigFieldError(field, f"{cfg.threads} threads asked, but {table.describe()} was measured at {have}; "
                                      f"a table is valid for its thread count only -- profile at {cfg.threads} threads "
                                      f"or drop the setting")


def check_budget(choices: SearchChoices, predictor, sens, budget_ms: float, steps: Sequence[int],
                 table_desc: str, guidance: str = "none") -> BudgetCheck:
    """The steps values `budget_ms` (one whole generation with `guidance`) reaches; ConfigFieldError
    (search.budget_ms) when none does, saying so when the number looks like a per-step figure."""
    pricing = predictor.generation
    minimum = min_reachable_ms(choices, predictor, sens)
    per_step = {int(s): pricing.per_step_budget(budget_ms, s, guidance) for s in steps}
    reachable = [s for s in steps if per_step[int(s)] >= minimum]
    if not reachable:
        per = ", ".join(f"{fmt_ms(pricing.generation_ms(minimum, s, guidance))} ms at {s} steps" for s in steps)
        hint = ""
        if budget_ms >= minimum:
            hint = (f"; {budget_ms:g} ms was read as ONE WHOLE GENERATION, but it is above the cheapest arch's "
                    f"{fmt_ms(minimum)} ms per step: if it is a per-step budget, multiply it by the steps")
        raise ConfigFieldError(
            "search.budget_ms",
            f"{budget_ms:g} ms is below the cheapest reachable arch on {table_desc} (one whole generation, {guidance} "
            f"guidance): {per} "
            f"({fmt_ms(minimum)} ms per step){hint}; raise the budget or use fewer steps",
        )
    return BudgetCheck(float(budget_ms), minimum, reachable, per_step, guidance,
                       pricing.definition(guidance))


def dp_seeds(choices: SearchChoices, predictor, sens, budget_ms_total: float, steps: Sequence[int], n_seeds: int,
             *, buckets: int, guidance: str = "none") -> list[tuple[Arch, int]]:
    """Up to `n_seeds` distinct (arch, steps) the exact DP finds under `budget_ms_total` (one whole
    generation with `guidance`): for each steps value and stream width the best layouts (and points
    along the DP's own front), best summed sensitivity score first, round-robin over steps values.
    Steps values the budget cannot reach give none."""
    space = choices.space
    pooled: list[tuple[float, Arch, int]] = []
    for s in steps:
        step_budget = predictor.generation.per_step_budget(budget_ms_total, s, guidance)
        for w in space.widths:
            try:
                problem = build_problem(choices, predictor, sens, step_budget, buckets=buckets, stream_width=w)
                results = dp_results(problem, n_seeds)
            except DitnasError:
                continue  # this stream width (or steps value) cannot fit the budget
            base = replace(space.max_arch(), steps=s)
            for r in results:
                arch = to_arch(r, choices, base)
                # a layout narrower than w was priced with the stream at w: exact only when latency grows
                # with width, so keep the seed only if the predictor agrees it fits (noisy tables)
                if predictor.predict(arch) <= step_budget * (1 + 1e-9):
                    pooled.append((r.score, arch, s))
    pooled.sort(key=lambda item: -item[0])
    seeds: list[tuple[Arch, int]] = []
    seen: set[tuple[Arch, int]] = set()
    by_steps = {s: [(a, st) for _, a, st in pooled if st == s] for s in steps}
    while len(seeds) < n_seeds and any(by_steps.values()):
        for s in steps:
            while by_steps[s]:
                item = by_steps[s].pop(0)
                if item not in seen:
                    seen.add(item)
                    seeds.append(item)
                    break
            if len(seeds) >= n_seeds:
                break
    return seeds


def study_name_for(checkpoint_sha: str, table_id: str | None, budget_ms_total: float, steps: Sequence[int],
                   memory_limit_mb: float | None, guidance: str = "none") -> str:
    """The default study name of `ditnas search`: a hash of what makes two searches the same search."""
    parts: list[Any] = [checkpoint_sha, table_id, float(budget_ms_total), sorted(int(s) for s in steps), memory_limit_mb]
    if guidance != "none":  # what was priced before guidance existed keeps its study name
        parts.append(guidance)
    text = json.dumps(parts)
    return f"ditnas-search-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def open_study(cfg: SearchConfig, choices: SearchChoices, storage: Any, name: str, budget_ms: float,
               seeds: Sequence[tuple[Arch, int]], *, constant_liar: bool = False,
               user_attrs: dict[str, Any] | None = None) -> optuna.Study:
    """Create or continue study `name` (two objectives: latency, quality), enqueue the DP seeds once.

    `constant_liar`: for drivers with several trials in flight (a sweep)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True, directions=list(DIRECTIONS),
                                sampler=make_sampler(cfg.sampler, cfg.seed, population_size=cfg.population,
                                                     constant_liar=constant_liar))
    if len(study.directions) != 2:
        raise DitnasError(f"study {name!r} in this storage has {len(study.directions)} objectives; "
                          "use another results folder or storage")
    recover_interrupted(study)
    study.set_user_attr("budget_ms", float(budget_ms))
    for key, value in (user_attrs or {}).items():
        study.set_user_attr(key, value)
    steps = cfg.sorted_steps
    for arch, s in seeds:
        study.enqueue_trial(encode(choices, arch, s, steps), user_attrs={"source": "dp"}, skip_if_exists=True)
    return study


# ----- trials a killed driver left behind -------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _driver_gone(trial: optuna.trial.FrozenTrial) -> bool | None:
    """True when a tagged RUNNING trial's driver is a process of this host that no longer exists; False
    for a live (or another host's) driver; None when the trial carries no driver tag (yet).
    # assumption: a trial tagged by another host belongs to a live driver there (drivers on several
    hosts share an RDB storage; their trials are not this process's to fail)."""
    host, _, pid = str(trial.user_attrs.get(DRIVER_ATTR, "")).rpartition(":")
    if not pid:
        return None
    return host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))


# A driver tags a trial right after `study.ask` creates it, so a trial of a live driver is untagged for a
# moment (found by tests/test_storage_load.py: a writer opening the shared study failed another writer's
# just-asked trial, whose driver then crashed on `tell` with UpdateFinishedTrialError). An untagged trial
# is therefore abandoned only once it has stayed untagged this long, timed on this process's clock (no
# clock skew between hosts): a driver killed inside `ask`, or an older ditnas, left it.
# assumption: 5 s is far above the ask-to-tag window (one storage read and the sampler's before_trial;
# milliseconds here, well under 1 s on a loaded 2-core machine with a 200-trial journal)
UNTAGGED_GRACE_S = 5.0


def _abandoned_trials(study: optuna.Study, grace_s: float) -> list[optuna.trial.FrozenTrial]:
    """The RUNNING trials whose driver is gone: tagged by a dead process of this host, or untagged for
    `grace_s` seconds of watching (polled; a trial that gets tagged or finishes meanwhile is dropped)."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    gone = [t for t in running if _driver_gone(t)]
    untagged = {t.number for t in running if _driver_gone(t) is None}
    deadline = time.monotonic() + grace_s
    while untagged and time.monotonic() < deadline:
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        now = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        untagged = {n for n in untagged if n in now and _driver_gone(now[n]) is None}
    if untagged:
        now = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        gone += [now[n] for n in sorted(untagged) if n in now and _driver_gone(now[n]) is None]
    return gone


def recover_interrupted(study: optuna.Study, *, untagged_grace_s: float = UNTAGGED_GRACE_S) -> list[int]:
    """Tell FAIL every trial a dead driver left RUNNING and enqueue its parameters again (marked
    `retry_of`), so a SIGKILLed search loses no evaluation and leaves no trial RUNNING. A trial without
    a driver tag counts as left behind only after `untagged_grace_s` seconds still untagged (a live
    driver tags its trial just after asking it). Returns the numbers of the trials recovered."""
    recovered = []
    for t in _abandoned_trials(study, untagged_grace_s):
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        # even with no parameters recorded yet (killed inside `ask`) the retry keeps the trial count
        attrs = {k: v for k, v in t.user_attrs.items() if k == "source"}
        study.enqueue_trial(dict(t.params), user_attrs={**attrs, "retry_of": t.number})
        recovered.append(t.number)
    return recovered
