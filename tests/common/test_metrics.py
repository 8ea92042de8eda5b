"""common/metrics.py against a pure-Python brute force and hand-computed values; the tie rules against an
enumeration of every order of the tied items."""
import itertools
import math

import pytest
import torch

from common.metrics import average, full_sort_metrics, rank_metrics, sampled_metrics, tie_metrics


def metrics_of_order(order, positives, ks):
    """Textbook metrics of one ranked list (item ids, best first) given the set of positives."""
    out = {}
    for k in ks:
        hits = [1 if j in positives else 0 for j in order[:k]]
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(positives), k)))
        first = next((r for r, h in enumerate(hits) if h), None)
        out[f"HR@{k}"] = float(any(hits))
        out[f"Recall@{k}"] = sum(hits) / len(positives)
        out[f"NDCG@{k}"] = dcg / idcg
        out[f"MRR@{k}"] = 0.0 if first is None else 1 / (first + 1)
    return out


def brute_force(scores, pos, ks, exclude=None, tie_key=lambda j, positives: j):
    """Per-row loops: sort by score, ties by `tie_key` (default: the item id, like a fixed tie order), then count."""
    out = {f"{m}@{k}": [] for k in ks for m in ("HR", "Recall", "NDCG", "MRR")}
    for b in range(len(scores)):
        row = [(-math.inf if exclude is not None and exclude[b][j] and not pos[b][j] else s, j)
               for j, s in enumerate(scores[b])]
        positives = {j for j, p in enumerate(pos[b]) if p}
        order = [j for _, j in sorted(row, key=lambda t: (-t[0], tie_key(t[1], positives)))]
        for key, value in metrics_of_order(order, positives, ks).items():
            out[key].append(value)
    return out


def expected_over_tie_orders(scores, positives, ks):
    """The mean metrics over EVERY order of the items inside each group of equal scores (rows of <= 8 items)."""
    groups = [[j for j in range(len(scores)) if scores[j] == value] for value in sorted(set(scores), reverse=True)]
    orders = [sum(choice, []) for choice in itertools.product(*(map(list, itertools.permutations(g)) for g in groups))]
    per_order = [metrics_of_order(order, positives, ks) for order in orders]
    return {key: sum(m[key] for m in per_order) / len(per_order) for key in per_order[0]}


@pytest.mark.parametrize("seed", range(5))
def test_full_sort_matches_brute_force_multi_positive(seed):
    gen = torch.Generator().manual_seed(seed)
    B, N, ks = 16, 30, (1, 5, 10, 20)
    scores = torch.randn(B, N, generator=gen, dtype=torch.float64)  # distinct: no tie ambiguity
    pos = torch.rand(B, N, generator=gen) < 0.15
    pos[torch.arange(B), torch.randint(0, N, (B,), generator=gen)] = True  # at least one positive
    exclude = torch.rand(B, N, generator=gen) < 0.3
    got = full_sort_metrics(scores, pos, ks, exclude_mask=exclude)
    want = brute_force(scores.tolist(), pos.tolist(), ks, exclude.tolist())
    for key, values in want.items():
        torch.testing.assert_close(got[key], torch.tensor(values, dtype=torch.float64), msg=key)


