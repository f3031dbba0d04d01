"""smogx with one realistic mistake each, behind the same adapter: the spec must still fail them on
the mathematics (spec/test_outside.py checks that it does).

    python -m spec --impl spec.examples.smogx_wrong:rank_means    # per-rank means averaged (G5, G6)
    python -m spec --impl spec.examples.smogx_wrong:raw_members   # raw embeddings averaged (G2, G8)

Each variant is a fresh copy of smogx.py with one function replaced (so train_step and
multi_head_step use the wrong one too) and a fresh copy of smogx_adapter.py pointing at it.
"""

from __future__ import annotations

import inspect
import types

import torch
import torch.nn.functional as F

from spec.examples import smogx, smogx_adapter


def _copy(module, name, **replace):
    copy = types.ModuleType(name, module.__doc__)
    exec(compile(inspect.getsource(module), module.__file__, "exec"), copy.__dict__)
    for attr, fn in replace.items():  # rebind to the copy's globals, as if written in it
        copy.__dict__[attr] = types.FunctionType(fn.__code__, copy.__dict__, attr, fn.__defaults__)
    return copy


def _momentum_step_rank_means(protos, emb, labels, beta):
    """Each rank averages its own members, then the ranks' means are averaged: weights ranks, not samples."""
    protos = protos.detach()
    ct = _ctype(protos, emb)  # noqa: F821 - smogx's, in the copy
    e = F.normalize(emb.detach().to(ct), dim=1)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1  # noqa: F821
    out = protos.clone()
    for k in range(protos.shape[0]):
        members = e[labels == k]
        mean = (
            members.mean(dim=0)
            if members.shape[0]
            else torch.zeros_like(e[0] if len(e) else protos[k].to(ct))
        )
        hit = torch.tensor([float(members.shape[0] > 0)], dtype=ct)
        _sync_sum_(mean)  # noqa: F821
        _sync_sum_(hit)  # noqa: F821
        if hit.item() > 0:
            moved = beta * protos[k].to(ct) + (1 - beta) * mean / world
            out[k] = F.normalize(moved, dim=0).to(protos.dtype)
    return out


def _momentum_step_raw_members(protos, emb, labels, beta):
    """Averages the raw embeddings instead of their directions."""
    protos = protos.detach()
    ct = _ctype(protos, emb)  # noqa: F821
    e = emb.detach().to(ct)
    K, D = protos.shape
    stats = torch.zeros(K, D + 1, dtype=ct)
    for k in range(K):
        members = e[labels == k]
        stats[k, :D] = members.sum(dim=0)
        stats[k, D] = members.shape[0]
    _sync_sum_(stats)  # noqa: F821
    out = protos.clone()
    for k in range(K):
        if stats[k, D] > 0:
            moved = beta * protos[k].to(ct) + (1 - beta) * stats[k, :D] / stats[k, D]
            out[k] = F.normalize(moved, dim=0).to(protos.dtype)
    return out


def _variant(name, **replace):
    lib = _copy(smogx, f"smogx_{name}", **replace)
    adapter = _copy(smogx_adapter, f"smogx_adapter_{name}")
    adapter.smogx = lib
    return adapter


rank_means = _variant("rank_means", momentum_step=_momentum_step_rank_means)
raw_members = _variant("raw_members", momentum_step=_momentum_step_raw_members)
