"""smognp: SMoG in NumPy, the example of a port to another framework (spec/README.md, "The gradient bridge").

NumPy only: no torch, no autograd. Collectives are callables on arrays passed in (`all_reduce(a)`: the
SUM over ranks; `broadcast(a)`: rank 0's value; both default to the identity), randomness is a seed
for NumPy's generator, and the derivatives are written by hand: the functions that have a gradient
return `(value, vjp)`, where `vjp(cotangent)` gives the cotangents of the inputs (JAX's convention).
The VJP of the step with `group_grad=True` all-reduces its cotangent itself, as `jax.lax.psum` would.

Everything is computed in max(input dtype, float32); NumPy has no bfloat16, so bf16 arrays never
reach it (an adapter hands them over exactly upcast to float32).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def _ident(a):
    return a


def _dt(*arrays):
    return np.result_type(np.float32, *[a.dtype for a in arrays])


def _norm(x):
    return np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)


def unit(x):
    return x / _norm(x)


def _unit_vjp(x, d):
    """Cotangent of x for y = x / max(||x||, EPS), given the cotangent d of y."""
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    y = x / np.maximum(n, EPS)
    return np.where(n > EPS, (d - y * (d * y).sum(-1, keepdims=True)) / np.maximum(n, EPS), d / EPS)


# -- one iteration ---------------------------------------------------------------------------------


def assign(z, groups):
    """argmax_k <unit(z_i), c_k>; ties and zero rows go to the lowest index."""
    dt = _dt(z, groups)
    if len(z) == 0:
        return np.zeros(0, dtype=np.int64)
    return (unit(z.astype(dt)) @ groups.astype(dt).T).argmax(1).astype(np.int64)


def update(groups, z, a, beta, all_reduce=None):
    """-> (new groups in the dtype of groups, the pieces the VJP needs). Sums and counts over ranks."""
    reduce = all_reduce or _ident
    dt = _dt(groups, z)
    K, D = groups.shape
    g, zh = groups.astype(dt), unit(z.astype(dt))
    sums = np.zeros((K, D), dt)
    np.add.at(sums, a, zh)
    counts = reduce(np.bincount(a, minlength=K).astype(dt))
    sums = reduce(sums)
    u = beta * g + (1 - beta) * sums / np.maximum(counts, 1)[:, None]
    hit = counts > 0
    new = np.where(hit[:, None], unit(u), g)
    return new.astype(groups.dtype), (u, hit, counts)


def logits(p, groups, tau):
    dt = _dt(p, groups)
    return unit(p.astype(dt)) @ groups.astype(dt).T / tau


def loss(p, groups, targets, tau):
    """Mean cross-entropy of the logits -> (value, vjp: d -> (dp, dgroups))."""
    s = logits(p, groups, tau)
    m = s.max(1, keepdims=True)
    lse = (m + np.log(np.exp(s - m).sum(1, keepdims=True)))[:, 0]
    n = len(targets)
    value = (lse - s[np.arange(n), targets]).mean()

    def vjp(d):
        err = np.exp(s - lse[:, None])
        err[np.arange(n), targets] -= 1
        ds = d * err / (n * tau)  # (N, K)
        dt = s.dtype
        return _unit_vjp(p.astype(dt), ds @ groups.astype(dt)), ds.T @ unit(p.astype(dt))

    return value.astype(s.dtype), vjp


def step(groups, z_update, z_target, p, beta, tau, all_reduce=None, group_grad=False):
    """One head -> ((loss, new groups, targets [J, B]), vjp: (dloss, dnew) -> (dz_update, dp)).
    Targets and the update's assignment with the old groups; the loss with the new ones."""
    reduce = all_reduce or _ident
    targets = np.stack([assign(zt, groups) for zt in z_target])
    a = assign(z_update, groups)
    new, (u, hit, counts) = update(groups, z_update, a, beta, reduce)
    pairs = [loss(pc, new, t, tau) for pc in p for t in targets]
    value = np.mean([v for v, _ in pairs])

    def vjp(dloss, dnew=None):
        n = len(pairs)
        parts = [back(dloss / n) for _, back in pairs]
        dp = np.stack(
            [
                sum(parts[c * len(targets) + j][0] for j in range(len(targets)))
                for c in range(len(p))
            ]
        )
        if not group_grad:
            return None, dp
        dc = sum(dg for _, dg in parts) + (0 if dnew is None else dnew)
        dc = reduce(dc)  # every rank's cotangent of the shared groups (psum)
        du = np.where(hit[:, None], _unit_vjp(u, dc), 0)
        dzh = (1 - beta) * du[a] / np.maximum(counts, 1)[a][:, None]
        return _unit_vjp(z_update.astype(dzh.dtype), dzh), dp

    return (np.asarray(value, dtype=pairs[0][0].dtype), new, targets), vjp


