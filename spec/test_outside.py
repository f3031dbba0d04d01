"""Outside implementations: what the suite offers code it was not written with.

- The harness's torch.distributed stand-in (harness.SimulatedDistributed) exists on the simulated
  ranks only, behaves as torch.distributed there, and is gone when run_ranks returns.
- smogx (spec/examples/smogx.py), an implementation with its own conventions, judged through its
  adapter by `python -m spec`: no mathematics invariant fails, its optional mode reads "not implemented
  (optional)", its declared replicated-bank k-means "n/a (declared)", its conventions are contract
  results; the wrong variants of spec/examples/smogx_wrong.py fail the mathematics. The verdicts run
  on a selection of invariants (G5: the stand-in; G11: true-cosine scoring of bf16 groups; L6, L7:
  the optional mode; K1, K6: the declaration; M3, M5, H6: conventions), in one subprocess, in the
  default run only; `python -m spec --impl spec.examples.smogx_adapter` gives the whole verdict.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import pytest
import torch
import torch.distributed as dist

from spec.harness import DEFAULT_IMPL, SPEC_DIR, SimulatedDistributed, impl_name, run_ranks

REAL = {name: getattr(dist, name) for name in SimulatedDistributed.NAMES}


def _untouched():
    return all(getattr(dist, name) is fn for name, fn in REAL.items()) and not dist.is_initialized()


def test_simulated_torch_distributed_on_the_ranks_only():
    seen_outside = []

    def fn(rank, all_reduce, broadcast):
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)                                   # in place, as torch.distributed
        b = torch.tensor([float(rank)])
        dist.broadcast(b, src=1)
        parts = [torch.zeros(2) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, torch.tensor([rank, 10.0 * rank]))
        both = all_reduce(torch.tensor([1.0]))               # the handed function shares the sequence
        objs = [None] * 3
        dist.all_gather_object(objs, {"rank": rank})
        if rank == 0:                                       # another thread sees the real module
            other = threading.Thread(target=lambda: seen_outside.append(dist.is_initialized()))
            other.start()
            other.join()
        assert objs == [{"rank": 0}, {"rank": 1}, {"rank": 2}]
        return dist.is_initialized(), dist.get_rank(), dist.get_world_size(), t, b, parts, both

    out = run_ranks(3, fn)
    for rank, (init, r, w, t, b, parts, both) in enumerate(out):
        assert init and r == rank and w == 3
        assert t.item() == 6.0 and b.item() == 1.0 and both.item() == 3.0
        assert [p.tolist() for p in parts] == [[0.0, 0.0], [1.0, 10.0], [2.0, 20.0]]
    assert seen_outside == [False]
    assert _untouched(), "the stand-in leaked out of run_ranks"


def test_simulated_torch_distributed_is_restored_after_a_failing_rank():
    def fn(rank, all_reduce, broadcast):
        if rank == 1:
            raise RuntimeError("rank 1 fails")
        dist.all_reduce(torch.zeros(1))
    with pytest.raises(RuntimeError, match="rank 1 fails"):
        run_ranks(2, fn)
    assert _untouched()


def test_differentiable_all_reduce_of_torch_distributed_nn():
    import torch.distributed.nn.functional as dnn

    xs = [torch.tensor([float(r + 1)], requires_grad=True) for r in range(2)]
    out = run_ranks(2, lambda r, ar, bc: dnn.all_reduce(xs[r] * xs[r]))
    assert [o.item() for o in out] == [5.0, 5.0]
    sum(out).backward()
    assert [x.grad.item() for x in xs] == [4.0, 8.0]          # d/dx_r of 2 (x_0^2 + x_1^2)


VERDICT_LINE = re.compile(r"^([A-Z]\d+)\s+(pass|FAIL \(consequential\)|FAIL|xfail|not implemented \(optional\)|"
                          r"not implemented \(no autograd\)|not implemented|n/a \(declared\)|skipped)(?=\s|$)", re.M)
RIGHT = ("spec.examples.smogx_adapter",
         "G5 or G11 or L6 or L7 or K1 or K6 or M3 or M5 or H6")
WRONG = {"rank_means": {"G5", "G6"}, "raw_members": {"G2"}}   # variant -> what it must FAIL
RUNS = [RIGHT] + [(f"spec.examples.smogx_wrong:{v}", " or ".join(sorted(ids))) for v, ids in WRONG.items()]
SCRIPT = """
import sys
from spec.__main__ import main
for impl, select in {runs!r}:
    rc = main(["--impl", impl, "-m", select, "--judge", "mathematics"])
    print(f"=== exit {{rc}}", flush=True)
"""


@pytest.fixture(scope="module")
def verdicts():
    """{impl: (exit status, {id: status}, text)} of the RUNS, in one subprocess (one torch import)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SMOG_IMPL", "SMOG_XFAIL", "PYTEST_ADDOPTS")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(runs=RUNS)], cwd=SPEC_DIR.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    parts = re.findall(r"(spec verdict for (\S+).*?)=== exit (\d+)", proc.stdout, re.S)
    assert len(parts) == len(RUNS), proc.stdout + proc.stderr
    return {impl: (int(rc), dict(VERDICT_LINE.findall(text)), text) for text, impl, rc in parts}


only_default = pytest.mark.skipif(impl_name() != DEFAULT_IMPL,
                                  reason="the outside implementation is judged in the default run only")


@only_default
def test_outside_implementation_verdict(verdicts):
    rc, got, text = verdicts[RIGHT[0]]
    assert rc == 0, f"--judge mathematics should pass smogx:\n{text}"
    want = {"G5": "pass", "G11": "pass", "L6": "not implemented (optional)", "L7": "pass", "K1": "pass",
            "K6": "n/a (declared)", "M3": "pass", "M5": "FAIL", "H6": "FAIL"}
    assert got == want, text
    assert "declared by the implementation" in text and "replicated_kmeans" in text, text
    assert "group_grad=True" in text, text
    assert re.search(r"^L7 .* 1/2 pass, 1 not implemented \(optional\)", text, re.M), text
    assert re.search(r"^K1 .* 1/2 pass, 1 n/a \(declared\)", text, re.M), text


@only_default
@pytest.mark.parametrize("variant", sorted(WRONG))
def test_wrong_outside_implementation_fails_the_mathematics(verdicts, variant):
    rc, got, text = verdicts[f"spec.examples.smogx_wrong:{variant}"]
    assert rc == 1, text
    assert {i for i, v in got.items() if v.startswith("FAIL")} == WRONG[variant], text
