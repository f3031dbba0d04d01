"""heads.md: one iteration of all heads, smog_multihead_step (H1-H5)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from spec.harness import close, close_with_grad, ref_assign, ref_step_loss, ref_update, unambiguous
from spec.strategies import DTYPES, betas, matrices, taus, unit_rows

invariant = pytest.mark.invariant


def _problem(data, h_min=1):
    dtype = data.draw(DTYPES, "dtype")
    H, C, J = data.draw(st.integers(h_min, 3), "H"), data.draw(st.integers(2, 3), "C"), data.draw(st.integers(1, 2), "J")
    B, k, d = data.draw(st.integers(1, 5), "B"), data.draw(st.integers(1, 5), "K"), data.draw(st.integers(1, 4), "D")
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
    dtype, g, z, zt, p, beta, tau = _problem(data)
    p = p.clone().requires_grad_(True)
    loss, new, targets = impl.smog_multihead_step(g, z, zt, p, beta, tau)
    assert loss.dim() == 0
    ref = torch.stack([ref_step_loss(p, new[h].detach(), targets[h], tau) for h in range(g.shape[0])]).mean()
    close_with_grad(loss, ref, p, dtype, scale=1 / tau)


@invariant("H2")
@given(data=st.data())
def test_head_h_updates_from_online_crop_h_mod_2(impl, data):
    dtype, g, z, zt, p, beta, tau = _problem(data, h_min=2)
    expected = _updates(dtype, g, z, beta)
    _, new, _ = impl.smog_multihead_step(g, z, zt, p, beta, tau)
    assert new.shape == g.shape and new.dtype == g.dtype
    close(new, expected, dtype)


@invariant("H3")
@given(data=st.data())
def test_targets_of_each_head_use_its_own_groups_before_the_update(impl, data):
    dtype, g, z, zt, p, beta, tau = _problem(data, h_min=2)
    _, _, targets = impl.smog_multihead_step(g, z, zt, p, beta, tau)
    assert targets.shape == (g.shape[0], *zt.shape[:2]) and targets.dtype == torch.long
    for h in range(g.shape[0]):
        for j in range(zt.shape[0]):
            ref, margin = ref_assign(zt[j], g[h])
            ok = unambiguous(margin, dtype)
            assert torch.equal(targets[h, j][ok], ref[ok]), f"targets of head {h}, momentum crop {j}"


@invariant("H4")
@given(data=st.data(), group_grad=st.booleans())
def test_incoming_groups_receive_no_gradient(impl, data, group_grad):
    """Even when the caller's groups require grad (an nn.Parameter, say), nothing flows into them: the
    groups move only by the momentum update, never by the optimiser."""
    dtype, g, z, zt, p, beta, tau = _problem(data)
    g = g.clone().requires_grad_(True)
    z, p = z.clone().requires_grad_(True), p.clone().requires_grad_(True)
    loss, new, targets = impl.smog_multihead_step(g, z, zt, p, beta, tau, group_grad=group_grad)
    assert not targets.requires_grad
    if not group_grad:
        assert not new.requires_grad, "new groups carry a graph although group_grad=False"
    outs = [loss] + ([new.sum()] if new.requires_grad else [])
    for out in outs:
        grad, = torch.autograd.grad(out, g, retain_graph=True, allow_unused=True)
        assert grad is None or not grad.any(), "gradient reached the incoming groups"


@invariant("H5")
@given(data=st.data(), group_grad=st.booleans())
def test_equals_independent_single_head_steps(impl, data, group_grad):
    """Head h's outputs are smog_step's on (groups[h], z[h mod 2]); the heads do not see each other,
    and the inputs are not modified (the caller copies the new groups in after all heads)."""
    dtype, g, z, zt, p, beta, tau = _problem(data)
    before = [t.clone() for t in (g, z, zt, p)]
    loss, new, targets = impl.smog_multihead_step(g, z, zt, p, beta, tau, group_grad=group_grad)
    for t, t0, name in zip((g, z, zt, p), before, ("groups", "z", "z_target", "p")):
        assert torch.equal(t, t0), f"smog_multihead_step modified its input {name}"
    singles = [impl.smog_step(g[h], z[h % 2], zt, p, beta, tau, group_grad=group_grad) for h in range(g.shape[0])]
    close(loss, torch.stack([s[0] for s in singles]).mean(), dtype, scale=1 / tau)
    for h, (_, g_h, t_h) in enumerate(singles):
        assert torch.equal(targets[h], t_h), f"head {h}: targets differ from smog_step's"
        close(new[h], g_h, dtype, msg=f"head {h}: new groups differ from smog_step's")
    if g.shape[0] > 1:   # another head's groups change nothing in head 0
        other = g.clone()
        other[1:] = other[1:].flip(-1)
        _, new2, targets2 = impl.smog_multihead_step(other, z, zt, p, beta, tau, group_grad=group_grad)
        assert torch.equal(new2[0], new[0]) and torch.equal(targets2[0], targets[0]), "head 0 saw another head"


@invariant("H2")
def test_fewer_than_two_online_crops_is_an_error(impl):
    g, x = torch.eye(2).unsqueeze(0), torch.ones(1, 1, 2)
    with pytest.raises(ValueError):
        impl.smog_multihead_step(g, x, x, x, 0.5, 0.1)
