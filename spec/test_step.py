"""step.md: one head's iteration, smog_step (S1-S7); the returned types (S8, contract)."""

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
    run_ranks,
    unambiguous,
)
from spec.strategies import DTYPES, betas, matrices, seeds, shard_sizes, taus, unit_rows

invariant, optional = pytest.mark.invariant, pytest.mark.optional


def _problem(data, dtype=None, b_min=1, b_max=5):
    dtype = dtype or data.draw(DTYPES, "dtype")
    B, C, J = (
        data.draw(st.integers(b_min, b_max), "B"),
        data.draw(st.integers(1, 3), "C"),
        data.draw(st.integers(1, 2), "J"),
    )
    k, d = data.draw(st.integers(1, 5), "K"), data.draw(st.integers(1, 4), "D")
    g = data.draw(unit_rows(k, d, dtype), "groups")
    z = data.draw(matrices(B, d, dtype), "z_update")
    zt = data.draw(matrices(J * B, d, dtype), "z_target").view(J, B, d)
    p = data.draw(matrices(C * B, d, dtype), "p").view(C, B, d)
    return dtype, g, z, zt, p, data.draw(betas, "beta"), data.draw(taus, "tau")


def _decided(dtype, g, *zs):
    """Assume every row of every z is assigned without a near-tie (see harness.unambiguous)."""
    for z in zs:
        _, m = ref_assign(z.reshape(-1, z.shape[-1]), g)
        assume(bool(unambiguous(m, dtype).all()))


@invariant("S1")
@given(data=st.data())
def test_targets_use_groups_before_update(impl, data):
    dtype, g, z, zt, p, beta, tau = _problem(data)
    _, _, targets = impl.smog_step(g, z, zt, p, beta, tau)
    for j in range(zt.shape[0]):
        ref, margin = ref_assign(zt[j], g)
        ok = unambiguous(margin, dtype)
        assert torch.equal(targets[j].long()[ok], ref[ok]), f"targets of crop {j}"


@invariant("S1")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_targets_before_update_worked_example(impl, dtype):
    """The update moves group 1 towards (1, 1.2); with the moved group the target row would flip
    from group 0 to group 1."""
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=dtype)
    z = torch.tensor([[1.0, 1.2]], dtype=dtype)
    zt = torch.tensor([[[0.9, 0.45]]], dtype=dtype)
    p = torch.tensor([[[1.0, 0.0]]], dtype=dtype)
    _, new, targets = impl.smog_step(g, z, zt, p, 0.0, 0.1)
    assert targets.tolist() == [[0]]
    assert ref_assign(zt[0], new)[0].tolist() == [1], "the example no longer discriminates"


@invariant("S2")
@given(data=st.data())
def test_loss_is_mean_over_crops_targets_samples_with_new_groups(impl, data):
    """The value claim; the gradient claim is the next test."""
    dtype, g, z, zt, p, beta, tau = _problem(data)
    loss, new, targets = impl.smog_step(g, z, zt, p, beta, tau)
    targets = targets.long()
    close_value(
        loss.reshape(()),
        ref_step_loss(p, new, targets, tau),
        dtype,
        scale=1 / tau,
        what="the loss (the mean over crops, targets and samples, with the new groups)",
    )
    per_pair = torch.stack(
        [
            impl.smog_loss(p[c], new, targets[j], tau)
            for c in range(p.shape[0])
            for j in range(zt.shape[0])
        ]
    )
    close(
        loss,
        per_pair.mean(),
        dtype,
        scale=1 / tau,
        msg="the loss is not the mean of smog_loss over the pairs",
    )


@invariant("S2")
@pytest.mark.gradient
@given(data=st.data())
def test_loss_gradient_in_p_is_that_of_the_mean_with_new_groups(impl, data):
    dtype, g, z, zt, p, beta, tau = _problem(data)
    p = p.clone().requires_grad_(True)
    loss, new, targets = impl.smog_step(g, z, zt, p, beta, tau)
    needs_graph(loss, "smog_step's loss")
    ref = ref_step_loss(p, new.detach(), targets.long(), tau)
    (got,) = torch.autograd.grad(loss, p)
    (want,) = torch.autograd.grad(ref, p)
    close_grad(got, want, "p", dtype, scale=1 / tau, what="smog_step's loss")


@invariant("S3")
@given(data=st.data())
def test_new_groups_are_update_of_old_groups(impl, data):
    dtype, g, z, zt, p, beta, tau = _problem(data)
    _decided(dtype, g, z)
    a, _ = ref_assign(z, g)
    expected, smallest = ref_update(g, z, a, beta)
    assume(smallest > 1e-2)
    _, new, _ = impl.smog_step(g, z, zt, p, beta, tau)
    close(new, expected, dtype)
    close(new, impl.update_groups(g, z, impl.assign_groups(z, g), beta), dtype)


@invariant("S4")
@given(data=st.data())
def test_duplicating_the_whole_batch_changes_nothing(impl, data):
    dtype, g, z, zt, p, beta, tau = _problem(data)
    _decided(dtype, g, z, zt)
    assume(ref_update(g, z, ref_assign(z, g)[0], beta)[1] > 1e-2)
    loss, new, targets = impl.smog_step(g, z, zt, p, beta, tau)
    loss2, new2, targets2 = impl.smog_step(
        g, torch.cat([z, z]), torch.cat([zt, zt], 1), torch.cat([p, p], 1), beta, tau
    )
    assert torch.equal(targets2, torch.cat([targets, targets], 1))
    close(new2, new, dtype)
    close(loss2, loss, dtype, scale=1 / tau)


