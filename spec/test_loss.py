"""loss.md: group logits and the cross-entropy (L1-L4), the gradient paths of smog_step (L5, L6)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from spec.harness import close, ref_assign, ref_normalise, unambiguous
from spec.strategies import DTYPES, matrices, positive_scales, seeds, taus, unit_rows

invariant = pytest.mark.invariant


def _problem(data, dtype=None):
    dtype = dtype or data.draw(DTYPES, "dtype")
    n, k, d = data.draw(st.integers(1, 7), "N"), data.draw(st.integers(1, 6), "K"), data.draw(st.integers(1, 5), "D")
    p = data.draw(matrices(n, d, dtype), "p")
    g = data.draw(unit_rows(k, d, dtype), "groups")
    t = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(data.draw(seeds, "targets seed")))
    tau = data.draw(taus, "tau")
    return dtype, p, g, t, tau


def ref_logits(p, g, tau):
    return ref_normalise(p) @ g.double().T / tau


@invariant("L1")
@given(data=st.data())
def test_logits_and_loss_match_definition(impl, data):
    dtype, p, g, t, tau = _problem(data)
    logits = impl.group_logits(p, g, tau)
    assert logits.shape == (p.shape[0], g.shape[0])
    close(logits, ref_logits(p, g, tau), dtype, scale=1 / tau)
    ref = ref_logits(p, g, tau)
    ref_loss = (torch.logsumexp(ref, dim=1) - ref.gather(1, t.view(-1, 1)).squeeze(1)).mean()
    loss = impl.smog_loss(p, g, t, tau)
    assert loss.dim() == 0
    close(loss, ref_loss, dtype, scale=1 / tau)


@invariant("L2")
@given(data=st.data())
def test_loss_gradient_through_normalisation(impl, data):
    """dL/dp_i = 1/(N tau ||p_i||) (I - p^_i p^_i^T) G^T (softmax(G p^_i / tau) - e_{t_i}), float64."""
    _, p, g, t, tau = _problem(data, torch.float64)
    p = p.clone().requires_grad_(True)
    impl.smog_loss(p, g, t, tau).backward()
    n = p.shape[0]
    with torch.no_grad():
        ph = ref_normalise(p)
        err = torch.softmax(ph @ g.T / tau, dim=1) - torch.nn.functional.one_hot(t, g.shape[0]).double()
        d_ph = err @ g / (n * tau)                                        # (N, D) dL/dp^
        proj = d_ph - (d_ph * ph).sum(1, keepdim=True) * ph               # (I - p^ p^T) dL/dp^
        expected = proj / p.norm(dim=1, keepdim=True)
    assert p.grad is not None, "no gradient reached p"
    torch.testing.assert_close(p.grad, expected, atol=1e-10 / tau, rtol=1e-8)


@invariant("L3")
@given(data=st.data())
def test_loss_invariant_to_positive_rescaling_of_p(impl, data):
    dtype, p, g, t, tau = _problem(data)
    s = data.draw(positive_scales(p.shape[0]), "scales").to(dtype)
    close(impl.group_logits(p * s, g, tau), impl.group_logits(p, g, tau), dtype, scale=1 / tau)
    close(impl.smog_loss(p * s, g, t, tau), impl.smog_loss(p, g, t, tau), dtype, scale=1 / tau)


@invariant("L4")
@given(data=st.data())
def test_loss_bounds(impl, data):
    """0 <= L <= ln K + 2/tau: logits lie in [-1/tau, 1/tau]."""
    dtype, p, g, t, tau = _problem(data)
    loss = float(impl.smog_loss(p, g, t, tau))
    slack = 1e-9 if dtype == torch.float64 else 1e-4 / tau
    assert -slack <= loss <= math.log(g.shape[0]) + 2 / tau + slack


@invariant("L4")
@given(data=st.data())
def test_loss_is_ln_k_when_all_logits_are_equal(impl, data):
    dtype, p, g, t, tau = _problem(data)
    same = g[:1].expand_as(g).contiguous()         # K copies of one group: every logit of a row is equal
    expected = torch.tensor(math.log(g.shape[0]), dtype=torch.float64)
    close(impl.smog_loss(p, same, t, tau), expected, dtype, scale=1 / tau)


def _step_problem(data):
    B, C, J = data.draw(st.integers(1, 5), "B"), data.draw(st.integers(1, 3), "C"), data.draw(st.integers(1, 2), "J")
    k, d = data.draw(st.integers(1, 5), "K"), data.draw(st.integers(1, 4), "D")
    f64 = torch.float64
    g = data.draw(unit_rows(k, d, f64), "groups")
    z = data.draw(matrices(B, d, f64), "z_update")
    zt = data.draw(matrices(J * B, d, f64), "z_target").view(J, B, d)
    p = data.draw(matrices(C * B, d, f64), "p").view(C, B, d)
    return g, z, zt, p, data.draw(st.floats(0.0, 0.999), "beta"), data.draw(taus, "tau")


@invariant("L5")
@given(data=st.data())
def test_no_gradient_through_update_when_group_grad_false(impl, data):
    g, z, zt, p, beta, tau = _step_problem(data)
    z, p = z.clone().requires_grad_(True), p.clone().requires_grad_(True)
    loss, new, _ = impl.smog_step(g, z, zt, p, beta, tau, group_grad=False)
    assert not new.requires_grad, "new_groups carries a graph although group_grad=False"
    loss.backward()
    assert z.grad is None or not z.grad.any(), "gradient reached z_update although group_grad=False"
    assert p.grad is not None


@invariant("L6")
@given(data=st.data())
def test_gradient_through_update_when_group_grad_true(impl, data):
    """dL/dz_i = (1-beta)/(n_{a_i} ||z_i||) (I - z^_i z^_i^T) (I - c_k c_k^T)/||u_k|| dL/dc_k, k = a_i,
    with dL/dc_k = 1/(CJB tau) sum_{c,j,b} (softmax_k(l_cb) - [t_jb = k]) p^_cb (loss.md)."""
    g, z, zt, p, beta, tau = _step_problem(data)
    a, margin = ref_assign(z, g)
    ta, tmargin = ref_assign(zt.reshape(-1, zt.shape[-1]), g)
    assume(bool(unambiguous(margin, torch.float64).all()) and bool(unambiguous(tmargin, torch.float64).all()))
    zh, K = ref_normalise(z), g.shape[0]
    n = torch.bincount(a, minlength=K).double()
    mean = torch.zeros_like(g).index_add(0, a, zh) / n.clamp_min(1).unsqueeze(1)
    u = beta * g + (1 - beta) * mean                                       # (K, D) before normalisation
    hit = n > 0
    assume(bool((u.norm(dim=1)[hit] > 1e-2).all()))
    c = torch.where(hit.unsqueeze(1), u / u.norm(dim=1, keepdim=True), g)
    C, J, B = p.shape[0], zt.shape[0], z.shape[0]
    targets = ta.view(J, B)
    ph = ref_normalise(p)                                                  # (C, B, D)
    soft = torch.softmax(ph @ c.T / tau, dim=-1)                           # (C, B, K)
    onehot = torch.nn.functional.one_hot(targets, K).double()              # (J, B, K)
    err = J * soft - onehot.sum(0).unsqueeze(0)                            # (C, B, K) summed over j
    d_c = torch.einsum("cbk,cbd->kd", err, ph) / (C * J * B * tau)          # dL/dc_k
    d_u = (d_c - (d_c * c).sum(1, keepdim=True) * c) / u.norm(dim=1, keepdim=True)
    d_zh = (1 - beta) * d_u[a] / n[a].unsqueeze(1)
    expected = (d_zh - (d_zh * zh).sum(1, keepdim=True) * zh) / z.norm(dim=1, keepdim=True)

    zg = z.clone().requires_grad_(True)
    loss, new, got_t = impl.smog_step(g, zg, zt, p, beta, tau, group_grad=True)
    assert torch.equal(got_t, targets)
    assert loss.requires_grad and new.requires_grad, "no graph from z_update although group_grad=True"
    loss.backward()
    assert zg.grad is not None, "no gradient reached z_update although group_grad=True"
    torch.testing.assert_close(zg.grad, expected, atol=1e-10 / tau, rtol=1e-7)
