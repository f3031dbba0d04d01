"""Plumbing shared by the spec tests: the implementation under test, simulated ranks, references.

Nothing in here is SMoG: the references below are the equations of spec/*.md written once more in
vectorised float64 torch, so a test compares the implementation with the *equation*, not with the
oracle (the oracle is just another implementation under test).
"""

from __future__ import annotations

import importlib
import math
import os
import re
import threading
from pathlib import Path

import pytest
import torch

IMPL_ENV = "SMOG_IMPL"
DEFAULT_IMPL = "smog"
ALL_MUTANTS = "spec.mutants:*"
PROTOCOL = (
    "assign_groups",
    "update_groups",
    "group_logits",
    "smog_loss",
    "smog_step",
    "smog_multihead_step",
    "spherical_kmeans",
    "momentum_update_",
    "beta_schedule",
    "regroup",
)  # the functional core, see spec/README.md


# -- the invariants ----------------------------------------------------------------------------------

SPEC_DIR = Path(__file__).resolve().parent
DOCS = {
    "grouping.md": "G",
    "loss.md": "L",
    "kmeans.md": "K",
    "step.md": "S",
    "momentum.md": "M",
    "heads.md": "H",
    "run.md": "R",
}
DEFINITION = re.compile(r"^#{2,4}\s+\(([A-Z]\d+)\)", re.M)  # "### (G2) The momentum update"

# What each invariant's tests also exercise: when one of these fails too, this failure probably follows
# from it (python -m spec marks it so). S2's loss, say, is computed with the groups of G2/G3.
DEPENDS = {
    "G3": ["G2"],
    "G5": ["G2"],
    "G6": ["G5"],
    "G7": ["G2"],
    "G8": ["G1", "G2"],
    "G9": ["G2"],
    "G11": ["G1", "G2"],
    "G12": ["G1", "G2"],
    "L2": ["L1"],
    "L3": ["L1"],
    "L4": ["L1"],
    "L5": ["S2"],
    "L6": ["G2", "G3", "L1", "S1"],
    "L7": ["L6", "G5"],
    "L8": ["L1"],
    "K2": ["K1", "G1"],
    "K3": ["K1", "K2"],
    "K4": ["K3"],
    "K5": ["K3"],
    "K6": ["K1", "K3"],
    "K7": ["K1"],
    "K8": ["K1", "K3"],
    "S1": ["G1"],
    "S2": ["S1", "S3", "L1", "L2"],
    "S3": ["G1", "G2", "G3"],
    "S4": ["S2", "S3"],
    "S5": ["S3"],
    "S6": ["S2", "S3", "G5"],
    "S7": ["G10"],
    "M2": ["M1"],
    "M4": ["M1"],
    "H1": ["S2"],
    "H2": ["S3"],
    "H3": ["S1"],
    "H4": ["L5", "L6"],
    "H5": ["S1", "S2", "S3", "S7"],
    "R2": ["K2", "K3"],
    "R4": ["R2", "K6"],
}


ASSERTS = {"AssertionError", "Failed"}  # a failure that is an assertion (a kill), not a crash


def invariant_ids() -> dict:
    """{id: document} for every invariant defined in spec/*.md, in document order."""
    ids = {}
    for doc, letter in DOCS.items():
        for i in DEFINITION.findall((SPEC_DIR / doc).read_text()):
            assert i[0] == letter, f"{i} is defined in {doc}, which holds the {letter}* invariants"
            assert i not in ids, f"{i} is defined twice ({ids[i]} and {doc})"
            ids[i] = doc
    return ids


CONTRACT_SECTION = re.compile(
    r"^## Contract\b", re.M
)  # ids defined below this heading are contract


def invariant_kinds() -> dict:
    """{id: "mathematics" or "contract"}: a document's invariants below its "## Contract" heading are
    conventions of the protocol (error types, exact end points, returned dtypes and shapes); all
    others are the mathematics of SMoG."""
    kinds = {}
    for doc in DOCS:
        text = (SPEC_DIR / doc).read_text()
        m = CONTRACT_SECTION.search(text)
        cut = m.start() if m else len(text)
        for found in DEFINITION.finditer(text):
            kinds[found.group(1)] = "contract" if found.start() > cut else "mathematics"
    return kinds


