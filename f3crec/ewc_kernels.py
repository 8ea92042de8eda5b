"""EWC's penalty inside the compiled round kernels (kernels.py, §11): the round's EWC group, each participant's
part of it, its stored Fisher rows made local rows, and the gradient of (γ/2)·Σ F (θ − θ*)² for those rows, the
private vector and the head. Without EWC (`ewc` None) every helper compiles to nothing in the round.
numpy + numba only (no torch). The block-end Fisher itself (kernels.fisher_rows) is the round's closed-form
gradient and stays beside the rounds.
"""
from __future__ import annotations

from .jit import load_fast

from numba import njit, types  # noqa: E402  (after .jit, which imports numba with SciPy hidden)
from numba.extending import overload  # noqa: E402


# ---- EWC (§11): the round's group `ewc` = (γ, has (A,), f_lo (A,), f_hi (A,), f_items (L,), f_rows (L, d),
# F_p, F_w, F_b, θ*_w, θ*_b (U, ·)), or None (no EWC: every helper below compiles to nothing). Participant a's
# stored Fisher rows are f_items[f_lo[a]:f_hi[a]] (empty unless it returns), `has[a]`: a Fisher of its Φ_u.
# Not inline="always": compiled apart, a helper's `is None` test is on its own argument, which numba prunes
# when it is None (inlined, it would not be); _ewc_client is an overload, so the None case never becomes an
# Optional tuple.
def _ewc_client(ewc, a):
    """Participant a's part of the round's EWC group: (γ, has, lo, hi, f_items, f_rows, F_p, F_w, F_b, θ*_w,
    θ*_b), or None. Compiled only (the overload below): typed by what `ewc` is, never an Optional."""
    raise NotImplementedError("a numba overload: call it from compiled code")


@overload(_ewc_client, jit_options={"cache": True})
def _ewc_client_typed(ewc, a):
    if isinstance(ewc, (types.NoneType, types.Omitted)):
        return lambda ewc, a: None

    def client(ewc, a):
        gamma, has, f_lo, f_hi, f_items, f_rows, f_p, f_w, f_b, anchor_w, anchor_b = ewc
        return gamma, has[a], f_lo[a], f_hi[a], f_items, f_rows, f_p, f_w, f_b, anchor_w, anchor_b
    return client


@njit(cache=True)
def _ewc_max_rows(ewc):
    """The most stored Fisher rows of one participant (the local row buffers' extra room); 0 without EWC."""
    if ewc is None:
        return 0
    most = 0
    for a in range(ewc[2].size):
        most = max(most, ewc[3][a] - ewc[2][a])
    return most


@njit(cache=True)
def _ewc_off(e):
    """Whether the client's EWC penalty is absent (no Fisher of Φ_u, no stored rows)."""
    if e is None:
        return True
    return not e[1] and e[3] == e[2]


@njit(cache=True)
def _ewc_rows(e, q, slot, row_item, local, n_rows):
    """The client's stored Fisher rows made local rows too (after those of _local_rows); returns the count."""
    if e is None:
        return n_rows
    f_items = e[4]
    for j in range(e[2], e[3]):
        i = f_items[j]
        if slot[i] < 0:
            slot[i] = n_rows
            row_item[n_rows] = i
            for k in range(q.shape[1]):
                local[n_rows, k] = q[i, k]
            n_rows += 1
    return n_rows


@njit(cache=True)
def _ewc_grads(e, local, slot, anchor_items, grad, with_p, p, anchor_p, user, gp):
    """EWC's penalty gradient, ∂/∂θ of (γ/2)·Σ F (θ − θ*)² = (γ/2·F)·2(θ − θ*) (autograd's order): into `grad`
    for the client's stored Fisher rows (θ* = Q^{t−1}, anchor_items) and, where it has a Fisher of Φ_u and
    `with_p`, into the private vector's `gp`."""
    if e is None:
        return
    half = 0.5 * e[0]
    f_items, f_rows, f_p = e[4], e[5], e[6]
    for j in range(e[2], e[3]):
        i = f_items[j]
        r = slot[i]
        for k in range(local.shape[1]):
            grad[r, k] += (half * f_rows[j, k]) * (2.0 * (local[r, k] - anchor_items[i, k]))
    if e[1] and with_p:
        for k in range(p.size):
            gp[k] += (half * f_p[user, k]) * (2.0 * (p[k] - anchor_p[user, k]))


@njit(cache=True)
def _ewc_head_grads(e, user, w, b, ew, eb):
    """EWC's penalty gradient of the head (w, b) into ew, eb (zero without a Fisher of Φ_u)."""
    if e is None:
        return
    half = 0.5 * e[0]
    f_w, f_b, anchor_w, anchor_b = e[7], e[8], e[9], e[10]
    for k in range(w.size):
        ew[k] = (half * f_w[user, k]) * (2.0 * (w[k] - anchor_w[user, k])) if e[1] else 0.0
    eb[0] = (half * f_b[user, 0]) * (2.0 * (b[0] - anchor_b[user, 0])) if e[1] else 0.0


@njit(cache=True)
def _plus_ewc(g, e, extra):
    """g plus EWC's term `extra` (g itself, untouched, without EWC)."""
    if e is None:
        return g
    return g + extra


load_fast(globals())
