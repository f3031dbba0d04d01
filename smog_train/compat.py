"""torch APIs that changed within the supported range (torch >= 2.4): one switch per API, the current
call where the installed torch has it, the older one otherwise, so no process of a run prints a
deprecation warning on either side. Each switch is a module attribute set once at import from what
the installed torch offers; tests set it to run the other branch (tests/test_compat.py)."""
from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
import torch.nn as nn


def _functional_all_reduce_has_autograd() -> bool:
    """Whether torch's functional all_reduce is differentiable (an Autograd kernel is registered for
    `_c10d_functional::all_reduce`); torch.distributed.nn.functional.all_reduce is deprecated there."""
    try:
        import torch.distributed._functional_collectives  # noqa: F401  (registers the kernels)
        return torch._C._dispatch_has_kernel_for_dispatch_key("_c10d_functional::all_reduce", "Autograd")
    except (ImportError, AttributeError, RuntimeError):
        return False


# torch.distributed._functional_collectives.all_reduce (differentiable) instead of the deprecated
# torch.distributed.nn.functional.all_reduce
FUNCTIONAL_ALL_REDUCE = _functional_all_reduce_has_autograd()
# DistributedDataParallel(forward_sync_buffers=) instead of the deprecated broadcast_buffers=
DDP_FORWARD_SYNC_BUFFERS = "forward_sync_buffers" in inspect.signature(
    nn.parallel.DistributedDataParallel.__init__).parameters


def differentiable_all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over the ranks of the default group, as a new tensor; its backward sums the
    gradient over ranks. The same reduction (gloo / NCCL all-reduce) either way."""
    if FUNCTIONAL_ALL_REDUCE:
        import torch.distributed._functional_collectives as funcol
        return funcol.wait_tensor(funcol.all_reduce(t, "sum", dist.group.WORLD))
    import torch.distributed.nn.functional as dnn
    return dnn.all_reduce(t)


def ddp_buffer_sync(sync: bool) -> dict:
    """DistributedDataParallel keyword: broadcast rank 0's buffers at every forward (`sync`) or not.
    The current keyword still broadcasts them once at construction, where train.py's buffers are
    identical on every rank (same seed), so both keywords train the same."""
    return {"forward_sync_buffers" if DDP_FORWARD_SYNC_BUFFERS else "broadcast_buffers": sync}
