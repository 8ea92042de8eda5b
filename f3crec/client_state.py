"""Client-side state of every user, stacked one row per user (§3 "What persists across blocks").

This is what lives on the devices: Φ_u and its saved slots, T^u and ŷ^{t−1} at T^u's items (ARM), the anchors θ* and the
Fisher (emb_reg/EWC), and each client's received copy of Q^{t−1}. The vectorised simulator trains on it
in place; the reference simulator keeps the same values inside its `Client` objects and converts to this
form for checkpoints. The server never holds a reference to it. Nothing here is users × items: KD reads
ŷ^{t−1} only at T^u, so ŷ is kept as (U, N) aligned with T^u, and a checkpoint is sized by the state.
The arrays are torch tensors, or numpy arrays for the compiled simulator (arrays.py: one code for both).
"""
from __future__ import annotations

import numpy as np

from .arrays import cat, clone, is_tensor, like, zeros


class ClientStates:
    """Stacked per-user client state; `state_dict()` is a plain dict (loads with weights_only=True)."""

    def __init__(self, private: dict, topn: int):
        self.private = private                                           # Φ: name -> (U, ...)
        self.slots: dict[str, dict] = {}                                 # 'best' / 'last' copies of Φ
        first = next(iter(private.values()))
        self.topn = zeros(first, (self.num_users(), topn), "int64")      # T^u where has_topn
        self.yhat = zeros(first, (self.num_users(), topn))               # ŷ^{t−1} at T^u's items
        self.has_topn = zeros(first, (self.num_users(),), "bool")
        self.anchor = {k: clone(v) for k, v in private.items()}         # θ*: best Φ of the last trained block
        self.anchor_items = None                                         # received Q^{t−1}
        self.fisher = {k: zeros(v, tuple(v.shape)) for k, v in private.items()}
        self.fisher_valid = zeros(first, (self.num_users(),), "bool")
        self.fisher_rows: dict | None = None                             # flat: user, item, F (L, d) (EWC)

    def num_users(self) -> int:
        return next(iter(self.private.values())).shape[0]

    def grow(self, new_private: dict) -> None:
        """Append the clients of the users first seen in this block (arrays of any kind: made this state's)."""
        count = next(iter(new_private.values())).shape[0]
        new_private = {k: like(v, self.private[k]) for k, v in new_private.items()}
        for k, v in new_private.items():
            self.private[k] = cat([self.private[k], v])
            self.anchor[k] = cat([self.anchor[k], v])
            self.fisher[k] = cat([self.fisher[k], zeros(v, tuple(v.shape))])
            for slot in self.slots.values():
                slot[k] = cat([slot[k], v])
        self.topn = cat([self.topn, zeros(self.topn, (count, self.topn.shape[1]))])
        self.yhat = cat([self.yhat, zeros(self.yhat, (count, self.yhat.shape[1]))])
        self.has_topn = cat([self.has_topn, zeros(self.has_topn, (count,))])
        self.fisher_valid = cat([self.fisher_valid, zeros(self.fisher_valid, (count,))])

    def set_fisher_rows(self, users, items, values) -> None:
        """Replace the Fisher rows of the clients in `users` (absent users keep theirs, §11 EWC): tensors, or numpy
        arrays (the compiled simulator), sorted by (user, item)."""
        if not is_tensor(values):
            self.fisher_rows = _merge_rows(self.fisher_rows, users, items, values)
            return
        import torch
        if self.fisher_rows is not None:
            keep = ~torch.isin(self.fisher_rows["user"], users.unique())
            users = torch.cat([self.fisher_rows["user"][keep], users])
            items = torch.cat([self.fisher_rows["item"][keep], items])
            values = torch.cat([self.fisher_rows["F"][keep], values])
        order = torch.argsort(users * (int(items.max()) + 1 if items.numel() else 1) + items)
        self.fisher_rows = {"user": users[order], "item": items[order], "F": values[order]}

    def save_slot(self, name: str) -> None:
        self.slots[name] = {k: clone(v) for k, v in self.private.items()}

    def load_slot(self, name: str) -> None:
        self.private = {k: clone(v) for k, v in self.slots[name].items()}

    def state_dict(self) -> dict:
        return {"private": self.private, "slots": self.slots, "yhat": self.yhat, "topn": self.topn,
                "has_topn": self.has_topn, "anchor": self.anchor, "anchor_items": self.anchor_items,
                "fisher": self.fisher, "fisher_valid": self.fisher_valid, "fisher_rows": self.fisher_rows}

    def load_state_dict(self, state: dict) -> None:
        yhat, topn = state.get("yhat"), state.get("topn")
        if yhat is None or topn is None or yhat.shape != topn.shape:
            raise ValueError("this checkpoint keeps ŷ over every item (code before 2026-12-06): not resumable by "
                             "this version; start the run again (ŷ is now kept at Tᵘ's items only)")
        for key, value in state.items():
            setattr(self, key, value)


