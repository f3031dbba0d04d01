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
    ns.__dict__.update(
        oracle=oracle, __builtins__=builtins, **replacements
    )  # C code imports via __builtins__
    mine = {oracle.__file__, __file__}
    for key, fn in list(ns.__dict__.items()):
        if isinstance(fn, types.FunctionType) and fn.__code__.co_filename in mine:
            new = types.FunctionType(
                fn.__code__, ns.__dict__, fn.__name__, fn.__defaults__, fn.__closure__
            )
            new.__kwdefaults__, new.__doc__ = fn.__kwdefaults__, fn.__doc__
            ns.__dict__[key] = new
    MUTANTS[name] = (mistake, catches)
    globals()[name] = ns
    return ns


# -- grouping -------------------------------------------------------------------------------------


def _update(
    groups,
    z,
    assign,
    beta,
    *,
    all_reduce=None,
    members="normalised",
    renormalise=True,
    empty="keep",
    combine="sums",
    beta_on="group",
    in_place=False,
    promote=True,
    accumulate="add",
    differentiable_reduce=True,
    round_back=True,
):
    """The oracle's update_groups with switches for the classic mistakes."""
    reduce = _sum_over_ranks(all_reduce)
    if (
        not differentiable_reduce
    ):  # dist.all_reduce in place: right values, autograd sees no reduction
        inner = reduce
        reduce = lambda t: t + (inner(t.detach()) - t).detach()  # noqa: E731
    K, D = groups.shape
    dt = _dtype(groups) if promote else groups.dtype
    sums = [torch.zeros(D, dtype=dt) for _ in range(K)]
    counts = [0.0] * K
    seen = [[] for _ in range(K)]
    for i in range(z.shape[0]):
        k = int(assign[i])
        v = normalise(z[i].to(dt)) if members == "normalised" else z[i].to(dt)
        if accumulate == "skip zero rows" and not z[i].any():
            continue
        if accumulate == "distinct" and any(torch.equal(v, w) for w in seen[k]):
            continue
        seen[k].append(v)
        if accumulate == "last wins":  # index_copy / index_put instead of index_add
            sums[k], counts[k] = v, 1.0
            continue
        sums[k] = sums[k] + v
        counts[k] += 1.0
    sums, local = torch.stack(sums), torch.tensor(counts, dtype=dt)
    if combine == "sums":
        sums, counts = reduce(sums), reduce(local)
        means = sums / counts.clamp_min(1).unsqueeze(1)
    elif combine == "local counts":  # sums reduced, counts forgotten
        sums, counts = reduce(sums), local
        means = sums / counts.clamp_min(1).unsqueeze(1)
        counts = reduce(local)
    else:  # average of per-rank means
        world = reduce(torch.ones((), dtype=dt))
        means = reduce(sums / local.clamp_min(1).unsqueeze(1)) / world
        counts = reduce(local)
    new = []
    for k in range(K):
        c_k = groups[k].to(dt)
        if float(counts[k]) > 0:
            v = (
                beta * c_k + (1 - beta) * means[k]
                if beta_on == "group"
                else (1 - beta) * c_k + beta * means[k]
            )
            new.append(normalise(v) if renormalise else v)
        else:
            new.append(c_k if empty == "keep" else torch.zeros_like(c_k))
    out = torch.stack(new).to(groups.dtype) if round_back else torch.stack(new)
    if in_place:
        groups.copy_(out)
        return groups
    return out


def _mk_update(**switches):
    def update_groups(groups, z, assign, beta, *, all_reduce=None):
        return _update(groups, z, assign, beta, all_reduce=all_reduce, **switches)

    return update_groups


