"""Leave-one-out split, the two evaluation protocols, the embedding cache and robustness scenarios.

Protocol (§13): leave-one-out by time; the history is the <= 10 items before the target.
  P1 `sampled`  the target vs 100 negatives drawn uniformly from items the user never touched (saved once
                per dataset, scoped seed). Ties: pessimistic by default (`eval.ties`), our choice, not the
                paper's: the paper does not say; a collapsed model then scores 0, never a lucky hit.
  P2 `full`     every item scored, padding and the user's earlier items masked (never the target). Ties:
                `torch.topk`'s order by default (`eval.full_ties`: topk), as RecBole.
Selection uses validation only; test is scored once at the best-validation checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch

from common.checkpoints import load_checkpoint, save_checkpoint
from common.io import atomic_write, cache_root
from common.metrics import average, full_sort_metrics, sampled_metrics

from .catalog import Catalog
from .config import SCENARIOS, EvalConfig
from .console import bar
from .diagnostics import geometry

SPLITS = ("valid", "test")


def left_pad(rows: list[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        row = row[-length:]
        if len(row):
            out[i, length - len(row):] = row
    return out


def split_sequences(sequences: list[np.ndarray], max_history: int, instances_per_user: int = 0) -> dict:
    """Training pairs and the validation/test queries of every user (§7, §13).

    Training targets are i_2 .. i_{n-2} (never the validation or test item); `instances_per_user` > 0
    keeps only each user's latest that many (1 = only the last training pair).
    """
    too_short = sum(len(s) < 3 for s in sequences)
    if too_short:
        raise ValueError(f"{too_short} user(s) have fewer than 3 items: leave-one-out needs train/valid/test")
    train_hist, train_target = [], []
    for seq in sequences:
        positions = range(1, len(seq) - 2)
        if instances_per_user > 0:
            positions = positions[-instances_per_user:]
        for t in positions:
            train_hist.append(seq[max(0, t - max_history):t])
            train_target.append(seq[t])
    out = {"train": {"history": left_pad(train_hist, max_history), "target": np.array(train_target, dtype=np.int64)}}
    for split, cut in (("valid", 2), ("test", 1)):
        prefixes = [seq[:-cut] for seq in sequences]
        out[split] = {"history": left_pad(prefixes, max_history),
                      "target": np.array([seq[-cut] for seq in sequences], dtype=np.int64),
                      "seen": prefixes}            # every earlier item, for full-ranking masks
    return out


def negatives(sequences: list[np.ndarray], num_items: int, num_negatives: int, seed: int, split: str,
              dataset: str) -> tuple[np.ndarray, str]:
    """[U, n] uniform negatives never in the user's sequence (history, valid and test targets included).

    Drawn once per (dataset, split, seed) with a scoped generator and saved under the cache root, so
    every method reads the same file; returns (negatives, sha1 of the file content).
    """
    digest = hashlib.sha1(f"{num_items}|".encode() + b"".join(s.astype(np.int64).tobytes() + b"|"
                                                           for s in sequences)).hexdigest()[:10]
    path = cache_root() / "vlm2rec" / dataset / f"negatives_{split}_n{num_negatives}_s{seed}_{digest}.npy"
    out = _saved_negatives(path, sequences, num_items, num_negatives)
    if out is None:
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        out = np.empty((len(sequences), num_negatives), dtype=np.int64)
        for user, seq in enumerate(sequences):
            allowed = np.setdiff1d(np.arange(1, num_items + 1), seq)
            if len(allowed) < num_negatives:
                raise ValueError(f"user {user} has only {len(allowed)} unseen items for {num_negatives} negatives: "
                                 "lower eval.num_negatives")
            out[user] = rng.choice(allowed, num_negatives, replace=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as handle:
            np.save(handle, out)
    return out, hashlib.sha1(out.tobytes()).hexdigest()[:12]


def _saved_negatives(path: Path, sequences: list[np.ndarray], num_items: int, num_negatives: int) -> np.ndarray | None:
    """The saved negatives when the file loads and every row holds distinct items in 1..num_items that the
    user never touched; None (draw again: the draw is deterministic) after any failed check."""
    if not path.exists():
        return None
    try:
        out = np.load(path, allow_pickle=False)
        ok = (out.dtype == np.int64 and out.shape == (len(sequences), num_negatives)
              and bool(((out >= 1) & (out <= num_items)).all())
              and all(len(np.unique(row)) == num_negatives and not np.isin(row, seq).any()
                      for row, seq in zip(out, sequences)))
    except (OSError, ValueError, EOFError):
        ok = False
    if not ok:
        warnings.warn(f"negatives cache {path} failed its check; drawing them again", stacklevel=3)
        return None
    return out


def scenario_catalog(catalog: Catalog, scenario: str, fraction: float, noise_std: float, seed: int) -> Catalog:
    """A copy of the catalog where a fixed `fraction` of items loses its image/title or gets a noisy image."""
    num_items = len(catalog.titles) - 1
    rng = np.random.default_rng([seed, SCENARIOS.index(scenario), 11])
    hit = set((rng.permutation(num_items)[: int(round(fraction * num_items))] + 1).tolist())
    if scenario == "missing_image":
        return dataclasses.replace(catalog, images=[None if i in hit else p for i, p in enumerate(catalog.images)])
    if scenario == "missing_title":
        return dataclasses.replace(catalog, titles=[("" if i in hit else t) for i, t in enumerate(catalog.titles)])
    return dataclasses.replace(catalog, noisy=frozenset(hit), noise_std=noise_std)


def state_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha1()
    for name, tensor in sorted(model.trainable_state().items()):
        digest.update(name.encode())
        digest.update(tensor.float().numpy().tobytes())
    return digest.hexdigest()[:12]


@torch.no_grad()
def embed(model, split_data: dict, num_items: int, modes: list[str], cache_dir: Path | None,
          batch_size: int, desc: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """User embeddings [U, d] and item tables [I+1, d] per mode, read from / written to `cache_dir`
    (its name is the content key, `cache_key`; the file is written atomically and checked on reading)."""
    if cache_dir is not None:
        saved = _saved_embeddings(cache_dir / "embeddings.pt", len(split_data["history"]), num_items, modes)
        if saved is not None:
            return saved
    was_training = model.training
    model.eval()
    device = model.log_scale.device
    modes = tuple(modes)
    item_rows: dict[str, list[torch.Tensor]] = {}
    for start in bar(range(1, num_items + 1, batch_size), f"encoding {desc} items"):
        ids = torch.arange(start, min(start + batch_size, num_items + 1), device=device)
        for mode, emb in model.encode("item", ids, modes).items():
            item_rows.setdefault(mode, []).append(emb.float().cpu())
    items = {m: torch.cat([torch.zeros(1, rows[0].shape[1]), *rows]) for m, rows in item_rows.items()}
    history = torch.as_tensor(split_data["history"])
    user_rows: dict[str, list[torch.Tensor]] = {}
    for start in bar(range(0, len(history), batch_size), f"encoding {desc} users"):
        for mode, emb in model.encode("hist", history[start:start + batch_size].to(device), modes).items():
            user_rows.setdefault(mode, []).append(emb.float().cpu())
    users = {m: torch.cat(rows) for m, rows in user_rows.items()}
    model.train(was_training)
    if cache_dir is not None:
        save_checkpoint(cache_dir / "embeddings.pt", {"users": users, "items": items})
    return users, items


def _saved_embeddings(path: Path, num_users: int, num_items: int, modes) -> tuple[dict, dict] | None:
    """The cached (users, items) when the file loads and holds every mode at the right shapes and finite;
    None (recompute) otherwise: a damaged or partial file is never trusted."""
    if not path.exists():
        return None
    try:
        saved = load_checkpoint(path)
        users, items = saved["users"], saved["items"]
        ok = set(users) == set(items) >= set(modes) and all(
            users[m].dim() == 2 and users[m].shape[0] == num_users and items[m].shape == (num_items + 1, users[m].shape[1])
            and bool(torch.isfinite(users[m]).all() and torch.isfinite(items[m]).all()) for m in users)
    except Exception:                     # torch.load raises many types on a damaged file
        ok = False
    if not ok:
        warnings.warn(f"embedding cache {path} failed its check; recomputing it", stacklevel=3)
        return None
    return users, items


def score_protocols(users: torch.Tensor, items: torch.Tensor, split_data: dict, negs: np.ndarray,
                    cfg: EvalConfig, batch: int = 1024) -> dict[str, dict[str, float]]:
    """Both protocols' mean metrics from cached embeddings of one modality mode."""
    target = torch.as_tensor(split_data["target"])
    out: dict[str, dict[str, float]] = {}
    if "sampled" in cfg.protocols:
        per_user = []
        for s in range(0, len(users), batch):
            # One product scores the positive and the negatives alike, so equal item vectors tie exactly
            # (separate dot products may differ in the last bit and turn a collapsed model into hits).
            scores = users[s:s + batch] @ items.T                             # (b, I+1)
            pos = scores.gather(1, target[s:s + batch].view(-1, 1)).squeeze(1)     # (b,)
            neg = scores.gather(1, torch.as_tensor(negs[s:s + batch]))       # (b, n)
            per_user.append(sampled_metrics(pos, neg, tuple(cfg.ks), cfg.ties))
        out["sampled"] = average(per_user)
    if "full" in cfg.protocols:
        per_user = []
        for s in range(0, len(users), batch):
            scores = users[s:s + batch] @ items.T                             # (b, I+1)
            exclude = torch.zeros_like(scores, dtype=torch.bool)
            exclude[:, 0] = True                                              # padding column
            for row, seen in enumerate(split_data["seen"][s:s + batch]):
                exclude[row, torch.as_tensor(seen)] = True                    # earlier items, never the target
            pos = torch.zeros_like(exclude).scatter_(1, target[s:s + batch].view(-1, 1), True)
            per_user.append(full_sort_metrics(scores, pos, tuple(cfg.ks), exclude, cfg.full_ties))
        out["full"] = average(per_user)
    return out


