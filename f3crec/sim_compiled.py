"""Compiled simulator (§13): the stacked client state and block-end code of the vectorised simulator
(local_loop.StackedSimulator, client_state, server), held as numpy arrays, with a round of local training
and the validation/test evaluation as compiled per-client loops (kernels.py, eval_kernels.py; numba). It never imports torch.

A round is dispatch-bound in the tensor simulators (1,250–2,000 ATen calls for a few ms of arithmetic); here
each participant's local epoch is one pass of a compiled loop with closed-form gradients, on the
same plan (round.py: the same per-user streams, negatives, shuffles and memory draws) and the same client
state (ClientStates, held stacked by the shared StackedSimulator code), so checkpoints, the base cache,
end-of-block ŷ / T^u, slots and the server are shared code, run on numpy arrays. Every sum has a fixed order
(single-threaded kernels): the numbers do not depend on the thread count.

Covered: FedMF (kernels.fedmf_round_drawn), FedNCF and PFedRec (kernels.affine_round: their heads in closed
form, PFedRec's two sub-steps, the round-0 reset) with ft, arm, itm, f3crec, topn_kd, naive_replay,
emb_reg, ewc and full_retrain (ITM and the restarts are server / block-loop code) and LDP noise (each client's
Laplace noise from its own stream, added to the summed upload), on the CPU. EWC's block-end Fisher is
closed-form too (kernels.fisher_rows, equal to round.fisher) and its penalty gradient is inside the round
(ewc_kernels._ewc_grads), so an EWC run imports no torch either. `check(cfg, flags)`
names what is not covered in one line; `federation.simulator=auto` runs this simulator where it is
covered and the vectorised one elsewhere. Equal to the vectorised simulator to ≤ 1e-12 in float64 round by round and
in every metric (tests/f3crec/test_compiled.py): the sums run in another order than ATen's (BLAS dot
products, FMA in its SGD update, numpy's row sums in ITM and its float32 exp in the m_u table), so equality
is to rounding, not bit for bit.
"""
from __future__ import annotations

import mmap
from fractions import Fraction

import numpy as np
from threadpoolctl import threadpool_limits

from common.config import ConfigError

from . import arm_kernels, draw_kernels, eval_kernels, kernels, streams
from .evaluate import SCORE_ROWS, test_exclude
from .local_loop import StackedSimulator
from .model import BACKBONES
from .round import RoundContext, RoundPlan, ldp_noise

K = 20  # NDCG@20 / Recall@20 (§10)
LDP_CHUNK = 64  # clients whose (|I|, d) LDP noise is drawn at once


def unsupported(cfg, flags: dict) -> str | None:
    """Why the compiled simulator cannot run this configuration (a one-line reason), or None."""
    if cfg.train.device == "cuda":
        return "train.device=cuda (the compiled kernels run on the CPU)"
    return None


def single_blas():
    """numpy's BLAS (the evaluation's score products) on one thread for the run; returns the limiter whose
    restore_original_limits() undoes it. A product's float64 bits depend on OpenBLAS's thread count (measured:
    1 vs 2 threads differ), so the compiled run's numbers would follow train.threads; and OpenBLAS's default
    (every core) spins its threads on these small products: 3.5× the run's CPU time on a busy machine."""
    return threadpool_limits(1, user_api="blas")


def check(cfg, flags: dict) -> None:
    reason = unsupported(cfg, flags)
    if reason is not None:
        raise ConfigError(f"federation.simulator=compiled does not cover {reason}; use "
                          "federation.simulator=vectorised or auto")


