"""Hypothesis strategies for the spec suite: small and awkward shapes, awkward values.

Tensors are drawn as (kind, seed) and built with a seeded torch.Generator: fast to generate, exactly
reproducible, and the kind is what shrinks. Kinds:
  gauss   i.i.d. N(0, 1) entries
  int     integers in [-2, 2] (exact ties, antipodal rows; an all-zero row gets a 1 in column 0)
  dup     rows drawn with replacement from a few distinct rows (duplicate rows)
  scaled  Gaussian rows times 2**e, e in [-8, 8] (very different norms)
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

KINDS = ("gauss", "int", "dup", "scaled")
DTYPES = st.sampled_from([torch.float64, torch.float32])
seeds = st.integers(0, 2**32 - 1)
betas = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.99]), st.floats(0.0, 1.0))
taus = st.one_of(st.sampled_from([0.1, 1.0, 10.0]), st.floats(0.01, 10.0))  # tau in (0, 10]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build(kind: str, seed: int, n: int, d: int) -> torch.Tensor:
    g = _gen(seed)
    if kind == "gauss":
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
    elif kind == "int":
        x = torch.randint(-2, 3, (n, d), generator=g).double()
    elif kind == "dup":
        base = torch.randn(max(1, (n + 1) // 2), d, generator=g, dtype=torch.float64)
        x = base[torch.randint(0, base.shape[0], (n,), generator=g)]
    elif kind == "scaled":
        x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(
            -8, 9, (n, 1), generator=g
        )
    else:
        raise ValueError(kind)
    zero = (x == 0).all(dim=1)
    x[zero, 0] = 1.0  # rows are never the zero vector (its direction is undefined)
    return x


@st.composite
def matrices(draw, n: int, d: int, dtype=torch.float64, kinds=KINDS):
    """[n, d] rows of the given dtype, none of them zero."""
    return build(draw(st.sampled_from(kinds)), draw(seeds), n, d).to(dtype)


@st.composite
def unit_rows(draw, k: int, d: int, dtype=torch.float64, kinds=KINDS):
    """[k, d] unit rows (group features / centres); 'dup' gives identical groups."""
    x = build(draw(st.sampled_from(kinds)), draw(seeds), k, d)
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)


@st.composite
def assignments(draw, n: int, k: int):
    """[n] group indices in [0, k): spread over all groups, or crowded into a few (many empty groups)."""
    g = _gen(draw(seeds))
    hi = k if draw(st.booleans()) else max(1, k // 3)
    return torch.randint(0, hi, (n,), generator=g)


@st.composite
def shard_sizes(draw, n: int, min_size: int = 0, max_world: int = 4):
    """Sizes of 2..4 uneven shards adding up to n, each at least min_size (n >= 2 * min_size)."""
    top = min(max_world, n // min_size) if min_size else max_world
    world = draw(st.integers(2, max(2, top)))
    free = n - world * min_size
    cuts = sorted(draw(st.lists(st.integers(0, free), min_size=world - 1, max_size=world - 1)))
    bounds = [0, *cuts, free]
    return [min_size + bounds[i + 1] - bounds[i] for i in range(world)]


@st.composite
def positive_scales(draw, n: int, powers_of_two: bool = False):
    """[n, 1] positive row factors: exact powers of two, or anything in [1e-3, 1e3]."""
    g = _gen(draw(seeds))
    if powers_of_two:
        return 2.0 ** torch.randint(-30, 31, (n, 1), generator=g).double()
    return torch.exp(torch.empty(n, 1, dtype=torch.float64).uniform_(-6.9, 6.9, generator=g))


small = st.integers(1, 6)
