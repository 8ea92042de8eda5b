"""Client-side state of every user, stacked one row per user (§3 "What persists across blocks").

This is what lives on the devices: Φ_u and its saved slots, T^u and ŷ^{t−1} at T^u's items (ARM), the anchors θ* and the
Fisher (emb_reg/EWC), and each client's received copy of Q^{t−1}. The vectorised simulator trains on it
in place; the reference simulator keeps the same values inside its `Client` objects and converts to this
form for checkpoints. The server never holds a reference to it. Nothing here is users × items: KD reads
ŷ^{t−1} only at T^u, so ŷ is kept as (U, N) aligned with T^u, and a checkpoint is sized by the state.
"""
from __future__ import annotations

import torch


class ClientStates:
    """Stacked per-user client state; `state_dict()` is a plain dict (loads with weights_only=True)."""

    def __init__(self, private: dict[str, torch.Tensor], topn: int):
        self.private = private                                           # Φ: name -> (U, ...)
        self.slots: dict[str, dict[str, torch.Tensor]] = {}              # 'best' / 'last' copies of Φ
        device = next(iter(private.values())).device
        self.topn = torch.zeros(self.num_users(), topn, dtype=torch.long, device=device)  # T^u where has_topn
        dtype = next(iter(private.values())).dtype
        self.yhat = torch.zeros(self.num_users(), topn, dtype=dtype, device=device)  # ŷ^{t−1} at T^u's items
        self.has_topn = torch.zeros(self.num_users(), dtype=torch.bool, device=device)
        self.anchor = {k: v.clone() for k, v in private.items()}        # θ*: best Φ of the last trained block
        self.anchor_items: torch.Tensor | None = None                   # received Q^{t−1}
        self.fisher = {k: torch.zeros_like(v) for k, v in private.items()}
        self.fisher_valid = torch.zeros(self.num_users(), dtype=torch.bool, device=device)
        self.fisher_rows: dict[str, torch.Tensor] | None = None          # flat: user, item, F (L, d)

    def num_users(self) -> int:
        return next(iter(self.private.values())).shape[0]

    def grow(self, new_private: dict[str, torch.Tensor]) -> None:
        """Append the clients of the users first seen in this block."""
        count = next(iter(new_private.values())).shape[0]
        device = self.topn.device
        new_private = {k: v.to(device) for k, v in new_private.items()}
        for k, v in new_private.items():
            self.private[k] = torch.cat([self.private[k], v])
            self.anchor[k] = torch.cat([self.anchor[k], v])
            self.fisher[k] = torch.cat([self.fisher[k], torch.zeros_like(v)])
            for slot in self.slots.values():
                slot[k] = torch.cat([slot[k], v])
        self.topn = torch.cat([self.topn, torch.zeros(count, self.topn.shape[1], dtype=torch.long, device=device)])
        self.yhat = torch.cat([self.yhat, self.yhat.new_zeros(count, self.yhat.shape[1])])
        self.has_topn = torch.cat([self.has_topn, torch.zeros(count, dtype=torch.bool, device=device)])
        self.fisher_valid = torch.cat([self.fisher_valid, torch.zeros(count, dtype=torch.bool, device=device)])

    def set_fisher_rows(self, users: torch.Tensor, items: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the Fisher rows of the clients in `users` (absent users keep theirs, §11 EWC)."""
        if self.fisher_rows is not None:
            keep = ~torch.isin(self.fisher_rows["user"], users.unique())
            users = torch.cat([self.fisher_rows["user"][keep], users])
            items = torch.cat([self.fisher_rows["item"][keep], items])
            values = torch.cat([self.fisher_rows["F"][keep], values])
        order = torch.argsort(users * (int(items.max()) + 1 if items.numel() else 1) + items)
        self.fisher_rows = {"user": users[order], "item": items[order], "F": values[order]}

    def save_slot(self, name: str) -> None:
        self.slots[name] = {k: v.clone() for k, v in self.private.items()}

    def load_slot(self, name: str) -> None:
        self.private = {k: v.clone() for k, v in self.slots[name].items()}

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
