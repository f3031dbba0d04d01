"""heads.md: one iteration of all heads, smog_multihead_step (H1-H5); the returned types and the
error (H6, contract)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from spec.harness import (
    close,
    close_grad,
    close_value,
    needs_graph,
    ref_assign,
    ref_normalise,
    ref_step_loss,
    ref_update,
    unambiguous,
)
from spec.strategies import DTYPES, betas, matrices, taus, unit_rows

invariant, optional = pytest.mark.invariant, pytest.mark.optional


def _problem(data, h_min=1):
    dtype = data.draw(DTYPES, "dtype")
    H, C, J = (
        data.draw(st.integers(h_min, 3), "H"),
        data.draw(st.integers(2, 3), "C"),
        data.draw(st.integers(1, 2), "J"),
    )
    B, k, d = (
        data.draw(st.integers(1, 5), "B"),
        data.draw(st.integers(1, 5), "K"),
        data.draw(st.integers(1, 4), "D"),
    )
    g = data.draw(unit_rows(H * k, d, dtype), "groups").view(H, k, d)
    z = data.draw(matrices(C * B, d, dtype), "z").view(C, B, d)
    zt = data.draw(matrices(J * B, d, dtype), "z_target").view(J, B, d)
    p = data.draw(matrices(C * B, d, dtype), "p").view(C, B, d)
    return dtype, g, z, zt, p, data.draw(betas, "beta"), data.draw(taus, "tau")


def _updates(dtype, g, z, beta):
    """(H2) the reference new groups of every head, from crop h mod 2; assumes no near-tie and no cancelling group."""
    out = []
    for h in range(g.shape[0]):
        a, margin = ref_assign(z[h % 2], g[h])
        assume(bool(unambiguous(margin, dtype).all()))
        new, smallest = ref_update(g[h], z[h % 2], a, beta)
        assume(smallest > 1e-2)
        out.append(new)
    return torch.stack(out)


@invariant("H1")
@given(data=st.data())
def test_loss_is_the_mean_over_heads(impl, data):
    """The value claim; the gradient claim is the next test."""
    dtype, g, z, zt, p, beta, tau = _problem(data)
    loss, new, targets = impl.smog_multihead_step(g, z, zt, p, beta, tau)
    ref = torch.stack(
        [ref_step_loss(p, new[h], targets[h].long(), tau) for h in range(g.shape[0])]
    ).mean()
    close_value(loss.reshape(()), ref, dtype, scale=1 / tau, what="the loss (the mean over heads)")


@invariant("H1")
@pytest.mark.gradient
@given(data=st.data())
def test_loss_gradient_in_p_is_that_of_the_mean_over_heads(impl, data):
    dtype, g, z, zt, p, beta, tau = _problem(data)
    p = p.clone().requires_grad_(True)
    loss, new, targets = impl.smog_multihead_step(g, z, zt, p, beta, tau)
    needs_graph(loss, "smog_multihead_step's loss")
    ref = torch.stack(
        [ref_step_loss(p, new[h].detach(), targets[h].long(), tau) for h in range(g.shape[0])]
    ).mean()
    (got,) = torch.autograd.grad(loss, p)
    (want,) = torch.autograd.grad(ref, p)
    close_grad(got, want, "p", dtype, scale=1 / tau, what="smog_multihead_step's loss")


@invariant("H2")
@given(data=st.data())
def test_head_h_updates_from_online_crop_h_mod_2(impl, data):
    dtype, g, z, zt, p, beta, tau = _problem(data, h_min=2)
    expected = _updates(dtype, g, z, beta)
    _, new, _ = impl.smog_multihead_step(g, z, zt, p, beta, tau)
    close(new, expected, dtype)


@invariant("H3")
@given(data=st.data())
def test_targets_of_each_head_use_its_own_groups_before_the_update(impl, data):
    dtype, g, z, zt, p, beta, tau = _problem(data, h_min=2)
    _, _, targets = impl.smog_multihead_step(g, z, zt, p, beta, tau)
    for h in range(g.shape[0]):
        for j in range(zt.shape[0]):
            ref, margin = ref_assign(zt[j], g[h])
            ok = unambiguous(margin, dtype)
            assert torch.equal(targets[h, j].long()[ok], ref[ok]), (
                f"targets of head {h}, momentum crop {j}"
            )


def _check_no_gradient_into_groups(impl, data, group_grad):
    dtype, g, z, zt, p, beta, tau = _problem(data)
    g = g.clone().requires_grad_(True)
    z, p = z.clone().requires_grad_(True), p.clone().requires_grad_(True)
    loss, new, targets = impl.smog_multihead_step(g, z, zt, p, beta, tau, group_grad=group_grad)
    assert not targets.requires_grad
    if not group_grad:
        assert not new.requires_grad, "new groups carry a graph although group_grad=False"
    needs_graph(loss, "smog_multihead_step's loss")
    outs = [loss] + ([new.sum()] if new.requires_grad else [])
    for out in outs:
        (grad,) = torch.autograd.grad(out, g, retain_graph=True, allow_unused=True)
        assert grad is None or not grad.any(), "gradient reached the incoming groups"


@invariant("H4")
@pytest.mark.gradient
@given(data=st.data())
def test_incoming_groups_receive_no_gradient(impl, data):
    """Even when the caller's groups require grad (an nn.Parameter, say), nothing flows into them: the
    groups move only by the momentum update, never by the optimiser."""
    _check_no_gradient_into_groups(impl, data, group_grad=False)


@invariant("H4")
@pytest.mark.gradient
@optional("group_grad")
@given(data=st.data())
def test_incoming_groups_receive_no_gradient_with_group_grad(impl, data):
    """As above with group_grad=True: neither the loss nor new_groups carries gradient into `groups`."""
    _check_no_gradient_into_groups(impl, data, group_grad=True)


def _check_independent_heads(impl, data, **kw):
    dtype, g, z, zt, p, beta, tau = _problem(data)
    before = [t.clone() for t in (g, z, zt, p)]
    loss, new, targets = impl.smog_multihead_step(g, z, zt, p, beta, tau, **kw)
    for t, t0, name in zip((g, z, zt, p), before, ("groups", "z", "z_target", "p")):
        assert torch.equal(t, t0), f"smog_multihead_step modified its input {name}"
    singles = [impl.smog_step(g[h], z[h % 2], zt, p, beta, tau, **kw) for h in range(g.shape[0])]
    close(loss, torch.stack([s[0] for s in singles]).mean(), dtype, scale=1 / tau)
    for h, (_, g_h, t_h) in enumerate(singles):
        assert torch.equal(targets[h].long(), t_h.long()), (
            f"head {h}: targets differ from smog_step's"
        )
        close(new[h], g_h, dtype, msg=f"head {h}: new groups differ from smog_step's")
    if g.shape[0] > 1:  # another head's groups change nothing in head 0
        other = g.clone()
        other[1:] = other[1:].flip(-1)
        _, new2, targets2 = impl.smog_multihead_step(other, z, zt, p, beta, tau, **kw)
        assert torch.equal(new2[0], new[0]) and torch.equal(targets2[0], targets[0]), (
            "head 0 saw another head"
        )


@invariant("H5")
@given(data=st.data())
def test_equals_independent_single_head_steps(impl, data):
    """Head h's outputs are smog_step's on (groups[h], z[h mod 2]); the heads do not see each other,
    and the inputs are not modified (the caller copies the new groups in after all heads)."""
    _check_independent_heads(impl, data)


@invariant("H5")
@optional("group_grad")
@given(data=st.data())
def test_equals_independent_single_head_steps_with_group_grad(impl, data):
    _check_independent_heads(impl, data, group_grad=True)


@invariant("H2")
def test_fewer_than_two_online_crops_is_an_error(impl):
    """Head 1 updates from crop 1, which one crop does not have: the call raises (some exception; its
    type is the contract of H6) instead of updating every head from crop 0."""
    g, x = torch.eye(2).unsqueeze(0), torch.ones(1, 1, 2)
    try:
        impl.smog_multihead_step(g, x, x, x, 0.5, 0.1)
    except Exception:  # noqa: BLE001 - any error will do here; NotImplementedError never gets here (Impl)
        return
    raise AssertionError(
        "smog_multihead_step returned with one online crop; head 1 has no crop 1 to update from"
    )


# -- contract: the protocol's conventions ------------------------------------------------------------


@invariant("H6")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_multihead_return_types(impl, dtype):
    """(a 0-dim loss, new groups of the dtype and shape of `groups` [H, K, D], int64 targets [H, J, B])."""
    gen = torch.Generator().manual_seed(6)
    g = ref_normalise(torch.randn(3, 4, 3, generator=gen, dtype=torch.float64)).to(dtype)
    z, zt, p = (
        torch.randn(*s, 5, 3, generator=gen, dtype=torch.float64).to(dtype)
        for s in ((2,), (2,), (2,))
    )
    loss, new, targets = impl.smog_multihead_step(g, z, zt, p, 0.9, 0.1)
    assert loss.dim() == 0, f"loss of shape {tuple(loss.shape)}; the protocol's is a 0-dim tensor"
    assert new.dtype == dtype and new.shape == g.shape, (
        f"new groups {new.dtype} {tuple(new.shape)} for {dtype} groups {tuple(g.shape)}"
    )
    assert targets.dtype == torch.long and tuple(targets.shape) == (3, 2, 5), (
        f"targets {targets.dtype} {tuple(targets.shape)}; the protocol's are int64 (H, J, B) = (3, 2, 5)"
    )


@invariant("H6")
def test_fewer_than_two_online_crops_is_a_value_error(impl):
    g, x = torch.eye(2).unsqueeze(0), torch.ones(1, 1, 2)
    try:
        impl.smog_multihead_step(g, x, x, x, 0.5, 0.1)
    except Exception as e:  # noqa: BLE001 - the type is what this test checks
        assert isinstance(e, ValueError), (
            f"one online crop raised {type(e).__name__}; the protocol's error is ValueError"
        )
        return
    raise AssertionError(
        "smog_multihead_step returned with one online crop; the protocol raises ValueError"
    )
