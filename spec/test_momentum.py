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
    return [
        torch.nn.Parameter(
            torch.randn(SHAPES[i % len(SHAPES)], generator=g, dtype=torch.float64).to(dtype),
            requires_grad=False,
        )
        for i in range(n)
    ]


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
        torch.testing.assert_close(
            t.detach().double(),
            m * a.double() + (1 - m) * o.detach().double(),
            **tt,
            msg=lambda e: (
                f"m = {m}: {e} (judged as {dtype}: atol {tt['atol']:.3g}, rtol {tt['rtol']:.3g})"
            ),
        )


@invariant("M2")
@given(seed=seeds, dtype=DTYPES, n=st.integers(1, 5))
def test_m0_copies_and_m1_keeps(impl, seed, dtype, n):
    target, online = _params(seed, dtype, n), _params(seed + 1, dtype, n)
    t0 = [t.clone() for t in target]
    impl.momentum_update_(target, online, 1.0)
    assert all(torch.equal(t, a) for t, a in zip(target, t0)), "m = 1 changed the momentum copy"
    impl.momentum_update_(target, online, 0.0)
    assert all(torch.equal(t, o) for t, o in zip(target, online)), (
        "m = 0 did not make the copies equal"
    )


@invariant("M4")
@given(seed=seeds, steps=st.integers(0, 30), m=ms)
def test_n_steps_closed_form(impl, seed, steps, m):
    target, online = _params(seed, torch.float64, 3), _params(seed + 1, torch.float64, 3)
    t0 = [t.clone() for t in target]
    for _ in range(steps):
        impl.momentum_update_(target, online, m)
    for t, a, o in zip(target, t0, online):
        torch.testing.assert_close(
            t,
            m**steps * a + (1 - m**steps) * o,
            atol=1e-12 * (steps + 1),
            rtol=1e-12,
            msg=lambda e: (
                f"{steps} steps of m = {m}: {e} (judged as float64: atol 1e-12 (n + 1), rtol 1e-12)"
            ),
        )


def _schedule_tol(s) -> float:
    """(M3) the rounding of the returned values: float64's, or float32's for a float32 schedule (any
    other dtype is held to float32's too); 4 ulps of 1, the values lie in [0, 1]."""
    return 4 * torch.finfo(torch.float64 if s.dtype == torch.float64 else torch.float32).eps


@invariant("M3")
@given(start=st.floats(0.0, 1.0), end=st.floats(0.0, 1.0), total=st.integers(2, 500))
def test_beta_schedule_is_linear(impl, start, end, total):
    """beta_t = beta_start + (beta_end - beta_start) t / (T - 1) for T >= 2, within the rounding of the
    returned dtype (one step, where the formula is 0/0, the exact ends and the dtype are the contract of
    M5)."""
    s = torch.as_tensor(impl.beta_schedule(start, end, total))
    assert tuple(s.shape) == (total,), f"{tuple(s.shape)} values for {total} steps"
    t = torch.arange(total, dtype=torch.float64)
    want = start + (end - start) * t / (total - 1)
    torch.testing.assert_close(
        s.double(),
        want,
        atol=_schedule_tol(s),
        rtol=0,
        msg=lambda e: (
            f"{start} -> {end} over {total} steps: {e} (judged as {s.dtype}: atol "
            f"{_schedule_tol(s):.3g}, 4 ulps of 1, rtol 0)"
        ),
    )


@invariant("M3")
def test_beta_schedule_released_recipe(impl):
    s = torch.as_tensor(impl.beta_schedule(1.0, 0.99, 1001))
    tol = _schedule_tol(s)
    s = s.double()
    assert (
        abs(float(s[0]) - 1.0) <= tol
        and abs(float(s[500]) - 0.995) <= tol
        and abs(float(s[-1]) - 0.99) <= tol
    ), f"1.0 -> 0.99 over 1001 steps: {float(s[0])}, {float(s[500])}, {float(s[-1])}"
    assert bool((s[1:] <= s[:-1]).all()), "the schedule 1.0 -> 0.99 is not non-increasing"


# -- contract: the protocol's conventions ------------------------------------------------------------


@invariant("M5")
@given(start=st.floats(0.0, 1.0), end=st.floats(0.0, 1.0), total=st.integers(1, 500))
def test_beta_schedule_is_float64_with_exact_ends(impl, start, end, total):
    s = impl.beta_schedule(start, end, total)
    assert isinstance(s, torch.Tensor), (
        f"schedule returned as {type(s).__name__}; the protocol's is a float64 tensor"
    )
    assert s.dtype == torch.float64, f"schedule in {s.dtype}; the protocol's is float64"
    assert float(s[0]) == start, (
        f"first value {float(s[0])!r} is not beta_start = {start!r} exactly"
    )
    if total == 1:
        assert tuple(s.shape) == (1,), (
            f"one step gives {tuple(s.shape)}; the protocol's is [beta_start]"
        )
        return
    assert float(s[-1]) == end, f"last value {float(s[-1])!r} is not beta_end = {end!r} exactly"
