"""Path-Drop Guidance priced for the search: one denoising step = the full net + its dense-only net.

PDG (SPRINT; supernet/token_drop.py) runs per step the arch on the label and, as the unconditional branch, the
arch's dense-only net on the null label: the first and last `dense` slots, every middle slot skipped, the stream
at the arch's width with every transition, patch embedding and final layer (token_drop.dense_only_plan). Two
batch-1 calls, so the per-step feature of the generation pricing is

    P_pdg(arch) = P(arch) + P(dense-only arch)              (LatencyPredictor.predict_step(arch, "pdg"))

and the generation is α_pdg·steps·P_pdg + β_pdg·steps + γ_pdg (generation_latency.py: measured pdg generations,
or derived from the none fit). Both calls are sums of the same calibrated cells, so P_pdg stays additive: a dense
slot's block is paid twice, a middle slot's once, the embedding, final layer, transitions and the calibration
intercept twice. `PathDropPricing` is the search's predictor interface on that sum (`predict`, `cell_cost`,
`fixed_cost`, `slot_weights`, `generation`), so the DP and Optuna optimise a PDG generation exactly as the
predictor prices it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ditnas.arch import Arch
from ditnas.latency_models.programs import Cell
from ditnas.supernet.token_drop import check_pdg_dense


@dataclass
class PathDropPricing:
    """A LatencyPredictor seen as the per-step cost of a PDG step (module docstring)."""

    base: Any  # LatencyPredictor
    dense: int

    def __post_init__(self) -> None:
        self.space = self.base.space
        self.table = self.base.table
        self.calibration = self.base.calibration
        check_pdg_dense(int(self.dense), self.space.depth, "search.pdg_dense")

    @property
    def generation(self) -> Any:
        return self.base.generation

    def predict(self, arch: Arch, calibrated: bool = True) -> float:
        """One PDG step in ms: the full call + the dense-only call (per-call calibrated each)."""
        return self.base.predict_step(arch, "pdg", self.dense, calibrated)

    def predict_generation(self, arch: Arch, steps: int | None = None, guidance: str = "pdg") -> float:
        return self.base.predict_generation(arch, steps, guidance, self.dense)

    def slot_weights(self, depth: int) -> list[int]:
        """How many of a step's calls run slot i's block: 2 at the dense ends, 1 in the middle."""
        return [2 if i < self.dense or i >= depth - self.dense else 1 for i in range(depth)]

    def cell_cost(self, cell: Cell, calibrated: bool = True) -> float:
        """A block's term per call it runs in (`slot_weights` multiplies); every other cell runs in both calls."""
        cost = self.base.cell_cost(cell, calibrated)
        return cost if cell.kind == "block" else 2 * cost

    def fixed_cost(self, calibrated: bool = True) -> float:
        return 2 * self.base.fixed_cost(calibrated)

    def describe(self) -> dict[str, Any]:
        return {"guidance": "pdg", "pdg_dense": self.dense,
                "per_step": "full net + dense-only net (first and last pdg_dense slots), two batch-1 calls"}
