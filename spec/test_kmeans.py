"""kmeans.md: spherical k-means (K1-K9); the returned types and the error type (K10, contract).

The tests that shard the rows over ranks do not apply to a k-means over a bank replicated on every
rank; an implementation declares that with SPEC_DECLARES = {"replicated_kmeans": ...}, and they read
"n/a (declared)"."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from spec.harness import (
    close,
    kmeans_objective,
    margin_threshold,
    ref_assign,
    ref_kmeans_from,
    ref_mstep,
    ref_normalise,
    run_ranks,
    split_rows,
    tol,
    unambiguous,
)
from spec.strategies import DTYPES, matrices, seeds

invariant = pytest.mark.invariant
sharded = pytest.mark.unless_declared(
    "replicated_kmeans"
)  # n/a for a k-means over a replicated bank


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _problem(data, dtype=None, n_max=10, kinds=("gauss", "int", "dup", "scaled")):
    dtype = dtype or data.draw(DTYPES, "dtype")
    n, d = data.draw(st.integers(1, n_max), "N"), data.draw(st.integers(1, 4), "D")
    k = data.draw(st.integers(1, n), "k")
    x = data.draw(matrices(n, d, dtype, kinds), "x")
    return dtype, x, k, data.draw(seeds, "seed")


def _drawn_rows(c, x):
    """-> (row of x whose normalised value each centre is, largest distance): which rows were drawn."""
    dist = torch.cdist(c.double(), ref_normalise(x))
    return dist.argmin(dim=1), float(dist.min(dim=1).values.max())


def _distinct_directions(x) -> bool:
    xn = ref_normalise(x)
    return len(xn) < 2 or bool(torch.pdist(xn).min() > 1e-6)


@invariant("K1")
@given(data=st.data())
def test_initial_centres_are_k_distinct_normalised_rows_fixed_by_the_generator(impl, data):
    """What SMoG requires of the draw, whatever generator an implementation draws with: iters = 0
    returns k distinct normalised rows of the data, and the same generator state the same rows. Which
    rows a seed picks is the contract (K11)."""
    dtype, x, k, seed = _problem(data, kinds=("gauss", "int", "scaled"))
    c, _ = impl.spherical_kmeans(x, k, 0, generator=_gen(seed))
    rows, far = _drawn_rows(c, x)
    assert far < (1e-12 if dtype == torch.float64 else 1e-6), (
        f"an initial centre is not a normalised row of the data (distance {far:.3g})"
    )
    if _distinct_directions(x):
        assert len(set(rows.tolist())) == k, (
            f"initial centres are rows {rows.tolist()}: not {k} distinct rows"
        )
    again, _ = impl.spherical_kmeans(x, k, 0, generator=_gen(seed))
    assert torch.equal(again, c), "the same generator state drew different initial centres"


@invariant("K1")
@sharded
@given(data=st.data(), world=st.integers(2, 4))
def test_sharded_initial_centres_come_from_rank0_and_are_shared(impl, data, world):
    """All ranks hold the same k distinct rows of the data; only rank 0's generator matters."""
    d, k = data.draw(st.integers(1, 4), "D"), data.draw(st.integers(1, 4), "k")
    sizes = [data.draw(st.integers(k, k + 3), "rank 0 rows")] + [
        data.draw(st.integers(1, 4), f"rank {r} rows") for r in range(1, world)
    ]
    x = data.draw(matrices(sum(sizes), d, torch.float64, ("gauss",)), "x")
    xs, seed = split_rows(x, sizes), data.draw(seeds, "seed")
    runs = []
    for other in (1, 2):  # other ranks' generators differ between the two runs
        runs.append(
            run_ranks(
                world,
                lambda r, ar, bc: impl.spherical_kmeans(
                    xs[r],
                    k,
                    0,
                    generator=_gen(seed if r == 0 else seed + other * (r + 7)),
                    all_reduce=ar,
                    broadcast=bc,
                ),
            )
        )
    for out in runs:
        for r in range(world):
            assert torch.equal(out[r][0], runs[0][0][0]), (
                f"rank {r} holds different initial centres"
            )
    dist = torch.cdist(runs[0][0][0].double(), ref_normalise(x))  # (k, N)
    match = dist.argmin(dim=1)
    assert dist.min(dim=1).values.max() < 1e-12, "an initial centre is not a normalised data row"
    xn = ref_normalise(x)
    if torch.pdist(xn).min() > 1e-6 if len(xn) > 1 else True:  # rows distinct as directions
        assert len(set(match.tolist())) == k, "initial centres are not k distinct rows"


