"""The slow oracle: SMoG's functional core written straight from spec/*.md with plain Python loops.

Nothing here is vectorised over samples or groups: every sum is a loop over samples, every argmax a
loop over groups with a strict `>` (so ties keep the lowest index). Dot products and norms are torch
reductions over the D entries of one vector, which keeps autograd working for the gradient checks.
It is meant to be read next to the equations and to be slow; `smog.py` is the fast version.

Run the suite against it with `SMOG_IMPL=spec.oracle pytest spec`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

EPS = 1e-12  # normalise(v) = v / max(||v||, EPS), as torch.nn.functional.normalize


def _sum_over_ranks(fn):
    """(G5) the reduce function: identity without a process group, torch.distributed SUM with one."""
    if fn is not None:
        return fn
    if dist.is_available() and dist.is_initialized():

        def reduce(t):
            t = t.detach().clone()
            dist.all_reduce(t)
            return t

        return reduce
    return lambda t: t


def _rank0(fn):
    """(K1) broadcast: rank 0's value on every rank; identity without a process group."""
    if fn is not None:
        return fn
    if dist.is_available() and dist.is_initialized():

        def bcast(t):
            t = t.detach().clone()
            dist.broadcast(t, src=0)
            return t

        return bcast
    return lambda t: t


def _dtype(t):
    return torch.promote_types(t.dtype, torch.float32)


def dot(u, v):
    return (u * v).sum()


def normalise(v):
    """v / max(||v||, EPS) for one vector v [D]."""
    return v / torch.clamp(torch.sqrt(dot(v, v)), min=EPS)


def _argmax(scores):
    """Index of the largest entry of a list of Python floats; ties keep the lowest index (G1)."""
    best = 0
    for k in range(1, len(scores)):
        if scores[k] > scores[best]:
            best = k
    return best


# -- grouping.md ---------------------------------------------------------------------------------


def assign_groups(z, groups):
    """(G1) a_i = argmax_k <z_i / ||z_i||, c_k>, lowest index on ties. z [N, D], groups [K, D] -> [N]."""
    dt = _dtype(groups)
    g = groups.detach().to(dt)
    out = []
    for i in range(z.shape[0]):
        zi = normalise(z[i].detach().to(dt))
        scores = (g * zi).sum(
            dim=1
        )  # <z^_i, c_k> for every k: each a sum over D, as dot() computes it
        out.append(_argmax(scores.tolist()))
    return torch.tensor(out, dtype=torch.long, device=z.device)


def update_groups(groups, z, assign, beta, *, all_reduce=None):
    """(G2) c_k <- normalise(beta c_k + (1 - beta) S_k / n_k) for n_k > 0, else c_k (G4);
    S_k and n_k are summed over ranks (G5) before dividing. Returns a new tensor (G10)."""
    reduce = _sum_over_ranks(all_reduce)
    K, D = groups.shape
    dt = _dtype(groups)
    sums = [torch.zeros(D, dtype=dt, device=groups.device) for _ in range(K)]
    counts = [0.0] * K
    for i in range(z.shape[0]):
        k = int(assign[i])
        sums[k] = sums[k] + normalise(z[i].to(dt))
        counts[k] += 1.0
    sums = reduce(torch.stack(sums))  # S_k over all ranks
    counts = reduce(torch.tensor(counts, dtype=dt, device=groups.device))  # n_k over all ranks
    new = []
    for k in range(K):
        c_k = groups[k].to(dt)
        if float(counts[k]) > 0:
            new.append(normalise(beta * c_k + (1 - beta) * sums[k] / counts[k]))
        else:
            new.append(c_k)
    return torch.stack(new).to(groups.dtype)


# -- loss.md -------------------------------------------------------------------------------------


def group_logits(p, groups, tau):
    """(L1) l_ik = <p_i / ||p_i||, c_k> / tau. p [N, D], groups [K, D] -> [N, K]."""
    dt = _dtype(groups)
    rows = []
    for i in range(p.shape[0]):
        pi = normalise(p[i].to(dt))
        rows.append(torch.stack([dot(pi, groups[k].to(dt)) / tau for k in range(groups.shape[0])]))
    return torch.stack(rows)


