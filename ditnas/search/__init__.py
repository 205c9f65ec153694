"""Search: the space encoding (`space`) and the exact budget-aware DP (`dp`).

Pure algorithms: nothing here reads a latency table or a checkpoint; callers pass cost and score arrays.
"""

from ditnas.search.dp import (
    DPProblem,
    DPResult,
    TwoPhaseResult,
    brute_force,
    k_best,
    solve,
    solve_two_phase,
    to_arch,
)
from ditnas.search.space import SearchChoices, SlotChoice

__all__ = [
    "DPProblem",
    "DPResult",
    "SearchChoices",
    "SlotChoice",
    "TwoPhaseResult",
    "brute_force",
    "k_best",
    "solve",
    "solve_two_phase",
    "to_arch",
]