@invariant("K2")
@given(data=st.data(), iters=st.integers(0, 4))
def test_returned_assignment_is_estep_on_returned_centres(impl, data, iters):
    """Up to 40 rows: enough that the last iteration usually still moves rows between clusters, so
    the assignment from before the last M-step differs from the one asked for."""
    dtype, x, k, seed = _problem(data, n_max=40)
    c, a = impl.spherical_kmeans(x, k, iters, generator=_gen(seed))
    ref, margin = ref_assign(x, c)
    ok = unambiguous(margin, dtype)
    a = a.long()
    assert torch.equal(a[ok], ref[ok]), f"{a.tolist()} != argmax {ref.tolist()}"


@invariant("K3")
@given(data=st.data(), t=st.integers(0, 3))
def test_one_iteration_is_normalised_mean_of_members(impl, data, t):
    """c_{t+1} = M-step(c_t, a_t), where (c_t, a_t) is the result after t iterations (K2: a_t is the
    E-step on c_t); a cluster without members keeps its centre bit for bit."""
    dtype, x, k, seed = _problem(data)
    c_t, a_t = impl.spherical_kmeans(x, k, t, generator=_gen(seed))
    a_t = a_t.long()
    c_next, _ = impl.spherical_kmeans(x, k, t + 1, generator=_gen(seed))
    expected, smallest = ref_mstep(x, c_t, a_t)
    assume(smallest > 1e-2)
    close(c_next, expected, dtype)
    empty = torch.bincount(a_t, minlength=k) == 0
    assert torch.equal(c_next[empty], c_t[empty]), "an empty cluster did not keep its centre"


@invariant("K3")
@given(data=st.data())
def test_empty_clusters_keep_their_centre(impl, data):
    """Duplicate rows and k = N: identical initial centres, and only one copy can win their rows."""
    dtype = data.draw(DTYPES, "dtype")
    n, d = data.draw(st.integers(2, 8), "N"), data.draw(st.integers(1, 4), "D")
    x = data.draw(matrices(n, d, dtype, ("dup",)), "x")
    seed = data.draw(seeds, "seed")
    c0, a0 = impl.spherical_kmeans(x, n, 0, generator=_gen(seed))
    c1, _ = impl.spherical_kmeans(x, n, 1, generator=_gen(seed))
    empty = torch.bincount(a0.long(), minlength=n) == 0
    assume(bool(empty.any()))
    assert torch.equal(c1[empty], c0[empty]), (
        f"empty clusters {empty.nonzero().flatten().tolist()} moved"
    )


@invariant("K4")
@given(data=st.data())
def test_objective_never_decreases(impl, data):
    dtype, x, k, seed = _problem(data)
    objective = [
        kmeans_objective(x, impl.spherical_kmeans(x, k, t, generator=_gen(seed))[0])
        for t in range(5)
    ]
    slack = x.shape[0] * (1e-10 if dtype == torch.float64 else 1e-5)
    for t in range(4):
        assert objective[t + 1] >= objective[t] - slack, f"objective went down: {objective}"


@invariant("K5")
@given(data=st.data(), iters=st.integers(0, 4))
def test_centres_have_unit_norm(impl, data, iters):
    """Rows in the positive orthant, so no cluster's members can sum to zero (kmeans.md)."""
    dtype, x, k, seed = _problem(data)
    x = x.abs()
    c, _ = impl.spherical_kmeans(x, k, iters, generator=_gen(seed))
    norms = c.double().norm(dim=1)
    close(norms, torch.ones_like(norms), dtype)


