"""Two slips in the NumPy port's own derivatives (spec/examples/smognp.py), behind the same adapter: the
gradient bridge certifies the port's VJPs, not torch's, so a wrong VJP fails.

- `no_psum`: the step's VJP with group_grad=True does not all-reduce the cotangent of the shared groups,
  so each rank's z_update gets only its own rank's part of the gradient (fails L7 across ranks; the
  single-process L6 still passes, where the all-reduce is the identity).
- `no_projection`: the VJP of the normalisation x / ||x|| forgets the projection (I - y y^T), the
  classic slip of a hand-written VJP (fails the gradient claims of L2, S2 and H1; every value passes).

    python -m spec --impl spec.examples.smognp_wrong:no_psum -m L7
"""

from __future__ import annotations

import inspect
import types

from spec.examples import smognp, smognp_adapter


def _variant(name: str, old: str, new: str):
    """The port with one line changed, and the adapter (its source, unchanged) bound to that port."""
    port = types.ModuleType(f"smognp[{name}]")
    src = inspect.getsource(smognp)
    assert src.count(old) == 1, f"{name}: the line to change is not in smognp.py once"
    exec(compile(src.replace(old, new), f"{smognp.__file__} [{name}]", "exec"), port.__dict__)
    adapter = types.ModuleType(f"spec.examples.smognp_wrong:{name}")
    adapter.__dict__.update(smognp=port, __name__=adapter.__name__)
    asrc = inspect.getsource(smognp_adapter).replace("from spec.examples import smognp\n", "")
    exec(compile(asrc, f"{smognp_adapter.__file__} [{name}]", "exec"), adapter.__dict__)
    return adapter


no_psum = _variant("no_psum", "dc = reduce(dc)", "dc = dc")
no_projection = _variant(
    "no_projection",
    "(d - y * (d * y).sum(-1, keepdims=True)) / np.maximum(n, EPS)",
    "d / np.maximum(n, EPS)",
)