def _cross_entropy(logits_row, t):
    """-log softmax(l)_t = logsumexp(l) - l_t, with the maximum subtracted for stability."""
    m = logits_row.detach().max()
    total = 0.0
    for k in range(logits_row.shape[0]):
        total = total + torch.exp(logits_row[k] - m)
    return m + torch.log(total) - logits_row[t]


def smog_loss(p, groups, targets, tau):
    """(L1) mean over samples of the cross-entropy of group_logits against integer targets."""
    logits = group_logits(p, groups, tau)
    total = 0.0
    for i in range(p.shape[0]):
        total = total + _cross_entropy(logits[i], int(targets[i]))
    return total / p.shape[0]


# -- step.md -------------------------------------------------------------------------------------


def smog_step(groups, z_update, z_target, p, beta, tau, *, all_reduce=None, group_grad=False):
    """One head's iteration. groups [K, D], z_update [B, D], z_target [J, B, D], p [C, B, D]
    -> (loss [], new_groups [K, D], targets [J, B]).
    (S1) targets and the update's assignment use the groups before the update;
    (S3) new groups by update_groups; (S2) loss = mean over (c, j, b) with the new groups;
    (L5/L6) gradient reaches z_update only when group_grad is True."""
    old = groups.detach()
    J, C = z_target.shape[0], p.shape[0]
    targets = torch.stack([assign_groups(z_target[j], old) for j in range(J)])
    a = assign_groups(z_update, old)
    new = update_groups(
        old, z_update if group_grad else z_update.detach(), a, beta, all_reduce=all_reduce
    )
    if not group_grad:
        new = new.detach()
    total = 0.0
    for c in range(C):
        for j in range(J):
            total = total + smog_loss(p[c], new, targets[j], tau)
    return total / (C * J), new, targets


# -- heads.md -----------------------------------------------------------------------------------


def smog_multihead_step(groups, z, z_target, p, beta, tau, *, all_reduce=None, group_grad=False):
    """All H heads of one iteration. groups [H, K, D], z [C, B, D] online projector embeddings,
    z_target [J, B, D], p [C, B, D] -> (loss [], new_groups [H, K, D], targets [H, J, B]).
    (H2) head h updates from z[h mod 2]; (H1) loss = mean over heads; (H5) each head is smog_step."""
    if z.shape[0] < 2:
        raise ValueError(
            "smog_multihead_step: head h updates from global crop h mod 2; pass at least 2 crops"
        )
    total, new, targets = 0.0, [], []
    for h in range(groups.shape[0]):
        loss, g, t = smog_step(
            groups[h],
            z[h % 2],
            z_target,
            p,
            beta,
            tau,
            all_reduce=all_reduce,
            group_grad=group_grad,
        )
        total = total + loss
        new.append(g)
        targets.append(t)
    return total / groups.shape[0], torch.stack(new), torch.stack(targets)


# -- kmeans.md -----------------------------------------------------------------------------------


def spherical_kmeans(x, k, iters=10, *, generator=None, all_reduce=None, broadcast=None):
    """(K1) init: rank 0 draws randperm(N_0, generator)[:k] of its normalised rows, broadcast;
    iterations of (K2) E-step argmax and (K3) M-step normalised mean of members (sums and counts
    summed over ranks; empty clusters keep their centre). Returns (centres [k, D], assignment [N]
    of the rows to the returned centres). ValueError (K9) when fewer than k rows exist in total."""
    reduce, bcast = _sum_over_ranks(all_reduce), _rank0(broadcast)
    dt = _dtype(x)
    N, D = x.shape
    rows = [normalise(x[i].to(dt)) for i in range(N)]
    n_total = int(reduce(torch.tensor([float(N)], dtype=torch.float64)).item())
    if n_total < k:
        raise ValueError(f"spherical_kmeans: {n_total} rows in total, fewer than k={k}")
    n_rank0 = int(bcast(torch.tensor([float(N)], dtype=torch.float64)).item())
    if n_rank0 < k:
        raise ValueError(
            f"spherical_kmeans: the initial centres come from rank 0, which holds {n_rank0} < k rows"
        )
    centres = torch.zeros(k, D, dtype=dt, device=x.device)
    if N >= k:  # only rank 0's draw survives the broadcast
        idx = torch.randperm(N, generator=generator)[:k]
        centres = torch.stack([rows[int(i)] for i in idx])
    return _lloyd(x, rows, bcast(centres), iters, reduce)