# What an implementation may declare about itself (SPEC_DECLARES in its module or namespace: a dict
# {name: its own words} or a list of names). A declared difference turns the tests it concerns into
# "n/a (declared)"; the verdict lists every declaration.
DECLARABLE = {
    "replicated_kmeans": "k-means over a memory bank replicated on every rank, so the tests that shard "
    "its rows over ranks do not apply",
    "own_random_draw": "the initial rows of k-means and of the regroup are drawn with the implementation's own "
    "generator (seeded from the one handed in), not torch.randperm: SMoG's draw (K1, R3), "
    "not the reference's bits, so the contract's tests of those bits do not apply",
}


def declarations(ns) -> dict:
    """{name: the implementation's words} from `ns.SPEC_DECLARES`; ValueError for an unknown name."""
    raw = getattr(ns, "SPEC_DECLARES", None) or {}
    got = dict(raw) if isinstance(raw, dict) else {name: "" for name in raw}
    unknown = sorted(set(got) - set(DECLARABLE))
    if unknown:
        raise ValueError(
            f"SPEC_DECLARES names {unknown}; what can be declared: {sorted(DECLARABLE)}"
        )
    return got


NOT_DEFINED = " is not defined in "  # the message of a missing protocol function
NOT_IMPLEMENTED = " raised NotImplementedError"  # the message of a protocol function that says so
NA_DECLARED = "n/a (declared "  # the skip reason of a test a declaration makes moot
OPTIONAL_NOT_IMPLEMENTED = (
    "not implemented (optional "  # the skip reason of an optional mode left out
)
NO_AUTOGRAD = "no autograd: "  # the message of a gradient claim on a port without autograd


def cited_ids(item) -> set:
    """The invariant ids a collected pytest item cites with @pytest.mark.invariant."""
    return {i for m in item.iter_markers("invariant") for i in m.args}


def impl_name() -> str:
    return os.environ.get(IMPL_ENV, "").strip() or DEFAULT_IMPL


def load_namespace(name: str):
    """'pkg.module' or 'pkg.module:attr' -> the module, or the attribute of it (a namespace)."""
    mod, _, attr = name.partition(":")
    ns = importlib.import_module(mod)
    return getattr(ns, attr) if attr else ns


class Impl:
    """The implementation under test. Functions are fetched lazily, so a function the module lacks
    fails only the tests that need it, with '<name> is not defined in <module>'. A NotImplementedError
    raised by a protocol function fails the test as '<name> raised NotImplementedError' (reported as
    "not implemented"), except in a call that asks for an optional mode (group_grad=True): there it
    skips the test as "not implemented (optional group_grad=True)"."""

    OPTIONAL = {
        "group_grad": True
    }  # keyword arguments that switch on an optional mode of the protocol

    def __init__(self, name: str):
        self.name = name
        self._ns = None

    def _load(self):
        if self._ns is None:
            try:
                self._ns = load_namespace(self.name)
            except (
                Exception
            ) as e:  # an import error of the module under test fails each test, clearly
                pytest.fail(
                    f"cannot import the implementation under test {self.name!r} ({IMPL_ENV}): "
                    f"{type(e).__name__}: {e}",
                    pytrace=False,
                )
        return self._ns

    def __getattr__(self, attr: str):
        if attr not in PROTOCOL:  # python and hypothesis probe objects for other attributes
            raise AttributeError(attr)
        ns = self._load()
        try:
            fn = getattr(ns, attr)
        except AttributeError:
            pytest.fail(f"{attr}{NOT_DEFINED}{self.name}", pytrace=False)
        name = self.name

        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except NotImplementedError as e:
                modes = [f"{k}={v}" for k, v in Impl.OPTIONAL.items() if kwargs.get(k) == v]
                if modes:
                    pytest.skip(
                        f"{OPTIONAL_NOT_IMPLEMENTED}{', '.join(modes)}): {attr} of {name} says: {e}"
                    )
                if _wants_grad(args, kwargs):
                    pytest.fail(
                        f"{NO_AUTOGRAD}{attr} raised NotImplementedError in {name} for inputs that require "
                        f"grad: {e}",
                        pytrace=False,
                    )
                pytest.fail(f"{attr}{NOT_IMPLEMENTED} in {name}: {e}", pytrace=False)
            except (
                RuntimeError
            ) as e:  # Tensor.numpy() on an input that requires grad, in an adapter
                if "requires grad" in str(e) and _wants_grad(args, kwargs):
                    pytest.fail(
                        f"{NO_AUTOGRAD}{attr} of {name} cannot take inputs that require grad: {e}",
                        pytrace=False,
                    )
                raise

        call.__name__ = attr
        return call

    def __repr__(self):
        return f"Impl({self.name!r})"


