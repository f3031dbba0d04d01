"""group_grad=True under real data parallelism: 2 processes, a gloo process group, uneven shards.

With group_grad=True the updated groups are a differentiable function of every rank's embeddings:
S_k is all-reduced, and the adjoint of a SUM all-reduce is a SUM (torch.distributed.nn's all_reduce,
which smog.py uses when its input requires grad). If rank r backpropagates its share of the loss,
(B_r / B) * L_r, every sample receives exactly the gradient of the whole-batch loss computed in one
process (spec/loss.md, (L7)). Each rank writes its gradients; the parent compares them.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import smog
from test_core_dist import SPLIT, WORLD, _free_port, data, shard

BETA, TAU = 0.6, 0.1
TOL = 1e-6


def crops(seed=5):
    """z [C=3, B, D] online projector embeddings of every crop (multi-head step), from the shared data."""
    groups, zu, zt, p = data()
    z = torch.cat(
        [zu.unsqueeze(0), torch.randn(2, *zu.shape, generator=torch.Generator().manual_seed(seed))]
    )
    return torch.stack([groups, groups.flip(0), groups.roll(1, 0)]), z, zt, p


def detached_all_reduce(t):
    """A SUM all-reduce that autograd does not see (dist.all_reduce in place): the forward values are
    right, but the backward keeps each rank's gradient local -- the mistake this file guards against."""
    total = t.detach().clone()
    dist.all_reduce(total)
    return t + (total - t).detach()


def gradients(rank=None, all_reduce=None):
    """Backpropagate (B_r / B) * loss of this rank's shard (rank None: the whole batch, weight 1) through
    smog_step and smog_multihead_step with group_grad=True -> the gradients of z_update, z and p."""
    B = sum(SPLIT)
    cut = (lambda x, dim=0: x) if rank is None else (lambda x, dim=0: shard(x, rank, dim))
    weight = 1.0 if rank is None else SPLIT[rank] / B
    groups, zu, zt, p = data()
    zu, p1 = cut(zu).requires_grad_(True), cut(p, 1).requires_grad_(True)
    loss, new, _ = smog.smog_step(
        groups, zu, cut(zt, 1), p1, BETA, TAU, group_grad=True, all_reduce=all_reduce
    )
    (weight * loss).backward()
    heads, z, zt, p = crops()
    z, p2 = cut(z, 1).requires_grad_(True), cut(p, 1).requires_grad_(True)
    loss_h, new_h, _ = smog.smog_multihead_step(
        heads, z, cut(zt, 1), p2, BETA, TAU, group_grad=True, all_reduce=all_reduce
    )
    (weight * loss_h).backward()
    return {
        "z_update": zu.grad,
        "p": p1.grad,
        "groups": new.detach(),
        "z": z.grad,
        "p_heads": p2.grad,
        "heads": new_h.detach(),
    }


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save(
            {"right": gradients(rank), "detached": gradients(rank, detached_all_reduce)},
            os.path.join(out_dir, f"{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_group_grad_two_ranks_gives_the_whole_batch_gradient(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    runs = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD)]
    r0, r1 = (run["right"] for run in runs)
    whole = gradients()
    for key in ("groups", "heads"):
        assert torch.equal(r0[key], r1[key]), f"ranks hold different {key}"
        torch.testing.assert_close(r0[key], whole[key], atol=TOL, rtol=0)
    for key, dim in (("z_update", 0), ("p", 1), ("z", 1), ("p_heads", 1)):
        got = torch.cat([r0[key], r1[key]], dim)
        torch.testing.assert_close(
            got, whole[key], atol=TOL, rtol=1e-5, msg=lambda m: f"gradient of {key}: {m}"
        )
    # teeth: an all-reduce that autograd does not see gives the same groups but other gradients
    d0, d1 = (run["detached"] for run in runs)
    torch.testing.assert_close(d0["groups"], whole["groups"], atol=TOL, rtol=0)
    wrong = torch.cat([d0["z_update"], d1["z_update"]])
    assert float((wrong - whole["z_update"]).abs().max()) > 1e-3, (
        "the check would not see a detached all-reduce"
    )
