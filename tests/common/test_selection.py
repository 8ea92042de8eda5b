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


def flame_reference_rule(scores, patience, max_epochs):
    """FLAME's loop as it was written before it used Selection (flame/train.py::fit): best 0.0 at epoch 0,
    stop before epoch e when e > best_epoch + patience. Returns (best, best_epoch, epochs run)."""
    best, best_epoch, ran = 0.0, 0, 0
    for epoch in range(1, max_epochs + 1):
        if epoch > best_epoch + patience:
            break
        ran = epoch
        if scores[epoch - 1] > best:
            best, best_epoch = scores[epoch - 1], epoch
    return best, best_epoch, ran


def test_flame_progress_decides_as_flames_reference_rule_also_across_a_resume():
    import random
    from flame.train import Progress

    rng = random.Random(0)
    for _ in range(300):
        n, patience = rng.randint(1, 12), rng.randint(0, 4)
        scores = [rng.choice([0.0, 0.1, 0.2, 0.3, math.nan]) for _ in range(n)]
        cut = rng.randint(0, n)  # a resume from last.pt after `cut` epochs

        progress = Progress.start(patience)
        for epoch in range(1, n + 1):
            if epoch == cut + 1 and cut:  # rebuilt from the fields last.pt keeps
                progress = Progress.from_checkpoint({"epoch": progress.epoch, "best_val": progress.best,
                                                     "best_epoch": progress.best_epoch, "train_time": 0.0,
                                                     "time_to_best": 0.0}, patience)
            if progress.select.should_stop:
                break
            progress.record(epoch, scores[epoch - 1], 1.0)
        assert (progress.best, progress.best_epoch, progress.epoch) == \
            flame_reference_rule(scores, patience, n), (scores, patience, cut)


def test_f3crec_block_loop_decides_as_its_reference_rule():
    """f3crec/train.py::run_block before it used Selection: best -1.0, stale count, stop at stale >= patience."""
    import random

    rng = random.Random(1)
    for _ in range(300):
        scores, patience = [rng.choice([0.0, 0.1, 0.2, 0.3]) for _ in range(rng.randint(1, 12))], rng.randint(1, 4)
        best, best_round, stale, ran = -1.0, -1, 0, 0
        for r, value in enumerate(scores):
            ran = r + 1
            if value > best:
                best, best_round, stale = value, r, 0
            else:
                stale += 1
            if stale >= patience:
                break
        select = Selection(patience=patience, best=-1.0)
        for r, value in enumerate(scores):
            select.update(value, r)
            if select.should_stop:
                break
        assert (select.best, select.best_at, r + 1) == (best, best_round, ran)
