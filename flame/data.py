"""FLAME data pipeline (§3): truncation, leave-one-out, training samples, evaluation inputs.

Everything ends up as tensors (no per-sample Python in the training loop):
    cfg = DataConfig(name="amazon-toys")
    data = build_data(load_raw(cfg), cfg)
    data.train_seq (S, L), data.train_target (S,), data.valid_seq (U, L), data.valid_hist (U, H), ...
Real datasets come from common.datasets.load_sequences; "synthetic" is a tiny generated set for tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import numpy as np
import torch

from common.datasets import load_sequences

from .config import DataConfig, DatasetName

DATASETS = tuple(name for name in get_args(DatasetName) if name != "synthetic")


@dataclass
class SeqData:
    """Tensors of one dataset. Histories are item ids left-aligned and 0-padded (for the seen mask)."""
    num_users: int
    num_items: int  # I: the largest item id of the untruncated file (quirk 14)
    train_seq: torch.Tensor  # (S, L) left-padded inputs (§3.4)
    train_target: torch.Tensor  # (S,)
    valid_seq: torch.Tensor  # (U, L) last L items of s[0..n-3] (§3.5)
    valid_target: torch.Tensor  # (U,) s[n-2]
    valid_hist: torch.Tensor  # (U, H) s[0..n-3]
    test_seq: torch.Tensor  # (U, L) last L items of s[0..n-2]
    test_target: torch.Tensor  # (U,) s[n-1]
    test_hist: torch.Tensor  # (U, H) s[0..n-2]

    def training_to(self, device: torch.device) -> None:
        """Put the training tensors on `device` (the loop only takes index slices of them)."""
        self.train_seq, self.train_target = self.train_seq.to(device), self.train_target.to(device)


def synthetic_sequences(num_users: int, num_items: int, seed: int) -> list[np.ndarray]:
    """Learnable toy data: each user walks item -> item+step (mod I) with a little noise.

    Lengths are 5..30, so truncation and padding both occur; ids are 1..num_items.
    """
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(num_users):
        length = int(rng.integers(5, 31))
        step = int(rng.integers(1, 4))
        walk = (int(rng.integers(num_items)) + step * np.arange(length)) % num_items + 1
        noise = rng.random(length) < 0.1
        walk[noise] = rng.integers(1, num_items + 1, size=int(noise.sum()))
        seqs.append(walk.astype(np.int64))
    return seqs


def load_raw(cfg: DataConfig) -> list[np.ndarray]:
    """User sequences in file order (seqs[u-1] = user u), items chronological."""
    if cfg.name == "synthetic":
        return synthetic_sequences(cfg.synthetic_users, cfg.synthetic_items, cfg.synthetic_seed)
    if cfg.name not in DATASETS:
        raise ValueError(f"data.name={cfg.name!r}: expected one of {DATASETS} or 'synthetic'")
    try:  # FLAME files as shipped, ML-1M built; statistics asserted
        return load_sequences(cfg.name, cfg.root)
    except FileNotFoundError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else cfg.name
        raise FileNotFoundError(f"data for {cfg.name} is missing ({first}); set REPRO_DATA or data.root, "
                                f"or run the offline smoke config: --config flame/configs/smoke.yaml") from err


def _pad_right(rows: list[np.ndarray]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)


def build_data(seqs: list[np.ndarray], cfg: DataConfig) -> SeqData:
    """Truncate, split leave-one-out and cut the training samples (§3.3-3.5)."""
    length = cfg.max_len
    num_items = int(max(int(s.max()) for s in seqs))  # over the untruncated sequences (§3.3 step 1)
    keep = length + 3 if cfg.truncate == "reference" else None
    windows, targets, valid_in, test_in, valid_hist, test_hist = [], [], [], [], [], []
    valid_target, test_target = [], []
    for user, full in enumerate(seqs, start=1):
        s = np.asarray(full, dtype=np.int64)
        s = s[-keep:] if keep else s  # the last 53 items (§3.3 step 2)
        n = len(s)
        if n < 3:
            raise ValueError(f"user {user} has {n} items; leave-one-out needs at least 3")
        padded = np.concatenate([np.zeros(length, dtype=np.int64), s])  # padded[j+L] = s[j]
        if n > 3:
            # Sample k = 1..n-3: input s[k-L..k-1] = padded[k..k+L-1], target s[k] (§3.4).
            window = np.lib.stride_tricks.sliding_window_view(padded, length)[1: n - 2]
            windows.append(window)
            targets.append(s[1: n - 2])
        valid_in.append(padded[n - 2: n - 2 + length])  # last L of s[0..n-3]
        test_in.append(padded[n - 1: n - 1 + length])  # last L of s[0..n-2]: includes the valid item
        valid_target.append(int(s[n - 2]))
        test_target.append(int(s[n - 1]))
        valid_hist.append(s[: n - 2])
        test_hist.append(s[: n - 1])
    return SeqData(
        num_users=len(seqs), num_items=num_items,
        train_seq=torch.from_numpy(np.concatenate(windows)),
        train_target=torch.from_numpy(np.concatenate(targets)),
        valid_seq=torch.from_numpy(np.stack(valid_in)),
        valid_target=torch.tensor(valid_target),
        valid_hist=_pad_right(valid_hist),
        test_seq=torch.from_numpy(np.stack(test_in)),
        test_target=torch.tensor(test_target),
        test_hist=_pad_right(test_hist),
    )
