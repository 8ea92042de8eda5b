"""common/selection.py: the one model-selection and early-stopping rule, against hand-traced sequences."""
import math

from common.selection import Selection


def trace(scores, patience):
    """(best, best_at, index of the evaluation after which training stops or None) by hand-written loop."""
    select = Selection(patience=patience)
    for at, score in enumerate(scores):
        select.update(score, at)
        if select.should_stop:
            return select.best, select.best_at, at
    return select.best, select.best_at, None


def test_strict_improvement_wins_and_ties_keep_the_earliest():
    assert trace([0.1, 0.3, 0.3, 0.2], None) == (0.3, 1, None)


def test_patience_counts_evaluations_without_a_strict_improvement():
    # improvements at 0 and 2; then 3 and 4 bring none: patience 2 stops after evaluation 4
    assert trace([0.1, 0.05, 0.2, 0.2, 0.1, 0.9], 2) == (0.2, 2, 4)
    assert trace([0.1, 0.05, 0.2, 0.2, 0.1, 0.9], 3) == (0.9, 5, None)
    assert trace([0.5, 0.4], 1) == (0.5, 0, 1)


def test_nan_never_wins_and_counts_as_stale():
    assert trace([math.nan, 0.2, math.nan], 5) == (0.2, 1, None)
    select = Selection(patience=1)
    assert not select.update(math.nan, 0) and select.should_stop and select.best_at == -1