def multihead_step(groups, z, z_target, p, beta, tau, all_reduce=None, group_grad=False):
    """All heads: head h is `step` on groups[h] updating from z[h mod 2]; the loss is their mean."""
    if z.shape[0] < 2:
        raise ValueError(f"head 1 updates from online crop 1; got {z.shape[0]} online crop(s)")
    H = groups.shape[0]
    outs = [
        step(groups[h], z[h % 2], z_target, p, beta, tau, all_reduce, group_grad) for h in range(H)
    ]
    value = np.mean([o[0][0] for o in outs])

    def vjp(dloss, dnew=None):
        dz, dp = np.zeros(z.shape, _dt(z)), 0
        for h, (_, back) in enumerate(outs):
            dzh, dph = back(dloss / H, None if dnew is None else dnew[h])
            dp = dp + dph
            if dzh is not None:
                dz[h % 2] += dzh
        return (dz if group_grad else None), dp

    result = (
        np.asarray(value, dtype=outs[0][0][0].dtype),
        np.stack([o[0][1] for o in outs]),
        np.stack([o[0][2] for o in outs]),
    )
    return result, vjp


# -- the run ---------------------------------------------------------------------------------------


def _lloyd(xh, c, iters, reduce):
    k, D = c.shape
    for _ in range(iters):
        a = assign(xh, c)
        sums = np.zeros((k, D), c.dtype)
        np.add.at(sums, a, xh)
        counts = reduce(np.bincount(a, minlength=k).astype(c.dtype))
        sums = reduce(sums)
        c = np.where(counts[:, None] > 0, unit(sums), c)
    return c, assign(xh, c)


def kmeans(x, k, iters=10, seed=None, all_reduce=None, broadcast=None):
    """Spherical k-means over this rank's rows: rank 0 draws k distinct rows with NumPy's generator
    (`seed`), broadcast; `iters` E/M steps with sums and counts over ranks -> (centres, assignment)."""
    reduce, bcast = all_reduce or _ident, broadcast or _ident
    dt = _dt(x)
    xh = unit(x.astype(dt))
    N, D = x.shape
    if int(reduce(np.array([N], dtype=np.float64))[0]) < k:
        raise ValueError(f"{N} rows on this rank, fewer than k = {k} in total")
    c = np.zeros((k, D), dt)
    if N >= k:
        c = xh[np.random.default_rng(seed).permutation(N)[:k]]
    c, a = _lloyd(xh, bcast(c), iters, reduce)
    return c.astype(x.dtype), a


def regroup(bank, index, n, n_heads, k, iters=10, seed=None, init_index=None, all_reduce=None):
    """Head h: k-means over bank row h mod 2 from the rows of dataset indices init_index[h] (default: a
    draw of k of the n indices per head, in turn, from one NumPy generator), each gathered from the
    rank that holds it by summing zeros elsewhere."""
    reduce = all_reduce or _ident
    if init_index is None:
        rng = np.random.default_rng(seed)
        init_index = np.stack([rng.permutation(n)[:k] for _ in range(n_heads)])
    row_of = np.full(n, -1)
    row_of[index] = np.arange(len(index))
    heads = []
    for h in range(n_heads):
        xh = unit(bank[h % 2].astype(_dt(bank)))
        pos = row_of[init_index[h]]
        first = np.zeros((k, xh.shape[1]), xh.dtype)
        first[pos >= 0] = xh[pos[pos >= 0]]
        heads.append(_lloyd(xh, reduce(first), iters, reduce)[0])
    return np.stack(heads).astype(bank.dtype)


def ema_(target, online, m):
    """theta_k <- m theta_k + (1 - m) theta_q, in place on the arrays of `target`."""
    for tk, tq in zip(target, online):
        tk *= m
        tk += (1 - m) * tq


def beta_schedule(start, end, total):
    s = np.linspace(start, end, total, dtype=np.float64)
    s[0] = start
    if total > 1:
        s[-1] = end
    return s