PER_USER = ("private", "slots", "yhat", "topn", "has_topn", "anchor", "fisher", "fisher_valid")   # a row per user


def _each(value, fn):
    return {k: _each(v, fn) for k, v in value.items()} if isinstance(value, dict) else fn(value)


def user_rows(state: dict, rows) -> dict:
    """A ClientStates.state_dict() with every per-user array cut to the users `rows` (a Flower node's own: its
    saved state sized by its users, not by every user id)."""
    return {k: _each(v, lambda a: a[rows]) if k in PER_USER else v for k, v in state.items()}


def spread(a, rows, count: int):
    """`count` rows of a's kind: a's rows at `rows`, zero elsewhere (users hosted by another Flower node)."""
    out = zeros(a, (count, *a.shape[1:]))
    out[rows] = a
    return out


def spread_user_rows(state: dict, rows, count: int) -> dict:
    """user_rows' inverse: per-user arrays of `count` rows, `state`'s at `rows`, zero elsewhere."""
    return {k: _each(v, lambda a: spread(a, rows, count)) if k in PER_USER else v for k, v in state.items()}


def _merge_rows(rows: dict | None, users: np.ndarray, items: np.ndarray, values: np.ndarray) -> dict:
    """set_fisher_rows for numpy arrays: the kept old rows and the new ones, each sorted by (user, item), merged
    by scattering both into one fresh array (the new ones are sorted first if they are not): one copy of the
    F rows (60 MB on ML-100K) instead of a concatenation and a gather."""
    old = {"user": np.zeros(0, np.int64), "item": np.zeros(0, np.int64), "F": values[:0]} if rows is None else rows
    keep = ~np.isin(old["user"], np.unique(users))
    ascending = (users[1:] > users[:-1]) | ((users[1:] == users[:-1]) & (items[1:] > items[:-1]))
    if not keep.any() and bool(ascending.all()):
        return {"user": users, "item": items, "F": values}      # nothing kept, already sorted: no copy
    span = max(int(items.max()) if items.size else 0, int(old["item"].max()) if old["item"].size else 0) + 1
    key_old, key_new = old["user"][keep] * span + old["item"][keep], users * span + items
    if key_new.size > 1 and not bool((key_new[1:] > key_new[:-1]).all()):
        order = np.argsort(key_new, kind="stable")
        users, items, values, key_new = users[order], items[order], values[order], key_new[order]
    at_old = np.searchsorted(key_new, key_old) + np.arange(key_old.size)     # final positions, both sorted
    at_new = np.searchsorted(key_old, key_new) + np.arange(key_new.size)
    out = {"user": np.empty(key_old.size + key_new.size, np.int64), "item": np.empty(key_old.size + key_new.size, np.int64),
           "F": np.empty((key_old.size + key_new.size, *values.shape[1:]), values.dtype)}
    for name, new in (("user", users), ("item", items), ("F", values)):
        out[name][at_old] = old[name][keep]
        out[name][at_new] = new
    return out