def cache_key(model, split_data: dict, tag: str) -> str:
    """Embedding-cache folder name: backbone + trained weights + item content + the split's histories
    (Q9). Equal keys mean equal embeddings, so the cached ones are reused."""
    parts = (model.embedder.identifier, state_hash(model), model.embedder.catalog.fingerprint(),
             hashlib.sha1(np.ascontiguousarray(split_data["history"]).tobytes()).hexdigest())
    return f"{tag}_{hashlib.sha1('|'.join(parts).encode()).hexdigest()[:16]}"


def evaluate(model, split_data: dict, negs: np.ndarray, num_items: int, cfg: EvalConfig, run_dir: Path | None,
             tag: str) -> dict:
    """{protocol: {mode: metrics}} plus item-geometry diagnostics for one split (§13, §11.4).
    Embeddings are cached under <run_dir>/embeddings/ when a run folder is given."""
    cache_dir = None if run_dir is None else Path(run_dir) / "embeddings" / cache_key(model, split_data, tag)
    users, items = embed(model, split_data, num_items, cfg.modality_modes, cache_dir, cfg.batch_size, tag)
    results: dict = {}
    for mode in users:
        for protocol, metrics in score_protocols(users[mode], items[mode], split_data, negs, cfg).items():
            results.setdefault(protocol, {})[mode] = metrics
    results["geometry"] = geometry(items)
    return results