def test_hand_computed_two_by_five():
    # Row 0: one positive (item 2) ranked 2nd -> NDCG = 1/log2(3). Row 1: positives {0, 4}, ranks 0 and 3.
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2, 0.3],
                           [0.8, 0.7, 0.6, 0.1, 0.5]])
    pos = torch.tensor([[0, 0, 1, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    m = full_sort_metrics(scores, pos, ks=(1, 3, 5))
    assert m["HR@1"].tolist() == [0.0, 1.0]
    assert m["NDCG@3"][0].item() == pytest.approx(1 / math.log2(3))
    # Row 1 @5: DCG = 1 + 1/log2(5); IDCG over min(2,5)=2 ideal ranks = 1 + 1/log2(3).
    assert m["NDCG@5"][1].item() == pytest.approx((1 + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))
    # Row 1 @3: one of two positives found -> Recall 0.5; IDCG uses min(2, 3) = 2 ranks.
    assert m["Recall@3"][1].item() == pytest.approx(0.5)
    assert m["NDCG@3"][1].item() == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert m["MRR@5"].tolist() == pytest.approx([0.5, 1.0])


def test_recall_divides_by_number_of_positives_not_k():
    scores = torch.arange(30, 0, -1, dtype=torch.float64).view(1, 30)
    pos = torch.zeros(1, 30, dtype=torch.bool)
    pos[0, :25] = True  # 25 positives, all in the top 25
    m = full_sort_metrics(scores, pos, ks=(20,))
    assert m["Recall@20"].item() == pytest.approx(20 / 25)
    assert m["NDCG@20"].item() == pytest.approx(1.0)


def test_single_target_ndcg_identity_and_rank_metrics_agree():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(64, 50, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 50, (64,), generator=gen)
    pos = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, target.view(-1, 1), True)
    full = full_sort_metrics(scores, pos, ks=(10, 20))
    rank = (scores > scores.gather(1, target.view(-1, 1))).sum(1).double()     # distinct scores: the rank
    by_rank = rank_metrics(rank, ks=(10, 20))
    for key in full:
        torch.testing.assert_close(full[key], by_rank[key], msg=key)
    for ties in ("pessimistic", "optimistic", "average"):          # no ties: every rule agrees with topk
        for key, value in full_sort_metrics(scores, pos, ks=(10, 20), ties=ties).items():
            torch.testing.assert_close(value, full[key], msg=f"{ties} {key}")
    hit = rank < 20
    torch.testing.assert_close(full["NDCG@20"][hit], 1 / torch.log2(rank[hit] + 2))


def test_exclusion_never_hides_a_target():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0]])
    pos = torch.tensor([[False, True, False, False]])
    exclude = torch.ones_like(pos)  # everything "seen", the target too
    m = full_sort_metrics(scores, pos, ks=(1,), exclude_mask=exclude)
    assert m["HR@1"].item() == 1.0
    for ties in ("pessimistic", "average"):
        assert full_sort_metrics(scores, pos, ks=(1,), exclude_mask=exclude, ties=ties)["HR@1"].item() == 1.0


def test_row_without_positive_is_an_error():
    with pytest.raises(ValueError, match="no positive"):
        full_sort_metrics(torch.zeros(2, 3), torch.tensor([[True, False, False], [False] * 3]))


def test_tie_rules():
    scores = torch.tensor([[3.0, 2.0, 2.0, 2.0, 0.0]])
    pos = torch.tensor([[False, False, True, False, False]])  # one item strictly above, two others tied with it
    hr = {ties: full_sort_metrics(scores, pos, ks=(1, 2, 3), ties=ties) for ties in ("optimistic", "pessimistic", "average")}
    assert [hr["optimistic"][f"HR@{k}"].item() for k in (1, 2, 3)] == [0.0, 1.0, 1.0]
    assert [hr["pessimistic"][f"HR@{k}"].item() for k in (1, 2, 3)] == [0.0, 0.0, 0.0]
    assert [hr["average"][f"HR@{k}"].item() for k in (1, 2, 3)] == pytest.approx([0.0, 1 / 3, 2 / 3])
    with pytest.raises(ValueError, match="full_sort_metrics: ties must be one of"):
        full_sort_metrics(scores, pos, ties="random")
    with pytest.raises(ValueError, match="sampled_metrics: ties must be one of"):
        sampled_metrics(torch.zeros(1), torch.zeros(1, 3), ties="topk")     # topk is full ranking only


def test_average_ties_are_the_expected_metric_not_the_metric_of_the_average_rank():
    # 18 items above the target, 4 others tied with it, K = 20: the target lands at rank 18..22 with equal
    # chance, 2 of the 5 are inside the top 20. The average rank (20) would give HR 0.
    m = tie_metrics(torch.tensor([18]), torch.tensor([4]), ks=(20,), ties="average")
    assert m["HR@20"].item() == pytest.approx(0.4)
    assert m["NDCG@20"].item() == pytest.approx((1 / math.log2(20) + 1 / math.log2(21)) / 5)
    assert m["MRR@20"].item() == pytest.approx((1 / 19 + 1 / 20) / 5)
    scores = torch.cat([torch.arange(40.0, 22.0, -1), torch.zeros(5), torch.full((7,), -1.0)]).view(1, -1)
    pos = torch.zeros_like(scores, dtype=torch.bool)
    pos[0, 20] = True                                                   # in the middle of the 5 tied items
    full = full_sort_metrics(scores, pos, ks=(20,), ties="average")
    assert full["HR@20"].item() == pytest.approx(0.4)
    sampled = sampled_metrics(scores[0, 20:21], scores[:, [j for j in range(30) if j != 20]], ks=(20,), ties="average")
    assert sampled["HR@20"].item() == pytest.approx(0.4)


