"""smog_train/compat.py and smog.differentiable_all_reduce: both branches of each torch-API switch
compute the same thing, the current branch warns nothing; and a real 2-process training run prints no
warning line from this project's code (torchrun, gloo, SyncBN on the CPU, DDP, --group-grad's
differentiable all-reduce)."""

import os
import re
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import smog
from smog_train import compat
from test_train import ROOT, TINY, ok, run_train

# "path:line: SomeWarning: message", the line Python's warnings module prints
WARNING_LINE = re.compile(r"^(?P<path>.+?):\d+: (?P<kind>\w*Warning): ")


def our_warning_lines(text: str) -> list:
    """The warning lines of `text` attributed to a file of this repository (a deprecated torch call
    made from our code is attributed to our line: torch warns with the caller's stack level)."""
    return [
        ln
        for ln in text.splitlines()
        if (m := WARNING_LINE.match(ln))
        and os.path.abspath(m.group("path")).startswith(ROOT + os.sep)
    ]


def test_our_warning_lines_reads_pythons_format():
    text = (
        f"{ROOT}/train.py:84: FutureWarning: `broadcast_buffers` is deprecated.\n"
        f"  net = ...\n/usr/lib/python3/site-packages/torch/x.py:3: UserWarning: theirs\n"
        f"{ROOT}/smog_train/sync_bn.py:44: FutureWarning: torch.distributed.nn.functional.all_reduce\n"
    )
    assert [ln.split(":")[0] for ln in our_warning_lines(text)] == [
        f"{ROOT}/train.py",
        f"{ROOT}/smog_train/sync_bn.py",
    ]


def test_two_process_training_prints_no_warning_from_our_code(tmp_path):
    """torchrun, 2 gloo processes, 1 epoch of 6 steps with --group-grad: DDP's buffer keyword, the
    CPU SyncBN's and the group update's differentiable all-reduces all run. PYTHONWARNINGS=default
    also shows DeprecationWarnings, which Python hides outside __main__."""
    r = ok(
        run_train(
            [*TINY, "--epochs", "1", "--group-grad", "--out-dir", "dist"],
            tmp_path,
            nproc=2,
            env={"PYTHONWARNINGS": "default"},
        )
    )
    assert "world 2" in r.stdout and "saved dist/checkpoint.pth (step 6" in r.stdout
    lines = our_warning_lines(r.stdout + r.stderr)
    assert not lines, "warnings from our code:\n" + "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# both branches of each switch, in two gloo processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _branches(module, flag_name: str):
    """The values of module.<flag_name> this torch can run: the current API only where it has it."""
    return [False, True] if getattr(module, flag_name) else [False]


def _all_reduce_branches() -> dict:
    res = {}
    for flag in _branches(smog, "FUNCTIONAL_ALL_REDUCE"):
        smog.FUNCTIONAL_ALL_REDUCE = flag
        x = torch.randn(
            5, 7, generator=torch.Generator().manual_seed(dist.get_rank()), requires_grad=True
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = smog.differentiable_all_reduce(x * 1.7)
            (y.sin() * (dist.get_rank() + 1.3)).sum().backward()
        res[flag] = (y.detach(), x.grad, [str(w.message) for w in caught])
    return res


def _ddp_branches() -> dict:
    res = {}
    for flag in _branches(compat, "DDP_FORWARD_SYNC_BUFFERS"):
        compat.DDP_FORWARD_SYNC_BUFFERS = flag
        for sync in (False, True):
            torch.manual_seed(0)  # identical weights and buffers
            net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ddp = nn.parallel.DistributedDataParallel(net, **compat.ddp_buffer_sync(sync))
            x = torch.randn(8, 3, generator=torch.Generator().manual_seed(dist.get_rank()))
            for _ in range(2):  # rank-local data moves the BN statistics
                ddp(x).sum().backward()
            res[flag, sync] = (net[1].running_mean.clone(), [str(w.message) for w in caught])
    return res


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        res = dict(all_reduce=_all_reduce_branches(), ddp=_ddp_branches())
    finally:
        dist.destroy_process_group()
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def branches(tmp_path_factory) -> list:
    """Per rank of two gloo processes: each branch's results (one spawn for both switches)."""
    out = tmp_path_factory.mktemp("compat")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_differentiable_all_reduce_branches_agree_bitwise(branches):
    """Forward: the sum over ranks; backward: the gradient summed over ranks; the functional branch
    equal to the legacy one bit for bit and without a warning (the legacy one warns on this torch)."""
    got = [b["all_reduce"] for b in branches]
    xs = [torch.randn(5, 7, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    total = xs[0] * 1.7 + xs[1] * 1.7
    for r in range(2):
        y, g, _ = got[r][False]
        torch.testing.assert_close(y, total)
        torch.testing.assert_close(g, 1.7 * total.cos() * (1.3 + 2.3))  # d/dx of both ranks' losses
        if True in got[r]:
            y1, g1, caught = got[r][True]
            assert torch.equal(y1, y) and torch.equal(g1, g)
            assert caught == [], caught
            assert any("deprecated" in m for m in got[r][False][2])  # what the switch avoids
    if not smog.FUNCTIONAL_ALL_REDUCE:
        pytest.skip("this torch has no differentiable functional all_reduce: legacy branch only")


def test_ddp_buffer_sync_branches_agree(branches):
    """sync=True: rank 0's BN statistics are broadcast before each forward; sync=False: each rank
    keeps its own. The same under either keyword, and the current keyword warns nothing."""
    got = [b["ddp"] for b in branches]
    for flag in _branches(compat, "DDP_FORWARD_SYNC_BUFFERS"):
        # rank 0 ends the same either way; rank 1, synced, started its second forward from rank 0's
        assert torch.equal(got[0][flag, True][0], got[0][flag, False][0])
        assert not torch.equal(got[1][flag, True][0], got[1][flag, False][0])
        for r in range(2):
            assert torch.equal(got[r][flag, False][0], got[r][False, False][0])
            assert torch.equal(got[r][flag, True][0], got[r][False, True][0])
    if compat.DDP_FORWARD_SYNC_BUFFERS:
        assert all(got[r][True, s][1] == [] for r in range(2) for s in (False, True))
        assert any("deprecated" in m for m in got[0][False, False][1])
    else:
        pytest.skip("this torch has no forward_sync_buffers: broadcast_buffers branch only")
