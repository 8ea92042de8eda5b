"""common/metrics.py against a pure-Python brute force and hand-computed values (CONVENTIONS.md §8)."""
import math

import pytest
import torch

from common.metrics import average, full_sort_metrics, rank_metrics, sampled_metrics, target_rank


def brute_force(scores, pos, ks, exclude=None):
    """Per-row loops: sort by score (stable on index, like a fixed tie order), then count."""
    out = {f"{m}@{k}": [] for k in ks for m in ("HR", "Recall", "NDCG", "MRR")}
    for b in range(len(scores)):
        row = [(-math.inf if exclude is not None and exclude[b][j] and not pos[b][j] else s, j)
               for j, s in enumerate(scores[b])]
        order = [j for _, j in sorted(row, key=lambda t: (-t[0], t[1]))]
        positives = {j for j, p in enumerate(pos[b]) if p}
        for k in ks:
            top = order[:k]
            hits = [1 if j in positives else 0 for j in top]
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / math.log2(r + 2) for r in range(min(len(positives), k)))
            first = next((r for r, h in enumerate(hits) if h), None)
            out[f"HR@{k}"].append(float(any(hits)))
            out[f"Recall@{k}"].append(sum(hits) / len(positives))
            out[f"NDCG@{k}"].append(dcg / idcg)
            out[f"MRR@{k}"].append(0.0 if first is None else 1 / (first + 1))
    return out


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
    rank = target_rank(scores, target)
    by_rank = rank_metrics(rank, ks=(10, 20))
    for key in full:
        torch.testing.assert_close(full[key], by_rank[key], msg=key)
    hit = rank < 20
    torch.testing.assert_close(full["NDCG@20"][hit], 1 / torch.log2(rank[hit] + 2))


def test_exclusion_never_hides_a_target():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0]])
    pos = torch.tensor([[False, True, False, False]])
    exclude = torch.ones_like(pos)  # everything "seen", the target too
    m = full_sort_metrics(scores, pos, ks=(1,), exclude_mask=exclude)
    assert m["HR@1"].item() == 1.0
    assert target_rank(scores, torch.tensor([1]), exclude_mask=exclude).item() == 0.0


def test_row_without_positive_is_an_error():
    with pytest.raises(ValueError, match="no positive"):
        full_sort_metrics(torch.zeros(2, 3), torch.tensor([[True, False, False], [False] * 3]))


def test_tie_rules():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    target = torch.tensor([2])  # one item strictly above, two others tied with it
    assert target_rank(scores, target, ties="optimistic").item() == 0.0
    assert target_rank(scores, target, ties="pessimistic").item() == 2.0
    assert target_rank(scores, target, ties="average").item() == 1.0
    with pytest.raises(ValueError):
        target_rank(scores, target, ties="random")


def test_sampled_metrics_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 5, (40,), generator=gen).double()       # small integers: many ties
    neg = torch.randint(0, 5, (40, 100), generator=gen).double()
    for ties in ("pessimistic", "optimistic", "average"):
        got = sampled_metrics(pos, neg, ks=(10, 20), ties=ties)
        for b in range(40):
            greater = sum(1 for v in neg[b] if v > pos[b])
            tied = sum(1 for v in neg[b] if v == pos[b])
            rank = greater + {"pessimistic": tied, "optimistic": 0, "average": tied / 2}[ties]
            for k in (10, 20):
                want = 1 / math.log2(rank + 2) if rank < k else 0.0
                assert got[f"NDCG@{k}"][b].item() == pytest.approx(want)
                assert got[f"HR@{k}"][b].item() == float(rank < k)


def test_collapsed_scores_are_pessimistic_misses():
    # A branch that scores every candidate the same must not get HR = 1 under the default tie rule.
    m = sampled_metrics(torch.zeros(3), torch.zeros(3, 100), ks=(10,))
    assert m["HR@10"].sum().item() == 0.0


def test_average_is_exact_over_uneven_batches():
    a = {"HR@10": torch.tensor([1.0, 0.0, 1.0])}
    b = {"HR@10": torch.tensor([0.0])}
    assert average([a, b])["HR@10"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        average([])
