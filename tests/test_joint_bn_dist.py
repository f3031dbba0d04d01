"""BatchNorm across crop sizes under data parallelism: 2 gloo processes, uneven shards.

torch's SyncBatchNorm runs on GPUs only; smog_train/sync_bn.py (what train.py uses for several
CPU processes) does its reduction on the CPU: per-rank counts, means and centred sums of squares
all-reduced, then combined. Because backbones.joint_bn calls the norm layer ONCE on the pixels of
all crop sizes, such a layer reduces over all sizes and all ranks at once; a shortcut BN is called
once per size, reducing each size over all ranks. The shards must give exactly the whole batch
through the released rule written out by hand (release_ref.released_resnet with plain BNs, one
process), not through the code under test: outputs, running statistics, gradients.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from release_ref import released_resnet
from smog_train import backbones
from smog_train.sync_bn import CPUSyncBatchNorm as CPUSyncBN
from test_core_dist import SPLIT, WORLD, _free_port, shard

TOL = 1e-5


def net_and_crops():
    """A ResNet-18 (small-image stem) cut after stage 2: joint BNs and one strided shortcut."""
    torch.manual_seed(0)
    net, _ = backbones.build_backbone("resnet18", cifar_stem=True)
    net.layer3 = net.layer4 = nn.Sequential()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    g = torch.Generator().manual_seed(1)
    B = sum(SPLIT)
    crops = [torch.randn(B, 3, 8, 8, generator=g) for _ in range(2)] + [
        torch.randn(B, 3, 4, 4, generator=g) for _ in range(2)
    ]
    return net.train(), crops


WATCH = ("bn1", "layer2.0.bn2", "layer2.0.downsample.1")  # stem, a joint BN, the shortcut BN


def _job(rank):
    net, crops = net_and_crops()
    for name, m in list(net.named_modules()):
        if isinstance(m, nn.BatchNorm2d):
            sync = CPUSyncBN(m.num_features)
            sync.load_state_dict(m.state_dict())
            parent, _, leaf = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, leaf, sync)
    out = backbones.encode_crops(net, [shard(c, rank) for c in crops])  # (4 * b_r, F)
    out.square().sum().backward()
    mods = dict(net.named_modules())
    res = {"out": out.detach(), "grad": net.conv1.weight.grad, "sgrad": mods[WATCH[2]].weight.grad}
    for w in WATCH:
        res |= {
            w + " rm": mods[w].running_mean,
            w + " rv": mods[w].running_var,
            w + " n": mods[w].num_batches_tracked,
        }
    return res


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
    # by hand
    whole = torch.cat(released_resnet(net, [torch.cat(crops[:2]), torch.cat(crops[2:])]))
    whole.square().sum().backward()
    mods = dict(net.named_modules())
    B, n = sum(SPLIT), len(crops)
    for k in range(WORLD):
        rows = torch.cat([whole[c * B : (c + 1) * B].split(SPLIT)[k] for c in range(n)])
        torch.testing.assert_close(r[k]["out"], rows, rtol=TOL, atol=TOL)
        for w in WATCH:
            torch.testing.assert_close(r[k][w + " rm"], mods[w].running_mean, rtol=TOL, atol=TOL)
            torch.testing.assert_close(r[k][w + " rv"], mods[w].running_var, rtol=TOL, atol=TOL)
            calls = 2 if "downsample" in w else 1  # the shortcut BN: once per size
            assert int(r[k][w + " n"]) == int(mods[w].num_batches_tracked) == calls
    for key, p in (("grad", net.conv1.weight), ("sgrad", mods[WATCH[2]].weight)):
        scale = float(p.grad.abs().max())  # float32 sums in another order
        torch.testing.assert_close(r[0][key] + r[1][key], p.grad, rtol=1e-3, atol=1e-4 * scale)
    # per-shard statistics (no reduction) would give other outputs: the comparison has teeth
    net2, _ = net_and_crops()
    alone = torch.cat(
        released_resnet(
            net2,
            [
                torch.cat([shard(c, 0) for c in crops[:2]]),
                torch.cat([shard(c, 0) for c in crops[2:]]),
            ],
        )
    )
    assert (alone - r[0]["out"]).abs().max() > 1e-3
