"""Real data parallelism: 2 processes, a gloo process group on the CPU, *uneven* shards.

Each worker writes what it holds after the collective call; the parent compares the ranks with
each other and with the single-process result on the whole batch.
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import smog
from smog_train import backbones

WORLD = 2
SPLIT = [3, 8]  # uneven shards of an 11-sample batch
TOL = 1e-6


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir, job):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save(JOBS[job](rank), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_2proc(job, tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), job), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD)]


def shard(x, rank, dim=0):
    return x.split(SPLIT, dim=dim)[rank]


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    K, D, B = 7, 5, sum(SPLIT)
    groups = F.normalize(torch.randn(K, D, generator=g), dim=-1)
    return (
        groups,
        torch.randn(B, D, generator=g),
        torch.randn(2, B, D, generator=g),
        torch.randn(3, B, D, generator=g),
    )


# ---------------------------------------------------------------- jobs (run inside each rank)


def job_update(rank):
    groups, z, _, _ = data()
    zr = shard(z, rank)
    return {"groups": smog.update_groups(groups, zr, smog.assign_groups(zr, groups), 0.6)}


def job_step(rank):
    groups, zu, zt, p = data()
    loss, new, targets = smog.smog_step(
        groups, shard(zu, rank), shard(zt, rank, 1), shard(p, rank, 1), 0.6, 0.1
    )
    return {"groups": new, "loss": loss.detach(), "targets": targets}


def kmeans_rows():
    g = torch.Generator().manual_seed(3)
    return torch.randn(60, 4, generator=g)


KM_SPLIT = [35, 25]


def job_kmeans(rank):
    x = kmeans_rows().split(KM_SPLIT)[rank]
    c0, _ = smog.spherical_kmeans(x, 6, 0, generator=torch.Generator().manual_seed(1))
    c1, _ = smog.spherical_kmeans(x, 6, 1, generator=torch.Generator().manual_seed(1))
    c10, a10 = smog.spherical_kmeans(x, 6, 10, generator=torch.Generator().manual_seed(1))
    return {"c0": c0, "c1": c1, "c10": c10, "a10": a10}


def tiny_model():
    torch.manual_seed(0)
    cfg = smog.SMoGConfig(arch="smallcnn", width=8, dim=16, hidden_dim=32, n_groups=9, n_heads=3)
    return backbones.build_smog(cfg)


def model_inputs():
    g = torch.Generator().manual_seed(4)
    B = sum(SPLIT)
    on = [torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(B, 3, 8, 8, generator=g)
    ]
    mo = [torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)]
    return on, mo


def job_ddp_forward(rank):
    m = (
        tiny_model().eval()
    )  # eval: BN uses running statistics, so shards see the same normalisation
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    on, mo = model_inputs()
    loss, stats, _ = ddp([shard(c, rank) for c in on], [shard(c, rank) for c in mo], 0.7)
    loss.backward()
    first = m.groups.clone()
    m.train()  # a second, train-mode step (per-shard BN statistics): ranks must still agree
    ddp([shard(c, rank) for c in on], [shard(c, rank) for c in mo], 0.7)
    return {
        "first": first,
        "second": m.groups.clone(),
        "nonempty": stats["nonempty"],
        "grad": m.backbone.features[0].weight.grad.clone(),
    }


JOBS = {"update": job_update, "step": job_step, "kmeans": job_kmeans, "ddp": job_ddp_forward}


# ---------------------------------------------------------------- tests (parent process)


def maxdiff(a, b):
    return float((a.double() - b.double()).abs().max())


def test_update_groups_two_ranks_equal_whole_batch(tmp_path):
    r0, r1 = run_2proc("update", tmp_path)
    groups, z, _, _ = data()
    whole = smog.update_groups(groups, z, smog.assign_groups(z, groups), 0.6)
    assert torch.equal(r0["groups"], r1["groups"]), "ranks hold different groups"
    assert maxdiff(r0["groups"], whole) <= TOL
    # and the wrong way (average of per-rank updates) really differs here, so the check has teeth
    wrong = F.normalize(
        sum(
            smog.update_groups(groups, shard(z, r), smog.assign_groups(shard(z, r), groups), 0.6)
            for r in range(2)
        ),
        dim=-1,
    )
    assert maxdiff(wrong, whole) > 1e-3


def test_smog_step_two_ranks_equal_whole_batch(tmp_path):
    r0, r1 = run_2proc("step", tmp_path)
    groups, zu, zt, p = data()
    loss, whole, targets = smog.smog_step(groups, zu, zt, p, 0.6, 0.1)
    assert torch.equal(r0["groups"], r1["groups"])
    assert maxdiff(r0["groups"], whole) <= TOL
    assert torch.equal(torch.cat([r0["targets"], r1["targets"]], 1), targets)
    # per-rank losses are local means; weighted by shard size they give the global mean
    glob = (r0["loss"] * SPLIT[0] + r1["loss"] * SPLIT[1]) / sum(SPLIT)
    assert abs(float(glob) - float(loss)) <= 1e-5


def test_kmeans_two_ranks_identical_and_one_iteration_is_global_m_step(tmp_path):
    r0, r1 = run_2proc("kmeans", tmp_path)
    for key in ("c0", "c1", "c10"):
        assert torch.equal(r0[key], r1[key]), f"ranks disagree on {key}"
    x = F.normalize(kmeans_rows(), dim=-1)
    # initial centres are rows of rank 0 (the first 35 rows), chosen with rank 0's generator
    idx = torch.randperm(KM_SPLIT[0], generator=torch.Generator().manual_seed(1))[:6]
    assert maxdiff(r0["c0"], x[idx]) == 0
    # one iteration from the shared start = M-step over the rows of both ranks
    a = (x @ r0["c0"].T).argmax(1)
    m = torch.stack(
        [F.normalize(x[a == k].sum(0), dim=0) if (a == k).any() else r0["c0"][k] for k in range(6)]
    )
    assert maxdiff(r0["c1"], m) <= TOL
    # the whole run equals the single-process run from the same start
    c, assign = smog.spherical_kmeans(x, 6, 10, init=r0["c0"])
    assert maxdiff(r0["c10"], c) <= TOL
    assert torch.equal(torch.cat([r0["a10"], r1["a10"]]), assign)


def test_ddp_forward_two_ranks_agree_and_equal_single_process(tmp_path):
    r0, r1 = run_2proc("ddp", tmp_path)
    for key in ("first", "second", "nonempty", "grad"):
        assert torch.equal(r0[key], r1[key]), f"ranks disagree on {key} after a DDP step"
    m = tiny_model().eval()
    on, mo = model_inputs()
    m(on, mo, 0.7)  # the whole batch in one process
    assert maxdiff(r0["first"], m.groups) <= TOL
    assert maxdiff(r0["first"], tiny_model().groups) > 1e-3  # the step did move the groups