def _wants_grad(args, kwargs) -> bool:
    """Whether any tensor among the arguments (or in a list of them) requires grad."""
    flat = []
    for a in [*args, *kwargs.values()]:
        flat += list(a) if isinstance(a, (list, tuple)) else [a]
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat)


def needs_graph(out, what: str):
    """A gradient claim: `out` must carry a graph back to the inputs that require grad. A result without
    one (a port that computes values only) fails as "no autograd", which the verdict reads as the
    gradient claims not implemented, with that cause, instead of a wrong gradient."""
    if not (isinstance(out, torch.Tensor) and out.requires_grad):
        pytest.fail(
            f"{NO_AUTOGRAD}{what} carries no graph although an input requires grad (its value may be "
            f"right; a port exposes its own derivatives through a gradient bridge, spec/README.md)",
            pytrace=False,
        )
    return out


# -- simulated data parallelism --------------------------------------------------------------------

_rank = threading.local()  # inside a simulated rank's thread: .rank, .world, .exchange


class _Done:
    """What a collective called with async_op=True returns: it has completed already."""

    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True


def _combine(tensors, op):
    import torch.distributed as dist

    out = tensors[0].clone()
    for t in tensors[1:]:
        if op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            out = out + t
        elif op == dist.ReduceOp.MAX:
            out = torch.maximum(out, t)
        elif op == dist.ReduceOp.MIN:
            out = torch.minimum(out, t)
        elif op == dist.ReduceOp.PRODUCT:
            out = out * t
        else:
            raise NotImplementedError(f"the simulated torch.distributed has no reduce op {op}")
    return out / len(tensors) if op == dist.ReduceOp.AVG else out


def _in_rank() -> bool:
    return getattr(_rank, "rank", None) is not None