def exact_sum(values: np.ndarray) -> Fraction:
    """The exact rational sum of float64 values (= sum(map(Fraction, values))) in integer arithmetic: each
    value is m·2^e with an integer |m| < 2^53; the m of one e are summed exactly in numpy (split into 27-bit
    halves, so a float64 total of up to 2^26 halves stays an exact integer), then the few per-e totals in
    Python integers."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return Fraction(0)
    mant, exp = np.frexp(values)
    ints = (mant * 2.0 ** 53).astype(np.int64)          # exact: |mant| < 1 has 53 significant bits
    exp = exp.astype(np.int64)
    low = int(exp.min())
    group = exp - low                                    # value = ints · 2^(low − 53 + group)
    if values.size >= 1 << 26:                           # beyond the exact float64 range of the halves' sums
        total = sum(int(m) << int(g) for m, g in zip(ints.tolist(), group.tolist()))
    else:
        high = np.bincount(group, weights=ints >> 27)   # |half| < 2^26 each
        rest = np.bincount(group, weights=ints & ((1 << 27) - 1))
        used = np.flatnonzero((high != 0) | (rest != 0))
        total = sum(((int(high[g]) << 27) + int(rest[g])) << int(g) for g in used.tolist())
    return Fraction(total) * Fraction(2) ** (low - 53)


def _csr(users: list[int], parts: list[dict[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(ptr, flat): each user's items of every part in turn (part order inside a user), CSR in `users` order;
    numpy work in O(items) (one concatenation per part, one scatter), no per-user array operation."""
    empty = np.zeros(0, np.int64)
    counts, flats = [], []
    for part in parts:
        arrays = [part.get(u, empty) for u in users]
        counts.append(np.fromiter(map(len, arrays), np.int64, len(users)))
        flats.append(np.concatenate(arrays).astype(np.int64, copy=False) if arrays else empty)
    per_user = np.sum(counts, axis=0) if counts else np.zeros(len(users), np.int64)
    ptr = np.concatenate([[0], np.cumsum(per_user)]).astype(np.int64)
    if len(parts) == 1:
        return ptr, flats[0]
    flat, before = np.empty(int(ptr[-1]), np.int64), ptr[:-1].copy()
    for count, values in zip(counts, flats):   # part p of user u goes after u's earlier parts
        starts = np.cumsum(count) - count
        flat[np.repeat(before - starts, count) + np.arange(values.size)] = values
        before += count
    return ptr, flat


def _chunks(csr: tuple, n_users: int) -> list[tuple]:
    """The evaluation's score products, one per SCORE_ROWS users of a (positive ptr, positives, exclusion ptr,
    exclusions) CSR: (lo, hi, each part of the chunk's users rebased to 0), made once per block for the
    validation instead of every round."""
    pos_ptr, pos, exc_ptr, exc = csr
    out = []
    for lo in range(0, n_users, SCORE_ROWS):
        hi = min(lo + SCORE_ROWS, n_users)
        out.append((lo, hi, pos_ptr[lo:hi + 1] - pos_ptr[lo], pos[pos_ptr[lo]:pos_ptr[hi]],
                    exc_ptr[lo:hi + 1] - exc_ptr[lo], exc[exc_ptr[lo]:exc_ptr[hi]]))
    return out


HUGE_PAGE = 1 << 21   # 2 MiB: transparent huge pages on x86-64 Linux


