"""The adapter of the NumPy port smognp (spec/examples/smognp.py): the protocol of spec/README.md,
translated and nothing else.

Two faces of the same port:
- this module: with the gradient bridge. Each function with a gradient is a torch.autograd.Function
  whose forward converts tensors to arrays and calls the port, and whose backward calls the port's
  own VJP (the `vjp` the port returns with its value). The derivatives are the port's; the bridge
  only carries them to torch. `python -m spec --impl spec.examples.smognp_adapter`
- `plain`: the same conversions without the bridge (values only).
  `python -m spec --impl spec.examples.smognp_adapter:plain`: every value claim is judged, the
  gradient claims read "not implemented (no autograd)".

Translation only: tensors <-> arrays (bf16, which NumPy lacks, goes over exactly upcast to float32 and
comes back rounded once to the caller's dtype, as the protocol's update returns it); the harness's
collectives wrapped for arrays; a torch.Generator turned into a seed for the port's NumPy generator
(one draw from it, so the same generator state gives the same seed). The port draws its k-means and
regroup starts with NumPy, not torch.randperm, and declares so: the contract's tests of the
reference's own draw (K11, R5) read "n/a (declared)".
"""

from __future__ import annotations

import types

import numpy as np
import torch

from spec.examples import smognp

SPEC_DECLARES = {
    "own_random_draw": "k-means and regroup starts are drawn with numpy.random.default_rng"
}


def _np(t):
    t = torch.as_tensor(t).detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()


def _t(a):
    a = np.asarray(a)
    return torch.from_numpy(a if a.flags.c_contiguous else a.copy())


def _coll(fn):
    """A protocol collective (torch tensors) as the port's (arrays); None stays None (the identity)."""
    return None if fn is None else (lambda a: _np(fn(_t(a))))


def _seed(generator):
    return int(torch.randint(0, 2**62, (1,), generator=generator))


# -- values (both faces) ---------------------------------------------------------------------------


def assign_groups(z, groups):
    return _t(smognp.assign(_np(z), _np(groups)))


def update_groups(groups, z, assign, beta, *, all_reduce=None):
    new, _ = smognp.update(
        _np(groups), _np(z), _np(assign).astype(np.int64), beta, _coll(all_reduce)
    )
    return _t(new).to(groups.dtype)


def group_logits(p, groups, tau):
    return _t(smognp.logits(_np(p), _np(groups), tau))


def spherical_kmeans(x, k, iters=10, *, generator=None, all_reduce=None, broadcast=None):
    c, a = smognp.kmeans(_np(x), k, iters, _seed(generator), _coll(all_reduce), _coll(broadcast))
    return _t(c).to(x.dtype), _t(a)


def regroup(
    bank, index, n, n_heads, k, iters=10, *, generator=None, init_index=None, all_reduce=None
):
    init = None if init_index is None else _np(init_index)
    return _t(
        smognp.regroup(
            _np(bank), _np(index), n, n_heads, k, iters, _seed(generator), init, _coll(all_reduce)
        )
    ).to(bank.dtype)


def momentum_update_(target, online, m):
    smognp.ema_(
        [t.detach().numpy() for t in target], [_np(t) for t in online], m
    )  # views: in place


def beta_schedule(beta_start, beta_end, total_steps):
    return _t(smognp.beta_schedule(beta_start, beta_end, total_steps))


# -- the gradient bridge ---------------------------------------------------------------------------


class _Loss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, groups, targets, tau):
        value, ctx.vjp = smognp.loss(_np(p), _np(groups), _np(targets), tau)
        ctx.dtypes = p.dtype, groups.dtype
        return _t(value)

    @staticmethod
    def backward(ctx, d):
        dp, dg = ctx.vjp(_np(d))
        return _t(dp).to(ctx.dtypes[0]), _t(dg).to(ctx.dtypes[1]), None, None


class _Step(torch.autograd.Function):
    """One head (heads=False) or all heads: outputs (loss, new groups, targets); the incoming groups
    and the targets get no gradient; new groups carry one only with group_grad=True."""

    @staticmethod
    def forward(ctx, groups, z, z_target, p, beta, tau, all_reduce, group_grad, heads):
        fn = smognp.multihead_step if heads else smognp.step
        (loss, new, targets), ctx.vjp = fn(
            _np(groups), _np(z), _np(z_target), _np(p), beta, tau, _coll(all_reduce), group_grad
        )
        ctx.group_grad, ctx.dtypes = group_grad, (z.dtype, p.dtype)
        new, targets = _t(new).to(groups.dtype), _t(targets)
        ctx.mark_non_differentiable(targets)
        if not group_grad:
            ctx.mark_non_differentiable(new)
        return _t(loss), new, targets

    @staticmethod
    def backward(ctx, dloss, dnew, _):
        dz, dp = ctx.vjp(_np(dloss), _np(dnew) if ctx.group_grad else None)
        dz = None if dz is None else _t(dz).to(ctx.dtypes[0])
        return None, dz, None, _t(dp).to(ctx.dtypes[1]), None, None, None, None, None


def smog_loss(p, groups, targets, tau):
    return _Loss.apply(p, groups, targets, tau)


def smog_step(groups, z_update, z_target, p, beta, tau, *, all_reduce=None, group_grad=False):
    return _Step.apply(groups, z_update, z_target, p, beta, tau, all_reduce, group_grad, False)


def smog_multihead_step(groups, z, z_target, p, beta, tau, *, all_reduce=None, group_grad=False):
    return _Step.apply(groups, z, z_target, p, beta, tau, all_reduce, group_grad, True)


# -- the same port without the bridge: values only -------------------------------------------------


def _values(groups, z, z_target, p, beta, tau, all_reduce, group_grad, fn):
    (loss, new, targets), _ = fn(
        _np(groups), _np(z), _np(z_target), _np(p), beta, tau, _coll(all_reduce), group_grad
    )
    return _t(loss), _t(new).to(groups.dtype), _t(targets)


plain = types.SimpleNamespace(
    SPEC_DECLARES=SPEC_DECLARES,
    assign_groups=assign_groups,
    update_groups=update_groups,
    group_logits=group_logits,
    spherical_kmeans=spherical_kmeans,
    regroup=regroup,
    momentum_update_=momentum_update_,
    beta_schedule=beta_schedule,
    smog_loss=lambda p, groups, targets, tau: _t(
        smognp.loss(_np(p), _np(groups), _np(targets), tau)[0]
    ),
    smog_step=lambda groups, z_update, z_target, p, beta, tau, *, all_reduce=None, group_grad=False: (
        _values(groups, z_update, z_target, p, beta, tau, all_reduce, group_grad, smognp.step)
    ),
    smog_multihead_step=lambda groups, z, z_target, p, beta, tau, *, all_reduce=None, group_grad=False: (
        _values(groups, z, z_target, p, beta, tau, all_reduce, group_grad, smognp.multihead_step)
    ),
)
