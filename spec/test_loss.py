"""loss.md: group logits and the cross-entropy (L1-L4), the gradient paths of smog_step (L5-L7), low
precision (L8); the returned types (L9, contract). group_grad=True is an optional mode: its tests
are separate from the default mode's and read "not implemented (optional ...)" where the
implementation raises NotImplementedError for it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from spec.harness import (
    close,
    needs_graph,
    ref_assign,
    ref_normalise,
    ref_update,
    run_ranks,
    unambiguous,
)
from spec.strategies import DTYPES, matrices, positive_scales, seeds, shard_sizes, taus, unit_rows

invariant, optional = pytest.mark.invariant, pytest.mark.optional


def _problem(data, dtype=None):
    dtype = dtype or data.draw(DTYPES, "dtype")
    n, k, d = (
        data.draw(st.integers(1, 7), "N"),
        data.draw(st.integers(1, 6), "K"),
        data.draw(st.integers(1, 5), "D"),
    )
    p = data.draw(matrices(n, d, dtype), "p")
    g = data.draw(unit_rows(k, d, dtype), "groups")
    t = torch.randint(
        0, k, (n,), generator=torch.Generator().manual_seed(data.draw(seeds, "targets seed"))
    )
    tau = data.draw(taus, "tau")
    return dtype, p, g, t, tau


def ref_logits(p, g, tau, renormalise=False):
    """(L1) <p^_i, c_k>/tau against the groups as given, or against unit(c_k) (the true cosine)."""
    return ref_normalise(p) @ (ref_normalise(g) if renormalise else g.double()).T / tau


@invariant("L1")
@given(data=st.data())
def test_logits_and_loss_match_definition(impl, data):
    dtype, p, g, t, tau = _problem(data)
    logits = impl.group_logits(p, g, tau)
    close(logits, ref_logits(p, g, tau), dtype, scale=1 / tau)
    ref = ref_logits(p, g, tau)
    ref_loss = (torch.logsumexp(ref, dim=1) - ref.gather(1, t.view(-1, 1)).squeeze(1)).mean()
    close(impl.smog_loss(p, g, t, tau).reshape(()), ref_loss, dtype, scale=1 / tau)


@invariant("L2")
@pytest.mark.gradient
@given(data=st.data())
def test_loss_gradient_through_normalisation(impl, data):
    """dL/dp_i = 1/(N tau ||p_i||) (I - p^_i p^_i^T) G^T (softmax(G p^_i / tau) - e_{t_i}), float64."""
    _, p, g, t, tau = _problem(data, torch.float64)
    p = p.clone().requires_grad_(True)
    needs_graph(impl.smog_loss(p, g, t, tau), "smog_loss").backward()
    n = p.shape[0]
    with torch.no_grad():
        ph = ref_normalise(p)
        err = (
            torch.softmax(ph @ g.T / tau, dim=1)
            - torch.nn.functional.one_hot(t, g.shape[0]).double()
        )
        d_ph = err @ g / (n * tau)  # (N, D) dL/dp^
        proj = d_ph - (d_ph * ph).sum(1, keepdim=True) * ph  # (I - p^ p^T) dL/dp^
        expected = proj / p.norm(dim=1, keepdim=True)
    assert p.grad is not None, "no gradient reached p"
    torch.testing.assert_close(
        p.grad,
        expected,
        atol=1e-10 / tau,
        rtol=1e-8,
        msg=lambda m: (
            f"gradient of smog_loss w.r.t. p differs from the closed form (L2): {m} "
            f"(judged as float64: atol {1e-10 / tau:.3g}, rtol 1e-8)"
        ),
    )


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
    """Three ways to make every logit of a row equal: K copies of one group, zero predictions (n(0) = 0),
    predictions orthogonal to every group. Each gives exactly ln K, whatever the targets."""
    dtype, p, g, t, tau = _problem(data)
    K, D = g.shape
    expected = torch.tensor(math.log(K), dtype=torch.float64)
    same = g[:1].expand_as(g).contiguous()  # K copies of one group: every logit of a row is equal
    close(impl.smog_loss(p, same, t, tau), expected, dtype, scale=1 / tau)
    close(impl.smog_loss(torch.zeros_like(p), g, t, tau), expected, dtype, scale=1 / tau)
    axis = torch.zeros(K, D + 1, dtype=dtype)
    axis[:, :D] = g  # groups in the first D coordinates ...
    ortho = torch.zeros(p.shape[0], D + 1, dtype=dtype)
    ortho[:, D] = p[:, 0].abs() + 1  # ... predictions along the last one
    close(impl.smog_loss(ortho, axis, t, tau), expected, dtype, scale=1 / tau)


@invariant("L4")
@given(data=st.data())
def test_loss_below_ln_k_for_argmax_targets_above_for_argmin(impl, data):
    """Each term is log sum_k exp(l_k - l_t): at most ln K when t is the row's largest logit, at least
    ln K when it is the smallest (and at most ln K + 2/tau always)."""
    dtype, p, g, _, tau = _problem(data)
    ref = ref_logits(p, g, tau)
    slack = 1e-9 if dtype == torch.float64 else 1e-4 / tau
    ln_k = math.log(g.shape[0])
    assert float(impl.smog_loss(p, g, ref.argmax(1), tau)) <= ln_k + slack
    assert ln_k - slack <= float(impl.smog_loss(p, g, ref.argmin(1), tau)) <= ln_k + 2 / tau + slack


def _step_problem(data, b_min=1, b_max=5):
    B, C, J = (
        data.draw(st.integers(b_min, b_max), "B"),
        data.draw(st.integers(1, 3), "C"),
        data.draw(st.integers(1, 2), "J"),
    )
    k, d = data.draw(st.integers(1, 5), "K"), data.draw(st.integers(1, 4), "D")
    f64 = torch.float64
    g = data.draw(unit_rows(k, d, f64), "groups")
    z = data.draw(matrices(B, d, f64), "z_update")
    zt = data.draw(matrices(J * B, d, f64), "z_target").view(J, B, d)
    p = data.draw(matrices(C * B, d, f64), "p").view(C, B, d)
    return g, z, zt, p, data.draw(st.floats(0.0, 0.999), "beta"), data.draw(taus, "tau")


@invariant("L5")
@pytest.mark.gradient
@given(data=st.data())
def test_no_gradient_through_update_when_group_grad_false(impl, data):
    g, z, zt, p, beta, tau = _step_problem(data)
    z, p = z.clone().requires_grad_(True), p.clone().requires_grad_(True)
    loss, new, _ = impl.smog_step(g, z, zt, p, beta, tau, group_grad=False)
    assert not new.requires_grad, "new_groups carries a graph although group_grad=False"
    needs_graph(loss, "smog_step's loss").backward()
    assert z.grad is None or not z.grad.any(), "gradient reached z_update although group_grad=False"
    assert p.grad is not None


@invariant("L6")
@pytest.mark.gradient
@optional("group_grad")
@given(data=st.data())
def test_gradient_through_update_when_group_grad_true(impl, data):
    """dL/dz_i = (1-beta)/(n_{a_i} ||z_i||) (I - z^_i z^_i^T) (I - c_k c_k^T)/||u_k|| dL/dc_k, k = a_i,
    with dL/dc_k = 1/(CJB tau) sum_{c,j,b} (softmax_k(l_cb) - [t_jb = k]) p^_cb (loss.md)."""
    g, z, zt, p, beta, tau = _step_problem(data)
    a, margin = ref_assign(z, g)
    ta, tmargin = ref_assign(zt.reshape(-1, zt.shape[-1]), g)
    assume(
        bool(unambiguous(margin, torch.float64).all())
        and bool(unambiguous(tmargin, torch.float64).all())
    )
    zh, K = ref_normalise(z), g.shape[0]
    n = torch.bincount(a, minlength=K).double()
    mean = torch.zeros_like(g).index_add(0, a, zh) / n.clamp_min(1).unsqueeze(1)
    u = beta * g + (1 - beta) * mean  # (K, D) before normalisation
    hit = n > 0
    assume(bool((u.norm(dim=1)[hit] > 1e-2).all()))
    c = torch.where(hit.unsqueeze(1), u / u.norm(dim=1, keepdim=True), g)
    C, J, B = p.shape[0], zt.shape[0], z.shape[0]
    targets = ta.view(J, B)
    ph = ref_normalise(p)  # (C, B, D)
    soft = torch.softmax(ph @ c.T / tau, dim=-1)  # (C, B, K)
    onehot = torch.nn.functional.one_hot(targets, K).double()  # (J, B, K)
    err = J * soft - onehot.sum(0).unsqueeze(0)  # (C, B, K) summed over j
    d_c = torch.einsum("cbk,cbd->kd", err, ph) / (C * J * B * tau)  # dL/dc_k
    d_u = (d_c - (d_c * c).sum(1, keepdim=True) * c) / u.norm(dim=1, keepdim=True)
    d_zh = (1 - beta) * d_u[a] / n[a].unsqueeze(1)
    expected = (d_zh - (d_zh * zh).sum(1, keepdim=True) * zh) / z.norm(dim=1, keepdim=True)

    zg = z.clone().requires_grad_(True)
    loss, new, got_t = impl.smog_step(g, zg, zt, p, beta, tau, group_grad=True)
    assert torch.equal(got_t.long(), targets)
    needs_graph(loss, "smog_step's loss (group_grad=True)")
    assert new.requires_grad, "new_groups carries no graph from z_update although group_grad=True"
    loss.backward()
    assert zg.grad is not None, "no gradient reached z_update although group_grad=True"
    torch.testing.assert_close(
        zg.grad,
        expected,
        atol=1e-10 / tau,
        rtol=1e-7,
        msg=lambda m: (
            f"gradient of smog_step's loss w.r.t. z_update differs from the closed "
            f"form (L6): {m} (judged as float64: atol 1e-10/tau, rtol 1e-7)"
        ),
    )


def _sharded_step_problem(data):
    g, z, zt, p, beta, tau = _step_problem(data, b_min=2, b_max=8)
    sizes = data.draw(shard_sizes(z.shape[0], min_size=1), "shards")
    for rows in (z, zt.reshape(-1, z.shape[1])):
        assume(bool(unambiguous(ref_assign(rows, g)[1], torch.float64).all()))
    assume(ref_update(g, z, ref_assign(z, g)[0], beta)[1] > 1e-2)
    return g, z, zt, p, beta, tau, sizes


def _rank_gradients(impl, g, z, zt, p, beta, tau, sizes, group_grad):
    """Rank r backpropagates (B_r / B) L_r *in its own thread*, as every process of a real group runs its
    own backward -> (the ranks' z_update and p leaves) when all ranks are done. Both kinds of
    implementation are certified so: one whose backward reaches the other ranks through the
    differentiable all_reduce (the simulated sum's graph spans the ranks, so each rank's backward adds
    its cotangent to every rank's leaves; retain_graph, since those parts are shared), and a port whose
    own VJP all-reduces its cotangent (as jax.lax.psum does), which needs every rank in the backward."""
    zs = [t.clone().requires_grad_(True) for t in torch.split(z, sizes)]
    ps = [t.clone().requires_grad_(True) for t in torch.split(p, sizes, 1)]
    zts = torch.split(zt, sizes, 1)

    def rank(r, ar, _):
        loss = impl.smog_step(
            g, zs[r], zts[r], ps[r], beta, tau, all_reduce=ar, group_grad=group_grad
        )[0]
        needs_graph(loss, f"rank {r}'s loss")
        (loss * sizes[r] / z.shape[0]).backward(retain_graph=True)

    run_ranks(len(sizes), rank)
    return zs, ps


@invariant("L7")
@pytest.mark.gradient
@given(data=st.data())
def test_sharded_step_gives_the_single_process_gradient_in_p(impl, data):
    """The default mode (group_grad=False) on 2-4 uneven shards: rank r backpropagates (B_r / B) L_r,
    and every sample's gradient in p is that of the whole-batch loss in one process (the ranks hold
    the whole batch's groups, G5); z_update receives none (L5)."""
    g, z, zt, p, beta, tau, sizes = _sharded_step_problem(data)
    pw = p.clone().requires_grad_(True)
    needs_graph(impl.smog_step(g, z, zt, pw, beta, tau)[0], "smog_step's loss").backward()
    zs, ps = _rank_gradients(impl, g, z, zt, p, beta, tau, sizes, group_grad=False)
    assert all(t.grad is not None for t in ps), "no gradient reached p on some rank"
    torch.testing.assert_close(
        torch.cat([t.grad for t in ps], 1),
        pw.grad,
        atol=1e-10 / tau,
        rtol=1e-7,
        msg=lambda m: (
            f"shards {sizes}: the ranks' gradients w.r.t. p differ from the "
            f"single-process gradient: {m} (judged as float64: atol 1e-10/tau, "
            f"rtol 1e-7)"
        ),
    )
    assert all(t.grad is None or not t.grad.any() for t in zs), (
        "gradient reached z_update with group_grad=False"
    )


@invariant("L7")
@pytest.mark.gradient
@optional("group_grad")
@given(data=st.data())
def test_group_grad_across_ranks_gives_the_single_process_gradient(impl, data):
    """Rank r backpropagates (B_r / B) L_r through a differentiable SUM all-reduce (harness.run_ranks):
    every sample's gradient, in z_update and in p, is that of the whole-batch loss in one process."""
    g, z, zt, p, beta, tau, sizes = _sharded_step_problem(data)
    zw, pw = z.clone().requires_grad_(True), p.clone().requires_grad_(True)
    needs_graph(
        impl.smog_step(g, zw, zt, pw, beta, tau, group_grad=True)[0], "smog_step's loss"
    ).backward()
    zs, ps = _rank_gradients(impl, g, z, zt, p, beta, tau, sizes, group_grad=True)
    assert all(t.grad is not None for t in zs), "no gradient reached z_update on some rank"
    for name, got, want in (
        ("z_update", torch.cat([t.grad for t in zs]), zw.grad),
        ("p", torch.cat([t.grad for t in ps], 1), pw.grad),
    ):
        torch.testing.assert_close(
            got,
            want,
            atol=1e-10 / tau,
            rtol=1e-7,
            msg=lambda m: (
                f"shards {sizes}: the ranks' gradients w.r.t. {name} differ from "
                f"the single-process gradient: {m} (judged as float64: atol "
                f"1e-10/tau, rtol 1e-7)"
            ),
        )


@invariant("L8")
@given(data=st.data(), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_low_precision_inputs_give_fp32_logits(impl, data, dtype):
    """bf16/fp16 p and groups are promoted: the logits and the loss are those of the exactly upcast
    inputs, within float32 tolerance. The groups are unit only up to bf16/fp16 rounding, so the
    logits may score them as given or renormalised (the true cosine); either reading is accepted,
    the loss in the same reading as the logits."""
    _, p, g, t, tau = _problem(data, torch.float64)
    p, g = p.to(dtype), g.to(dtype)
    logits = impl.group_logits(p, g, tau)
    loss = impl.smog_loss(p, g, t, tau).reshape(())
    misses = []
    for renormalise in (False, True):
        ref = ref_logits(p, g, tau, renormalise)
        ref_loss = (torch.logsumexp(ref, dim=1) - ref.gather(1, t.view(-1, 1)).squeeze(1)).mean()
        try:
            close(logits, ref, torch.float32, scale=1 / tau, msg=f"logits of {dtype} inputs")
            close(loss, ref_loss, torch.float32, scale=1 / tau, msg=f"loss of {dtype} inputs")
            return
        except AssertionError as e:
            misses.append(
                f"against the {'renormalised' if renormalise else 'raw'} groups: "
                + str(e).split("\n")[0]
                + " "
                + " ".join(str(e).split("\n")[1:3])
            )
    raise AssertionError("L8: " + " | ".join(misses))


# -- contract: the protocol's conventions ------------------------------------------------------------


@invariant("L9")
@pytest.mark.parametrize(
    "dtype, want",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_logits_and_loss_return_types(impl, dtype, want):
    """group_logits: [N, K] in the promoted dtype max(dtype, float32); smog_loss: a 0-dim tensor."""
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(5, 3, generator=gen, dtype=torch.float64).to(dtype)
    g = ref_normalise(torch.randn(4, 3, generator=gen, dtype=torch.float64)).to(dtype)
    logits = impl.group_logits(p, g, 0.1)
    assert logits.dtype == want and tuple(logits.shape) == (5, 4), (
        f"group_logits returned {logits.dtype} {tuple(logits.shape)} for {dtype} inputs; "
        f"the protocol's is {want} (5, 4)"
    )
    loss = impl.smog_loss(p, g, torch.tensor([0, 1, 2, 3, 0]), 0.1)
    assert loss.dim() == 0, (
        f"smog_loss returned shape {tuple(loss.shape)}; the protocol's is a 0-dim tensor"
    )
