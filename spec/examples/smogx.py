"""smogx: a small SMoG (Synchronous Momentum Grouping) written from the method's description.

An *outside* implementation, kept here as the spec's example of one: it is not derived from smog.py
or spec/oracle.py and has its own conventions and its own names:

- prototypes are scored by the true cosine (embeddings *and* prototypes normalised), in float32 or
  better;
- the momentum update loops over the prototypes and synchronises its statistics with an in-place
  torch.distributed.all_reduce when a process group exists;
- prototypes are updated from detached embeddings only (as the authors' released code); asking for
  gradient through the update raises NotImplementedError;
- k-means runs on a memory bank that every rank holds whole (gathered beforehand), so it needs no
  communication; the regroup of all heads gathers the bank with all_gather_object;
- bad input fails an `assert`; the beta schedule is a float32 torch.linspace.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _ctype(*tensors):
    """Compute in float32 or better: bf16/fp16 are promoted, float64 stays float64."""
    out = torch.float32
    for t in tensors:
        out = torch.promote_types(out, t.dtype)
    return out


def _sync_sum_(t):
    """Sum a tensor over all ranks, in place (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def nearest_prototype(emb, protos):
    """Index of the prototype with the largest cosine similarity to each row of emb [N, D]."""
    ct = _ctype(emb, protos)
    sim = F.normalize(emb.detach().to(ct), dim=1) @ F.normalize(protos.detach().to(ct), dim=1).T
    return sim.argmax(dim=1)  # the first maximum on ties


def momentum_step(protos, emb, labels, beta):
    """Move every prototype that received members towards their mean direction:
    c <- normalise(beta * c + (1 - beta) * mean_i normalise(e_i)), statistics summed over ranks."""
    protos = protos.detach()
    ct = _ctype(protos, emb)
    K, D = protos.shape
    e = F.normalize(emb.detach().to(ct), dim=1)
    stats = torch.zeros(K, D + 1, dtype=ct)
    for k in range(K):
        members = e[labels == k]
        stats[k, :D] = members.sum(dim=0)
        stats[k, D] = members.shape[0]
    _sync_sum_(stats)
    out = protos.clone()
    for k in range(K):
        count = stats[k, D]
        if count > 0:
            moved = beta * protos[k].to(ct) + (1 - beta) * stats[k, :D] / count
            out[k] = F.normalize(moved, dim=0).to(protos.dtype)
    return out


def prototype_logits(pred, protos, temperature):
    ct = _ctype(pred, protos)
    return F.normalize(pred.to(ct), dim=1) @ F.normalize(protos.to(ct), dim=1).T / temperature


def prototype_loss(pred, protos, labels, temperature):
    return F.cross_entropy(prototype_logits(pred, protos, temperature), labels)


def train_step(protos, online_emb, momentum_embs, preds, *, beta, temperature, group_grad=False):
    """One head: targets from the momentum embeddings and the current prototypes; prototypes moved
    with the online embeddings; loss of every prediction against every target set, averaged."""
    if group_grad:
        raise NotImplementedError("smogx updates the prototypes from detached embeddings only")
    protos = protos.detach()
    targets = torch.stack([nearest_prototype(m, protos) for m in momentum_embs])
    new = momentum_step(protos, online_emb, nearest_prototype(online_emb, protos), beta)
    losses = [prototype_loss(p, new, t, temperature) for p in preds for t in targets]
    return torch.stack(losses).mean(), new, targets


def multi_head_step(
    protos, online_embs, momentum_embs, preds, *, beta, temperature, group_grad=False
):
    """All heads; head h moves with the online embedding of global crop h % 2; loss averaged."""
    assert online_embs.shape[0] >= 2, "smogx needs the online embeddings of both global crops"
    outs = [
        train_step(
            protos[h],
            online_embs[h % 2],
            momentum_embs,
            preds,
            beta=beta,
            temperature=temperature,
            group_grad=group_grad,
        )
        for h in range(protos.shape[0])
    ]
    return (
        torch.stack([o[0] for o in outs]).mean(),
        torch.stack([o[1] for o in outs]),
        torch.stack([o[2] for o in outs]),
    )


def cluster_bank(bank, k, iters=10, generator=None, start=None):
    """Spherical k-means of the whole memory bank (the same on every rank), from the rows `start` or
    k rows drawn by `generator`; -> (centres, labels)."""
    assert bank.shape[0] >= k, f"cannot seed {k} clusters from {bank.shape[0]} rows"
    ct = _ctype(bank)
    x = F.normalize(bank.to(ct), dim=1)
    centres = x[
        torch.randperm(x.shape[0], generator=generator)[:k] if start is None else start
    ].clone()
    for _ in range(iters):
        labels = nearest_prototype(x, centres)
        for j in range(k):
            members = x[labels == j]
            if members.shape[0]:
                centres[j] = F.normalize(members.sum(dim=0), dim=0)
    return centres.to(bank.dtype), nearest_prototype(x, centres)


def regroup_heads(bank, index, n, heads, k, iters=10, generator=None, init_index=None):
    """New prototypes for every head at the start of an epoch. The memory bank (bank[j]: global crop j's
    embeddings of the samples `index`) is gathered whole on every rank, in dataset order; head h
    clusters crop h % 2's rows, from k rows of its own draw (or init_index[h])."""
    parts = [(index, bank)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (index.cpu(), bank.cpu()))
    whole = torch.zeros(2, n, bank.shape[-1], dtype=bank.dtype)
    for idx, rows in parts:
        whole[:, idx] = rows
    out = []
    for h in range(heads):
        start = (
            init_index[h] if init_index is not None else torch.randperm(n, generator=generator)[:k]
        )
        out.append(cluster_bank(whole[h % 2], k, iters, start=start)[0])
    return torch.stack(out)


@torch.no_grad()
def ema_(teacher, student, m):
    """teacher <- m * teacher + (1 - m) * student, in place."""
    teacher, student = list(teacher), list(student)
    torch._foreach_mul_(teacher, m)
    torch._foreach_add_(teacher, student, alpha=1 - m)


def beta_schedule(start, end, steps):
    return torch.linspace(start, end, steps)