class SimulatedDistributed:
    """A stand-in for torch.distributed on the harness's simulated ranks, so that code which calls
    torch.distributed itself needs no shim. While `run_ranks` runs, these attributes of the
    torch.distributed module are replaced by functions that, *called from a simulated rank's thread*,
    behave as torch.distributed does on that rank of a `world`-rank group (and, called from any other
    thread, are the real functions):

        is_initialized() -> True          get_world_size(group=None) -> W     get_rank(group=None) -> r
        all_reduce(t, op=SUM)             in place, every op of ReduceOp but BAND/BOR/BXOR; invisible to
                                          autograd, as the real one
        all_gather(list, t)               in place into the list, rank order
        all_gather_into_tensor(out, t)    in place, rank order along dim 0
        broadcast(t, src=0)               in place
        barrier()
        all_gather_object(list, obj)      broadcast_object_list(list, src=0)
        torch.distributed.nn.functional.all_reduce(t, op=SUM)   returns a new, differentiable sum

    `async_op=True` returns a handle whose wait() returns at once. Every rank must call the same
    collectives in the same order (otherwise a barrier breaks, and the test fails saying so); they
    share one sequence with the all_reduce/broadcast functions that run_ranks hands to `fn`. The
    replacement is made when run_ranks starts and undone when it returns, so nothing leaks into
    other tests; only attribute look-ups at call time (`dist.all_reduce(...)`) see it, not a name
    bound before (`from torch.distributed import all_reduce` at import time)."""

    NAMES = (
        "is_initialized",
        "get_world_size",
        "get_rank",
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "broadcast",
        "barrier",
        "all_gather_object",
        "broadcast_object_list",
    )
    _lock = threading.Lock()
    _depth = 0
    _saved: dict = {}

    @staticmethod
    def _targets():
        import torch.distributed as dist

        out = [(dist, name) for name in SimulatedDistributed.NAMES]
        try:
            import torch.distributed.nn as dnn
            import torch.distributed.nn.functional as dnnf

            out += [(dnnf, "all_reduce"), (dnn, "all_reduce")]
        except Exception:  # noqa: BLE001 - a torch without torch.distributed.nn: nothing to replace there
            pass
        return out

    @staticmethod
    def _stand_in(module, name, real):
        import torch.distributed as dist

        differentiable = module is not dist

        def fn(*args, **kwargs):
            if not _in_rank():
                return real(*args, **kwargs)
            return SimulatedDistributed._call(name, differentiable, *args, **kwargs)

        fn.__name__, fn.__doc__ = (
            name,
            f"the harness's simulated {module.__name__}.{name} (spec/harness.py)",
        )
        fn.__wrapped_real__ = real
        return fn

    @staticmethod
    def _call(name, differentiable, *args, **kwargs):
        import torch.distributed as dist

        r, ex = _rank.rank, _rank.exchange
        done = _Done() if kwargs.get("async_op") else None
        if name == "is_initialized":
            return True
        if name == "get_world_size":
            return _rank.world
        if name == "get_rank":
            return r
        if name == "barrier":
            ex(torch.zeros(()))
            return done
        if (
            name == "all_reduce" and differentiable
        ):  # torch.distributed.nn.functional.all_reduce(t, op, group)
            t = args[0]
            op = kwargs.get("op", args[1] if len(args) > 1 else dist.ReduceOp.SUM)
            return _combine(ex(t), op)
        if name == "all_reduce":
            t = args[0]
            op = kwargs.get("op", args[1] if len(args) > 1 else dist.ReduceOp.SUM)
            total = _combine(ex(t.detach()), op)
            with torch.no_grad():
                t.copy_(total)
            return done
        if name == "broadcast":
            t = args[0]
            src = kwargs.get("src", args[1] if len(args) > 1 else 0)
            got = ex(t.detach())
            with torch.no_grad():
                t.copy_(got[src])
            return done
        if name == "all_gather":  # all_gather(tensor_list, tensor, group, async_op)
            outs = args[0] if args else kwargs["tensor_list"]
            t = args[1] if len(args) > 1 else kwargs["tensor"]
            got = ex(t.detach())
            with torch.no_grad():
                for o, g in zip(outs, got):
                    o.copy_(g)
            return done
        if name == "all_gather_into_tensor":  # (output_tensor, input_tensor, group, async_op)
            out = args[0] if args else kwargs["output_tensor"]
            t = args[1] if len(args) > 1 else kwargs["input_tensor"]
            got = ex(t.detach())
            with torch.no_grad():
                out.copy_(torch.stack(got).reshape(out.shape))  # rank order along dim 0
            return done
        if name == "all_gather_object":  # (object_list, obj, group)
            outs = args[0] if args else kwargs["object_list"]
            outs[:] = ex(args[1] if len(args) > 1 else kwargs["obj"])
            return None
        if name == "broadcast_object_list":  # (object_list, src, group, device)
            objs = args[0] if args else kwargs["object_list"]
            src = kwargs.get("src", args[1] if len(args) > 1 else 0)
            objs[:] = ex(list(objs))[src]
            return None
        raise AssertionError(name)

    @classmethod
    def __enter__(cls):
        with cls._lock:
            if cls._depth == 0:
                cls._saved = {(m, n): getattr(m, n) for m, n in cls._targets()}
                for (m, n), real in cls._saved.items():
                    setattr(m, n, cls._stand_in(m, n, real))
            cls._depth += 1
        return cls

    @classmethod
    def __exit__(cls, *exc):
        with cls._lock:
            cls._depth -= 1
            if cls._depth == 0:
                for (m, n), real in cls._saved.items():
                    setattr(m, n, real)
                cls._saved = {}
        return False


def run_ranks(world: int, fn, timeout: float = 10.0):
    """Run fn(rank, all_reduce, broadcast) on `world` threads, one per simulated rank, and return the
    list of results in rank order.

    all_reduce(t) returns a *new* tensor, the sum over ranks of their t, added in rank order (so every
    rank gets the same bits), and it is differentiable: the sum is an autograd sum of every rank's own
    tensor, so a backward through any rank's result reaches every rank's input. The adjoint of a SUM
    all-reduce is a SUM over ranks, which is what torch.distributed.nn's all_reduce computes when every
    rank backpropagates its own loss; here the test backpropagates the sum of the ranks' losses once.
    broadcast(t) returns a detached copy of rank 0's t. Neither touches its argument: an implementation
    that ignores the return value fails. Collectives called a different number of times on different
    ranks end in a BrokenBarrierError.

    Code that calls torch.distributed itself instead of the functions it is handed works too: while
    the ranks run, torch.distributed is the stand-in of `SimulatedDistributed` in their threads."""
    barrier = threading.Barrier(world, timeout=timeout)
    slots: list = [None] * world
    results: list = [None] * world
    errors: list = [None] * world

    def exchange(rank, t):
        slots[rank] = t.clone() if isinstance(t, torch.Tensor) else t  # a copy that keeps t's graph
        barrier.wait()
        got = list(slots)
        barrier.wait()
        return got

    def body(rank):
        def all_reduce(t):
            got = exchange(rank, t)
            out = got[0].clone()
            for g in got[1:]:
                out = out + g
            return out

        def broadcast(t):
            return exchange(rank, t)[0].detach().clone()

        _rank.rank, _rank.world, _rank.exchange = rank, world, lambda t: exchange(rank, t)
        try:
            results[rank] = fn(rank, all_reduce, broadcast)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            errors[rank] = e
            barrier.abort()
        finally:
            _rank.rank = _rank.world = _rank.exchange = None

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world)]
    with SimulatedDistributed():
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if real:
        raise real[0]
    if any(e is not None for e in errors):
        raise AssertionError(
            "collectives were called a different number of times on different ranks "
            "(a barrier broke)"
        ) from next(e for e in errors if e is not None)
    return results


