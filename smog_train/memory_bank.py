"""SMoG's memory bank for train.py: [2, N, D] normalised online projector embeddings of the two online
global crops of every training image, sharded over ranks by dataset index. Each step the batch's
(index, z) are all-gathered and every rank writes its own rows, so the per-epoch k-means over the shards
(smog.regroup: sums and counts all-reduced) equals k-means over the whole bank. Filled before epoch 0
by one no-grad pass of the online network (train-mode BN, running statistics restored afterwards)."""

from __future__ import annotations

import torch
import torch.nn as nn

import smog
from smog_train import data, launch
from smog_train.batches import loader, reraise_data_error, to_device
from smog_train.config import UsageError


class MemoryBank:
    """[2, N, D] normalised online embeddings of the two online global crops, sharded by dataset index:
    rank r holds rows i = r, r + W, r + 2W, ... (local row i // W). `local` [2, N_r, D]."""

    def __init__(self, n: int, dim: int, rank: int, world: int, device):
        self.n, self.rank, self.world = n, rank, world
        self.index = torch.arange(rank, n, world)  # dataset index of each local row
        self.local = torch.zeros(2, len(self.index), dim, device=device)

    def write(self, idx: torch.Tensor, z: torch.Tensor) -> None:
        """idx [b] this rank's batch, z [2, b, D]; all-gathers the global batch (collective), keeps own rows."""
        idx_all = launch.all_gather_rows(idx)
        z_all = launch.all_gather_rows(z.transpose(0, 1).contiguous())  # (B, 2, D)
        mine = idx_all % self.world == self.rank
        self.local[:, idx_all[mine] // self.world] = (
            z_all[mine].transpose(0, 1).to(self.local.dtype)
        )

    def full(self) -> torch.Tensor:
        """[2, N, D] on the CPU in dataset order (collective)."""
        rows = launch.all_gather_rows(
            self.local.transpose(0, 1).contiguous()
        ).cpu()  # (N, 2, D) in rank order
        order = torch.cat([torch.arange(r, self.n, self.world) for r in range(self.world)])
        out = torch.empty(self.n, *rows.shape[1:], dtype=rows.dtype)
        out[order] = rows
        return out.transpose(0, 1).contiguous()

    def load(self, full: torch.Tensor) -> None:
        """The whole bank in dataset order [2, N, D] (a checkpoint's, written with any number of
        ranks) -> this rank's shard: re-sharding is exact, whatever the world size that wrote it."""
        if tuple(full.shape) != (2, self.n, self.local.shape[2]):
            raise UsageError(
                f"checkpoint memory bank has shape {tuple(full.shape)}, expected "
                f"{(2, self.n, self.local.shape[2])}; the dataset or --dim changed"
            )
        self.local.copy_(full[:, self.rank :: self.world])


def bn_buffers(module: nn.Module) -> list:
    return [
        b
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b in m.buffers()
    ]


class restore_buffers:
    """Context: the given buffers get their values back on exit (forward passes that must not count)."""

    def __init__(self, bufs: list):
        self.bufs = bufs

    def __enter__(self):
        self.saved = [b.clone() for b in self.bufs]

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, s in zip(self.bufs, self.saved):
                b.copy_(s)


@torch.no_grad()
def fill_bank(model: smog.SMoG, bank: MemoryBank, ds, cfg, device, micro: int, autocast) -> None:
    """One no-grad pass of the online network over the dataset (train-mode BN, statistics restored).
    In dataset order, wrapped around to whole global batches of G = W * b (b = 2 * micro per rank,
    at least 2, at most ceil(N / W)); rank r embeds the r-th contiguous part of each, and the rows
    reach the ranks that hold them as in a training step (MemoryBank.write; the wrapped padding is
    not written). So every rank runs the same number of full batches (SyncBN's collectives stay in
    step, no batch has a single sample), and with synchronised BatchNorm the bank does not depend
    on the number of ranks (up to rounding)."""
    W, r = bank.world, bank.rank
    b = max(2, min(2 * micro, -(-bank.n // W)))
    G = b * W
    order = [j % bank.n for j in range(-(-bank.n // G) * G)]
    starts = range(r * b, len(order), G)  # this rank's parts
    parts = [order[s : s + b] for s in starts]
    model.train()
    with restore_buffers(bn_buffers(model.backbone) + bn_buffers(model.projector)):
        try:
            for s, (x, _) in zip(starts, loader(ds, parts, cfg, device)):
                with autocast():
                    z = model.embed(to_device(x, device, cfg))  # (b, D) unit rows
                keep = max(0, min(b, bank.n - s))  # not the padding
                idx = torch.arange(s, s + keep, device=device)  # order[p] = p
                bank.write(idx, z[:keep].to(bank.local.dtype)[None].expand(2, -1, -1))
        except data.BadImageError as e:
            reraise_data_error(e)
