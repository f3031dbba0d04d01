"""smogx (spec/examples/smogx.py) in the spec protocol: `python -m spec --impl spec.examples.smogx_adapter`."""

from spec.examples import smogx

SPEC_DECLARES = {"replicated_kmeans": "cluster_bank clusters a bank every rank holds whole"}


def assign_groups(z, groups):
    return smogx.nearest_prototype(z, groups)


def update_groups(
    groups, z, assign, beta, *, all_reduce=None
):  # smogx calls torch.distributed itself
    return smogx.momentum_step(groups, z, assign, beta)


def group_logits(p, groups, tau):
    return smogx.prototype_logits(p, groups, tau)


def smog_loss(p, groups, targets, tau):
    return smogx.prototype_loss(p, groups, targets, tau)


def smog_step(groups, z_update, z_target, p, beta, tau, *, all_reduce=None, group_grad=False):
    return smogx.train_step(
        groups, z_update, z_target, p, beta=beta, temperature=tau, group_grad=group_grad
    )


def smog_multihead_step(groups, z, z_target, p, beta, tau, *, all_reduce=None, group_grad=False):
    return smogx.multi_head_step(
        groups, z, z_target, p, beta=beta, temperature=tau, group_grad=group_grad
    )


def spherical_kmeans(x, k, iters=10, *, generator=None, all_reduce=None, broadcast=None):
    return smogx.cluster_bank(x, k, iters, generator=generator)


def momentum_update_(target, online, m):
    smogx.ema_(target, online, m)


def beta_schedule(beta_start, beta_end, total_steps):
    return smogx.beta_schedule(beta_start, beta_end, total_steps)


def regroup(
    bank, index, n, n_heads, k, iters=10, *, generator=None, init_index=None, all_reduce=None
):
    return smogx.regroup_heads(
        bank, index, n, n_heads, k, iters, generator=generator, init_index=init_index
    )
