"""torch APIs that changed within the supported range (torch >= 2.4): one switch per API, the current
call where the installed torch has it, the older one otherwise, so no process of a run prints a
deprecation warning on either side. Each switch is a module attribute set once at import from what
the installed torch offers; tests set it to run the other branch (tests/test_compat.py). The
differentiable all-reduce's switch lives in smog.py (smog.FUNCTIONAL_ALL_REDUCE), which imports
nothing of this package."""

from __future__ import annotations

import inspect

import torch.nn as nn

# DistributedDataParallel(forward_sync_buffers=) instead of the deprecated broadcast_buffers=
DDP_FORWARD_SYNC_BUFFERS = (
    "forward_sync_buffers"
    in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
)


def ddp_buffer_sync(sync: bool) -> dict:
    """DistributedDataParallel keyword: broadcast rank 0's buffers at every forward (`sync`) or not.
    The current keyword still broadcasts them once at construction, where train.py's buffers are
    identical on every rank (same seed), so both keywords train the same."""
    return {"forward_sync_buffers" if DDP_FORWARD_SYNC_BUFFERS else "broadcast_buffers": sync}