_derive(
    "no_renormalise",
    "the momentum update is not renormalised",
    "G2, G3",
    update_groups=_mk_update(renormalise=False),
)
_derive(
    "empty_groups_zeroed",
    "groups without members are reset to zero",
    "G4",
    update_groups=_mk_update(empty="zero"),
)
_derive(
    "mean_of_rank_means",
    "per-rank means averaged instead of reducing sums and counts",
    "G5, G6",
    update_groups=_mk_update(combine="mean of means"),
)
_derive(
    "counts_not_reduced",
    "sums are all-reduced, counts are not",
    "G5",
    update_groups=_mk_update(combine="local counts"),
)
_derive(
    "raw_members",
    "raw (un-normalised) members averaged into unit groups",
    "G2, G8, S3",
    update_groups=_mk_update(members="raw"),
)
_derive(
    "beta_swapped",
    "beta and 1 - beta swapped",
    "G2, G7, S3",
    update_groups=_mk_update(beta_on="mean"),
)
_derive(
    "update_in_place",
    "update_groups writes into its input",
    "G10",
    update_groups=_mk_update(in_place=True),
)
_derive(
    "update_last_member_wins",
    "member sums written with index_copy: the last member of a group wins",
    "G9",
    update_groups=_mk_update(accumulate="last wins"),
)
_derive(
    "update_in_low_precision",
    "bf16/fp16 member sums accumulated in the input dtype",
    "G11",
    update_groups=_mk_update(promote=False),
)
_derive(
    "zero_rows_not_counted",
    "zero rows skipped (treated as padding) instead of counted in group 0",
    "G12",
    update_groups=_mk_update(accumulate="skip zero rows"),
)
_derive(
    "duplicates_counted_once",
    "a group's mean over its distinct members (a repeated sample counts once)",
    "S5",
    update_groups=_mk_update(accumulate="distinct"),
)
_derive(
    "update_not_rounded_back",
    "bf16/fp16 groups updated in float32 and returned in float32",
    "G13",
    update_groups=_mk_update(round_back=False),
)
_derive(
    "reduce_not_differentiable",
    "in-place all-reduce of the sums: gradient stays on its own rank",
    "L7",
    update_groups=_mk_update(differentiable_reduce=False),
)


def _assign_ties_last(z, groups):
    dt = _dtype(groups)
    out = []
    for i in range(z.shape[0]):
        zi = normalise(z[i].detach().to(dt))
        scores = [float(dot(zi, groups[k].detach().to(dt))) for k in range(groups.shape[0])]
        best = 0
        for k in range(1, len(scores)):
            if scores[k] >= scores[best]:  # >= keeps the *last* maximum
                best = k
        out.append(best)
    return torch.tensor(out, dtype=torch.long)


_derive(
    "ties_to_last_index",
    "assignment ties go to the highest index",
    "G1",
    assign_groups=_assign_ties_last,
)


def _assign_fp16_raw(z, groups):
    """Scores of the raw rows in float16 (autocast): tiny rows underflow to 0, huge ones overflow."""
    scores = z.detach().to(torch.float16) @ groups.detach().to(torch.float16).T
    return scores.float().nan_to_num(0.0).argmax(dim=1)


