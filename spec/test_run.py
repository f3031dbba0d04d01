"""run.md: the regroup of all heads from the memory bank (R1-R4); the returned type and the
reference's draw (R5, contract).

The bank of a problem is built in dataset-index order (`full [2, n, D]`, row i = dataset index i) and
handed over in a shuffled local order (`full[:, perm]` with `index = perm`), as a data loader writes
it; the references work on `full`."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from spec.harness import close, ref_kmeans_from, ref_normalise, ref_regroup, run_ranks, split_rows
from spec.strategies import DTYPES, matrices, seeds, shard_sizes

invariant = pytest.mark.invariant


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _bank(data, dtype=torch.float64, h_min=1, n_extra=6):
    """-> (dtype, full [2, n, D], perm [n], H, k); the rows are Gaussian, so no two are parallel."""
    H, k, d = (
        data.draw(st.integers(h_min, 3), "H"),
        data.draw(st.integers(1, 4), "k"),
        data.draw(st.integers(2, 4), "D"),
    )
    n = data.draw(st.integers(k, k + n_extra), "n")
    full = data.draw(matrices(2 * n, d, dtype, ("gauss",)), "bank").view(2, n, d)
    perm = torch.randperm(n, generator=_gen(data.draw(seeds, "order")))
    return dtype, full, perm, H, k


def _draw(n, H, k, seed):
    """Initial dataset indices of the test's own choosing (R2 takes any)."""
    g = _gen(seed + 1)
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(H)])


def _rows_of(centres, x):
    """-> (indices of the rows of `x` whose normalised value each centre is, largest distance)."""
    dist = torch.cdist(centres.double(), ref_normalise(x))
    return dist.argmin(dim=1), float(dist.min(dim=1).values.max())


@invariant("R1")
@given(data=st.data())
def test_head_h_clusters_bank_row_h_mod_2(impl, data):
    """iters = 0: every initial centre of head h is a normalised row of bank row h mod 2."""
    dtype, full, perm, H, k = _bank(data, h_min=2)
    n = full.shape[1]
    got = impl.regroup(full[:, perm], perm, n, H, k, 0, generator=_gen(data.draw(seeds, "seed")))
    for h in range(H):
        _, far = _rows_of(got[h], full[h % 2])
        assert far < 1e-10, (
            f"head {h}: its initial centres are not rows of bank row {h % 2} (distance {far:.3g})"
            + (
                "; they are rows of bank row 0"
                if h % 2 and _rows_of(got[h], full[0])[1] < 1e-10
                else ""
            )
        )


@invariant("R2")
@given(data=st.data(), iters=st.integers(0, 3))
def test_each_head_is_kmeans_from_the_rows_of_its_dataset_indices(impl, data, iters):
    """init_index given: head h equals Lloyd iterations on bank row h mod 2 from the normalised rows of
    the dataset indices init_index[h], whatever the local order of the rows."""
    dtype = data.draw(DTYPES, "dtype")
    dtype, full, perm, H, k = _bank(data, dtype)
    n = full.shape[1]
    init = _draw(n, H, k, data.draw(seeds, "seed"))
    want, worst = ref_regroup(full, init, iters)
    assume(worst > (1e-9 if dtype == torch.float64 else 1e-5))
    got = impl.regroup(full[:, perm], perm, n, H, k, iters, init_index=init)
    for h in range(H):
        close(
            got[h],
            want[h],
            dtype,
            msg=f"head {h} (bank row {h % 2}, initial dataset indices {init[h].tolist()}, "
            f"local order {perm.tolist()}, {iters} iterations)",
        )


