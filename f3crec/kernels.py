"""Compiled kernels of the compiled simulator (sim_compiled.py, §13): one FedMF round of local training as a
per-client loop (FedMF; FedNCF and PFedRec with their heads) and EWC's Fisher. numpy + numba only (no torch).

`fedmf_round` trains every participant of a round in turn, exactly as ReferenceSimulator's `Client` does
(§5, §6, §11), with closed-form gradients instead of autograd: FedMF's score is s = q_i · p_u, so for a
mini-batch of n samples with g_j = (σ(s_j) − y_j)/n,

    ∂L/∂p_u = Σ_j g_j q_{i_j},   ∂L/∂q_i = Σ_{j: i_j = i} g_j p_u,

plus ARM's KD on the memory items (rank T^u in the client's current full-catalogue scores, D_u, m_u from
the table `m_of_d` that method.memory_size computed, the memory draw from the plan's MEMORY stream — the
same SplitMix64 values as streams.py) and emb_reg's penalty. A client's local table is kept as the rows it
can change (`slot[item]` → local row); every other row equals the broadcast. The upload is the sum over
clients of their row deltas, added client by client in user order, so the result does not depend on any
thread count: the kernels are single-threaded and every sum has a fixed order (the per-sample score
q_i · p_u is summed in SIMD lanes, `_row_dot`: an order fixed by the compiled code, not by threads).

`fedmf_round_drawn` is fedmf_round with each client's samples drawn inside the loop, one client ahead
(draw_kernels.py's `_draw_client`, the per-client draw of `draw_plan`: the same values), what the simulator runs
for FedMF.

`affine_round` is the same loop for the backbones with a head (FedNCF, PFedRec): s = a_u · q_i + c_u with
(a_u, c_u) from the private tensors (model.py), the head's gradients in closed form, PFedRec's two
optimiser sub-steps and the round-0 reset.

The plan's draws are in draw_kernels.py, ARM's ranking in arm_kernels.py, EWC's penalty helpers in
ewc_kernels.py, the evaluation kernels (top-K metrics, top-N rows) in eval_kernels.py, the LLVM intrinsics in
intrinsics.py, numba's set-up in jit.py.

EWC (§11): `fisher_rows` is round.fisher's diagonal empirical Fisher in closed form (∂q_i = g a, ∂Φ_u from
s = a·q_i + c); the round kernels take an optional `ewc` group (None: the EWC code is not compiled in) and
add (γ/2)·Σ F (θ − θ*)²'s gradient for the client's stored Fisher rows and its Φ_u (ewc_kernels.py).
"""
from __future__ import annotations

import numpy as np

from .jit import load_fast

from numba import njit, types  # noqa: E402  (after .jit, which imports numba with SciPy hidden)
from numba.extending import overload  # noqa: E402

from .arm_kernels import _client_scores, _memory, _target_scores, replay_ranks  # noqa: E402
from .intrinsics import as_dtype_of, prefetch_read, prefetch_write  # noqa: E402
from .draw_kernels import _draw_client, _draw_scratch, largest_client  # noqa: E402
from .ewc_kernels import (_ewc_client, _ewc_grads, _ewc_head_grads, _ewc_max_rows, _ewc_off, _ewc_rows,  # noqa: E402
                          _plus_ewc)

PREFETCH_BYTES = 1 << 19