def _assign_chunk_tail_lost(z, groups, chunk=1 << 21):
    """The E-step in row chunks of 2^21 scores (smog._nearest's size); the last partial chunk is dropped
    and its rows left at 0."""
    dt = _dtype(groups)
    zn = torch.nn.functional.normalize(z.detach().to(dt), dim=-1)
    step = max(1, chunk // max(1, groups.shape[0]))
    out = torch.zeros(z.shape[0], dtype=torch.long)
    for lo in range(0, z.shape[0] - step + 1, step):
        out[lo : lo + step] = (zn[lo : lo + step] @ groups.detach().to(dt).T).argmax(1)
    if z.shape[0] < step:  # one partial chunk only: computed (small inputs are unaffected)
        out = (zn @ groups.detach().to(dt).T).argmax(1)
    return out


_derive(
    "assign_fp16_raw_scores",
    "assignment scores of raw rows computed in float16",
    "G8",
    assign_groups=_assign_fp16_raw,
)


# -- loss -----------------------------------------------------------------------------------------


def _logits_unnormalised_p(p, groups, tau):
    dt = _dtype(groups)
    return torch.stack(
        [
            torch.stack([dot(p[i].to(dt), groups[k].to(dt)) / tau for k in range(groups.shape[0])])
            for i in range(p.shape[0])
        ]
    )


def _logits_times_tau(p, groups, tau):
    return oracle.group_logits(p, groups, 1.0) * tau


def _logits_norm_detached(p, groups, tau):
    dt = _dtype(groups)
    pd = p.to(dt)
    return (pd / pd.norm(dim=1, keepdim=True).detach().clamp_min(1e-12)) @ groups.to(dt).T / tau


def _logits_low_precision(p, groups, tau):
    return torch.nn.functional.normalize(p, dim=-1) @ groups.T / tau


def _loss_softmax_over_batch(p, groups, targets, tau):
    logp = torch.log_softmax(group_logits(p, groups, tau), dim=0)  # noqa: F821 - over samples, not groups
    return -logp.gather(1, targets.view(-1, 1)).mean()


_derive(
    "p_not_normalised",
    "logits use the raw prediction p",
    "L1, L3",
    group_logits=_logits_unnormalised_p,
)
_derive(
    "norm_of_p_detached",
    "p / ||p||.detach(): right logits, gradient without the projection",
    "L2",
    group_logits=_logits_norm_detached,
)
_derive(
    "softmax_over_batch",
    "log-softmax taken over the samples instead of the groups",
    "L4",
    smog_loss=_loss_softmax_over_batch,
)
_derive(
    "logits_in_low_precision",
    "logits computed in the inputs' bf16/fp16",
    "L8",
    group_logits=_logits_low_precision,
)
_derive(
    "tau_multiplies",
    "logits multiplied by tau instead of divided",
    "L1",
    group_logits=_logits_times_tau,
)


def _logits_float64(p, groups, tau):
    return oracle.group_logits(p.double(), groups.double(), tau)


_derive(
    "logits_always_float64",
    "logits computed and returned in float64 whatever the inputs",
    "L9",
    group_logits=_logits_float64,
)


# -- step -----------------------------------------------------------------------------------------


def _step(
    groups,
    z_update,
    z_target,
    p,
    beta,
    tau,
    *,
    all_reduce=None,
    group_grad=False,
    targets_from="old",
    loss_groups="new",
    detach="auto",
    average="all",
    pass_reduce=True,
    normalise_targets_in_place=False,
    detach_groups=True,
    targets_dtype=torch.long,
):
    if (
        normalise_targets_in_place
    ):  # a no-grad momentum output, so "why not" -- but it is the caller's tensor
        z_target.div_(z_target.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    if not pass_reduce:
        all_reduce = lambda t: t  # noqa: E731 - the step forgets to hand all_reduce to update_groups
    old = groups.detach() if detach_groups else groups
    J, C = z_target.shape[0], p.shape[0]
    a = assign_groups(z_update, old)  # noqa: F821 - resolved in the mutant's namespace
    leak = group_grad if detach == "auto" else detach == "never"
    new = update_groups(
        old,
        z_update if leak else z_update.detach(),
        a,
        beta,  # noqa: F821
        all_reduce=all_reduce,
    )
    if not leak and detach_groups:
        new = new.detach()
    tg = old if targets_from == "old" else new.detach()
    targets = torch.stack([assign_groups(z_target[j], tg) for j in range(J)]).to(targets_dtype)  # noqa: F821
    lg = new if loss_groups == "new" else old
    total = 0.0
    for c in range(C):
        for j in range(J):
            total = total + smog_loss(p[c], lg, targets[j], tau)  # noqa: F821
    if average == "per sample sum":
        total = total * z_update.shape[0]
    return (total / (C * J) if average != "none" else total), new, targets


def _mk_step(**switches):
    def smog_step(groups, z_update, z_target, p, beta, tau, *, all_reduce=None, group_grad=False):
        return _step(
            groups,
            z_update,
            z_target,
            p,
            beta,
            tau,
            all_reduce=all_reduce,
            group_grad=group_grad,
            **switches,
        )

    return smog_step


_derive(
    "targets_after_update",
    "targets computed with the updated groups",
    "S1",
    smog_step=_mk_step(targets_from="new"),
)
_derive(
    "loss_with_old_groups",
    "loss computed with the groups before the update",
    "S2",
    smog_step=_mk_step(loss_groups="old"),
)
_derive(
    "loss_summed_over_crops",
    "loss summed over (crop, target) pairs instead of averaged",
    "S2",
    smog_step=_mk_step(average="none"),
)
_derive(
    "gradient_leaks_through_groups",
    "group_grad=False still lets gradient through the update",
    "L5",
    smog_step=_mk_step(detach="never"),
)
_derive(
    "group_grad_ignored",
    "group_grad=True still detaches the update",
    "L6",
    smog_step=_mk_step(detach="always"),
)
_derive(
    "loss_summed_over_samples",
    "loss summed over the batch (reduction='sum') instead of averaged",
    "S4",
    smog_step=_mk_step(average="per sample sum"),
)
_derive(
    "all_reduce_not_passed_down",
    "smog_step does not hand all_reduce to update_groups",
    "S6",
    smog_step=_mk_step(pass_reduce=False),
)
_derive(
    "targets_int32",
    "smog_step returns its targets as int32",
    "S8",
    smog_step=_mk_step(targets_dtype=torch.int32),
)
_derive(
    "targets_normalised_in_place",
    "smog_step normalises z_target in place",
    "S7",
    smog_step=_mk_step(normalise_targets_in_place=True),
)


# -- heads ----------------------------------------------------------------------------------------


def _multihead(
    groups,
    z,
    z_target,
    p,
    beta,
    tau,
    *,
    all_reduce=None,
    group_grad=False,
    crop="h mod 2",
    update_from="z",
    targets_head="own",
    combine="mean",
    in_place=False,
    step_switches=None,
    crop_check="ValueError",
):
    if crop_check == "assert":
        assert z.shape[0] >= 2, "pass at least 2 online crops"
    elif z.shape[0] < 2:
        raise ValueError(
            "smog_multihead_step: head h updates from global crop h mod 2; pass at least 2 crops"
        )

    def step(*args, **kw):
        if step_switches:
            return _step(*args, **kw, **step_switches)
        return smog_step(*args, **kw)  # noqa: F821 - resolved in the mutant's namespace

    total, new, targets = 0.0, [], []
    for h in range(groups.shape[0]):
        c = h % 2 if crop == "h mod 2" else 0
        src = {"z": z, "p": p, "z_target": z_target}[update_from]
        loss, g, t = step(
            groups[h],
            src[c % src.shape[0]],
            z_target,
            p,
            beta,
            tau,
            all_reduce=all_reduce,
            group_grad=group_grad,
        )
        if targets_head == "head 0" and h > 0:
            t = targets[0]
            loss = sum(
                smog_loss(p[ci], g, t[j], tau)
                for ci in range(p.shape[0])  # noqa: F821
                for j in range(t.shape[0])
            ) / (p.shape[0] * t.shape[0])
        if in_place:
            groups[h].copy_(g.detach())
        total = total + loss
        new.append(g)
        targets.append(t)
    return (
        (total / groups.shape[0] if combine == "mean" else total),
        torch.stack(new),
        torch.stack(targets),
    )


def _mk_heads(**switches):
    def smog_multihead_step(
        groups, z, z_target, p, beta, tau, *, all_reduce=None, group_grad=False
    ):
        return _multihead(
            groups,
            z,
            z_target,
            p,
            beta,
            tau,
            all_reduce=all_reduce,
            group_grad=group_grad,
            **switches,
        )

    return smog_multihead_step


_derive(
    "heads_summed",
    "losses of the heads summed instead of averaged",
    "H1",
    smog_multihead_step=_mk_heads(combine="sum"),
)
_derive(
    "heads_all_from_crop0",
    "every head updates from online crop 0",
    "H2",
    smog_multihead_step=_mk_heads(crop="0"),
)
_derive(
    "heads_update_from_predictions",
    "groups updated from the predictor output p",
    "H2",
    smog_multihead_step=_mk_heads(update_from="p"),
)
_derive(
    "heads_update_from_momentum",
    "groups updated from the momentum embeddings",
    "H2",
    smog_multihead_step=_mk_heads(update_from="z_target"),
)
_derive(
    "heads_share_targets_of_head0",
    "every head's targets computed with head 0's groups",
    "H3",
    smog_multihead_step=_mk_heads(targets_head="head 0"),
)
_derive(
    "groups_trained",
    "incoming groups not detached: the optimiser trains them",
    "H4",
    smog_multihead_step=_mk_heads(step_switches=dict(detach_groups=False)),
)
_derive(
    "heads_assert_crops",
    "fewer than two online crops fail an assert (AssertionError, not ValueError)",
    "H6",
    smog_multihead_step=_mk_heads(crop_check="assert"),
)
_derive(
    "heads_update_buffer_in_loop",
    "each head writes its new groups into the input inside the loop",
    "H5",
    smog_multihead_step=_mk_heads(in_place=True),
)


# -- k-means --------------------------------------------------------------------------------------


def _assign_farthest(x, centres):
    return torch.cdist(torch.nn.functional.normalize(x.double(), dim=-1), centres.double()).argmax(
        dim=1
    )


def _kmeans(
    x,
    k,
    iters=10,
    *,
    generator=None,
    all_reduce=None,
    broadcast=None,
    init="rank0",
    mstep="reduced",
    empty="keep",
    normalise_x=True,
    final_estep=True,
    check_rows=True,
    estep="nearest",
    centre="normalised",
    row_error=ValueError,
):
    reduce, bcast = _sum_over_ranks(all_reduce), _rank0(broadcast)
    assign = assign_groups if estep == "nearest" else _assign_farthest  # noqa: F821
    dt = _dtype(x)
    N, D = x.shape
    rows = [normalise(x[i].to(dt)) if normalise_x else x[i].to(dt) for i in range(N)]
    if int(reduce(torch.tensor([float(N)], dtype=torch.float64)).item()) < k and check_rows:
        raise row_error("fewer rows than k")
    if init == "with replacement":
        idx = torch.randint(0, N, (k,), generator=generator)
    elif init == "last k":  # k distinct rows, seeded: SMoG, but not the reference's draw
        idx = torch.randperm(N, generator=generator)[-k:] if N >= k else torch.arange(N)
    elif init == "global rng":
        idx = torch.randperm(N)[:k] if N >= k else torch.arange(N)
    else:
        idx = torch.randperm(N, generator=generator)[:k] if N >= k else torch.arange(N)
    centres = torch.stack([rows[int(i)] for i in idx]) if N >= k else torch.zeros(k, D, dtype=dt)
    if init != "local":
        centres = bcast(centres)
    a = assign(x, centres)
    for _ in range(iters):
        a = assign(x, centres)
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
                new.append(normalise(sums[j]) if centre == "normalised" else sums[j] / counts[j])
            elif empty == "keep":
                new.append(centres[j])
            else:  # re-seed with the row farthest from its centre
                far = min(range(N), key=lambda i: float(dot(rows[i], centres[int(a[i])])))
                new.append(rows[far])
        centres = torch.stack(new)
    if final_estep:
        a = assign(x, centres)
    return centres, a


def _mk_kmeans(**switches):
    def spherical_kmeans(x, k, iters=10, *, generator=None, all_reduce=None, broadcast=None):
        return _kmeans(
            x, k, iters, generator=generator, all_reduce=all_reduce, broadcast=broadcast, **switches
        )

    return spherical_kmeans


_derive(
    "kmeans_centres_not_shared",
    "each rank draws its own initial centres",
    "K1, K6",
    spherical_kmeans=_mk_kmeans(init="local"),
)
_derive(
    "kmeans_local_mstep",
    "the M-step uses this rank's members only",
    "K6",
    spherical_kmeans=_mk_kmeans(mstep="local"),
)
_derive(
    "kmeans_init_with_replacement",
    "initial centres drawn with replacement",
    "K1",
    spherical_kmeans=_mk_kmeans(init="with replacement"),
)
_derive(
    "kmeans_empty_reseeded",
    "empty clusters re-seeded with the farthest row",
    "K3",
    spherical_kmeans=_mk_kmeans(empty="reseed"),
)
_derive(
    "kmeans_rows_not_normalised",
    "k-means on raw rows",
    "K1, K8",
    spherical_kmeans=_mk_kmeans(normalise_x=False),
)
_derive(
    "kmeans_stale_assignment",
    "returns the assignment from before the last M-step",
    "K2",
    spherical_kmeans=_mk_kmeans(final_estep=False),
)
_derive(
    "kmeans_farthest_centre",
    "E-step takes the argmax of the distance (cdist) instead of the argmin",
    "K4",
    spherical_kmeans=_mk_kmeans(estep="farthest"),
)
_derive(
    "kmeans_mean_not_normalised",
    "M-step centre is the plain mean of the members",
    "K5",
    spherical_kmeans=_mk_kmeans(centre="mean"),
)
_derive(
    "kmeans_global_rng",
    "initial draw from the global RNG, the generator ignored",
    "K7",
    spherical_kmeans=_mk_kmeans(init="global rng"),
)
_derive(
    "kmeans_no_row_check",
    "fewer rows than k not checked (zero centres padded in)",
    "K9",
    spherical_kmeans=_mk_kmeans(check_rows=False),
)
_derive(
    "kmeans_assert_rows",
    "fewer rows than k fail an assert (AssertionError, not ValueError)",
    "K10",
    spherical_kmeans=_mk_kmeans(row_error=AssertionError),
)
_derive(
    "kmeans_draw_last_k",
    "initial rows: the last k of randperm(N) (SMoG, not the reference's draw)",
    "K11",
    spherical_kmeans=_mk_kmeans(init="last k"),
)
_derive(
    "estep_chunk_tail_lost",
    "E-step in row chunks whose last partial chunk is dropped",
    "K2, K3",
    assign_groups=_assign_chunk_tail_lost,
)


# -- run ------------------------------------------------------------------------------------------


def _regroup(
    bank,
    index,
    n,
    n_heads,
    k,
    iters=10,
    *,
    generator=None,
    init_index=None,
    all_reduce=None,
    row="h mod 2",
    draw="per head",
    start="dataset index",
    gather="reduce",
):
    """The oracle's regroup with switches for the classic mistakes."""
    reduce = _sum_over_ranks(all_reduce)
    if init_index is None:
        if draw == "shared":  # one draw for all heads: heads 0 and 2 become identical
            init_index = oracle.initial_indices(n, 1, k, generator).expand(n_heads, k)
        elif draw == "last k":  # k distinct indices per head, but not the reference's bits
            init_index = torch.stack(
                [torch.randperm(n, generator=generator)[-k:] for _ in range(n_heads)]
            )
        else:
            init_index = oracle.initial_indices(n, n_heads, k, generator)
    here = {int(i): r for r, i in enumerate(index)}
    heads = []
    for h in range(n_heads):
        x = bank[0 if row == "0" else h % 2]
        if start == "rank 0's shard":  # K1's sharded draw: rank 0's local rows, broadcast
            heads.append(
                spherical_kmeans(x, k, iters, generator=generator, all_reduce=all_reduce)[0]
            )  # noqa: F821
            continue
        dt = _dtype(x)
        rows = [normalise(x[r].to(dt)) for r in range(x.shape[0])]
        if start == "local position":  # init_index read as positions in this rank's bank
            first = [
                rows[int(i)] if int(i) < len(rows) else torch.zeros(x.shape[1], dtype=dt)
                for i in init_index[h]
            ]
        else:
            first = [
                rows[here[int(i)]] if int(i) in here else torch.zeros(x.shape[1], dtype=dt)
                for i in init_index[h]
            ]
        first = torch.stack(first)
        centres, _ = _lloyd(x, rows, reduce(first) if gather == "reduce" else first, iters, reduce)  # noqa: F821
        heads.append(centres)
    return torch.stack(heads)


def _mk_regroup(**switches):
    def regroup(
        bank, index, n, n_heads, k, iters=10, *, generator=None, init_index=None, all_reduce=None
    ):
        return _regroup(
            bank,
            index,
            n,
            n_heads,
            k,
            iters,
            generator=generator,
            init_index=init_index,
            all_reduce=all_reduce,
            **switches,
        )

    return regroup


_derive(
    "regroup_row0_every_head", "every head clusters bank row 0", "R1", regroup=_mk_regroup(row="0")
)
_derive(
    "regroup_by_local_position",
    "initial rows taken by local position, not dataset index",
    "R2, R3, R4",
    regroup=_mk_regroup(start="local position"),
)
_derive(
    "regroup_shared_draw",
    "one initial draw shared by all heads (heads 0 and 2 identical)",
    "R3",
    regroup=_mk_regroup(draw="shared"),
)
_derive(
    "regroup_rank0_shard",
    "initial centres drawn from rank 0's shard (K1's sharded draw)",
    "R2, R3, R4",
    regroup=_mk_regroup(start="rank 0's shard"),
)
_derive(
    "regroup_not_gathered",
    "initial rows not all-reduced: each rank starts from its own rows only",
    "R4",
    regroup=_mk_regroup(gather="local"),
)
_derive(
    "regroup_last_k",
    "each head draws the last k of randperm(n) (SMoG, not the reference's draw)",
    "R5",
    regroup=_mk_regroup(draw="last k"),
)


# -- momentum -------------------------------------------------------------------------------------


@torch.no_grad()
def _ema_swapped(target, online, m):
    for tk, tq in zip(target, online):
        tk.copy_((1 - m) * tk + m * tq)


@torch.no_grad()
def _ema_rebinds(target, online, m):
    for tk, tq in zip(target, online):
        tk = m * tk + (1 - m) * tq  # noqa: F841 - rebinds the loop name, the parameter never changes


@torch.no_grad()
def _ema_by_difference(target, online, m):
    for tk, tq in zip(target, online):
        tk.copy_(
            tk + (1 - m) * (tq - tk)
        )  # the same in exact arithmetic; m = 0 no longer copies exactly


def _schedule_off_by_one(beta_start, beta_end, total_steps):
    t = torch.arange(total_steps, dtype=torch.float64)
    return beta_start + (beta_end - beta_start) * t / total_steps


def _schedule_float32(beta_start, beta_end, total_steps):
    return torch.linspace(beta_start, beta_end, total_steps, dtype=torch.float32).double()


_derive("ema_swapped", "m and 1 - m swapped in the EMA", "M1, M4", momentum_update_=_ema_swapped)
_derive(
    "ema_not_in_place",
    "the EMA rebinds a name instead of writing the parameter",
    "M1",
    momentum_update_=_ema_rebinds,
)
_derive(
    "ema_by_difference",
    "EMA written as theta_k + (1 - m)(theta_q - theta_k)",
    "M2",
    momentum_update_=_ema_by_difference,
)
_derive(
    "beta_schedule_off_by_one",
    "schedule divides by T instead of T - 1 (never reaches beta_end)",
    "M3",
    beta_schedule=_schedule_off_by_one,
)
_derive(
    "beta_schedule_float32",
    "schedule built in float32 (0.99 is not hit exactly)",
    "M5",
    beta_schedule=_schedule_float32,
)
