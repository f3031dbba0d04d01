"""One BatchNorm across crop sizes under data parallelism: 2 gloo processes, uneven shards.

torch's SyncBatchNorm runs on GPUs only; smog_train/sync_bn.py (what train.py uses for several
CPU processes) does its reduction on the CPU: per-rank counts, means and centred sums of squares
all-reduced, then combined. Because backbones.joint_bn calls the norm layer ONCE on the pixels of
all crop sizes, such a layer reduces over all sizes and all ranks at once: the shards must give
exactly the whole batch's joint-BN result (outputs, running statistics, gradients).
"""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import smog
from smog_train import backbones
from smog_train.sync_bn import CPUSyncBatchNorm as CPUSyncBN
from test_core_dist import SPLIT, WORLD, _free_port, shard

TOL = 1e-5


def net_and_crops():
    torch.manual_seed(0)
    net = backbones.SmallCNN(8)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    g = torch.Generator().manual_seed(1)
    B = sum(SPLIT)
    crops = [torch.randn(B, 3, 16, 16, generator=g) for _ in range(2)] + \
            [torch.randn(B, 3, 8, 8, generator=g) for _ in range(2)]
    return net.train(), crops


def _job(rank):
    net, crops = net_and_crops()
    for i, m in enumerate(net.features):
        if isinstance(m, nn.BatchNorm2d):
            sync = CPUSyncBN(m.num_features)
            sync.load_state_dict(m.state_dict())
            net.features[i] = sync
    out = backbones.encode_crops(net, [shard(c, rank) for c in crops])   # (4 * b_r, F)
    out.square().sum().backward()
    bn = net.features[-2]
    return {"out": out.detach(), "grad": net.features[0].weight.grad, "rm": bn.running_mean, "rv": bn.running_var}


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save(_job(rank), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_joint_bn_two_ranks_equal_whole_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r = [torch.load(tmp_path / f"{k}.pt", weights_only=True) for k in range(WORLD)]
    net, crops = net_and_crops()
    whole = backbones.encode_crops(net, crops)                            # one process, plain BN, joint
    whole.square().sum().backward()
    B, n = sum(SPLIT), len(crops)
    for k in range(WORLD):
        rows = torch.cat([whole[c * B:(c + 1) * B].split(SPLIT)[k] for c in range(n)])
        torch.testing.assert_close(r[k]["out"], rows, rtol=TOL, atol=TOL)
        torch.testing.assert_close(r[k]["rm"], net.features[-2].running_mean, rtol=TOL, atol=TOL)
        torch.testing.assert_close(r[k]["rv"], net.features[-2].running_var, rtol=TOL, atol=TOL)
    torch.testing.assert_close(r[0]["grad"] + r[1]["grad"], net.features[0].weight.grad, rtol=1e-3, atol=1e-4)
    # per-shard statistics (no reduction) would give other outputs: the comparison has teeth
    net2, _ = net_and_crops()
    alone = backbones.encode_crops(net2, [shard(c, 0) for c in crops])
    assert (alone - r[0]["out"]).abs().max() > 1e-3
