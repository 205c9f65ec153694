"""Fair per-slot sampling of the supernet's random subnets (`train.fair_sampling`), after FairNAS's
strict fairness: every op of a slot (and skip, where the slot may be skipped), every width and every MLP
ratio is drawn equally often.

Uniform sampling draws each slot's choices independently, so over a short schedule some op of some slot
is trained noticeably less often than its siblings (with 5 ops and 1000 draws the least-drawn op of a
slot gets ~15% fewer updates than the most-drawn), and the weight-sharing loss partly measures that
(issue "Train once, rank right"). Here each (slot, stage) keeps a shuffled deck per choice kind; a draw
takes the next card and a deck is reshuffled when it runs out, so after k full decks every choice has
been drawn exactly k times. The decks are part of the checkpoint: a resumed run draws what an
uninterrupted one would.
"""

from __future__ import annotations

import random

from ditnas.arch import SKIP, Arch, SearchSpace, Slot


class FairDraw:
    """Random archs of `space` whose per-slot choices cycle through shuffled decks."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.decks: dict[str, list[int]] = {}

    def _next(self, key: str, n: int, rng: random.Random) -> int:
        deck = self.decks.get(key)
        if not deck:
            deck = list(range(n))
            rng.shuffle(deck)
            self.decks[key] = deck
        return deck.pop()

    def sample(self, rng: random.Random) -> Arch:
        space = self.space
        stages = space._sample_stages(rng) if space.free_stages else space.stage_pattern
        slots = []
        for i, stage in enumerate(stages):
            ops = space.ops_for(stage)
            # skip weighs as one more op, as in SearchSpace.sample
            choices = (*ops, SKIP) if i in space.skippable else ops
            op = choices[self._next(f"{i}:{stage}:op", len(choices), rng)]
            if op == SKIP:
                slots.append(Slot(SKIP, stage=stage))
                continue
            width = space.widths[self._next(f"{i}:{stage}:width", len(space.widths), rng)]
            ratio = space.mlp_ratios[self._next(f"{i}:{stage}:mlp", len(space.mlp_ratios), rng)]
            slots.append(Slot(op, width, ratio, stage))
        return space._base(slots)

    def state_dict(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.decks.items()}

    def load_state_dict(self, state: dict[str, list[int]]) -> None:
        self.decks = {str(k): [int(i) for i in v] for k, v in state.items()}
