"""Deliberately wrong implementations of the protocol, each one realistic mistake.

Every mutant is the oracle with one function replaced (the others are rebound to the mutant, so
`smog_step` composes the mutated `update_groups`, for example). The suite must fail on every one:

    SMOG_IMPL=spec.mutants:no_renormalise pytest spec     # one mutant, see which tests catch it
    SMOG_IMPL=spec.oracle pytest spec/test_mutants.py     # all of them, the kill-rate check

MUTANTS maps each name to (the mistake, the invariant that should catch it).
"""
from __future__ import annotations

import builtins
import types

import torch

from spec import oracle
from spec.oracle import _dtype, _rank0, _sum_over_ranks, dot, normalise

MUTANTS: dict = {}


def _derive(name: str, mistake: str, catches: str, **replacements):
    """A module-like copy of the oracle plus this file's helpers and `replacements`; every function
    written in oracle.py or here is rebound to look its globals up in the copy."""
    ns = types.ModuleType(f"spec.mutants:{name}", f"{mistake} (should fail {catches})")
    ns.__dict__.update({k: v for k, v in vars(oracle).items() if not k.startswith("__")})
    ns.__dict__.update({k: v for k, v in globals().items() if k.startswith("_") and callable(v)})
    ns.__dict__.update(oracle=oracle, __builtins__=builtins, **replacements)  # C code imports via __builtins__
    mine = {oracle.__file__, __file__}
    for key, fn in list(ns.__dict__.items()):
        if isinstance(fn, types.FunctionType) and fn.__code__.co_filename in mine:
            new = types.FunctionType(fn.__code__, ns.__dict__, fn.__name__, fn.__defaults__, fn.__closure__)
            new.__kwdefaults__, new.__doc__ = fn.__kwdefaults__, fn.__doc__
            ns.__dict__[key] = new
    MUTANTS[name] = (mistake, catches)
    globals()[name] = ns
    return ns


# -- grouping -------------------------------------------------------------------------------------

def _update(groups, z, assign, beta, *, all_reduce=None, members="normalised", renormalise=True,
            empty="keep", combine="sums", beta_on="group", in_place=False):
    """The oracle's update_groups with switches for the classic mistakes."""
    reduce = _sum_over_ranks(all_reduce)
    K, D = groups.shape
    dt = _dtype(groups)
    sums = [torch.zeros(D, dtype=dt) for _ in range(K)]
    counts = [0.0] * K
    for i in range(z.shape[0]):
        k = int(assign[i])
        sums[k] = sums[k] + (normalise(z[i].to(dt)) if members == "normalised" else z[i].to(dt))
        counts[k] += 1.0
    sums, local = torch.stack(sums), torch.tensor(counts, dtype=dt)
    if combine == "sums":
        sums, counts = reduce(sums), reduce(local)
        means = sums / counts.clamp_min(1).unsqueeze(1)
    elif combine == "local counts":            # sums reduced, counts forgotten
        sums, counts = reduce(sums), local
        means = sums / counts.clamp_min(1).unsqueeze(1)
        counts = reduce(local)
    else:                                      # average of per-rank means
        world = reduce(torch.ones((), dtype=dt))
        means = reduce(sums / local.clamp_min(1).unsqueeze(1)) / world
        counts = reduce(local)
    new = []
    for k in range(K):
        c_k = groups[k].to(dt)
        if float(counts[k]) > 0:
            v = beta * c_k + (1 - beta) * means[k] if beta_on == "group" else (1 - beta) * c_k + beta * means[k]
            new.append(normalise(v) if renormalise else v)
        else:
            new.append(c_k if empty == "keep" else torch.zeros_like(c_k))
    out = torch.stack(new).to(groups.dtype)
    if in_place:
        groups.copy_(out)
        return groups
    return out


def _mk_update(**switches):
    def update_groups(groups, z, assign, beta, *, all_reduce=None):
        return _update(groups, z, assign, beta, all_reduce=all_reduce, **switches)
    return update_groups


_derive("no_renormalise", "the momentum update is not renormalised", "G2, G3",
        update_groups=_mk_update(renormalise=False))
_derive("empty_groups_zeroed", "groups without members are reset to zero", "G4",
        update_groups=_mk_update(empty="zero"))
