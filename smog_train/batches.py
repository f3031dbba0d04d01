"""How one rank's data and batches are made for train.py: the datasets, the step sampler (an exact, resumable position in a
seeded permutation), seeded items, the data loader and the transfer to the device.

Every item is (dataset index, online augmentation set, item seed); the seed is a function of (--seed,
epoch, index), so crops depend neither on workers, ranks nor where a run resumed. The roles of the two
augmentation sets swap every optimiser step (even step: online = A). `cfg` is a train.Config."""
from __future__ import annotations

import torch
import torch.distributed as dist

from smog_train import data
import smog
from smog_train.config import UsageError


def build_data(cfg, rank: int) -> tuple:
    """-> (train set yielding PIL images, train set with the eval transform, test set or None)."""
    kw = dict(root=cfg.data_root, bad_images=cfg.bad_images)
    try:
        if cfg.download and smog.dist_ready():  # rank 0 downloads, the others wait and read
            if rank == 0:
                data.build_dataset(cfg.data, "train", download=True, **kw)
            dist.barrier()
        train_raw = data.build_dataset(cfg.data, "train", None, download=cfg.download, **kw)
        test = None
        if (cfg.knn_every or cfg.final_eval) and data.has_test_split(cfg.data):
            test = data.build_dataset(cfg.data, "test", None, download=cfg.download, **kw)
    except ValueError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    w = max(0, cfg.workers)
    return train_raw, data.eval_set(train_raw, cfg.image_size, workers=w), data.eval_set(test, cfg.image_size, workers=w)


class StepBatches(torch.utils.data.Sampler):
    """Micro-batches of this rank for one epoch: a DistributedSampler permutation (seed + epoch,
    drop_last), cut into steps of `accum` micro-batches of `micro` samples; incomplete steps dropped.
    Items are (index, online set of the step, item seed). set_epoch(epoch, start_step) fast-forwards
    to an exact position, so a resumed run sees the same micro-batches as an uninterrupted one."""

    def __init__(self, n: int, rank: int, world: int, micro: int, accum: int, seed: int):
        self.n, self.rank, self.world, self.micro, self.accum, self.seed = n, rank, world, micro, accum, seed
        self.steps = (n // world) // (micro * accum)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def __len__(self):
        return (self.steps - self.start) * self.accum

    def __iter__(self):
        ds = torch.utils.data.DistributedSampler(range(self.n), num_replicas=self.world, rank=self.rank, shuffle=True,
                                                 seed=self.seed, drop_last=True)
        ds.set_epoch(self.epoch)
        idx = list(ds)
        for s in range(self.start, self.steps):
            online = "A" if s % 2 == 0 else "B"
            for a in range(self.accum):
                chunk = idx[(s * self.accum + a) * self.micro:(s * self.accum + a + 1) * self.micro]
                yield [(i, online, item_seed(self.seed, self.epoch, i)) for i in chunk]


def item_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (1 << 63)


def batch_geometry(cfg, n: int, world: int) -> tuple:
    """-> (micro-batch per rank, optimiser steps per epoch); refuses sizes that cannot run."""
    if cfg.batch_size % (world * cfg.accum):
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by world size {world} x --accum {cfg.accum}")
    micro = cfg.batch_size // (world * cfg.accum)
    if micro < 2:
        raise UsageError(f"micro-batch per rank is {micro} (batch {cfg.batch_size} / world {world} / accum {cfg.accum}); "
                         f"BatchNorm needs at least 2")
    spe = (n // world) // (micro * cfg.accum)
    if spe < 1:
        raise UsageError(f"global batch {cfg.batch_size} is larger than the dataset ({n} images"
                         f"{f', {n // world} per rank' if world > 1 else ''}); use a smaller --batch-size")
    shard0 = len(range(0, n, world))
    if cfg.n_groups > shard0:
        raise UsageError(f"--n-groups {cfg.n_groups} is more than the {shard0} samples in "
                         f"{'rank 0' + chr(39) + 's shard of ' if world > 1 else ''}the memory bank; use fewer groups")
    return micro, spe


def _worker_init(_):
    torch.set_num_threads(1)


def loader(ds, batch_sampler, cfg, device, *, persistent: bool = False):
    return torch.utils.data.DataLoader(ds, batch_sampler=batch_sampler, num_workers=cfg.workers,
                                       pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
                                       persistent_workers=persistent and cfg.workers > 0,
                                       collate_fn=getattr(ds, "collate", None),
                                       generator=torch.Generator())  # never draws from the global RNG


def reraise_data_error(e: Exception):
    """A BadImageError re-raised out of a DataLoader worker carries the worker traceback; keep its last line."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    msg = lines[-1] if lines else type(e).__name__
    raise UsageError(msg.split("Error: ", 1)[-1] if msg.startswith(("BadImageError", "ValueError")) else msg) from None


def to_device(x: torch.Tensor, device, cfg) -> torch.Tensor:
    x = data.normalize(x.to(device, non_blocking=True))     # uint8 crops are normalised here, per batch
    if cfg.channels_last and cfg.arch != "swin_t":
        x = x.contiguous(memory_format=torch.channels_last)
    return x