@invariant("K6")
@sharded
@given(data=st.data(), world=st.integers(2, 4), iters=st.integers(1, 4))
def test_sharded_run_equals_single_run_from_same_centres(impl, data, world, iters):
    d, k = data.draw(st.integers(1, 4), "D"), data.draw(st.integers(1, 4), "k")
    sizes = [data.draw(st.integers(k, k + 3), "rank 0 rows")] + [
        data.draw(st.integers(1, 5), f"rank {r} rows") for r in range(1, world)
    ]
    x = data.draw(matrices(sum(sizes), d, torch.float64), "x")
    xs, seed = split_rows(x, sizes), data.draw(seeds, "seed")

    def run(n_iters):
        return run_ranks(
            world,
            lambda r, ar, bc: impl.spherical_kmeans(
                xs[r], k, n_iters, generator=_gen(seed + r), all_reduce=ar, broadcast=bc
            ),
        )

    c0 = run(0)[0][0]
    expected_c, expected_a, worst = ref_kmeans_from(x, c0, iters)
    assume(worst > 1e-9)
    out = run(iters)
    for r in range(world):
        assert torch.equal(out[r][0], out[0][0]), f"rank {r} holds different centres from rank 0"
    close(out[0][0], expected_c, torch.float64, msg=f"shards {sizes}")
    assert torch.equal(torch.cat([o[1] for o in out]).long(), expected_a)


@invariant("K7")
@given(data=st.data(), iters=st.integers(0, 4))
def test_fixed_generator_is_deterministic(impl, data, iters):
    dtype, x, k, seed = _problem(data)
    c1, a1 = impl.spherical_kmeans(x, k, iters, generator=_gen(seed))
    c2, a2 = impl.spherical_kmeans(x, k, iters, generator=_gen(seed))
    assert torch.equal(c1, c2) and torch.equal(a1, a2)


@invariant("K8")
@given(data=st.data(), iters=st.integers(0, 4))
def test_invariant_to_positive_row_scaling(impl, data, iters):
    """Powers of two: the normalised rows are bit for bit the same, so the whole run is."""
    dtype, x, k, seed = _problem(data)
    s = 2.0 ** torch.randint(-20, 21, (x.shape[0], 1), generator=_gen(seed)).to(dtype)
    c1, a1 = impl.spherical_kmeans(x, k, iters, generator=_gen(seed))
    c2, a2 = impl.spherical_kmeans(x * s, k, iters, generator=_gen(seed))
    torch.testing.assert_close(
        c2,
        c1,
        atol=tol(dtype)["atol"],
        rtol=0,
        msg=lambda m: (
            f"rows rescaled by powers of two gave other centres: {m} (judged as "
            f"{dtype}: atol {tol(dtype)['atol']:.3g}, rtol 0)"
        ),
    )
    assert torch.equal(a1, a2)


def _raises(call) -> str:
    """'raised' if call() raises an Exception (its type is K10's business), else 'returned'."""
    try:
        call()
    except Exception:  # noqa: BLE001 - NotImplementedError never gets here (harness.Impl fails the test)
        return "raised"
    return "returned"


@invariant("K9")
@given(n=st.integers(0, 4), extra=st.integers(1, 3), d=st.integers(1, 3))
def test_fewer_rows_than_k_is_an_error(impl, n, extra, d):
    x = torch.randn(n, d, dtype=torch.float64, generator=_gen(n + d))
    assert _raises(lambda: impl.spherical_kmeans(x, n + extra, 2, generator=_gen(0))) == "raised", (
        f"{n} rows into k = {n + extra} clusters returned instead of raising"
    )


