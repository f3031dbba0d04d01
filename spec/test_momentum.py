"""momentum.md: the parameter EMA (M1, M2, M4) and the beta schedule (M3)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spec.strategies import DTYPES, seeds

invariant = pytest.mark.invariant

SHAPES = [(3,), (2, 2), (1,), (2, 1, 3)]


def _params(seed, dtype, n):
    """n tensors as a module hands them over: nn.Parameter objects (no grad, as in a momentum network)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(SHAPES[i % len(SHAPES)], generator=g, dtype=torch.float64).to(dtype),
                               requires_grad=False) for i in range(n)]


ms = st.one_of(st.sampled_from([0.0, 1.0, 0.999, 0.5]), st.floats(0.0, 1.0))


@invariant("M1")
@given(seed=seeds, dtype=DTYPES, n=st.integers(1, 5), m=ms)
def test_one_step_in_place(impl, seed, dtype, n, m):
    """The rule: after the call, each tensor *object* in `target` holds the new values. Writing into
    its storage (copy_, foreach ops) and rebinding its .data both qualify; rebinding a name does not."""
    target, online = _params(seed, dtype, n), _params(seed + 1, dtype, n)
    t0, o0 = [t.detach().clone() for t in target], [o.detach().clone() for o in online]
    impl.momentum_update_(target, online, m)
    tt = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 1e-6, "rtol": 1e-6}
    for t, a, o, o_before in zip(target, t0, online, o0):
        assert torch.equal(o, o_before), "the online parameters changed"
        torch.testing.assert_close(t.detach().double(), m * a.double() + (1 - m) * o.detach().double(), **tt)


@invariant("M2")
@given(seed=seeds, dtype=DTYPES, n=st.integers(1, 5))
def test_m0_copies_and_m1_keeps(impl, seed, dtype, n):
    target, online = _params(seed, dtype, n), _params(seed + 1, dtype, n)
    t0 = [t.clone() for t in target]
    impl.momentum_update_(target, online, 1.0)
    assert all(torch.equal(t, a) for t, a in zip(target, t0)), "m = 1 changed the momentum copy"
    impl.momentum_update_(target, online, 0.0)
    assert all(torch.equal(t, o) for t, o in zip(target, online)), "m = 0 did not make the copies equal"


@invariant("M4")
@given(seed=seeds, steps=st.integers(0, 30), m=ms)
def test_n_steps_closed_form(impl, seed, steps, m):
    target, online = _params(seed, torch.float64, 3), _params(seed + 1, torch.float64, 3)
    t0 = [t.clone() for t in target]
    for _ in range(steps):
        impl.momentum_update_(target, online, m)
    for t, a, o in zip(target, t0, online):
        torch.testing.assert_close(t, m ** steps * a + (1 - m ** steps) * o, atol=1e-12 * (steps + 1), rtol=1e-12)


@invariant("M3")
@given(start=st.floats(0.0, 1.0), end=st.floats(0.0, 1.0), total=st.integers(1, 500))
def test_beta_schedule_is_linear_with_exact_ends(impl, start, end, total):
    s = impl.beta_schedule(start, end, total)
    assert s.dtype == torch.float64 and s.shape == (total,)
    assert float(s[0]) == start
    if total == 1:
        return
    assert float(s[-1]) == end
    t = torch.arange(total, dtype=torch.float64)
    torch.testing.assert_close(s, start + (end - start) * t / (total - 1), atol=1e-15, rtol=0)


@invariant("M3")
def test_beta_schedule_released_recipe(impl):
    s = impl.beta_schedule(1.0, 0.99, 1001)
    assert float(s[0]) == 1.0 and float(s[500]) == pytest.approx(0.995, abs=1e-15) and float(s[-1]) == 0.99
    assert bool((s[1:] <= s[:-1]).all())
