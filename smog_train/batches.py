"""How one rank's data and batches are made for train.py: the datasets, the step sampler (an exact,
resumable position in a seeded permutation), seeded items, the data loader and the transfer to the
device.

Every item is (dataset index, online augmentation set, item seed); the seed is a function of (--seed,
epoch, index), so crops depend neither on workers, ranks nor where a run resumed. The roles of the two
augmentation sets swap every optimiser step (even step: online = A). `cfg` is a config.Config."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

import smog
from smog_train import data
from smog_train.config import UsageError, error_line


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
    return (
        train_raw,
        data.eval_set(train_raw, cfg.image_size, workers=w),
        data.eval_set(test, cfg.image_size, workers=w),
    )


class StepBatches(torch.utils.data.Sampler):
    """Micro-batches of this rank for one epoch. The epoch's order is one permutation of the
    dataset, torch.randperm(n) seeded with seed + epoch (DistributedSampler's); step s takes its
    block perm[s*B : (s+1)*B] (B the global batch), micro-batch a of the step the a-th of `accum`
    equal parts of that block, and rank r the r-th of `world` equal contiguous parts of it.
    So the global batch of step s, gathered in rank order, is the same block in the same order
    whatever the number of ranks; the last n mod B samples of the epoch are not used. Items are
    (index, online set of the step, item seed). set_epoch(epoch, start_step) fast-forwards to an
    exact position, so a resumed run, on any number of ranks, sees the same global batches."""

    def __init__(self, n: int, rank: int, world: int, micro: int, accum: int, seed: int):
        self.n, self.rank, self.world, self.micro, self.accum, self.seed = (
            n,
            rank,
            world,
            micro,
            accum,
            seed,
        )
        self.steps = n // (micro * accum * world)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def __len__(self):
        return (self.steps - self.start) * self.accum

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=gen).tolist()
        part = self.micro * self.world  # one micro-batch, all ranks
        for s in range(self.start, self.steps):
            online = "A" if s % 2 == 0 else "B"
            for a in range(self.accum):
                lo = (s * self.accum + a) * part + self.rank * self.micro
                yield [
                    (i, online, item_seed(self.seed, self.epoch, i))
                    for i in perm[lo : lo + self.micro]
                ]


def item_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (1 << 63)


def batch_geometry(cfg, n: int, world: int) -> tuple:
    """-> (micro-batch per rank, optimiser steps per epoch); refuses sizes that cannot run. Steps
    per epoch are n // batch whatever the world size, so a run may resume on any world size that
    divides batch / accum."""
    per = cfg.batch_size // cfg.accum if cfg.batch_size % cfg.accum == 0 else 0
    fits = [w for w in range(1, per + 1) if per % w == 0 and per // w >= 2]
    fits = ", ".join(map(str, fits[:12])) + (", ..." if len(fits) > 12 else "")
    if cfg.batch_size % (world * cfg.accum):
        raise UsageError(
            f"--batch-size {cfg.batch_size} is not divisible by world size {world} x "
            f"--accum {cfg.accum}; run on a number of processes that divides it "
            f"({fits or 'none'}; a resumed run keeps its --batch-size and --accum)"
        )
    micro = cfg.batch_size // (world * cfg.accum)
    if micro < 2:
        raise UsageError(
            f"micro-batch per rank is {micro} (batch {cfg.batch_size} / world "
            f"{world} / accum {cfg.accum}); BatchNorm needs at least 2: run on fewer "
            f"processes ({fits or 'none'})"
        )
    spe = n // cfg.batch_size
    if spe < 1:
        raise UsageError(
            f"global batch {cfg.batch_size} is larger than the dataset ({n} images); "
            f"use a smaller --batch-size"
        )
    if cfg.n_groups > n:
        raise UsageError(
            f"--n-groups {cfg.n_groups} is more than the {n} samples in the memory "
            f"bank; use fewer groups"
        )
    return micro, spe


def _worker_init(_):
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training process's to handle


def loader(ds, batch_sampler, cfg, device, *, persistent: bool = False):
    return torch.utils.data.DataLoader(
        ds,
        batch_sampler=batch_sampler,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init,
        persistent_workers=persistent and cfg.workers > 0,
        collate_fn=getattr(ds, "collate", None),
        generator=torch.Generator(),
    )  # never draws from the global RNG


def reraise_data_error(e: Exception):
    """A bad image met in the loader, as a one-line UsageError (config.error_line)."""
    raise UsageError(error_line(e)) from None


def to_device(x: torch.Tensor, device, cfg) -> torch.Tensor:
    x = data.normalize(
        x.to(device, non_blocking=True)
    )  # uint8 crops are normalised here, per batch
    if cfg.channels_last and cfg.arch != "swin_t":
        x = x.contiguous(memory_format=torch.channels_last)
    return x