def huge_page_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zero-filled array on 2 MiB-aligned anonymous memory advised for transparent huge pages (Linux
    `madvise` mode), else np.zeros. The round's kernels read random rows of the item table and of the summed
    delta: at 100,000 clients (15.6 MB each) 4 KiB pages miss the TLB on nearly every row. Private memory:
    `mmap.mmap(-1, n)` alone is shared memory (shmem, its own THP setting, `never` on many hosts), and until
    commit ec107ac no buffer got a huge page (f3crec/README.md "Scaling" has the figures)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes < HUGE_PAGE // 2 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.zeros(shape, dtype)
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE          # room to start on a 2 MiB boundary
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # private: shared memory is shmem (own THP setting)
    raw = np.frombuffer(buf, np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE
    try:
        buf.madvise(mmap.MADV_HUGEPAGE, start, size - start)
    except OSError:   # a kernel without THP: ordinary pages, same values
        pass
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _buffer(buffers: dict, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """buffers[name] reused while its shape and dtype match, else a fresh huge-page array (the old one freed
    first)."""
    old = buffers.get(name)
    if old is None or old.shape != tuple(shape) or old.dtype != np.dtype(dtype):
        buffers.pop(name, None)
        buffers[name] = huge_page_array(tuple(shape), dtype)
    return buffers[name]


def draw(plan: RoundPlan, dtype=np.float64, out: tuple[np.ndarray, np.ndarray] | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """(plan.items, plan.labels) drawn by draw_kernels.draw_plan: the same per-user streams, the same values
    (tests/f3crec/test_compiled.py compares them exactly). `out`: (items, labels) buffers of the right size to
    fill instead of fresh arrays (at 100,000 clients a fresh pair is 0.55 GB of new pages every round)."""
    m = plan.maker
    offsets, counts, positives, exc_ptr, exc = m.offsets, m.counts, m.pos_flat, m.exc_ptr, m.exc_flat
    size = int(offsets[-1])
    if out is not None and out[0].shape == (size,) and out[0].dtype == np.int64 and out[1].shape == (size,) \
            and out[1].dtype == dtype:
        items, labels = out
    else:
        items, labels = np.empty(size, np.int64), np.empty(size, dtype)
    draw_kernels.draw_plan(plan._keys(streams.NEGATIVES), plan._keys(streams.SHUFFLE), offsets, counts, positives,
                      exc_ptr, exc, m.n_items, items, labels)
    return items, labels


def discounts(k: int) -> np.ndarray:
    """1 / log2(rank + 1) for ranks 1..k: common.metrics._discounts in numpy (the same float64 values, tested)."""
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


class CompiledSimulator(StackedSimulator):
    """A stacked-state simulator (numpy) with `train_round`, `validate` and `test_row` as compiled loops."""

    def __init__(self, server, state):
        self.server, self.state = server, state   # Server and ClientStates of numpy arrays
        self._m_table: tuple[tuple, np.ndarray] | None = None
        self._valid_csr: tuple[int, list[int], list[tuple]] | None = None   # validation chunks of a block
        self._buffers: dict[str, np.ndarray] = {}   # the round's large arrays, reused (huge pages)

    # ------------------------------------------------------------------------------------------ round
    def _m_of_d(self, ctx: RoundContext, n_items: int, n_top: int) -> np.ndarray:
        """m_u for every possible D_u (0..N·(I−1)), by method.memory_size's float32 formula in numpy (numpy's
        float32 exp can differ from ATen's in the last bit; the floors agree, tests/f3crec/test_compiled.py)."""
        key = (ctx.eps, ctx.topn, n_items, n_top)
        if self._m_table is None or self._m_table[0] != key:
            disc = np.arange(n_top * max(n_items - 1, 0) + 1)
            size = np.floor(ctx.topn * np.exp(np.float32(-ctx.eps) * disc.astype(np.float32)))
            self._m_table = (key, size.astype(np.int64))
        return self._m_table[1]

    def train_round(self, plan: RoundPlan | None, ctx: RoundContext) -> dict:
        """One round of every participant (§3, §5, §6) through kernels.fedmf_round_drawn (FedMF, its samples drawn inside the loop) or affine_round, then the
        server's mean."""
        plan = self.plan(ctx) if plan is None else plan
        st, q = self.state, self.server.broadcast()
        if not isinstance(q, np.ndarray):
            raise ConfigError("federation.simulator=compiled: this round is not covered (see sim_compiled.unsupported)")
        table, q = q, _buffer(self._buffers, "q", q.shape, q.dtype)   # the broadcast, copied onto huge pages
        np.copyto(q, table)
        n_items, dim = q.shape
        users = plan.users
        returning = (users < ctx.n_prev_users) & (ctx.block > 0)
        arm_mode = {"off": 0, "adaptive": 1, "full": 2}[ctx.flags["arm"]]
        replay = returning & st.has_topn[users] if arm_mode else np.zeros(users.size, bool)
        topn = st.topn
        dtype = q.dtype
        yhat = st.yhat if st.yhat is not None else np.zeros((1, 1), dtype)
        emb = ctx.flags["reg"] == "emb" and bool(returning.any())
        ewc = self._ewc_group(ctx, users, returning, dim, dtype) if ctx.flags["reg"] == "ewc" and returning.any() \
            else None
        anchor_items = st.anchor_items if emb or ewc is not None else np.zeros((1, dim), dtype)
        n_prev_items = ctx.n_prev_items if emb else 0
        m_of_d = self._m_of_d(ctx, n_items, topn.shape[1]) if arm_mode == 1 else np.zeros(1, np.int64)
        keys = streams.keys(plan.seed, plan.block, plan.round, users, streams.MEMORY)
        total = _buffer(self._buffers, "total", q.shape, q.dtype)
        total.fill(0)
        steps = np.diff(plan.step_offsets)
        stats = np.zeros((int(steps[replay].sum()) if replay.any() else 0, 3), np.int64)
        q_t = np.ascontiguousarray(q.T) if replay.any() else np.zeros((dim, 1), dtype)
        offsets = plan.offsets
        anchor_p = st.anchor["p"] if "p" in st.anchor else np.zeros((1, dim), dtype)
        if ctx.net.name == "fedmf":   # each client's samples drawn inside the loop, just before it trains
            m = plan.maker
            n_stats = kernels.fedmf_round_drawn(
                q, q_t, st.private["p"], users, offsets, m.counts, m.pos_flat, m.exc_ptr, m.exc_flat, m.n_items,
                plan._keys(streams.NEGATIVES), plan._keys(streams.SHUFFLE), plan.batch_size,
                ctx.lrs["p"], ctx.lrs["Q"], replay, returning, topn, yhat, keys, arm_mode,
                float(ctx.flags["kd_weight"]), m_of_d, 1 if emb else 0, float(ctx.flags["reg_d"]), anchor_items,
                anchor_p, n_prev_items, total, stats, ewc, _buffer(self._buffers, "pair", (n_items, 2 * dim), dtype),
                q.nbytes >= arm_kernels.RANK_AHEAD_BYTES)
        else:   # FedNCF (kind 1) or PFedRec (kind 2): a head, sub-steps, the round-0 reset (§4)
            size = int(offsets[-1])
            samples = (_buffer(self._buffers, "items", (size,), np.int64),
                       _buffer(self._buffers, "labels", (size,), dtype))
            items, labels = draw(plan, dtype, samples)
            kind = {"fedncf": 1, "pfedrec": 2}[ctx.net.name]
            shared = {k: np.asarray(v, dtype) for k, v in ctx.shared_private.items()}
            n_sub = len(ctx.net.substeps)
            stats = np.zeros((stats.shape[0] * n_sub, 3), np.int64)
            n_stats = kernels.affine_round(
                q, q_t, kind, st.private["p"] if kind == 1 else np.zeros((1, dim), dtype),
                st.private["w"], st.private["b"], shared.get("p", np.zeros(dim, dtype)),
                shared["w"], shared["b"], bool(ctx.reset_private), users, offsets, items, labels, plan.batch_size,
                n_sub, ctx.lrs.get("p", 0.0), ctx.lrs["w"], ctx.lrs["Q"], replay, returning, topn, yhat, keys,
                arm_mode, float(ctx.flags["kd_weight"]), m_of_d, 1 if emb else 0, float(ctx.flags["reg_d"]),
                anchor_items, anchor_p, n_prev_items, total, stats, ewc)
        if ctx.ldp_scale > 0:   # every client adds Laplace noise to every row of its upload (§3), from its stream
            for lo in range(0, users.size, LDP_CHUNK):
                total += ldp_noise(ctx, users[lo:lo + LDP_CHUNK], (n_items, dim), dtype).sum(0)
        order = np.argsort(stats[:n_stats, 2], kind="stable")     # step-major, as the vectorised stats
        out = {"D": stats[:n_stats, 0][order].tolist(), "m": stats[:n_stats, 1][order].tolist()}
        return {**out, **self.server.aggregate_sum(total, users.size)}

    def _ewc_group(self, ctx: RoundContext, users: np.ndarray, returning: np.ndarray, dim: int, dtype) -> tuple:
        """The kernels' EWC group (ewc_kernels._ewc_client): γ, which participants have a Fisher of Φ_u, each
        returning participant's stored Fisher rows (a range of the (user, item)-sorted fisher_rows), the
        Fisher of Φ_u and the head's anchors (absent tensors: unused placeholders)."""
        st = self.state
        rows = st.fisher_rows
        if rows is None:
            lo = hi = np.zeros(users.size, np.int64)
            f_items, f_rows = np.zeros(0, np.int64), np.zeros((0, dim), dtype)
        else:
            lo = np.searchsorted(rows["user"], users, "left").astype(np.int64)
            hi = np.where(returning, np.searchsorted(rows["user"], users, "right"), lo).astype(np.int64)
            f_items, f_rows = np.ascontiguousarray(rows["item"], np.int64), np.ascontiguousarray(rows["F"], dtype)
        unused = np.zeros((1, 1), dtype)
        return (float(ctx.ewc_gamma), returning & st.fisher_valid[users], lo, hi, f_items, f_rows,
                st.fisher.get("p", np.zeros((1, dim), dtype)), st.fisher.get("w", unused), st.fisher.get("b", unused),
                st.anchor.get("w", unused), st.anchor.get("b", unused))

    def fisher_of(self, net, private: dict, items: np.ndarray, plan: RoundPlan) -> tuple:
        """round.fisher in closed form (kernels.fisher_rows) on the plan's samples as the compiled draw gives
        them: (F of Φ_u (A, ...), row owner (L,), row item (L,), F rows (L, d)), rows sorted by (owner, item)
        as the kernel writes them (no gather of the rows afterwards)."""
        n_clients, (n_items, dim) = plan.users.size, items.shape
        dtype = items.dtype
        samples, labels = draw(plan, dtype)
        empty = np.zeros((n_clients, 1), dtype)
        p, w, b = (private.get(k, empty) for k in ("p", "w", "b"))
        f_p, f_w = np.zeros((n_clients, p.shape[1] if "p" in private else 0), dtype), np.zeros_like(w)
        f_b = np.zeros((n_clients, 1), dtype)
        size = kernels.fisher_row_count(plan.offsets, samples, n_items)
        owner, row_item, f_rows = np.empty(size, np.int64), np.empty(size, np.int64), np.empty((size, dim), dtype)
        n_rows = kernels.fisher_rows({"fedmf": 0, "fedncf": 1, "pfedrec": 2}[net.name], np.ascontiguousarray(items),
                                     np.ascontiguousarray(p), np.ascontiguousarray(w), np.ascontiguousarray(b),
                                     np.arange(n_clients, dtype=np.int64), plan.offsets, samples, labels, f_p, f_w,
                                     f_b, owner, row_item, f_rows)
        assert n_rows == size
        return {k: {"p": f_p, "w": f_w, "b": f_b}[k] for k in private}, owner, row_item, f_rows

    # ------------------------------------------------------------------------------------- evaluation
    def _sums(self, users: list[int], positives: dict, exclude: list[dict], n_items: int) -> dict:
        ptr, pos = _csr(users, [positives])
        return self._sums_csr(users, (ptr, pos, *_csr(users, exclude)), n_items)

    def _sums_csr(self, users: list[int], csr: tuple, n_items: int) -> dict:
        """(exact sum, count) of NDCG@20 and Recall@20 over `users`, as evaluate.metric_sums gives them.

        Scores are evaluate.user_scores' (score_matrix on exactly SCORE_ROWS users, the last product
        zero-padded, so each score is the oracle's bit for bit), each product written into one reused
        buffer and ranked by eval_kernels.topk_metrics while it is still in cache: memory O(SCORE_ROWS × items),
        no per-chunk arrays."""
        if not users:
            return {"ndcg": (Fraction(0), 0), "recall": (Fraction(0), 0)}
        chunks = csr if isinstance(csr, list) else _chunks(csr, len(users))
        items = self.server.broadcast()[:n_items]
        private, net = self.private_matrix(), BACKBONES[self.cfg.backbone.name]
        ndcg, recall = np.empty(len(users)), np.empty(len(users))
        weights = discounts(min(K, n_items))
        index = np.asarray(users, dtype=np.int64)
        rows = {k: np.zeros((SCORE_ROWS, *v.shape[1:]), v.dtype) for k, v in private.items()}
        scores = _buffer(self._buffers, "scores", (SCORE_ROWS, n_items), items.dtype)
        for lo, hi, pos_ptr, pos, exc_ptr, exc in chunks:
            for k, v in private.items():
                np.take(v, index[lo:hi], axis=0, out=rows[k][:hi - lo])
                rows[k][hi - lo:] = 0                    # the zero padding of user_scores' last product
            if net.name == "fedmf":                      # a = p_u, c = 0 (x + 0 changes no ranking)
                np.matmul(rows["p"], items.T, out=scores)
            else:
                a, c = net.affine(rows)
                np.matmul(a, items.T, out=scores)        # score_matrix's a @ items.T, into the buffer
                if c.any():                              # + c
                    scores += c[:, None]
            if not eval_kernels.topk_metrics(scores[:hi - lo], pos_ptr, pos, exc_ptr, exc, weights, ndcg[lo:hi],
                                        recall[lo:hi]):
                raise ValueError("full_sort_metrics: non-finite value(s) (NaN or inf) in scores; metrics of such "
                                 "scores are meaningless (check the model for a NaN/inf output)")
        return {"ndcg": (exact_sum(ndcg), len(users)), "recall": (exact_sum(recall), len(users))}

    def validation_sums(self, t: int) -> dict:
        """Exact NDCG@20 / Recall@20 sums of block t's validation users (only its train masked, §8.2), one fused
        kernel call per chunk; the chunks made once a block."""
        if self._valid_csr is None or self._valid_csr[0] != t:
            block = self.blocks[t]
            users = sorted(block.valid)
            self._valid_csr = (t, users, _chunks((*_csr(users, [block.valid]), *_csr(users, [block.train])), len(users)))
        _, users, csr = self._valid_csr
        return self._sums_csr(users, csr, self.blocks[t].n_items)

    def test_sums(self, t: int, old_block_mask: str) -> list[dict]:
        """The exact sums of a_{t,i} for i = 0..t (§10), as evaluate.oracle_test_sums defines them."""
        n_items = self.blocks[t].n_items
        return [self._sums(sorted(self.blocks[i].test), self.blocks[i].test,
                           test_exclude(self.blocks, t, i, old_block_mask), n_items) for i in range(t + 1)]