@njit(cache=True, inline="always")
def _prefetch_rows(rows, slot, i):
    """Prefetch row i of the pair table (rows[i] = the broadcast row, then the summed delta's row: read and
    updated), line by line, into L2, and the item's entry of `slot` (at 100,000 clients a random entry of 0.5 MB).
    Read prefetches only: with write intent, perf put a quarter of the 100k kernel's samples on the prefetches (a
    wait for line fill buffers, presumably), and all-read was 4 % faster on the captured 100k round (2,265 -> 2,175 ms
    CPU, best of 4, load 1.3, 2026-12-07)."""
    prefetch_write(slot, i, 0)
    for k in range(0, rows.shape[1], max(1, 64 // rows.itemsize)):
        prefetch_read(rows, i, k)


@njit(cache=True, inline="always")
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@njit(cache=True, fastmath={"reassoc", "contract"})
def _row_dot(rows, r, p):
    """rows[r] · p, its terms summed in any order (reassociation lets LLVM use SIMD lanes for the sum)."""
    s = 0.0
    for k in range(p.size):
        s += rows[r, k] * p[k]
    return s


@njit(cache=True, inline="always")
def _row_buffers(q, offsets, extra):
    """(local, grad, row_item) sized for the round's largest client: its samples plus `extra` rows (T^u, and
    every old row under emb_reg); grad starts at zero and each update clears what it read."""
    max_rows = largest_client(offsets) + extra if offsets.size > 1 else 0
    return (np.empty((max_rows, q.shape[1]), q.dtype), np.zeros((max_rows, q.shape[1]), q.dtype),
            np.empty(max_rows, np.int64))


@njit(cache=True, inline="always")
def _local_rows(q, items, lo, hi, targets, kd, n_old, slot, row_item, local):
    """Lay out one client's local rows (every old row first when n_old > 0 — emb_reg —, then its sample items
    items[lo:hi], then its T^u `targets` when it replays) with slot[item] = row, row_item[row] = item and the
    rows' broadcast values copied into `local`; returns the row count."""
    n_rows = 0
    for i in range(n_old):
        slot[i] = n_rows
        row_item[n_rows] = i
        n_rows += 1
    for j in range(lo, hi):
        i = items[j]
        if slot[i] < 0:
            slot[i] = n_rows
            row_item[n_rows] = i
            n_rows += 1
    if kd:
        for k in range(targets.size):
            i = targets[k]
            if slot[i] < 0:
                slot[i] = n_rows
                row_item[n_rows] = i
                n_rows += 1
    for r in range(n_rows):                            # element loops: a row view per row costs more
        i = row_item[r]
        for k in range(q.shape[1]):
            local[r, k] = q[i, k]
    return n_rows


@njit(cache=True, inline="always")
def _kd_grads(scores, targets, yhat_u, perm, size, kd_weight, slot, v, local, grad, gv, total):
    """KD's gradients for the replayed slots perm[:size] of T^u (ŷ aligned with T^u): into the local rows'
    `grad` (times v) and the private vector's `gv` (times the row); returns `total` + each g in turn (the affine
    heads' bias gradient, summed in the same order as before)."""
    if size == 0:
        return total
    scale = kd_weight / size
    for k in range(size):
        i = targets[perm[k]]
        sig = _sigmoid(scores[i])
        target = _sigmoid(yhat_u[perm[k]])
        g = scale * (sig - target) / max((1.0 - sig) * sig, 1e-12) * ((1.0 - sig) * sig)
        r = slot[i]
        total += g
        for kk in range(v.size):
            grad[r, kk] += g * v[kk]
        for kk in range(v.size):
            gv[kk] += g * local[r, kk]
    return total


@njit(cache=True, inline="always")
def _emb_reg_grads(reg_d, local, row_item, n_rows, n_prev_items, anchor_items, grad, with_p, p, anchor_p, user, gp):
    """emb_reg's penalty gradient: 2·reg_d·(q_i − q̃_i) into `grad` for the local rows of the items known before
    this block (anchor_items), and where `with_p` 2·reg_d·(p_u − p̃_u) into the private vector's `gp`."""
    dim = local.shape[1]
    two = 2.0 * reg_d
    for r in range(n_rows):
        i = row_item[r]
        if i < n_prev_items:
            for k in range(dim):
                grad[r, k] += two * (local[r, k] - anchor_items[i, k])
    if with_p:
        for k in range(dim):
            gp[k] += two * (p[k] - anchor_p[user, k])


@njit(cache=True, inline="always")
def _one_step(rows, p, items, labels, lo, hi, nxt, lr_p, lr_q, slot, row_item, row_count, sample_row, g_buf, grad,
              row, gp):
    """fedmf_round's local epoch for a client whose samples fit one mini-batch, without KD or emb_reg (most
    clients of a base block): its rows equal the broadcast ones until the single SGD update, so they are read
    from the pair table, not copied. A row used by one sample (most rows) is updated and uploaded as that sample's
    gradient is formed, while the row is in cache; a row used by several samples sums its gradient first. The
    arithmetic is the general path's, operation for operation (grad = 0 + g·p rounded to the table's dtype,
    q − lr·grad rounded, then the delta), so the values are the same bit for bit."""
    dim = rows.shape[1] // 2
    n_rows = 0
    for j in range(lo, hi):                            # rows: one per distinct item, in first-use order
        i = items[j]
        r = slot[i]
        if r < 0:
            r = n_rows
            slot[i] = r
            row_item[r] = i
            row_count[r] = 0
            n_rows += 1
        row_count[r] += 1
        sample_row[j - lo] = r
    for k in range(dim):
        gp[k] = 0.0
    inv = 1.0 / (hi - lo)
    for j in range(lo, hi):                            # the scores
        g_buf[j - lo] = _row_dot(rows, items[j], p)
    for j in range(lo, hi):
        g_buf[j - lo] = (_sigmoid(g_buf[j - lo]) - labels[j]) * inv
    for j in range(lo, hi):                            # prefetching the next client's rows meanwhile
        if j - lo < nxt.size:
            _prefetch_rows(rows, slot, nxt[j - lo])
        i = items[j]
        r = sample_row[j - lo]
        g = g_buf[j - lo]
        if row_count[r] == 1:                          # its only sample: update and upload now, one pass
            for k in range(dim):
                qk = rows[i, k]
                gp[k] += g * qk
                gk = as_dtype_of(0.0 + g * p[k], rows)   # grad[r, k] = 0 + g·p_k, stored
                rows[i, dim + k] += as_dtype_of(qk - lr_q * gk, rows) - qk
        else:
            for k in range(dim):
                gp[k] += g * rows[i, k]
            for k in range(dim):
                grad[r, k] += g * p[k]
    for k in range(dim):
        p[k] -= lr_p * gp[k]
    for r in range(n_rows):
        i = row_item[r]
        if row_count[r] > 1:                           # rows of several samples: their summed gradient
            for k in range(dim):
                row[1, k] = rows[i, k] - lr_q * grad[r, k]
                grad[r, k] = 0.0
            for k in range(dim):
                rows[i, dim + k] += row[1, k] - rows[i, k]
        slot[i] = -1


@njit(cache=True, inline="always")
def _multi_step(rows, p, items, labels, lo, hi, nxt, batch_size, lr_p, lr_q, slot, local, grad, row_item, n_rows,
                step_count, multi, sample_row, g_buf, gp):
    """fedmf_round's local epoch for a client of several mini-batches without KD or emb_reg, on its local rows
    (laid out by _local_rows). In each step a row used by one sample of the mini-batch (most rows) is updated
    as that sample's gradient is formed (its gradient is that sample's alone, and no other sample of the step
    reads it), a row used by several sums its gradient first, and rows the step does not use are not touched
    (their gradient is zero: the general path's update leaves them unchanged). The arithmetic is the general
    path's, operation for operation (grad = 0 + g·p rounded to the table's dtype, local − lr·grad rounded), so
    the values are the same bit for bit; the row deltas are uploaded after the last step."""
    dim = rows.shape[1] // 2
    n_steps = (hi - lo + batch_size - 1) // batch_size
    for step in range(n_steps):
        b0 = lo + step * batch_size
        b1 = min(b0 + batch_size, hi)
        n_multi = 0
        for j in range(b0, b1):                        # rows used by several samples of this step
            r = slot[items[j]]
            sample_row[j - b0] = r
            step_count[r] += 1
            if step_count[r] == 2:
                multi[n_multi] = r
                n_multi += 1
        for k in range(dim):
            gp[k] = 0.0
        inv = 1.0 / (b1 - b0)
        for j in range(b0, b1):
            if j - lo < nxt.size:
                _prefetch_rows(rows, slot, nxt[j - lo])
            g_buf[j - b0] = _row_dot(local, sample_row[j - b0], p)
        for j in range(b0, b1):
            g_buf[j - b0] = (_sigmoid(g_buf[j - b0]) - labels[j]) * inv
        for j in range(b0, b1):
            r = sample_row[j - b0]
            g = g_buf[j - b0]
            if step_count[r] == 1:                     # its only sample in this step: update now
                for k in range(dim):
                    lk = local[r, k]
                    gp[k] += g * lk
                    gk = as_dtype_of(0.0 + g * p[k], local)   # grad[r, k] = 0 + g·p_k, stored
                    local[r, k] = lk - lr_q * gk
            else:
                for k in range(dim):
                    grad[r, k] += g * p[k]
                for k in range(dim):
                    gp[k] += g * local[r, k]
        for k in range(dim):
            p[k] -= lr_p * gp[k]
        for m in range(n_multi):
            r = multi[m]
            for k in range(dim):
                local[r, k] -= lr_q * grad[r, k]
                grad[r, k] = 0.0
        for j in range(b0, b1):
            step_count[sample_row[j - b0]] = 0
    for r in range(n_rows):                            # ---- upload: the row deltas, summed in user order
        i = row_item[r]
        for k in range(dim):
            rows[i, dim + k] += local[r, k] - rows[i, k]
        slot[i] = -1


@njit(cache=True, inline="always")
def _fedmf_scratch(q, offsets, batch_size, n_top, n_prev_items):
    """fedmf_round's per-client scratch: (slot, local, grad, row_item, p, gp, scores, ranks, g_buf, row_count,
    sample_row, row, step_count); slot is int32 (half the cache footprint of a random entry per sample)."""
    n_items, dim = q.shape
    local, grad, row_item = _row_buffers(q, offsets, n_top + n_prev_items)
    return (np.full(n_items, -1, np.int32), local, grad, row_item, np.empty(dim, q.dtype), np.empty(dim, q.dtype),
            np.empty(n_items, q.dtype), np.empty(n_top, np.int64), np.empty(batch_size, np.float64),
            np.empty(batch_size, np.int64), np.empty(batch_size, np.int64), np.empty((2, dim), q.dtype),
            np.zeros(local.shape[0], np.int32))


@njit(cache=True, inline="always")
def _fedmf_client(q, q_t, p_all, user, items, labels, lo, hi, nxt, batch_size, lr_p, lr_q, kd, emb, topn, yhat,
                  mem_key, arm_mode, kd_weight, m_of_d, reg_d, anchor_items, anchor_p, n_prev_items, rows, stats,
                  n_stats, scratch, first_step, ewc=None):
    """One participant's local epoch on its samples items[lo:hi], labels[lo:hi] (§5, §6), its row deltas added
    to the summed delta, the second half of the pair table `rows` (_pair_in); `nxt`: the sample items to prefetch meanwhile (the next client's); `ewc`: its EWC group
    (_ewc_client) or None; `first_step`: (whether its first step's T^u ranks and scores are given, those ranks,
    those scores) (arm_kernels.replay_ranks). Returns the stats rows."""
    slot, local, grad, row_item, p, gp, scores, ranks, g_buf, row_count, sample_row, row, step_count = scratch
    first, first_ranks, first_values = first_step
    dim = q.shape[1]
    for k in range(dim):
        p[k] = p_all[user, k]
    n_steps = (hi - lo + batch_size - 1) // batch_size
    if n_steps == 1 and not kd and not emb and _ewc_off(ewc):   # one mini-batch, rows read from the broadcast table
        _one_step(rows, p, items, labels, lo, hi, nxt, lr_p, lr_q, slot, row_item, row_count, sample_row,
                  g_buf, grad, row, gp)
        for k in range(dim):
            p_all[user, k] = p[k]
        return n_stats
    # ---- the client's local rows: its sample items, T^u when it replays, every old row under emb_reg
    n_rows = _local_rows(q, items, lo, hi, topn[user], kd, n_prev_items if emb else 0, slot, row_item, local)
    n_rows = _ewc_rows(ewc, q, slot, row_item, local, n_rows)
    if not kd and not emb and _ewc_off(ewc):           # several mini-batches, no KD/emb_reg/EWC
        _multi_step(rows, p, items, labels, lo, hi, nxt, batch_size, lr_p, lr_q, slot, local, grad, row_item, n_rows,
                    step_count, row_count, sample_row, g_buf, gp)
        for k in range(dim):
            p_all[user, k] = p[k]
        return n_stats
    # ---- local epoch: mini-batches of the shuffled samples (§5)
    for step in range(n_steps):
        b0 = lo + step * batch_size
        b1 = min(b0 + batch_size, hi)
        for k in range(dim):                       # grad is zero here: the update below clears it
            gp[k] = 0.0
        inv = 1.0 / (b1 - b0)
        # the scores, then their sigmoids (no vector state live across the exp calls), then the gradients;
        # meanwhile the rows of the samples one client ahead are prefetched (random rows of two tables
        # that outgrow the cache at 100k clients)
        for j in range(b0, b1):
            if j - lo < nxt.size:
                _prefetch_rows(rows, slot, nxt[j - lo])
            g_buf[j - b0] = _row_dot(local, slot[items[j]], p)
        for j in range(b0, b1):
            g_buf[j - b0] = (_sigmoid(g_buf[j - b0]) - labels[j]) * inv
        for j in range(b0, b1):
            r = slot[items[j]]
            g = g_buf[j - b0]
            for k in range(dim):                   # two loops, no views (a view per sample costs more
                grad[r, k] += g * p[k]             # than its arithmetic)
            for k in range(dim):
                gp[k] += g * local[r, k]
        if kd:                                     # ARM and KD over T^u (§6)
            targets = topn[user]
            ranked = step == 0 and first
            if ranked:                             # ranked before the round, with other clients
                for k in range(targets.size):
                    ranks[k] = first_ranks[k]
                    scores[targets[k]] = first_values[k]
            elif arm_mode == 2:                    # top-N KD reads T^u's scores only
                _target_scores(local, slot, targets, p, 0.0, scores)
            else:
                _client_scores(q_t, local, row_item, n_rows, p, 0.0, scores)
            size, perm, n_stats = _memory(scores, targets, ranks, arm_mode, m_of_d, stats, n_stats, step, mem_key,
                                          ranked)
            _kd_grads(scores, targets, yhat[user], perm, size, kd_weight, slot, p, local, grad, gp, 0.0)
        if emb:
            _emb_reg_grads(reg_d, local, row_item, n_rows, n_prev_items, anchor_items, grad, True, p, anchor_p,
                           user, gp)
        _ewc_grads(ewc, local, slot, anchor_items, grad, True, p, anchor_p, user, gp)
        # ---- SGD on p_u and the local rows (§4); after the last step each row is uploaded in the same pass
        for k in range(dim):
            p[k] -= lr_p * gp[k]
        if step < n_steps - 1:
            for r in range(n_rows):
                for k in range(dim):
                    local[r, k] -= lr_q * grad[r, k]
                    grad[r, k] = 0.0
        else:
            for r in range(n_rows):
                i = row_item[r]
                for k in range(dim):
                    local[r, k] -= lr_q * grad[r, k]
                    grad[r, k] = 0.0
                for k in range(dim):               # ---- upload: the row deltas, summed in user order
                    rows[i, dim + k] += local[r, k] - rows[i, k]
                slot[i] = -1
    for k in range(dim):
        p_all[user, k] = p[k]
    if n_steps == 0:                               # no samples: the rows are unchanged, nothing to add
        for r in range(n_rows):
            slot[row_item[r]] = -1
    return n_stats


def _pair_buffer(pair, q):
    """The round's pair table: `pair` ((I, 2d), the caller's buffer: huge pages), or a fresh array when None.
    Compiled only (the overload below): typed by what `pair` is, never an Optional."""
    raise NotImplementedError("a numba overload: call it from compiled code")


@overload(_pair_buffer, jit_options={"cache": True})
def _pair_buffer_typed(pair, q):
    if isinstance(pair, (types.NoneType, types.Omitted)):
        return lambda pair, q: np.empty((q.shape[0], 2 * q.shape[1]), q.dtype)
    return lambda pair, q: pair


@njit(cache=True, inline="always")
def _pair_in(pair, q, total):
    """A FedMF round's pair table: row i = q[i], then total[i] (the summed delta, added to in place, copied
    back by _pair_out). A sample's table row and delta row are adjacent lines of one page, one prefetch stream
    instead of two (captured 100k base round, kernel alone, copies included: 2.30 -> 2.12 s CPU, 2026-12-07)."""
    rows = _pair_buffer(pair, q)
    dim = q.shape[1]
    for i in range(q.shape[0]):
        for k in range(dim):
            rows[i, k] = q[i, k]
        for k in range(dim):
            rows[i, dim + k] = total[i, k]
    return rows


@njit(cache=True, inline="always")
def _pair_out(rows, total):
    """total = the summed-delta half of the pair table."""
    dim = total.shape[1]
    for i in range(total.shape[0]):
        for k in range(dim):
            total[i, k] = rows[i, dim + k]


@njit(cache=True)
def fedmf_round(q, q_t, p_all, users, offsets, items, labels, batch_size, lr_p, lr_q,
                replay, returning, topn, yhat, mem_keys, arm_mode, kd_weight, m_of_d,
                reg_mode, reg_d, anchor_items, anchor_p, n_prev_items, total, stats, ewc=None, pair=None):
    """One round of every participant (FedMF, one optimiser sub-step) on drawn samples (items, labels: client
    a's are offsets[a]:offsets[a + 1]); q_t is q transposed (contiguous). Updates p_all[users] in place, adds
    every client's row deltas to `total` (I, d) and writes (D_u, m_u, step) of every adaptive ARM step into
    `stats`; returns the number of stats rows. While a client trains, the rows of the samples one client ahead
    (as many as it has) are prefetched.

    arm_mode: 0 off, 1 adaptive (ARM), 2 full (top-N KD, m_u = N); reg_mode: 0 none, 1 emb_reg; `ewc`: the
    round's EWC group (see _ewc_client; anchor_items then holds Q^{t−1}) or None; `pair`: an (I, 2d) scratch of
    q's dtype for the pair table (_pair_in; None: allocated here).
    """
    scratch = _fedmf_scratch(q, offsets, batch_size, topn.shape[1], n_prev_items + _ewc_max_rows(ewc))
    rows = _pair_in(pair, q, total)
    no_ranks, no_values = np.zeros(topn.shape[1], np.int64), np.zeros(topn.shape[1], q.dtype)
    n_stats = 0
    for a in range(users.size):
        lo, hi = offsets[a], offsets[a + 1]
        kd, emb = replay[a] and arm_mode != 0, reg_mode == 1 and returning[a]
        n_stats = _fedmf_client(q, q_t, p_all, users[a], items, labels, lo, hi,
                                items[hi:min(2 * hi - lo, items.size)], batch_size, lr_p, lr_q, kd, emb, topn, yhat, mem_keys[a], arm_mode, kd_weight, m_of_d, reg_d, anchor_items, anchor_p,
                                n_prev_items, rows, stats, n_stats, scratch, (False, no_ranks, no_values),
                                _ewc_client(ewc, a))
    _pair_out(rows, total)
    return n_stats


@njit(cache=True)
def fedmf_round_drawn(q, q_t, p_all, users, offsets, counts, positives, exc_ptr, exc_items, n_items, neg_keys,
                      shuffle_keys, batch_size, lr_p, lr_q, replay, returning, topn, yhat, mem_keys, arm_mode, kd_weight, m_of_d,
                      reg_mode, reg_d, anchor_items, anchor_p, n_prev_items, total, stats, ewc=None, pair=None,
                      rank_ahead=False):
    """fedmf_round with each client's samples drawn (_draw_client, the values draw_plan gives) into a scratch
    of the largest client's size inside the loop, one client ahead, instead of the whole round's samples
    drawn into two arrays first and read back: at 100,000 clients 46 M samples, 0.7 GB written and read.
    The client trains on samples still in cache; the next client's are drawn and its rows prefetched
    meanwhile. Same values as draw_plan then fedmf_round, bit for bit (tests/f3crec/test_compiled.py);
    n_items: the catalogue the negatives are drawn from (|I^t|, as draw_plan's); `pair` as fedmf_round's.
    With `rank_ahead`, adaptive ARM's first-step ranks of clients without emb_reg or EWC rows are computed
    before the training loop, several clients per pass over the catalogue (arm_kernels.replay_ranks: the same
    ranks; it pays where the table outgrows the cache, sim_compiled passes q.nbytes ≥ RANK_AHEAD_BYTES)."""
    scratch = _fedmf_scratch(q, offsets, batch_size, topn.shape[1], n_prev_items + _ewc_max_rows(ewc))
    first = np.zeros(users.size, np.bool_)
    ahead = arm_mode == 1 and rank_ahead
    if ahead:
        for a in range(users.size):
            no_rows = _ewc_off(_ewc_client(ewc, a)) and not (reg_mode == 1 and returning[a])
            first[a] = replay[a] and no_rows and offsets[a + 1] > offsets[a]
    first_ranks = np.zeros((users.size if ahead else 1, topn.shape[1]), np.int64)   # (1, N): never read
    first_values = np.zeros((users.size if ahead else 1, topn.shape[1]), q.dtype)
    if ahead:
        replay_ranks(q, q_t, p_all, users, offsets, counts, positives, exc_ptr, exc_items, n_items, neg_keys, topn,
                     first, first_ranks, first_values)
    rows = _pair_in(pair, q, total)
    excluded, base, packed, out, start = _draw_scratch(offsets, n_items)
    largest = base.size
    cur_items, nxt_items = np.empty(largest, np.int64), np.empty(largest, np.int64)
    cur_labels, nxt_labels = np.empty(largest, q.dtype), np.empty(largest, q.dtype)
    n_stats = 0
    pos_at = 0
    prefetch = q.shape[0] * q.shape[1] * q.itemsize >= PREFETCH_BYTES
    if users.size > 0:
        _draw_client(neg_keys[0], shuffle_keys[0], counts[0], offsets[1] - offsets[0], positives, 0, exc_items,
                     exc_ptr[0], exc_ptr[1], n_items, excluded, base, packed, out, start, nxt_items, nxt_labels, 0)
        pos_at = counts[0]
    for a in range(users.size):
        cur_items, nxt_items = nxt_items, cur_items
        cur_labels, nxt_labels = nxt_labels, cur_labels
        size = offsets[a + 1] - offsets[a]
        n_next = 0
        if a + 1 < users.size:                         # the next client's samples, drawn before this one trains
            n_next = offsets[a + 2] - offsets[a + 1]
            _draw_client(neg_keys[a + 1], shuffle_keys[a + 1], counts[a + 1], n_next, positives, pos_at,
                         exc_items, exc_ptr[a + 1], exc_ptr[a + 2], n_items, excluded, base, packed, out, start,
                         nxt_items, nxt_labels, 0)
            pos_at += counts[a + 1]
        n_prefetch = min(n_next, size) if prefetch else 0
        kd, emb = replay[a] and arm_mode != 0, reg_mode == 1 and returning[a]
        given = a if ahead else 0                      # first-step ranks given: their row
        n_stats = _fedmf_client(q, q_t, p_all, users[a], cur_items, cur_labels, 0, size, nxt_items[:n_prefetch],
                                batch_size, lr_p, lr_q, kd, emb, topn, yhat, mem_keys[a],
                                arm_mode, kd_weight, m_of_d, reg_d, anchor_items, anchor_p, n_prev_items, rows,
                                stats, n_stats, scratch, (first[a], first_ranks[given], first_values[given]),
                                _ewc_client(ewc, a))
    _pair_out(rows, total)
    return n_stats


@njit(cache=True)
def affine_round(q, q_t, kind, p_all, w_all, b_all, shared_p, shared_w, shared_b, reset, users, offsets, items,
                 labels, batch_size, n_sub, lr_p, lr_head, lr_q, replay, returning, topn, yhat, mem_keys, arm_mode,
                 kd_weight, m_of_d, reg_mode, reg_d, anchor_items, anchor_p, n_prev_items, total, stats, ewc=None):
    """fedmf_round for the backbones with a head (model.py §4): kind 1 FedNCF (a = w[d:], c = w[:d]·p + b,
    one sub-step on p, w, b, Q), kind 2 PFedRec (a = w, c = b; sub-step 0 steps w, b, sub-step 1 steps Q
    with the loss recomputed). With s = a·q_i + c and per-logit gradient g: ∂a += g q_i, ∂c += g,
    ∂q_i += g a; then ∂w[d:] = ∂a, ∂w[:d] = ∂c p, ∂p = ∂c w[:d], ∂b = ∂c (FedNCF) or ∂w = ∂a,
    ∂b = ∂c (PFedRec). `reset`: every participant starts from the shared start-up values (Q2). stats rows are
    (D_u, m_u, step·n_sub + sub). `ewc`: as fedmf_round's; the head's penalty gradient goes to its update."""
    n_items, dim = q.shape
    n_top = topn.shape[1]
    w_dim = w_all.shape[1]
    slot = np.full(n_items, -1, np.int64)
    local, grad, row_item = _row_buffers(q, offsets, n_top + n_prev_items + _ewc_max_rows(ewc))
    p = np.zeros(dim, q.dtype)
    ew = np.zeros(w_dim, q.dtype)                      # EWC's penalty gradient of w and b
    eb = np.zeros(1, q.dtype)
    w = np.empty(w_dim, q.dtype)
    b = np.empty(1, q.dtype)
    av = np.empty(dim, q.dtype)
    ga = np.empty(dim, q.dtype)
    gp = np.empty(dim, q.dtype)
    scores = np.empty(n_items, q.dtype)
    ranks = np.empty(n_top, np.int64)
    n_stats = 0
    for a_ in range(users.size):
        user = users[a_]
        lo, hi = offsets[a_], offsets[a_ + 1]
        kd = replay[a_] and arm_mode != 0
        emb = reg_mode == 1 and returning[a_]
        n_rows = _local_rows(q, items, lo, hi, topn[user], kd, n_prev_items if emb else 0, slot, row_item, local)
        ewc_a = _ewc_client(ewc, a_)
        n_rows = _ewc_rows(ewc_a, q, slot, row_item, local, n_rows)
        for k in range(w_dim):
            w[k] = shared_w[k] if reset else w_all[user, k]
        b[0] = shared_b[0] if reset else b_all[user, 0]
        if kind == 1:
            for k in range(dim):
                p[k] = shared_p[k] if reset else p_all[user, k]
        n_steps = (hi - lo + batch_size - 1) // batch_size
        for step in range(n_steps):
            b0 = lo + step * batch_size
            b1 = min(b0 + batch_size, hi)
            inv = 1.0 / (b1 - b0)
            for sub in range(n_sub):
                # (a, c) of the current private values
                if kind == 1:
                    cv = 0.0
                    for k in range(dim):
                        av[k] = w[dim + k]
                        cv += w[k] * p[k]
                    cv += b[0]
                else:
                    for k in range(dim):
                        av[k] = w[k]
                    cv = b[0]
                for k in range(dim):
                    ga[k] = 0.0
                    gp[k] = 0.0
                gc = 0.0
                for j in range(b0, b1):
                    r = slot[items[j]]
                    s = 0.0
                    for k in range(dim):
                        s += local[r, k] * av[k]
                    g = (_sigmoid(s + cv) - labels[j]) * inv
                    gc += g
                    for k in range(dim):
                        grad[r, k] += g * av[k]
                    for k in range(dim):
                        ga[k] += g * local[r, k]
                if kd:                                 # ARM and KD over T^u (§6), s = a·q + c
                    if arm_mode == 2:                  # top-N KD reads T^u's scores only
                        _target_scores(local, slot, topn[user], av, cv, scores)
                    else:
                        _client_scores(q_t, local, row_item, n_rows, av, cv, scores)
                    size, perm, n_stats = _memory(scores, topn[user], ranks, arm_mode, m_of_d, stats, n_stats,
                                                  step * n_sub + sub, mem_keys[a_])
                    gc = _kd_grads(scores, topn[user], yhat[user], perm, size, kd_weight, slot, av, local, grad, ga,
                                   gc)
                if emb:
                    _emb_reg_grads(reg_d, local, row_item, n_rows, n_prev_items, anchor_items, grad, kind == 1, p,
                                   anchor_p, user, gp)
                _ewc_grads(ewc_a, local, slot, anchor_items, grad, kind == 1, p, anchor_p, user, gp)
                _ewc_head_grads(ewc_a, user, w, b, ew, eb)
                # ---- SGD on this sub-step's tensors, every gradient taken at the values before it
                step_head = kind == 1 or sub == 0
                step_items = kind == 1 or sub == 1
                if kind == 1:
                    for k in range(dim):
                        gp[k] += gc * w[k]
                    for k in range(dim):
                        w_k = w[k]
                        w[k] = w_k - lr_head * _plus_ewc(gc * p[k], ewc_a, ew[k])
                        w[dim + k] -= lr_head * _plus_ewc(ga[k], ewc_a, ew[dim + k])
                        p[k] -= lr_p * gp[k]
                    b[0] -= lr_head * _plus_ewc(gc, ewc_a, eb[0])
                elif step_head:
                    for k in range(dim):
                        w[k] -= lr_head * _plus_ewc(ga[k], ewc_a, ew[k])
                    b[0] -= lr_head * _plus_ewc(gc, ewc_a, eb[0])
                for r in range(n_rows):
                    for k in range(dim):
                        if step_items:
                            local[r, k] -= lr_q * grad[r, k]
                        grad[r, k] = 0.0
        for k in range(w_dim):
            w_all[user, k] = w[k]
        b_all[user, 0] = b[0]
        if kind == 1:
            for k in range(dim):
                p_all[user, k] = p[k]
        for r in range(n_rows):
            i = row_item[r]
            for k in range(dim):
                total[i, k] += local[r, k] - q[i, k]
            slot[i] = -1
    return n_stats


@njit(cache=True)
def fisher_rows(kind, q, p_all, w_all, b_all, users, offsets, items, labels, f_p, f_w, f_b, row_client, row_item,
                row_f):
    """EWC's diagonal empirical Fisher (round.fisher, §11) of every client of the block-end plan, in closed form:
    with s = a·q_i + c (kind 0 FedMF a = p, c = 0; 1 FedNCF a = w[d:], c = w[:d]·p + b; 2 PFedRec a = w,
    c = b) each sample's BCE gradient is g = σ(s) − y times ∂s/∂θ: ∂q_i = g a; FedMF ∂p = g q_i; FedNCF
    ∂p = g w[:d], ∂w = g [p; q_i], ∂b = g; PFedRec ∂w = g q_i, ∂b = g. F = the mean over the client's
    samples of the squared gradients (summed in sample order, then divided, as round.fisher does).

    Participant a's F of Φ_u goes to f_p[a], f_w[a], f_b[a] (the tensors it has); its rows, one per distinct
    sample item in item order, to row_client / row_item / row_f (fisher_row_count of them): sorted by
    (client, item), as round.fisher's. Returns the number of rows."""
    n_items, dim = q.shape
    w_dim = w_all.shape[1]
    slot = np.full(n_items, -1, np.int64)
    av = np.empty(dim, q.dtype)
    n_rows = 0
    for a in range(users.size):
        user = users[a]
        lo, hi = offsets[a], offsets[a + 1]
        first = n_rows
        cv = 0.0
        if kind == 0:
            for k in range(dim):
                av[k] = p_all[user, k]
        elif kind == 1:
            for k in range(dim):
                av[k] = w_all[user, dim + k]
            for k in range(dim):
                cv += w_all[user, k] * p_all[user, k]
            cv += b_all[user, 0]
        else:
            for k in range(dim):
                av[k] = w_all[user, k]
            cv = b_all[user, 0]
        for k in range(f_p.shape[1]):
            f_p[a, k] = 0.0
        for k in range(w_dim):
            f_w[a, k] = 0.0
        f_b[a, 0] = 0.0
        for j in range(lo, hi):                        # the client's distinct items, then in item order
            i = items[j]
            if slot[i] < 0:
                slot[i] = n_rows
                row_item[n_rows] = i
                n_rows += 1
        row_item[first:n_rows] = np.sort(row_item[first:n_rows])
        for r in range(first, n_rows):
            slot[row_item[r]] = r
            row_client[r] = a
            for k in range(dim):
                row_f[r, k] = 0.0
        for j in range(lo, hi):
            i = items[j]
            r = slot[i]
            s = 0.0
            for k in range(dim):
                s += q[i, k] * av[k]
            g = _sigmoid(s + cv) - labels[j]
            for k in range(dim):
                x = g * av[k]
                row_f[r, k] += x * x
            if kind == 0:
                for k in range(dim):
                    x = g * q[i, k]
                    f_p[a, k] += x * x
            elif kind == 1:
                for k in range(dim):
                    x = g * w_all[user, k]
                    f_p[a, k] += x * x
                for k in range(dim):
                    x = g * p_all[user, k]
                    f_w[a, k] += x * x
                    x = g * q[i, k]
                    f_w[a, dim + k] += x * x
            else:
                for k in range(dim):
                    x = g * q[i, k]
                    f_w[a, k] += x * x
            if kind != 0:
                f_b[a, 0] += g * g
        count = hi - lo
        if count > 0:
            for k in range(f_p.shape[1]):
                f_p[a, k] /= count
            for k in range(w_dim):
                f_w[a, k] /= count
            f_b[a, 0] /= count
        for r in range(first, n_rows):
            for k in range(dim):
                row_f[r, k] /= count
            slot[row_item[r]] = -1
    return n_rows


@njit(cache=True)
def fisher_row_count(offsets, items, n_items):
    """The number of distinct (client, item) pairs of the samples (client a's: items[offsets[a]:offsets[a+1]]):
    fisher_rows' row count."""
    seen = np.full(n_items, -1, np.int64)
    count = 0
    for a in range(offsets.size - 1):
        for j in range(offsets[a], offsets[a + 1]):
            if seen[items[j]] != a:
                seen[items[j]] = a
                count += 1
    return count


load_fast(globals())