@invariant("K9")
@sharded
@given(data=st.data(), world=st.integers(2, 3))
def test_sharded_row_count_is_global(impl, data, world):
    """Each rank but 0 holds fewer than k rows: not an error while the total holds k. When the total
    falls short, every rank raises (a rank left waiting in a collective breaks the barrier)."""
    k = data.draw(st.integers(2, 4), "k")
    sizes = [k] + [data.draw(st.integers(1, k - 1), f"rank {r} rows") for r in range(1, world)]
    x = torch.randn(sum(sizes), 2, dtype=torch.float64, generator=_gen(sum(sizes)))
    xs = split_rows(x, sizes)
    out = run_ranks(
        world,
        lambda r, ar, bc: impl.spherical_kmeans(
            xs[r], k, 1, generator=_gen(r), all_reduce=ar, broadcast=bc
        ),
    )
    assert all(o[0].shape == (k, 2) for o in out)
    small = [xs[r][: k - 1 if r == 0 else 0] for r in range(world)]
    got = run_ranks(
        world,
        lambda r, ar, bc: _raises(
            lambda: impl.spherical_kmeans(
                small[r], k, 1, generator=_gen(r), all_reduce=ar, broadcast=bc
            )
        ),
    )
    assert got == ["raised"] * world, f"{k - 1} rows in total into k = {k}: the ranks {got}"


@invariant("K2", "K3")
def test_large_run_crosses_the_estep_chunk_boundary(impl):
    """4096 rows x 600 centres = 2.46M scores: more than one chunk of smog._nearest (2^21 scores on the
    CPU), so an E-step computed in row chunks must stitch them back in order. One iteration from the
    implementation's own initial centres (its iters = 0 result) is compared with the float64
    reference: centres, and the returned assignment."""
    N, k, D = 4096, 600, 8
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    c0, _ = impl.spherical_kmeans(x, k, 0, generator=_gen(5))  # the implementation's own draw (K1)
    c1, a1, worst = ref_kmeans_from(x, c0, 1)
    assert worst > margin_threshold(torch.float64), (
        "the fixed data has a near-tie; pick another seed"
    )
    c, a = impl.spherical_kmeans(x, k, 1, generator=_gen(5))
    close(c, c1, torch.float64)
    a = a.long()
    assert torch.equal(a, a1), f"{int((a != a1).sum())} of {N} rows assigned differently"


# -- contract: the protocol's conventions ------------------------------------------------------------


@invariant("K10")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kmeans_return_types(impl, dtype):
    """(centres [k, D] of the dtype of x, int64 assignment [N])."""
    x = torch.randn(9, 3, generator=_gen(8), dtype=torch.float64).to(dtype)
    c, a = impl.spherical_kmeans(x, 4, 2, generator=_gen(9))
    assert c.dtype == dtype and tuple(c.shape) == (4, 3), (
        f"centres {c.dtype} {tuple(c.shape)} for {dtype} rows; the protocol's are {dtype} (k, D) = (4, 3)"
    )
    assert a.dtype == torch.long and tuple(a.shape) == (9,), (
        f"assignment {a.dtype} {tuple(a.shape)}; the protocol's is int64 (N,) = (9,)"
    )


@invariant("K10")
def test_fewer_rows_than_k_is_a_value_error(impl):
    x = torch.randn(3, 2, dtype=torch.float64, generator=_gen(10))
    try:
        impl.spherical_kmeans(x, 4, 2, generator=_gen(0))
    except Exception as e:  # noqa: BLE001 - the type is what this test checks
        assert isinstance(e, ValueError), (
            f"3 rows into k = 4 raised {type(e).__name__}; the protocol's error is ValueError"
        )
        return
    raise AssertionError("3 rows into k = 4 returned; the protocol raises ValueError")


@invariant("K11")
@pytest.mark.unless_declared("own_random_draw")
@given(data=st.data())
def test_reference_draw_is_randperm_of_the_rows(impl, data):
    """The reference's own draw, normalise(x)[randperm(N, generator)[:k]], pinned so that two
    implementations can be compared run for run; any other seeded draw of k distinct rows is SMoG (K1)."""
    dtype, x, k, seed = _problem(data)
    c, _ = impl.spherical_kmeans(x, k, 0, generator=_gen(seed))
    idx = torch.randperm(x.shape[0], generator=_gen(seed))[:k]
    close(
        c,
        ref_normalise(x)[idx],
        dtype,
        msg=f"expected rows {idx.tolist()} (randperm(N, generator)[:k])",
    )