_derive("mean_of_rank_means", "per-rank means averaged instead of reducing sums and counts", "G5, G6",
        update_groups=_mk_update(combine="mean of means"))
_derive("counts_not_reduced", "sums are all-reduced, counts are not", "G5",
        update_groups=_mk_update(combine="local counts"))
_derive("raw_members", "raw (un-normalised) members averaged into unit groups", "G2, G8",
        update_groups=_mk_update(members="raw"))
_derive("beta_swapped", "beta and 1 - beta swapped", "G2, G7",
        update_groups=_mk_update(beta_on="mean"))
_derive("update_in_place", "update_groups writes into its input", "G10",
        update_groups=_mk_update(in_place=True))


def _assign_ties_last(z, groups):
    dt = _dtype(groups)
    out = []
    for i in range(z.shape[0]):
        zi = normalise(z[i].detach().to(dt))
        scores = [float(dot(zi, groups[k].detach().to(dt))) for k in range(groups.shape[0])]
        best = 0
        for k in range(1, len(scores)):
            if scores[k] >= scores[best]:   # >= keeps the *last* maximum
                best = k
        out.append(best)
    return torch.tensor(out, dtype=torch.long)


_derive("ties_to_last_index", "assignment ties go to the highest index", "G1", assign_groups=_assign_ties_last)


# -- loss -----------------------------------------------------------------------------------------

def _logits_unnormalised_p(p, groups, tau):
    dt = _dtype(groups)
    return torch.stack([torch.stack([dot(p[i].to(dt), groups[k].to(dt)) / tau for k in range(groups.shape[0])])
                        for i in range(p.shape[0])])


def _logits_times_tau(p, groups, tau):
    return oracle.group_logits(p, groups, 1.0) * tau


_derive("p_not_normalised", "logits use the raw prediction p", "L1, L3", group_logits=_logits_unnormalised_p)
_derive("tau_multiplies", "logits multiplied by tau instead of divided", "L1", group_logits=_logits_times_tau)


# -- step -----------------------------------------------------------------------------------------

def _step(groups, z_update, z_target, p, beta, tau, *, all_reduce=None, group_grad=False,
          targets_from="old", loss_groups="new", detach="auto", average="all"):
    old = groups.detach()
    J, C = z_target.shape[0], p.shape[0]
    a = assign_groups(z_update, old)  # noqa: F821 - resolved in the mutant's namespace
    leak = group_grad if detach == "auto" else detach == "never"
    new = update_groups(old, z_update if leak else z_update.detach(), a, beta,  # noqa: F821
                        all_reduce=all_reduce)
    if not leak:
        new = new.detach()
    tg = old if targets_from == "old" else new.detach()
    targets = torch.stack([assign_groups(z_target[j], tg) for j in range(J)])  # noqa: F821
    lg = new if loss_groups == "new" else old
    total = 0.0
    for c in range(C):
        for j in range(J):
            total = total + smog_loss(p[c], lg, targets[j], tau)  # noqa: F821
    return (total / (C * J) if average == "all" else total), new, targets


def _mk_step(**switches):
    def smog_step(groups, z_update, z_target, p, beta, tau, *, all_reduce=None, group_grad=False):
        return _step(groups, z_update, z_target, p, beta, tau, all_reduce=all_reduce, group_grad=group_grad,
                     **switches)
    return smog_step


_derive("targets_after_update", "targets computed with the updated groups", "S1",
        smog_step=_mk_step(targets_from="new"))
_derive("loss_with_old_groups", "loss computed with the groups before the update", "S2",
        smog_step=_mk_step(loss_groups="old"))
_derive("loss_summed_over_crops", "loss summed over (crop, target) pairs instead of averaged", "S2",
        smog_step=_mk_step(average="none"))
_derive("gradient_leaks_through_groups", "group_grad=False still lets gradient through the update", "L5",
        smog_step=_mk_step(detach="never"))
_derive("group_grad_ignored", "group_grad=True still detaches the update", "L6",
        smog_step=_mk_step(detach="always"))


# -- k-means --------------------------------------------------------------------------------------