def split_rows(x: torch.Tensor, sizes, dim: int = 0):
    return list(torch.split(x, list(sizes), dim=dim))


# -- tolerances ------------------------------------------------------------------------------------


def tol(dtype) -> dict:
    """Comparison tolerances for results computed in `dtype` against a float64 reference."""
    if dtype == torch.float64:
        return dict(atol=1e-10, rtol=1e-9)
    return dict(atol=2e-5, rtol=1e-4)


def margin_threshold(dtype) -> float:
    """Rows whose best and second-best scores are closer than this are near-ties: rounding may pick
    either, so assignments are compared only on rows with a larger margin (or an exact tie)."""
    return 1e-9 if dtype == torch.float64 else 1e-5


LOWER = (
    (torch.float32, dict(atol=2e-5, rtol=1e-4)),
)  # the precision a float64 comparison may guess


def close(a, b, dtype, scale: float = 1.0, msg: str = ""):
    """assert_close(a, b) at the tolerance of `dtype` (times `scale` on atol). A failure says which
    tolerance and dtype it judged by, and, when the difference would pass at a lower precision's
    tolerance, which dtype the implementation probably computed in."""
    t = tol(dtype)
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if (
        a.numel() == 1 and b.numel() == 1
    ):  # a loss of shape [1] against a 0-dim one: values, not shapes (S8)
        a, b = a.reshape(()), b.reshape(())
    try:
        torch.testing.assert_close(a.double(), b.double(), atol=t["atol"] * scale, rtol=t["rtol"])
    except AssertionError as e:
        judged = f"judged as {str(dtype).replace('torch.', '')}: atol {t['atol'] * scale:.3g}, rtol {t['rtol']:.3g}"
        guess = ""
        if a.shape == b.shape:
            for low, lt in LOWER:
                if torch.finfo(low).eps <= torch.finfo(dtype).eps:
                    continue
                if torch.allclose(
                    a.double(), b.double(), atol=lt["atol"] * scale, rtol=lt["rtol"], equal_nan=True
                ):
                    name = str(low).replace("torch.", "")
                    guess = (
                        f"; the difference is within {name}'s tolerance: the implementation probably computed "
                        f"in {name} (the promotion rule: every computation runs in max(input dtype, float32))"
                    )
                    break
        raise AssertionError(f"{msg + ': ' if msg else ''}{e} ({judged}{guess})") from None


def close_value(got, want, dtype, scale: float = 1.0, what: str = "value"):
    """A value claim, with a message that says so."""
    close(got, want, dtype, scale=scale, msg=f"{what} differs from the equation's float64 value")


def close_grad(got, want, wrt: str, dtype, scale: float = 1.0, what: str = "the loss"):
    """A gradient claim, with a message that says so."""
    close(
        got,
        want,
        dtype,
        scale=scale,
        msg=f"gradient of {what} w.r.t. {wrt} differs from that of the equation's float64 value",
    )


# -- references: the equations of spec/*.md, vectorised, float64 ------------------------------------


def ref_normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def ref_assign(z: torch.Tensor, groups: torch.Tensor, renormalise: bool = False):
    """(G1) -> (assign [N] lowest index among the maxima, margin [N] best minus second best score, inf if K = 1).
    Scores against the groups as given, or (renormalise=True) against unit(c_k): the true cosine."""
    g = ref_normalise(groups) if renormalise else groups.double()
    s = ref_normalise(z) @ g.T  # (N, K)
    best = s.max(dim=1, keepdim=True).values
    assign = (s == best).to(torch.int8).argmax(dim=1)  # first maximum
    if s.shape[1] == 1:
        margin = torch.full((s.shape[0],), math.inf, dtype=torch.float64)
    else:
        top2 = s.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
    return assign, margin