def evaluate_test(model, test: dict, negs: np.ndarray, num_items: int, cfg: EvalConfig,
                  run_dir: Path | None) -> dict:
    """The test split once, clean and under each robustness scenario (§13.3); the catalogue is restored."""
    out = {"clean": evaluate(model, test, negs, num_items, cfg, run_dir, "test")}
    clean_catalog = model.embedder.catalog
    for scenario in cfg.scenarios:
        # The same items are hit for every method and seed (the edit depends on eval.neg_seed only).
        catalog = scenario_catalog(clean_catalog, scenario, cfg.scenario_fraction, cfg.noise_std, cfg.neg_seed)
        model.embedder.set_catalog(catalog)
        out[scenario] = evaluate(model, test, negs, num_items, cfg, run_dir, f"test-{scenario}")
    model.embedder.set_catalog(clean_catalog)
    return out


def split_negatives(sequences: list[np.ndarray], num_items: int, cfg: EvalConfig,
                    dataset: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The saved P1 negatives of the validation and test splits, and their checksums."""
    negs, sha = {}, {}
    for split in SPLITS:
        negs[split], sha[split] = negatives(sequences, num_items, cfg.num_negatives, cfg.neg_seed, split, dataset)
    return negs, sha


def selection_score(results: dict, select_on: str) -> float:
    protocol, mode, metric = select_on.split("/")
    return results[protocol][mode][metric]


def flat(results: dict, prefix: str) -> dict[str, float]:
    """{prefix_protocol_mode_metric: value} (geometry: {prefix_name: value}) for metrics.jsonl lines."""
    out = {}
    for protocol, by_mode in results.items():
        if protocol == "geometry":
            out.update({f"{prefix}_{name}": value for name, value in by_mode.items()})
            continue
        for mode, metrics in by_mode.items():
            out.update({f"{prefix}_{protocol}_{mode}_{name}": value for name, value in metrics.items()})
    return out