@invariant("S5")
@given(data=st.data(), seed=seeds)
def test_duplicating_one_sample(impl, data, seed):
    """Targets of the other samples and every group the sample did not join stay; the joined group
    moves as if the sample had weight 2 in its mean."""
    dtype, g, z, zt, p, beta, tau = _problem(data)
    _decided(dtype, g, z, zt)
    B = z.shape[0]
    b = int(torch.randint(0, B, (1,), generator=torch.Generator().manual_seed(seed)))
    a, _ = ref_assign(z, g)
    z2, zt2, p2 = (
        torch.cat([z, z[b : b + 1]]),
        torch.cat([zt, zt[:, b : b + 1]], 1),
        torch.cat([p, p[:, b : b + 1]], 1),
    )
    expected2, smallest = ref_update(g, z2, torch.cat([a, a[b : b + 1]]), beta)
    assume(smallest > 1e-2 and ref_update(g, z, a, beta)[1] > 1e-2)
    _, new, targets = impl.smog_step(g, z, zt, p, beta, tau)
    _, new2, targets2 = impl.smog_step(g, z2, zt2, p2, beta, tau)
    assert torch.equal(targets2[:, :B], targets) and torch.equal(targets2[:, B], targets[:, b])
    others = torch.arange(g.shape[0]) != a[b]
    close(new2[others], new[others], dtype)
    close(new2, expected2, dtype)


@invariant("S6")
@given(data=st.data())
def test_split_across_ranks_equals_one_batch(impl, data):
    """Every rank holds the same new groups (those of the whole batch), its rows' targets, and a
    loss whose sample-weighted mean over ranks is the whole batch's loss."""
    dtype, g, z, zt, p, beta, tau = _problem(data, b_min=2, b_max=8)
    sizes = data.draw(shard_sizes(z.shape[0], min_size=1), "shards")
    _decided(dtype, g, z, zt)
    assume(ref_update(g, z, ref_assign(z, g)[0], beta)[1] > 1e-2)
    zs, zts, ps = torch.split(z, sizes), torch.split(zt, sizes, 1), torch.split(p, sizes, 1)
    out = run_ranks(
        len(sizes),
        lambda r, ar, _: impl.smog_step(g, zs[r], zts[r], ps[r], beta, tau, all_reduce=ar),
    )
    loss, new, targets = impl.smog_step(g, z, zt, p, beta, tau)
    for r in range(len(sizes)):
        assert torch.equal(out[r][1], out[0][1]), f"rank {r} holds different groups from rank 0"
    close(out[0][1], new, dtype)
    assert torch.equal(torch.cat([o[2] for o in out], 1), targets)
    weighted = sum(o[0].double() * n for o, n in zip(out, sizes)) / sum(sizes)
    close(weighted, loss, dtype, scale=1 / tau)


def _check_pure(impl, g, z, zt, p, beta, tau, **kw):
    before = [t.clone() for t in (g, z, zt, p)]
    first = impl.smog_step(g, z, zt, p, beta, tau, **kw)
    for t, t0, name in zip((g, z, zt, p), before, ("groups", "z_update", "z_target", "p")):
        assert torch.equal(t, t0), f"smog_step modified its input {name}"
    second = impl.smog_step(g, z, zt, p, beta, tau, **kw)
    for x, y in zip(first, second):
        assert torch.equal(x, y), "a second identical call gave a different result (hidden state?)"


@invariant("S7")
@given(data=st.data())
def test_step_is_pure(impl, data):
    dtype, g, z, zt, p, beta, tau = _problem(data)
    _check_pure(impl, g, z, zt, p, beta, tau)


@invariant("S7")
@optional("group_grad")
@given(data=st.data())
def test_step_is_pure_with_group_grad(impl, data):
    dtype, g, z, zt, p, beta, tau = _problem(data)
    _check_pure(impl, g, z, zt, p, beta, tau, group_grad=True)


# -- contract: the protocol's conventions ------------------------------------------------------------


@invariant("S8")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_step_return_types(impl, dtype):
    """smog_step -> (a 0-dim loss, new groups of the dtype and shape of `groups`, int64 targets [J, B])."""
    gen = torch.Generator().manual_seed(5)
    g = ref_normalise(torch.randn(4, 3, generator=gen, dtype=torch.float64)).to(dtype)
    z, zt, p = (
        torch.randn(*s, 3, generator=gen, dtype=torch.float64).to(dtype)
        for s in ((6,), (2, 6), (3, 6))
    )
    loss, new, targets = impl.smog_step(g, z, zt, p, 0.9, 0.1)
    assert loss.dim() == 0, f"loss of shape {tuple(loss.shape)}; the protocol's is a 0-dim tensor"
    assert new.dtype == dtype and new.shape == g.shape, (
        f"new groups {new.dtype} {tuple(new.shape)} for {dtype} groups {tuple(g.shape)}"
    )
    assert targets.dtype == torch.long and tuple(targets.shape) == (2, 6), (
        f"targets {targets.dtype} {tuple(targets.shape)}; the protocol's are int64 (J, B) = (2, 6)"
    )
