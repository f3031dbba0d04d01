"""Features, kNN and the linear probe on features: what train.py's evaluations and eval_linear.py share.

Without a process group this is rank 0 of 1 and every collective is a no-op. Under one, every function
that says "collective" must be called on every rank; results are exact: counts and totals are summed
over ranks, then divided. eval_linear.py is the command line around these and the frozen-backbone
protocol; smog_train/evaluation.py the per-epoch kNN monitor and the demo table of train.py.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import smog
from smog_train.launch import all_gather_rows

# ----------------------------------------------------------------------------------------------
# ranks: without a process group this is rank 0 of 1, and every collective is a no-op


def rank_world() -> tuple:
    return (dist.get_rank(), dist.get_world_size()) if smog.dist_ready() else (0, 1)


def _my_slice(n: int) -> slice:
    """Contiguous shard of range(n) for this rank; shards in rank order concatenate to range(n)."""
    r, w = rank_world()
    return slice(r * n // w, (r + 1) * n // w)


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if smog.dist_ready():
        dist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------------------------
# features


def shard_loader(
    ds, batch_size: int, *, workers: int = 0, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """Loader over this rank's contiguous shard of `ds`, in order, without padding; gathering the
    shards in rank order (extract_features) gives the features of `ds` in dataset order."""
    idx = list(range(len(ds)))[_my_slice(len(ds))]
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, sampler=idx, num_workers=workers, pin_memory=pin_memory
    )


@torch.no_grad()
def _extract_local(backbone: nn.Module, loader, device) -> tuple:
    modes = [(m, m.training) for m in backbone.modules()]
    backbone.eval()
    feats, labels = [], []
    try:
        for x, y in loader:
            feats.append(backbone(x.to(device, non_blocking=True)).float().flatten(1))  # (b, F)
            labels.append(torch.as_tensor(y).to(device=device, dtype=torch.long))
    finally:
        for m, mode in modes:  # every module's own mode back, not just the root's
            m.training = mode
    if feats:
        f, y = torch.cat(feats), torch.cat(labels)
    else:  # empty shard: the feature width is needed for the gather; one probe forward finds it
        f, y = torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return f, y


def extract_features(backbone: nn.Module, loader, device) -> tuple:
    """Pooled features of every sample of `loader`'s dataset -> (feats [N, F] float32, labels [N] long),
    gathered across ranks in rank order (all_gather_rows). The backbone runs in eval() mode without
    gradient and every module gets its previous mode back. With shard_loader's loaders every sample
    counts once, in dataset order. Collective under a process group."""
    f, y = _extract_local(backbone, loader, device)
    if smog.dist_ready():
        # ranks with an empty shard do not know F: agree on it first
        width = torch.tensor([f.shape[1]], device=f.device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
        if f.shape[1] != int(width):
            f = f.new_zeros(0, int(width))
    return all_gather_rows(f.contiguous()), all_gather_rows(y.contiguous())


# ----------------------------------------------------------------------------------------------
# metrics (exact under data parallelism: counts and totals are summed, then divided)


@torch.no_grad()
def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """[len(ks)] float64 counts of rows whose label is among the top-k logits (k capped at #classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = (
        logits.topk(kmax, dim=1).indices
        if len(logits)
        else logits.new_zeros(0, kmax, dtype=torch.long)
    )
    hit = top == y[:, None]  # (n, kmax)
    return torch.stack([hit[:, : min(k, kmax)].any(1).sum() for k in ks]).double().cpu()


@torch.no_grad()
def _linear_accuracy(
    head: nn.Linear, test_f: torch.Tensor, test_y: torch.Tensor, chunk: int = 4096
) -> tuple:
    """(top1 %, top5 %) of `head` on the test features; each rank scores its own slice, counts summed."""
    sl = _my_slice(len(test_f))
    counts = torch.zeros(3, dtype=torch.float64)
    for f, y in zip(test_f[sl].split(chunk), test_y[sl].split(chunk)):
        counts[:2] += topk_correct(head(f), y)
        counts[2] += len(y)
    c1, c5, n = _sum_over_ranks(counts.to(test_f.device)).tolist()
    return 100.0 * c1 / max(n, 1), 100.0 * c5 / max(n, 1)


def knn_eval(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    n_classes: int,
    ks: Sequence[int] = (20,),
    T: float = 0.07,
) -> dict:
    """Weighted kNN top-1 in percent, {k: float}, on L2-normalised features (knn_predict: votes
    exp(sim/T), DINO protocol). Needs every rank's full train features (extract_features gathers them);
    each rank classifies its own slice of the test rows and the correct counts are summed.
    Collective under a process group."""
    sl = _my_slice(len(test_f))
    preds = knn_predict(train_f, train_y.to(train_f.device), test_f[sl], n_classes, ks=ks, T=T)
    y = test_y[sl].to(train_f.device)
    counts = torch.tensor(
        [float((preds[k].to(y.device) == y).sum()) for k in ks] + [float(len(y))],
        dtype=torch.float64,
        device=train_f.device,
    )
    *correct, n = _sum_over_ranks(counts).tolist()
    return {k: 100.0 * c / max(n, 1) for k, c in zip(ks, correct)}


# ----------------------------------------------------------------------------------------------
# the linear classifier


