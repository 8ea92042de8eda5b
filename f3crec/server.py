"""The server (§3, §7): owns the public item table Q, the previous-block snapshot Q^{t−1}, the
best-round copy, and the aggregation. It imports nothing from the client side and its API takes only what
clients upload: whole local tables (`aggregate`) or, from the vectorised simulator, the concatenation of
every participant's row deltas (`aggregate_deltas`). tests/f3crec/test_sim.py walks the object graph to
prove no client parameter or interaction is reachable from a Server. The tables are torch tensors, or numpy
arrays for the compiled simulator (which uploads one summed delta, `aggregate_sum`, and never imports torch).
"""
from __future__ import annotations

from common.runs import check_finite

from .arrays import cat, clone, like
from .method import item_temporal_mean


MEAN_BUDGET = 1 << 28   # entries (clients × item rows × d) averaged at once


def aggregate(tables: list, budget: int = MEAN_BUDGET):
    """FedAvg of uploaded tables: F3CRec takes the UNWEIGHTED mean over participants (§3)."""
    import torch
    return block_mean(lambda lo, hi: torch.stack([t[lo:hi] for t in tables]), tables[0], len(tables), budget)


def block_mean(block, like, count: int, budget: int = MEAN_BUDGET):
    """The mean over `count` clients of (I, d) tables, `block(lo, hi)` giving their rows lo:hi stacked
    (count, hi − lo, d): one block (torch.stack(tables).mean(0)) when count·I·d ≤ budget, else blocks of
    ⌊budget / (count·d)⌋ rows: memory O(budget), whatever the number of clients."""
    n_items, dim = like.shape
    step = max(1, budget // max(count * dim, 1))
    if step >= n_items:
        return block(0, n_items).mean(0)                            # (A, I, d) -> (I, d)
    out = like.new_empty(like.shape)
    for lo in range(0, n_items, step):
        out[lo:lo + step] = block(lo, min(lo + step, n_items)).mean(0)
    return out


class Server:
    """Holds Q, Q^{t−1} and named slots ('best', 'last'); mixes with ITM when it is on (§7)."""

    def __init__(self, items, beta: float, itm: bool):
        self.items = items                      # Q, broadcast every round
        self.previous = None                    # Q^{t−1}: best-round table of the last block
        self.beta, self.itm = beta, itm
        self.slots: dict = {}
        # Named when an aggregate is not finite (with the key to change); the block loop adds the round.
        self.where = "the server's aggregation (training diverged: lower backbone.lr)"

    def broadcast(self):
        return self.items

    def grow(self, new_rows) -> None:
        """Append rows for the items first seen in this block (§8 step 1); any array kind, made Q's."""
        self.items = cat([self.items, like(new_rows, self.items)])

    def aggregate(self, tables: list) -> dict:
        """Q′ = mean of the uploaded tables, then ITM in incremental blocks (the reference simulator)."""
        return self._finish(aggregate(tables))

    def aggregate_deltas(self, rows, deltas, num_clients: int, summed=None) -> dict:
        """Q′ = Q + (1/|P|) Σ_u Δ_u from every client's (row, delta) pairs, plus `summed`, a (I, d) sum of
        further clients' whole-table deltas: the same mean as `aggregate`, since an untouched row of an
        upload equals the broadcast row (tensors)."""
        total = self.items.new_zeros(self.items.shape).index_add_(0, rows, deltas)
        if summed is not None:
            total += summed
        return self.aggregate_sum(total, num_clients)

    def aggregate_sum(self, total, num_clients: int) -> dict:
        """Q′ = Q + total / |P| from the (I, d) sum of every participant's whole-table delta."""
        return self._finish(self.items + total / num_clients)

    def _finish(self, mean_table) -> dict:
        # Every simulator aggregates through here (§13, §14): a diverged round stops the run in one line,
        # before ITM, validation or the next round read the table. max |q| is finite iff every entry is.
        check_finite(abs(mean_table).max() if len(mean_table) else 0.0, self.where, what="item table")
        if self.itm and self.previous is not None:
            self.items, weight = item_temporal_mean(mean_table, self.previous, self.beta)
            return {"itm_w": float(weight.mean()) if len(weight) else 0.0}
        self.items = mean_table
        return {}

    def end_block(self) -> None:
        """Freeze the current (best-round, restored) table as Q^{t} for the next block's ITM (§7 step 5)."""
        self.previous = clone(self.items)

    def save_slot(self, name: str) -> None:
        self.slots[name] = clone(self.items)

    def load_slot(self, name: str) -> None:
        self.items = clone(self.slots[name])

    def state_dict(self) -> dict:
        return {"items": self.items, "previous": self.previous, "slots": dict(self.slots)}

    def load_state_dict(self, state: dict) -> None:
        self.items, self.previous, self.slots = state["items"], state["previous"], dict(state["slots"])
