"""The regroup that trains, checked through train.py itself (real processes), against a slow oracle.

A tiny run with beta fixed at 1 (the per-step update then only renormalises the groups) is killed
right after the regroup at the start of epoch 1 (the test-only fault point of smog_train/faults.py);
its end-of-epoch-0 checkpoint holds the memory bank that regroup read. The rerun resumes there,
regroups again and finishes epoch 1, so its final groups are that regroup's output up to rounding.
The oracle recomputes it from the bank alone with plain loops: head h clusters bank row h mod 2,
starting from the rows of K dataset indices drawn per head, in turn, from a generator seeded by
(seed, epoch). On 2 processes the bank is sharded over the ranks; the groups must be the same.
A training path that clusters bank row 0 for every head, draws one start for all heads, or draws
from one rank's shard fails here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from smog_train.batches import item_seed

ROOT = Path(__file__).resolve().parents[1]
N, K, H, ITERS, SEED = 64, 8, 3, 3, 0
ARGS = [
    "--data",
    f"demo:{N}",
    "--arch",
    "smallcnn",
    "--width",
    "8",
    "--dim",
    "16",
    "--hidden-dim",
    "32",
    "--n-groups",
    str(K),
    "--n-heads",
    str(H),
    "--image-size",
    "16",
    "--local-size",
    "8",
    "--n-local",
    "1",
    "--epochs",
    "2",
    "--batch-size",
    "16",
    "--kmeans-iters",
    str(ITERS),
    "--beta-start",
    "1",
    "--beta-end",
    "1",
    "--seed",
    str(SEED),
    "--knn-every",
    "0",
    "--no-final-eval",
    "--device",
    "cpu",
    "--workers",
    "0",
    "--threads",
    "1",
]


def _train(out_dir: Path, nproc: int, die_in_regroup: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMOG_TEST_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning")
    if die_in_regroup:
        env["SMOG_TEST_DIE_IN_REGROUP"] = "1"
    cmd = [sys.executable, "train.py", *ARGS, "--out-dir", str(out_dir)]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_port",
            str(port),
            *cmd[1:],
        ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def oracle_regroup(bank: torch.Tensor, epoch: int) -> torch.Tensor:
    """bank [2, N, D] (dataset order) -> [H, K, D], one head at a time, written out step by step."""
    gen = torch.Generator().manual_seed(item_seed(SEED, epoch, 1 << 40))
    out = []
    for h in range(H):
        x = F.normalize(bank[h % 2].double(), dim=-1)
        c = x[torch.randperm(N, generator=gen)[:K]]  # this head's own draw, in turn
        for _ in range(ITERS):
            a = torch.tensor([max(range(K), key=lambda j: float(xi @ c[j])) for xi in x])
            for j in range(K):
                members = x[a == j]
                if len(members):
                    c[j] = F.normalize(members.sum(0), dim=0)
        out.append(c)
    return torch.stack(out).float()


@pytest.mark.parametrize("nproc", [1, 2])
def test_train_regroups_head_h_from_bank_row_h_mod_2(tmp_path, nproc):
    out = tmp_path / "run"
    r = _train(out, nproc, die_in_regroup=True)
    assert r.returncode != 0 and "in regroup of epoch 1" in r.stderr, r.stderr[-3000:]
    ck0 = _load(out / "checkpoint.pth")
    assert (ck0["epoch"], ck0["step_in_epoch"]) == (1, 0)  # the end of epoch 0
    bank = ck0["bank"]  # what the regroup of epoch 1 reads
    r = _train(out, nproc, die_in_regroup=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epoch 1: regrouped" in r.stdout
    groups = _load(out / "checkpoint.pth")["model"]["groups"]
    want = oracle_regroup(bank, epoch=1)
    for h in range(H):
        torch.testing.assert_close(
            groups[h],
            want[h],
            rtol=0,
            atol=1e-5,
            msg=lambda m, h=h: f"head {h} (bank row {h % 2}): {m}",
        )
    assert (groups[0] - groups[2]).abs().max() > 1e-3  # heads 0 and 2: one row, two starts