@pytest.mark.parametrize("seed", range(6))
def test_full_ranking_tie_rules_against_every_order(seed):
    """Rows of 7 items with scores in {0, 1, 2} (large tie groups) and 1-3 positives: "average" is the mean
    over all orders of the tied items, "pessimistic"/"optimistic" the order with positives last/first."""
    gen = torch.Generator().manual_seed(seed)
    B, N, ks = 6, 7, (1, 2, 3, 5)
    scores = torch.randint(0, 3, (B, N), generator=gen).double()
    pos = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        pos[b, torch.randperm(N, generator=gen)[: 1 + b % 3]] = True
    exclude = torch.rand(B, N, generator=gen) < 0.2
    got = full_sort_metrics(scores, pos, ks, exclude_mask=exclude, ties="average")
    masked = scores.masked_fill(exclude & ~pos, float("-inf"))
    for b in range(B):
        want = expected_over_tie_orders(masked[b].tolist(), {j for j in range(N) if pos[b, j]}, ks)
        for key, value in want.items():
            assert got[key][b].item() == pytest.approx(value, abs=1e-12), (b, key)
    for ties, key in (("pessimistic", lambda j, p: (j in p, j)), ("optimistic", lambda j, p: (j not in p, j))):
        got = full_sort_metrics(scores, pos, ks, exclude_mask=exclude, ties=ties)
        want = brute_force(scores.tolist(), pos.tolist(), ks, exclude.tolist(), tie_key=key)
        for name, values in want.items():
            torch.testing.assert_close(got[name], torch.tensor(values, dtype=torch.float64), msg=f"{ties} {name}")


def test_sampled_metrics_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 5, (40,), generator=gen).double()       # small integers: many ties
    neg = torch.randint(0, 5, (40, 100), generator=gen).double()
    for ties in ("pessimistic", "optimistic", "average"):
        got = sampled_metrics(pos, neg, ks=(10, 20), ties=ties)
        for b in range(40):
            greater = sum(1 for v in neg[b] if v > pos[b])
            tied = sum(1 for v in neg[b] if v == pos[b])
            # "average": the target's rank is uniform on greater .. greater + tied; the metric is averaged.
            ranks = {"pessimistic": [greater + tied], "optimistic": [greater],
                     "average": range(greater, greater + tied + 1)}[ties]
            for k in (10, 20):
                want_ndcg = sum(1 / math.log2(r + 2) if r < k else 0.0 for r in ranks) / len(ranks)
                want_hr = sum(float(r < k) for r in ranks) / len(ranks)
                assert got[f"NDCG@{k}"][b].item() == pytest.approx(want_ndcg)
                assert got[f"HR@{k}"][b].item() == pytest.approx(want_hr)


def test_sampled_average_ties_against_every_order():
    # Few negatives so that every order of the tied ones can be listed: the positive is item 0.
    scores = [[1.0, 1.0, 1.0, 0.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 3.0, 3.0, 5.0, 3.0]]
    got = sampled_metrics(torch.tensor([r[0] for r in scores]), torch.tensor([r[1:] for r in scores]),
                          ks=(1, 2, 4), ties="average")
    for b, row in enumerate(scores):
        for key, value in expected_over_tie_orders(row, {0}, (1, 2, 4)).items():
            assert got[key][b].item() == pytest.approx(value, abs=1e-12), (b, key)


def test_collapsed_scores_are_pessimistic_misses():
    # A branch that scores every candidate the same must not get HR = 1 under the default tie rule.
    m = sampled_metrics(torch.zeros(3), torch.zeros(3, 100), ks=(10,))
    assert m["HR@10"].sum().item() == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_are_refused_naming_the_call(bad):
    scores = torch.tensor([[0.3, 0.2, 0.1]])
    broken = scores.clone()
    broken[0, 1] = bad                                                  # the target's own score
    pos = torch.tensor([[False, True, False]])
    with pytest.raises(ValueError, match=r"^full_sort_metrics: 1 non-finite value\(s\) .* in scores"):
        full_sort_metrics(broken, pos)
    with pytest.raises(ValueError, match=r"^sampled_metrics: 1 non-finite .* in pos_scores"):
        sampled_metrics(broken[:, 1], scores[:, [0, 2]])
    with pytest.raises(ValueError, match=r"^sampled_metrics: 1 non-finite .* in neg_scores"):
        sampled_metrics(scores[:, 1], broken[:, [0, 1]])
    with pytest.raises(ValueError, match=r"^rank_metrics: 1 non-finite .* in rank"):
        rank_metrics(torch.tensor([bad]))


def test_average_is_exact_over_uneven_batches():
    a = {"HR@10": torch.tensor([1.0, 0.0, 1.0])}
    b = {"HR@10": torch.tensor([0.0])}
    assert average([a, b])["HR@10"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        average([])