def assignment_mismatch(got: torch.Tensor, z: torch.Tensor, groups: torch.Tensor, dtype, also=None):
    """(G1) None if `got` is the argmax of the scores against the groups as given, or against the
    renormalised groups unit(c_k) (the true cosine), on every row without a near-tie (and every row
    of the boolean mask `also`, e.g. zero rows with an exact tie); otherwise a message. The two
    readings are the same function on unit groups; they part by rounding on groups that are unit
    only up to their dtype's rounding (bf16/fp16), where the suite accepts either, row for row of
    one reading (not a mixture)."""
    got = got.long()
    seen = []
    for renormalise in (False, True):
        ref, margin = ref_assign(z, groups, renormalise)
        ok = unambiguous(margin, dtype) if also is None else unambiguous(margin, dtype) | also
        if torch.equal(got[ok], ref[ok]):
            return None
        bad = (got != ref) & ok
        seen.append(
            f"{'renormalised' if renormalise else 'raw'} groups: rows {bad.nonzero().flatten().tolist()[:8]} "
            f"assigned {got[bad].tolist()[:8]}, argmax {ref[bad].tolist()[:8]}"
        )
    return "assignment is the argmax of neither reading of (G1): " + "; ".join(seen)


def unambiguous(margin: torch.Tensor, dtype) -> torch.Tensor:
    """Rows whose assignment does not depend on rounding. Exact ties of the float64 reference are
    excluded too: two identical group rows can get scores that differ in the last bit from a matmul
    (BLAS treats rows differently), so the tie rule is checked on exactly computable scores only."""
    return margin > margin_threshold(dtype)


def ref_update(groups, z, assign, beta):
    """(G2) loop over groups -> (new groups float64 [K, D], smallest ||pre-normalisation|| of a hit group)."""
    g, zn = groups.double(), ref_normalise(z)
    new, smallest = g.clone(), math.inf
    for k in range(g.shape[0]):
        members = zn[assign == k]
        if len(members):
            v = beta * g[k] + (1 - beta) * members.mean(0)
            smallest = min(smallest, float(v.norm()))
            new[k] = v / v.norm().clamp_min(1e-12)
    return new, smallest


def ref_mstep(x, centres, assign):
    """(K3) -> (new centres, smallest ||sum of members|| of a non-empty cluster)."""
    xn, c = ref_normalise(x), centres.double()
    new, smallest = c.clone(), math.inf
    for j in range(c.shape[0]):
        members = xn[assign == j]
        if len(members):
            s = members.sum(0)
            smallest = min(smallest, float(s.norm()))
            new[j] = s / s.norm().clamp_min(1e-12)
    return new, smallest


def ref_kmeans_from(x, c0, iters):
    """(K2, K3) Lloyd iterations from given centres -> (centres, assign, min margin over all E-steps)."""
    c, worst = c0.double(), math.inf
    for _ in range(iters):
        a, m = ref_assign(x, c)
        worst = min(worst, float(m.min()))
        c, _ = ref_mstep(x, c, a)
    a, m = ref_assign(x, c)
    worst = min(worst, float(m.min()))
    return c, a, worst


def ref_regroup(full, init_index, iters):
    """(R1, R2) head h: Lloyd iterations on full[h mod 2] (the whole bank, rows in dataset-index order)
    from its normalised rows init_index[h] -> (groups float64 [H, k, D], min margin over all E-steps)."""
    heads, worst = [], math.inf
    for h in range(init_index.shape[0]):
        x = full[h % 2]
        c, _, m = ref_kmeans_from(x, ref_normalise(x)[init_index[h]], iters)
        heads.append(c)
        worst = min(worst, m)
    return torch.stack(heads), worst


def kmeans_objective(x, centres) -> float:
    """(K4) J(c) = sum_i max_k <x_i/||x_i||, c_k>."""
    return float((ref_normalise(x) @ centres.double().T).max(dim=1).values.sum())


def ref_step_loss(p, new_groups, targets, tau):
    """(S2) mean over (c, j, b) of -log softmax(<p_cb/||p_cb||, c_k>/tau)_{t_jb}; differentiable in p."""
    logp = torch.log_softmax(ref_normalise(p) @ new_groups.double().T / tau, dim=-1)  # (C, B, K)
    C, J = p.shape[0], targets.shape[0]
    total = 0.0
    for c in range(C):
        for j in range(J):
            total = total - logp[c].gather(1, targets[j].view(-1, 1)).mean()
    return total / (C * J)