@invariant("R3")
@given(data=st.data())
def test_initial_draw_is_k_distinct_rows_fixed_by_the_generator_and_blind_to_row_order(impl, data):
    dtype, full, perm, H, k = _bank(data)
    n, seed = full.shape[1], data.draw(seeds, "seed")
    got = impl.regroup(full[:, perm], perm, n, H, k, 0, generator=_gen(seed))
    for h in range(H):
        rows, far = _rows_of(got[h], full[h % 2])
        assert far < 1e-10, (
            f"head {h}: an initial centre is not a normalised bank row (distance {far:.3g})"
        )
        assert len(set(rows.tolist())) == k, (
            f"head {h}: initial rows {rows.tolist()} are not {k} distinct rows"
        )
    again = impl.regroup(full[:, perm], perm, n, H, k, 0, generator=_gen(seed))
    assert torch.equal(again, got), "the same generator state gave a different draw"
    other = torch.randperm(n, generator=_gen(seed + 3))
    reordered = impl.regroup(full[:, other], other, n, H, k, 0, generator=_gen(seed))
    assert torch.equal(reordered, got), (
        f"reordering the bank's rows (local order {perm.tolist()} -> {other.tolist()}) changed the draw: "
        "it is by local position, not by dataset index"
    )


@invariant("R3")
def test_heads_0_and_2_start_from_different_rows(impl):
    """Heads 0 and 2 cluster bank row 0 (R1); with a draw per head they start from different rows for
    at least one of three seeds (two ordered draws of 4 of 16 rows coincide with probability 1/43680)."""
    full = torch.randn(2, 16, 3, generator=_gen(3), dtype=torch.float64)
    index = torch.arange(16)
    same = [
        torch.equal(g[0], g[2])
        for g in (impl.regroup(full, index, 16, 3, 4, 0, generator=_gen(s)) for s in range(3))
    ]
    assert not all(same), (
        "heads 0 and 2 start from the same rows for three seeds: one draw shared by all heads"
    )


@invariant("R4")
@given(data=st.data(), iters=st.integers(1, 3))
def test_sharded_bank_gives_the_single_process_groups_on_every_rank(impl, data, iters):
    """2-4 ranks, uneven shards (some may be empty), rows in shuffled order; every rank passes a
    generator in the same state."""
    dtype, full, perm, H, k = _bank(data)
    n, seed = full.shape[1], data.draw(seeds, "seed")
    sizes = data.draw(shard_sizes(n), "shards")
    start = impl.regroup(full[:, perm], perm, n, H, k, 0, generator=_gen(seed))
    worst = min(ref_kmeans_from(full[h % 2], start[h], iters)[2] for h in range(H))
    assume(worst > 1e-9)
    single = impl.regroup(full[:, perm], perm, n, H, k, iters, generator=_gen(seed))
    banks, idx = split_rows(full[:, perm], sizes, dim=1), split_rows(perm, sizes)
    out = run_ranks(
        len(sizes),
        lambda r, ar, _: impl.regroup(
            banks[r], idx[r], n, H, k, iters, generator=_gen(seed), all_reduce=ar
        ),
    )
    for r in range(len(sizes)):
        assert torch.equal(out[r], out[0]), (
            f"shards {sizes}: rank {r} holds different groups from rank 0"
        )
    close(
        out[0],
        single,
        dtype,
        msg=f"shards {sizes}: the ranks' groups are not the single-process groups",
    )


# -- contract: the protocol's conventions ------------------------------------------------------------


@invariant("R5")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_regroup_return_type(impl, dtype):
    full = torch.randn(2, 9, 3, generator=_gen(4), dtype=torch.float64).to(dtype)
    got = impl.regroup(full, torch.arange(9), 9, 3, 4, 2, generator=_gen(5))
    assert got.dtype == dtype and tuple(got.shape) == (3, 4, 3), (
        f"groups {got.dtype} {tuple(got.shape)} for a {dtype} bank; the protocol's are {dtype} (H, k, D) = (3, 4, 3)"
    )


@invariant("R5")
@pytest.mark.unless_declared("own_random_draw")
@given(data=st.data())
def test_reference_draw_is_randperm_per_head_in_turn(impl, data):
    dtype, full, perm, H, k = _bank(data)
    n, seed = full.shape[1], data.draw(seeds, "seed")
    g = _gen(seed)
    want = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(H)])
    got = impl.regroup(full[:, perm], perm, n, H, k, 0, generator=_gen(seed))
    for h in range(H):
        close(
            got[h],
            ref_normalise(full[h % 2])[want[h]],
            dtype,
            msg=f"head {h}: expected the rows of dataset indices {want[h].tolist()} "
            f"(randperm(n, generator)[:k], head {h} of {H} in turn)",
        )