def _kmeans(x, k, iters=10, *, generator=None, all_reduce=None, broadcast=None, init="rank0", mstep="reduced",
            empty="keep", normalise_x=True, final_estep=True):
    reduce, bcast = _sum_over_ranks(all_reduce), _rank0(broadcast)
    dt = _dtype(x)
    N, D = x.shape
    rows = [normalise(x[i].to(dt)) if normalise_x else x[i].to(dt) for i in range(N)]
    if int(reduce(torch.tensor([float(N)], dtype=torch.float64)).item()) < k:
        raise ValueError("fewer rows than k")
    if init == "with replacement":
        idx = torch.randint(0, N, (k,), generator=generator)
    else:
        idx = torch.randperm(N, generator=generator)[:k] if N >= k else torch.arange(N)
    centres = torch.stack([rows[int(i)] for i in idx]) if N >= k else torch.zeros(k, D, dtype=dt)
    if init != "local":
        centres = bcast(centres)
    a = assign_groups(x, centres)  # noqa: F821
    for _ in range(iters):
        a = assign_groups(x, centres)  # noqa: F821
        sums = [torch.zeros(D, dtype=dt) for _ in range(k)]
        counts = [0.0] * k
        for i in range(N):
            sums[int(a[i])] = sums[int(a[i])] + rows[i]
            counts[int(a[i])] += 1.0
        sums, counts = torch.stack(sums), torch.tensor(counts, dtype=dt)
        if mstep == "reduced":
            sums, counts = reduce(sums), reduce(counts)
        new = []
        for j in range(k):
            if float(counts[j]) > 0:
                new.append(normalise(sums[j]))
            elif empty == "keep":
                new.append(centres[j])
            else:   # re-seed with the row farthest from its centre
                far = min(range(N), key=lambda i: float(dot(rows[i], centres[int(a[i])])))
                new.append(rows[far])
        centres = torch.stack(new)
    if final_estep:
        a = assign_groups(x, centres)  # noqa: F821
    return centres, a


def _mk_kmeans(**switches):
    def spherical_kmeans(x, k, iters=10, *, generator=None, all_reduce=None, broadcast=None):
        return _kmeans(x, k, iters, generator=generator, all_reduce=all_reduce, broadcast=broadcast, **switches)
    return spherical_kmeans


_derive("kmeans_centres_not_shared", "each rank draws its own initial centres", "K1, K6",
        spherical_kmeans=_mk_kmeans(init="local"))
_derive("kmeans_local_mstep", "the M-step uses this rank's members only", "K6",
        spherical_kmeans=_mk_kmeans(mstep="local"))
_derive("kmeans_init_with_replacement", "initial centres drawn with replacement", "K1",
        spherical_kmeans=_mk_kmeans(init="with replacement"))
_derive("kmeans_empty_reseeded", "empty clusters re-seeded with the farthest row", "K3",
        spherical_kmeans=_mk_kmeans(empty="reseed"))
_derive("kmeans_rows_not_normalised", "k-means on raw rows", "K1, K8",
        spherical_kmeans=_mk_kmeans(normalise_x=False))
_derive("kmeans_stale_assignment", "returns the assignment from before the last M-step", "K2",
        spherical_kmeans=_mk_kmeans(final_estep=False))


# -- momentum -------------------------------------------------------------------------------------

@torch.no_grad()
def _ema_swapped(target, online, m):
    for tk, tq in zip(target, online):
        tk.copy_((1 - m) * tk + m * tq)


@torch.no_grad()
def _ema_rebinds(target, online, m):
    for tk, tq in zip(target, online):
        tk = m * tk + (1 - m) * tq   # noqa: F841 - rebinds the loop name, the parameter never changes


def _schedule_off_by_one(beta_start, beta_end, total_steps):
    t = torch.arange(total_steps, dtype=torch.float64)
    return beta_start + (beta_end - beta_start) * t / total_steps


def _schedule_float32(beta_start, beta_end, total_steps):
    return torch.linspace(beta_start, beta_end, total_steps, dtype=torch.float32).double()


_derive("ema_swapped", "m and 1 - m swapped in the EMA", "M1, M4", momentum_update_=_ema_swapped)
_derive("ema_not_in_place", "the EMA rebinds a name instead of writing the parameter", "M1",
        momentum_update_=_ema_rebinds)
_derive("beta_schedule_off_by_one", "schedule divides by T instead of T - 1 (never reaches beta_end)", "M3",
        beta_schedule=_schedule_off_by_one)
_derive("beta_schedule_float32", "schedule built in float32 (0.99 is not hit exactly)", "M3",
        beta_schedule=_schedule_float32)
