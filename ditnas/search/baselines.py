"""The hand-made layouts a searched arch is compared with (SnapGen++ / S2DiT reviewers' question: does
the search beat the obvious choice at the same budget?).

- `all_sa`: every slot self-attention;
- `uniform_interleave_<a>_<b>`: slot i runs ops[i % 2], LCHA/SSA (S2DiT's sandwich operators), else SA/SSA;
every slot a block (no skips) at the space's stage layout, one width and MLP ratio for all slots: the
widest width (then the largest ratio) whose priced generation fits the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ditnas.arch import Arch, SearchSpace, Slot
from ditnas.errors import DitnasError


def interleave_pair(space: SearchSpace) -> tuple[str, ...]:
    for pair in (("lcha", "ssa"), ("sa", "ssa")):
        if all(op in space.ops for op in pair):
            return pair
    return tuple(space.ops[:2]) if len(space.ops) >= 2 else tuple(space.ops)


def widest_fitting(space: SearchSpace, latency_ms: Callable[[Arch], float], ops: tuple[str, ...], budget_ms: float,
                   steps: int) -> dict[str, Any]:
    """The widest uniform layout of `ops` whose `latency_ms(arch)` (one whole generation) fits `budget_ms`;
    else the cheapest one tried and a note."""
    base = space.max_arch()
    tried = []
    for w in sorted(space.widths, reverse=True):
        for r in sorted(space.mlp_ratios, reverse=True):
            slots = [Slot(ops[i % len(ops)], w, r, s.stage) for i, s in enumerate(base.slots)]
            try:
                arch = space.validate(replace(base.with_slots(slots), steps=int(steps)))
            except DitnasError as exc:
                tried.append({"width": w, "mlp_ratio": r, "error": str(exc)})
                continue
            total = float(latency_ms(arch))
            tried.append({"width": w, "mlp_ratio": r, "latency_ms": total})
            if total <= budget_ms:
                return {"arch": arch, "fits": True, "latency_ms": total}
    cheapest = min((t for t in tried if "latency_ms" in t), key=lambda t: t["latency_ms"], default=None)
    return {"arch": None, "fits": False, "cheapest": cheapest,
            "note": f"cannot fit the budget at any width (ops {'/'.join(ops)}); cheapest "
                    + (f"{cheapest['latency_ms']:.4g} ms at width {cheapest['width']}, ratio {cheapest['mlp_ratio']}"
                       if cheapest else "none valid")}


def baseline_layouts(space: SearchSpace, latency_ms: Callable[[Arch], float], budget_ms: float,
                     steps: int) -> dict[str, dict[str, Any]]:
    """{name: widest_fitting(...)} for all-SA and the uniform interleave (a space without SA says so)."""
    pair = interleave_pair(space)
    out: dict[str, dict[str, Any]] = {}
    for name, ops in ((f"uniform_interleave_{'_'.join(pair)}", pair), ("all_sa", ("sa",))):
        if not all(op in space.ops for op in ops):
            out[name] = {"arch": None, "fits": False, "note": f"the space has no {'/'.join(ops)} op"}
        else:
            out[name] = widest_fitting(space, latency_ms, ops, budget_ms, steps)
    return out


def score_baselines(objectives: Any, space: SearchSpace, budget_ms: float, steps: int) -> dict[str, dict[str, Any]]:
    """The baselines priced and scored exactly as the search's trials (`Objectives.evaluate`), JSON-ready."""
    out = {}
    for name, fit in baseline_layouts(space, lambda a: objectives.latency_ms(a, steps), budget_ms, steps).items():
        if fit["fits"]:
            row = objectives.evaluate(fit["arch"], steps)
            out[name] = {"fits": True, **{k: row[k] for k in ("arch", "steps", "quality", "latency_ms")}}
        else:
            out[name] = {k: v for k, v in fit.items() if k != "arch"}
    return out