def new_linear(feat_dim: int, n_classes: int, seed: int = 0) -> nn.Linear:
    """nn.Linear with weight ~ N(0, 0.01) and bias 0 (SwAV protocol); identical on every rank."""
    head = nn.Linear(feat_dim, n_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    return head


def cosine_lr(lr: float, epoch: int, epochs: int) -> float:
    """Cosine from lr (epoch 0) to 0 (after the last epoch), stepped per epoch as in SwAV's eval_linear."""
    return 0.5 * lr * (1 + math.cos(math.pi * epoch / epochs))


class _Threads:
    """Run a block with n intra-op threads, then restore the previous number (reusable)."""

    def __init__(self, n: Optional[int]):
        self.n, self.prev = n, None

    def __enter__(self):
        if self.n is not None:
            self.prev = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.n is not None:
            torch.set_num_threads(self.prev)


def _step_threads(head: nn.Linear, device) -> _Threads:
    """A small linear layer on a CPU steps with one thread: its kernels take microseconds, less than
    OpenMP threads spend waiting at barriers, the more so on a busy machine."""
    small = torch.device(device).type == "cpu" and head.in_features * head.out_features <= (1 << 16)
    return _Threads(1 if small and torch.get_num_threads() > 1 else None)


def fit_linear(
    head: nn.Linear,
    batches: Callable[[int], Iterable],
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    wd: float,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Train `head` with SGD (momentum 0.9, cosine per epoch) on the global batches (feats [B, F],
    labels [B]) yielded by batches(epoch); score the test features after every epoch.
    -> dict(top1, top5 (last epoch), best_top1, best_top5 (at the best top-1 epoch), best_epoch, top1_history).
    FloatingPointError at the end of an epoch with a non-finite loss."""
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    hist, best = [], (-1.0, 0.0, -1)
    top1 = top5 = 0.0
    last_loss = torch.zeros(())
    nonfinite = torch.zeros((), dtype=torch.bool, device=test_f.device)
    step_threads = _step_threads(head, test_f.device)
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(lr, epoch, epochs)
        head.train()
        for f, y in batches(epoch):  # the backbone (augmented protocol) runs here, all threads
            if len(y) == 0:
                continue
            with step_threads:
                loss = F.cross_entropy(head(f), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            last_loss = loss.detach()
            nonfinite |= ~torch.isfinite(last_loss)
        if nonfinite.item():  # once per epoch: no host sync per step
            raise FloatingPointError(
                f"linear evaluation: non-finite loss in epoch {epoch + 1}; the "
                f"results would be chance level; check the checkpoint or lower "
                f"--lr"
            )
        head.eval()
        with step_threads:
            top1, top5 = _linear_accuracy(head, test_f, test_y)
        hist.append(top1)
        if top1 > best[0]:
            best = (top1, top5, epoch)
        if log is not None:
            log(
                f"epoch {epoch + 1}/{epochs}  lr {cosine_lr(lr, epoch, epochs):.4g}  loss {float(last_loss):.4f}  "
                f"top1 {top1:.2f}  top5 {top5:.2f}"
            )
    return dict(
        top1=top1,
        top5=top5,
        best_top1=best[0],
        best_top5=best[1],
        best_epoch=best[2] + 1,
        top1_history=hist,
    )


def linear_probe_features(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    n_classes: int,
    *,
    epochs: int = 100,
    lr: float = 0.3,
    wd: float = 1e-6,
    batch_size: int = 256,
    seed: int = 0,
) -> dict:
    """Linear probe on cached features (no augmentation): the protocol's linear layer, optimiser and
    schedule on fixed [N, F] features. Percentages; keys as fit_linear. Every rank holds the gathered
    features and takes the same steps (deterministic, so the result does not depend on the world
    size); the test set is scored in per-rank slices. Collective under a process group."""
    head = new_linear(train_f.shape[1], n_classes, seed).to(train_f.device)
    return fit_linear(
        head,
        cached_batches(train_f, train_y, batch_size, seed),
        test_f.float(),
        test_y.to(test_f.device),
        epochs=epochs,
        lr=lr,
        wd=wd,
    )


def cached_batches(
    train_f: torch.Tensor, train_y: torch.Tensor, batch_size: int, seed: int
) -> Callable[[int], Iterable]:
    """-> batches(epoch): minibatches of a permutation seeded by (seed, epoch), the same on every rank."""
    train_f, train_y = train_f.float(), train_y.to(train_f.device)

    def batches(epoch):
        perm = torch.randperm(
            len(train_f), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
        )
        perm = perm.to(train_f.device)
        # one gather per epoch, then views: a gather per batch would cost more than the probe's steps
        yield from zip(train_f[perm].split(batch_size), train_y[perm].split(batch_size))

    return batches


@torch.no_grad()
def knn_predict(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    n_classes: int,
    ks: Sequence[int] = (20,),
    T: float = 0.07,
    chunk: int = 256,
) -> dict:
    """Weighted kNN (DINO protocol): cosine similarity, top-k neighbours, votes exp(sim/T).
    Features [N, D] / [M, D] are L2-normalised here; returns {k: predictions [M]}; k is capped at N.
    Test rows are processed in chunks of `chunk` so memory stays O(chunk * N)."""
    tr = F.normalize(train_f.float(), dim=1)
    kmax = min(max(ks), tr.shape[0])
    preds = {k: [] for k in ks}
    for te in F.normalize(test_f.float(), dim=1).split(max(1, chunk)):
        sim, idx = (te @ tr.T).topk(kmax, dim=1)  # (m, kmax)
        w, lab = (sim / T).exp(), train_y[idx]
        for k in ks:
            kk = min(k, kmax)
            votes = torch.zeros(te.shape[0], n_classes, device=te.device)
            votes.scatter_add_(1, lab[:, :kk], w[:, :kk])
            preds[k].append(votes.argmax(1))
    return {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for k, v in preds.items()}
