"""BatchNorm over the samples of all ranks on the CPU (gloo), where torch's SyncBatchNorm does not
run (it needs a GPU). train.py converts every BatchNorm of the model with `convert` when a run has
several CPU processes and --sync-bn (the default); on CUDA it uses torch's SyncBatchNorm.

The reduction is SyncBatchNorm's: every rank computes its count, mean and centred sum of squares
per channel; the rows of all ranks are summed (an all-gather written as an all-reduce of one
non-zero row per rank, exact) and combined (Chan et al.), so the statistics are those of the global
micro-batch and do not depend on how it is split over ranks -- except for the order of
floating-point operations. The all-reduce is autograd-aware (smog.differentiable_all_reduce):
its backward sums the gradient over ranks, so each rank's inputs get the gradient of the global
statistics.
Running statistics are updated with the global mean and unbiased variance, identically on every
rank. In eval mode, and in a single process, it is the plain BatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import smog


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d/2d/3d with statistics over all ranks (module docstring); the same parameters,
    buffers and state-dict keys as the layer it replaces."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input with a channel dimension, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and smog.dist_ready() and dist.get_world_size() > 1):
            return super().forward(x)
        world, rank = dist.get_world_size(), dist.get_rank()
        C, dims = x.shape[1], [0, *range(2, x.dim())]
        shape = (1, C) + (1,) * (x.dim() - 2)
        xf = x.float()
        n_r = x.numel() // C
        mean_r = xf.mean(dims)
        m2_r = (xf - mean_r.view(shape)).square().sum(dims)
        row = torch.cat([mean_r, m2_r, xf.new_full((1,), float(n_r))])
        rows = smog.differentiable_all_reduce(
            F.pad(row[None], (0, 0, rank, world - 1 - rank))
        )  # (W, 2C+1)
        n = rows[:, 2 * C :]  # (W, 1)
        total = n.sum()
        mean = (rows[:, :C] * n).sum(0) / total
        m2 = (rows[:, C : 2 * C] + n * (rows[:, :C] - mean).square()).sum(0)
        var = m2 / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum
                if f is None:  # cumulative moving average
                    f = 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean.to(self.running_mean.dtype), alpha=f)
                unbiased = m2 / (total - 1).clamp_min(1)
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert(module: nn.Module) -> nn.Module:
    """Every BatchNorm in `module` replaced by a CPUSyncBatchNorm holding the same tensors (as
    nn.SyncBatchNorm.convert_sync_batchnorm does for torch's)."""
    out = module
    bn = nn.modules.batchnorm._BatchNorm
    if isinstance(module, bn) and not isinstance(module, CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            with torch.no_grad():
                out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert(child))
    return out