def _lloyd(x, rows, centres, iters, reduce):
    """(K2, K3) `iters` E/M steps from `centres` over this rank's normalised `rows` (sums and counts
    summed over ranks; empty clusters keep their centre) -> (centres, assignment to them)."""
    N, D = x.shape
    k, dt = centres.shape[0], centres.dtype
    for _ in range(iters):
        a = assign_groups(x, centres) if N else []
        sums = [torch.zeros(D, dtype=dt, device=x.device) for _ in range(k)]
        counts = [0.0] * k
        for i in range(N):
            sums[int(a[i])] = sums[int(a[i])] + rows[i]
            counts[int(a[i])] += 1.0
        sums = reduce(torch.stack(sums))
        counts = reduce(torch.tensor(counts, dtype=dt))
        centres = torch.stack(
            [normalise(sums[j]) if float(counts[j]) > 0 else centres[j] for j in range(k)]
        )
    a = assign_groups(x, centres) if N else torch.zeros(0, dtype=torch.long)
    return centres, a


# -- run.md --------------------------------------------------------------------------------------


def initial_indices(n, n_heads, k, generator=None):
    """(R3, R5) for each head in turn, k distinct dataset indices: randperm(n, generator)[:k]."""
    return torch.stack([torch.randperm(n, generator=generator)[:k] for _ in range(n_heads)])


def regroup(
    bank, index, n, n_heads, k, iters=10, *, generator=None, init_index=None, all_reduce=None
):
    """(R1) head h clusters bank row h mod 2, (R2) from the normalised bank rows of the dataset indices
    init_index[h] (R3: drawn per head by `generator` when not given); (R4) each initial row comes from
    the rank that holds it, the others adding zeros, summed over ranks. -> groups [H, k, D]."""
    reduce = _sum_over_ranks(all_reduce)
    if init_index is None:
        init_index = initial_indices(n, n_heads, k, generator)
    here = {int(i): r for r, i in enumerate(index)}  # dataset index -> this rank's row
    heads = []
    for h in range(n_heads):
        x = bank[h % 2]
        dt = _dtype(x)
        rows = [normalise(x[r].to(dt)) for r in range(x.shape[0])]
        start = [
            rows[here[int(i)]] if int(i) in here else torch.zeros(x.shape[1], dtype=dt)
            for i in init_index[h]
        ]
        centres, _ = _lloyd(x, rows, reduce(torch.stack(start)), iters, reduce)
        heads.append(centres)
    return torch.stack(heads)


# -- momentum.md ---------------------------------------------------------------------------------


@torch.no_grad()
def momentum_update_(target, online, m):
    """(M1) theta_k <- m theta_k + (1 - m) theta_q for every pair, in place."""
    for tk, tq in zip(target, online):
        tk.copy_(m * tk + (1 - m) * tq)


def beta_schedule(beta_start, beta_end, total_steps):
    """(M3) beta_t = beta_start + (beta_end - beta_start) t / (T - 1), t = 0..T-1; [beta_start] for T = 1."""
    if total_steps == 1:
        return torch.tensor([float(beta_start)], dtype=torch.float64)
    out = []
    for t in range(total_steps):
        out.append(beta_start + (beta_end - beta_start) * t / (total_steps - 1))
    out[-1] = beta_end
    return torch.tensor(out, dtype=torch.float64)


__all__ = [
    "assign_groups",
    "update_groups",
    "group_logits",
    "smog_loss",
    "smog_step",
    "smog_multihead_step",
    "spherical_kmeans",
    "momentum_update_",
    "beta_schedule",
]
