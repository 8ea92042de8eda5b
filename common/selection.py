"""Model selection on a validation score, and early stopping: one rule for every paper.

A score strictly greater than the best so far is the new best (the earliest of equal scores is kept; NaN
never wins). With `patience` set, training stops once `patience` evaluations in a row brought no strict
improvement; `patience=None` keeps the best of all evaluations (no early stopping).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Selection:
    patience: int | None = None
    best: float = -math.inf
    best_at: int = -1          # the step, epoch or round of `best`; -1 before any evaluation
    stale: int = 0             # evaluations since the last strict improvement

    def update(self, score: float, at: int) -> bool:
        """Record one validation score; True when it is the new best."""
        if score > self.best:
            self.best, self.best_at, self.stale = score, at, 0
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.stale >= self.patience
