"""grouping.md: assignment (G1, G8) and the synchronous momentum update (G2-G12); the returned types (G13, contract)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from spec.harness import (
    assignment_mismatch,
    close,
    ref_assign,
    ref_normalise,
    ref_update,
    run_ranks,
    split_rows,
    unambiguous,
)
from spec.strategies import (
    DTYPES,
    assignments,
    betas,
    matrices,
    positive_scales,
    seeds,
    shard_sizes,
    small,
    unit_rows,
)

invariant = pytest.mark.invariant


def _problem(data, n_max=8, k_max=6, d_max=5):
    dtype = data.draw(DTYPES, "dtype")
    n, k, d = (
        data.draw(st.integers(1, n_max), "N"),
        data.draw(st.integers(1, k_max), "K"),
        data.draw(st.integers(1, d_max), "D"),
    )
    z = data.draw(matrices(n, d, dtype), "z")
    g = data.draw(unit_rows(k, d, dtype), "groups")
    return dtype, z, g


@invariant("G1")
@given(data=st.data())
def test_assign_is_argmax_of_cosine(impl, data):
    dtype, z, g = _problem(data)
    a = impl.assign_groups(z, g)
    wrong = assignment_mismatch(a, z, g, dtype)
    assert wrong is None, wrong


@invariant("G1")
@given(n=small, k=st.integers(1, 8), d=st.integers(1, 3), seed=seeds, dtype=DTYPES)
def test_assign_ties_go_to_lowest_index(impl, n, k, d, seed, dtype):
    """Groups are signed unit axes +-e_j (repeats likely), z has small integer entries: every score is
    +-z_ij/||z_i||, computed exactly in any summation order, so ties are exact."""
    gen = torch.Generator().manual_seed(seed)
    axis = torch.randint(0, d, (k,), generator=gen)
    sign = torch.randint(0, 2, (k,), generator=gen) * 2 - 1
    g = torch.zeros(k, d, dtype=dtype)
    g[torch.arange(k), axis] = sign.to(dtype)
    zi = torch.randint(-2, 3, (n, d), generator=gen)
    zi[(zi == 0).all(1), 0] = 1
    expected = []
    for i in range(n):
        scores = [int(sign[j]) * int(zi[i, axis[j]]) for j in range(k)]
        expected.append(scores.index(max(scores)))  # first maximum
    a = impl.assign_groups(zi.to(dtype), g)
    assert a.tolist() == expected, f"ties: assigned {a.tolist()}, the first maximum is {expected}"


@invariant("G8")
@given(data=st.data())
def test_assign_and_update_invariant_to_positive_row_scaling(impl, data):
    dtype, z, g = _problem(data)
    s = (
        data.draw(
            positive_scales(z.shape[0]), "scales"
        )  # [1e-3, 1e3] times 2^[-30, 30]: far from 1
        * data.draw(positive_scales(z.shape[0], powers_of_two=True), "powers")
    ).to(dtype)
    assume(
        torch.isfinite(z * s).all() and bool(((z * s).double().norm(dim=1) > 1e-10).all())
    )  # above eps of n()
    ref, margin = ref_assign(z, g)
    ok = unambiguous(margin, dtype)
    scaled = impl.assign_groups(z * s, g).long()
    assert torch.equal(scaled[ok], ref[ok]), (
        f"assignment of rescaled rows {scaled.tolist()} != {ref.tolist()}"
    )
    a = data.draw(assignments(z.shape[0], g.shape[0]), "assign")
    beta = data.draw(betas, "beta")
    _, smallest = ref_update(g, z, a, beta)
    assume(smallest > 1e-2)
    close(impl.update_groups(g, z * s, a, beta), impl.update_groups(g, z, a, beta), dtype)


@invariant("G2")
@given(data=st.data())
def test_update_equals_loop_over_groups(impl, data):
    dtype, z, g = _problem(data)
    a = data.draw(assignments(z.shape[0], g.shape[0]), "assign")
    beta = data.draw(betas, "beta")
    expected, smallest = ref_update(g, z, a, beta)
    assume(
        smallest > 1e-2
    )  # a hit group whose pre-normalisation vector nearly cancels has no stable direction
    new = impl.update_groups(g, z, a, beta)
    close(new, expected, dtype, msg=f"beta={beta} assign={a.tolist()}")


@invariant("G3")
@given(data=st.data())
def test_update_keeps_unit_norm(impl, data):
    dtype, z, g = _problem(data)
    a = data.draw(assignments(z.shape[0], g.shape[0]), "assign")
    beta = data.draw(betas, "beta")
    _, smallest = ref_update(g, z, a, beta)
    assume(smallest > 1e-2)
    norms = impl.update_groups(g, z, a, beta).double().norm(dim=1)
    close(norms, torch.ones_like(norms), dtype)


@invariant("G4")
@given(data=st.data())
def test_groups_without_members_are_unchanged(impl, data):
    dtype, z, g = _problem(data, k_max=8)
    a = data.draw(assignments(z.shape[0], g.shape[0]), "assign")
    beta = data.draw(st.floats(0.0, 0.999), "beta")
    new = impl.update_groups(g, z, a, beta)
    empty = torch.bincount(a, minlength=g.shape[0]) == 0
    assert torch.equal(new[empty], g[empty]), (
        "a group without members changed (must be returned bit for bit)"
    )


@invariant("G5")
@given(data=st.data())
def test_sharded_update_equals_update_on_concatenated_batch(impl, data):
    dtype, z, g = _problem(data, n_max=10)
    a = data.draw(assignments(z.shape[0], g.shape[0]), "assign")
    beta = data.draw(betas, "beta")
    sizes = data.draw(shard_sizes(z.shape[0]), "shards")
    zs, as_ = split_rows(z, sizes), split_rows(a, sizes)
    out = run_ranks(
        len(sizes),
        lambda r, all_reduce, _: impl.update_groups(g, zs[r], as_[r], beta, all_reduce=all_reduce),
    )
    for r in range(1, len(sizes)):
        assert torch.equal(out[r], out[0]), f"rank {r} holds different groups from rank 0"
    _, smallest = ref_update(g, z, a, beta)
    assume(smallest > 1e-2)
    close(out[0], impl.update_groups(g, z, a, beta), dtype, msg=f"shards {sizes}")


@invariant("G6")
def test_per_rank_means_are_not_averaged(impl):
    """Rank 0 holds 1 member of the only group, rank 1 holds 3: the global mean weights samples
    (3/4 on rank 1's direction), averaging the two rank means would weight ranks (1/2 each)."""
    g = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    z0 = torch.tensor([[0.0, 5.0]], dtype=torch.float64)
    z1 = torch.tensor([[2.0, 0.0], [7.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    zs, as_ = [z0, z1], [torch.zeros(1, dtype=torch.long), torch.zeros(3, dtype=torch.long)]
    out = run_ranks(
        2, lambda r, all_reduce, _: impl.update_groups(g, zs[r], as_[r], 0.0, all_reduce=all_reduce)
    )
    right = ref_normalise(torch.tensor([[0.75, 0.25]]))
    wrong = ref_normalise(torch.tensor([[0.5, 0.5]]))
    assert (right - wrong).abs().max() > 0.1
    for r in range(2):
        close(out[r], right, torch.float64, msg=f"rank {r}")


@invariant("G7")
@given(data=st.data())
def test_beta_one_leaves_groups_unchanged(impl, data):
    dtype, z, g = _problem(data)
    a = data.draw(assignments(z.shape[0], g.shape[0]), "assign")
    close(impl.update_groups(g, z, a, 1.0), g, dtype)


@invariant("G7")
@given(data=st.data())
def test_beta_zero_sets_hit_groups_to_normalised_mean(impl, data):
    dtype, z, g = _problem(data)
    a = data.draw(assignments(z.shape[0], g.shape[0]), "assign")
    hit = torch.bincount(a, minlength=g.shape[0]) > 0
    means = torch.stack(
        [ref_normalise(z)[a == k].mean(0) if hit[k] else g[k].double() for k in range(g.shape[0])]
    )
    assume(means.norm(dim=1).min() > 1e-2)
    other = data.draw(unit_rows(*g.shape, dtype), "other groups")  # the old value must not matter
    for groups in (g, other):
        new = impl.update_groups(groups, z, a, 0.0)
        close(new[hit], ref_normalise(means)[hit], dtype)


@invariant("G9")
@given(data=st.data(), seed=seeds)
def test_update_invariant_to_batch_order(impl, data, seed):
    dtype, z, g = _problem(data, n_max=10)
    a = data.draw(assignments(z.shape[0], g.shape[0]), "assign")
    beta = data.draw(betas, "beta")
    _, smallest = ref_update(g, z, a, beta)
    assume(smallest > 1e-2)
    perm = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))
    close(impl.update_groups(g, z[perm], a[perm], beta), impl.update_groups(g, z, a, beta), dtype)


@invariant("G10")
@given(data=st.data())
def test_grouping_functions_are_pure(impl, data):
    dtype, z, g = _problem(data)
    a = data.draw(assignments(z.shape[0], g.shape[0]), "assign")
    beta = data.draw(betas, "beta")
    before = [t.clone() for t in (g, z, a)]
    impl.assign_groups(z, g)
    new = impl.update_groups(g, z, a, beta)
    for t, t0, name in zip((g, z, a), before, ("groups", "z", "assign")):
        assert torch.equal(t, t0), f"update_groups/assign_groups modified its input {name}"
    assert new.data_ptr() != g.data_ptr(), "update_groups must return a new tensor, not its input"


def _cone(n, d, seed, dtype):
    """[n, d] rows around the first axis (every coordinate of the mean is far from 0), n large."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, 0] += 3.0
    return x.to(dtype)


LOW = {
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}  # half an ulp of 1, the rounding of a unit entry


def _low_precision_problem(dtype, seed):
    K, D, N = 3, 4, 4096
    g = ref_normalise(_cone(K, D, seed, torch.float64)).to(dtype)  # unit up to bf16/fp16 rounding
    z = _cone(N, D, seed + 1, dtype)
    return g, z


LOW_CASES = [(torch.bfloat16, 0.5, 0), (torch.float16, 0.0, 1)]


@invariant("G11")
@pytest.mark.parametrize("dtype, beta, seed", LOW_CASES)
def test_low_precision_assignment_is_fp32s(impl, dtype, beta, seed):
    """4096 bf16/fp16 rows: scored in (at least) float32, the assignment is float32's on every row
    without a near-tie, against the groups as given or against the renormalised groups (the groups
    are unit only up to bf16/fp16 rounding, so the two readings of (G1) may part; either is accepted)."""
    g, z = _low_precision_problem(dtype, seed)
    wrong = assignment_mismatch(impl.assign_groups(z, g), z, g, torch.float32)
    assert wrong is None, f"G11 assignment of {dtype} rows: {wrong}"


@invariant("G11")
@pytest.mark.parametrize("dtype, beta, seed", LOW_CASES)
def test_low_precision_statistics_are_accumulated_in_fp32(impl, dtype, beta, seed):
    """4096 bf16/fp16 members, the assignment given: a bf16 sum stops growing at 256 (its spacing there
    is 2), an fp16 one at 2048. Promoted to float32, the new groups are the float64 update of the
    (exactly upcast) inputs, rounded once to the groups' dtype."""
    g, z = _low_precision_problem(dtype, seed)
    K, N = g.shape[0], z.shape[0]
    a = torch.randint(
        0, K - 1, (N,), generator=torch.Generator().manual_seed(seed)
    )  # group K-1 is empty
    new = impl.update_groups(g, z, a, beta)
    expected, _ = ref_update(g, z, a, beta)
    torch.testing.assert_close(
        new.double(),
        expected,
        atol=LOW[dtype],
        rtol=0,
        msg=lambda m: (
            f"G11 statistics of {N} {dtype} members (assignment given): {m} "
            f"(judged against the float64 update: atol {LOW[dtype]:.3g}, the "
            f"rounding of {dtype} groups, rtol 0)"
        ),
    )
    assert torch.equal(new[K - 1].to(g.dtype), g[K - 1]), "a group without members changed"


@invariant("G12")
@given(data=st.data())
def test_zero_rows_join_group_0_and_count(impl, data):
    """A zero row scores exactly 0 against every group, so it joins group 0 (the tie rule), adds the
    zero vector n(0) = 0 to S_0 and 1 to n_0: it pulls group 0 towards its old value."""
    dtype, z, g = _problem(data)
    where = torch.randint(
        0, 2, (z.shape[0],), generator=torch.Generator().manual_seed(data.draw(seeds, "zeros"))
    )
    z = torch.where(where.bool().unsqueeze(1), torch.zeros_like(z), z)
    a = impl.assign_groups(z, g).long()
    assert (a[where.bool()] == 0).all(), "a zero row did not join group 0"
    wrong = assignment_mismatch(a, z, g, dtype, also=where.bool())
    assert wrong is None, wrong
    ref, _ = ref_assign(z, g)
    beta = data.draw(betas, "beta")
    expected, smallest = ref_update(g, z, ref, beta)
    assume(smallest > 1e-2)
    close(impl.update_groups(g, z, ref, beta), expected, dtype)


@invariant("G12")
@given(data=st.data(), beta=st.sampled_from([0.0, 0.3, 0.99, 1.0]))
def test_members_that_cancel(impl, data, beta):
    """Members v and -v of one group sum to exactly 0 (n(-v) = -n(v) bit for bit), so u_k = beta c_k:
    the group keeps its direction for beta > 0 and becomes the zero vector n(0) = 0 for beta = 0."""
    dtype, z, g = _problem(data)
    k = int(
        torch.randint(
            0, g.shape[0], (1,), generator=torch.Generator().manual_seed(data.draw(seeds, "k"))
        )
    )
    v = z[:1]
    new = impl.update_groups(g, torch.cat([v, -v]), torch.tensor([k, k]), beta)
    if beta > 0:
        close(new[k], g[k], dtype)
    else:
        assert not new[k].any(), (
            f"beta = 0 and cancelling members: expected the zero vector, got {new[k].tolist()}"
        )
    others = torch.arange(g.shape[0]) != k
    assert torch.equal(new[others], g[others])


# -- contract: the protocol's conventions ------------------------------------------------------------

ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@invariant("G13")
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_grouping_return_types(impl, dtype):
    """assign_groups: int64 [N]; update_groups: the dtype and shape of `groups` (bf16/fp16 results are
    rounded back once, G11)."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(6, 3, generator=gen, dtype=torch.float64).to(dtype)
    g = ref_normalise(torch.randn(4, 3, generator=gen, dtype=torch.float64)).to(dtype)
    a = impl.assign_groups(z, g)
    assert a.dtype == torch.long and tuple(a.shape) == (6,), (
        f"assign_groups returned {a.dtype} {tuple(a.shape)}; the protocol's is int64 (6,)"
    )
    new = impl.update_groups(g, z, torch.tensor([0, 1, 1, 3, 0, 1]), 0.5)
    assert new.dtype == dtype and new.shape == g.shape, (
        f"update_groups returned {new.dtype} {tuple(new.shape)} for {dtype} groups {tuple(g.shape)}"
    )
