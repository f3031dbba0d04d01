"""Reliability of train.py and eval_linear.py, with real processes and real signals.

Faults: SIGKILL (through the test-only fault points of smog_train/faults.py) mid-iteration,
mid-regroup and half-way through a checkpoint write, for one process and for 2 gloo processes under
`python -m torch.distributed.run`, then the same command again; `--max-restarts`; SIGTERM; a
non-finite loss, with and without --skip-nonfinite. After every resume the final checkpoint must be
*bitwise* identical (weights, groups, memory bank, optimiser, RNG states, counters) to an uninterrupted
run of the same command, and log.jsonl must hold the same records (timings aside).

Safe loading: a crafted checkpoint whose pickle would create a file on load is refused by train.py,
eval_linear.py and `python -m smog_train.export` with one clear line, and the file is never created.

Bad input: one line on stderr (`error: ...`) naming the problem and the fix, exit code 2, no traceback,
and out_dir untouched (names, sizes, mtimes and contents compared before and after).

Runs are tiny (64 demo images of 16 px, smallcnn width 8, K=8, 2 heads, 2 epochs of 4 steps); the two
uninterrupted reference runs (1 and 2 processes) are computed once per module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from smog_train import checkpoint, export
from state_compare import assert_same

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN = 64
# 64 images / batch 16 = 4 steps per epoch, 2 epochs = 8 steps (global steps 0..7).
# Checkpoints (--save-every 3): after step 2 (step=3), end of epoch 0 (step=4), after step 5 (step=6),
# end of epoch 1 (step=8) -- the 1st, 2nd, 3rd and 4th checkpoint write of an uninterrupted run.
TINY = [
    "--data",
    f"demo:{N_TRAIN}",
    "--arch",
    "smallcnn",
    "--width",
    "8",
    "--dim",
    "16",
    "--hidden-dim",
    "32",
    "--n-groups",
    "8",
    "--n-heads",
    "2",
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
    "3",
    "--knn-every",
    "0",
    "--no-final-eval",
    "--device",
    "cpu",
    "--workers",
    "0",
    "--threads",
    "1",
    "--log-every",
    "1",
    "--save-every",
    "3",
]
TOTAL_STEPS = 8
VOLATILE_LOG_KEYS = {"time", "img_s", "data_frac"}  # wall-clock measurements in log.jsonl
RUNTIME_CONFIG_KEYS = {
    "out_dir",
    "resume",
    "git",
    "workers",
    "save_every",
}  # may differ between runs


# ----------------------------------------------------------------------------------------------
# running train.py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMOG_TEST_")}
    env.update(OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", PYTHONWARNINGS="ignore::FutureWarning")
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def train_cmd(out_dir, *extra, nproc: int = 1, torchrun: tuple = ()) -> list:
    args = [*TINY, "--out-dir", str(out_dir), *map(str, extra)]
    if nproc == 1:
        return [sys.executable, "train.py", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_port",
        str(_free_port()),
        *torchrun,
        "train.py",
        *args,
    ]


def run(cmd: list, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run in its own session; on a timeout the whole process group (torchrun and workers) is killed."""
    p = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-2000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def tmp_files(out_dir) -> list:
    return sorted(p.name for p in Path(out_dir).iterdir() if ".tmp" in p.name)


# ----------------------------------------------------------------------------------------------
# comparing final states


def log_records(out_dir) -> list:
    recs = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE_LOG_KEYS} for r in recs]


def assert_same_final(ref_dir, out_dir) -> None:
    """Bitwise-identical final checkpoints (every tensor: weights, BN statistics, groups, memory bank,
    optimiser state, every rank's RNG states; every counter) and the same log records."""
    ref, got = load(Path(ref_dir) / "checkpoint.pth"), load(Path(out_dir) / "checkpoint.pth")
    assert got["step"] == TOTAL_STEPS and got["epoch"] == 2, (got["step"], got["epoch"])
    assert set(ref) == set(got)
    for k in ref:
        if k == "log_offset":  # byte length of log.jsonl: its timing fields vary
            continue
        if k == "config":
            strip = lambda c: {f: v for f, v in c.items() if f not in RUNTIME_CONFIG_KEYS}  # noqa: E731
            assert_same(strip(ref[k]), strip(got[k]), "config")
            continue
        assert_same(ref[k], got[k], k)
    assert (
        "groups" in got["model"]
        and got["bank"].shape == (2, N_TRAIN, 16)
        and got["optimizer"]["state"]
    )
    assert log_records(out_dir) == log_records(ref_dir)
    assert tmp_files(out_dir) == []


# ----------------------------------------------------------------------------------------------
# the uninterrupted references (once per module)


@pytest.fixture(scope="module")
def ref1(tmp_path_factory):
    """One process, uninterrupted, checkpointing after *every* step (--save-every is a runtime field, so
    the result must not depend on it) while this process keeps loading out_dir/checkpoint.pth: every
    load must succeed (atomic writes: at every instant the newest complete checkpoint loads)."""
    out = tmp_path_factory.mktemp("ref1") / "run"
    cmd = train_cmd(out, "--save-every", "1")
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    loads, failures = [], []

    def poll():
        ck = out / "checkpoint.pth"
        while p.poll() is None:
            if ck.exists():
                try:
                    loads.append(checkpoint.load_checkpoint(str(ck))["step"])
                except ValueError as e:
                    failures.append(str(e))
            time.sleep(0.005)

    t = threading.Thread(target=poll)
    t.start()
    stdout, stderr = p.communicate(timeout=300)
    t.join()
    ok(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    assert stdout.count("saved ") == TOTAL_STEPS  # 3 mid-epoch saves + 1 end-of-epoch save, twice
    return dict(dir=out, loads=loads, failures=failures)


@pytest.fixture(scope="module")
def ref2(tmp_path_factory):
    """2 gloo processes under torchrun, uninterrupted; out/../batches records every step's
    micro-batches (dataset indices, a hash of each item's crops; recording changes nothing)."""
    out = tmp_path_factory.mktemp("ref2") / "run"
    rec = out.parent / "batches"
    rec.mkdir()
    ok(run(train_cmd(out, nproc=2), env={"SMOG_TEST_RECORD_BATCHES": rec}))
    return out


@pytest.fixture(scope="module")
def ref2_step4(cut2, tmp_path_factory):
    """The uninterrupted 2-process run's state after step 3 (checkpoint step=4): cut2 resumed on
    its own world size (bitwise the uninterrupted run, tested above) and stopped by SIGTERM."""
    out = tmp_path_factory.mktemp("ref2s4") / "run"
    shutil.copytree(cut2, out)
    ok(run(train_cmd(out, nproc=2), env={"SMOG_TEST_SIGTERM_AT_STEP": 3}))
    ck = load(out / "checkpoint.pth")
    assert (ck["step"], ck["world_size"]) == (4, 2)
    return ck


@pytest.fixture(scope="module")
def cut2(tmp_path_factory):
    """The run of ref2, rank 1 SIGKILLed in step 3 (mid-epoch 0): out_dir holds the checkpoint
    written after step 2 (step=3). Tests copy it before resuming."""
    out = tmp_path_factory.mktemp("cut2") / "run"
    r = run(train_cmd(out, nproc=2), env={"SMOG_TEST_DIE_AT_STEP": 3, "SMOG_TEST_DIE_RANK": 1})
    assert r.returncode != 0 and "SIGKILL self: at step 3" in r.stderr, r.stderr[-3000:]
    assert load(out / "checkpoint.pth")["step"] == 3
    return out


# ----------------------------------------------------------------------------------------------
# one process: SIGKILL at several points, then the same command again


def test_checkpoint_loads_at_every_instant_of_a_run(ref1):
    assert ref1["failures"] == [], ref1["failures"][:3]
    assert len(ref1["loads"]) > 0 and sorted(ref1["loads"]) == ref1["loads"]  # never goes back
    assert tmp_files(ref1["dir"]) == []


@pytest.mark.parametrize(
    "die_at,last_ck",
    [(2, None), (7, 6)],
    ids=["before-first-checkpoint", "after-mid-epoch-checkpoint"],
)
def test_sigkill_mid_iteration_resumes_bitwise(ref1, tmp_path, die_at, last_ck):
    """SIGKILL after the backward of step `die_at`, before its optimiser step. The rerun resumes from the
    last complete checkpoint (or starts over when there is none) and, with a data-loader worker this
    time (--workers is a runtime field), ends bitwise identical to the uninterrupted run."""
    out = tmp_path / "run"
    r = run(train_cmd(out), env={"SMOG_TEST_DIE_AT_STEP": die_at})
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert f"[test] SIGKILL self: at step {die_at}" in r.stderr
    ck = out / "checkpoint.pth"
    assert (load(ck)["step"] if ck.exists() else None) == last_ck
    r = ok(run(train_cmd(out, "--workers", "1")))
    assert (f"resuming at step {last_ck}" in r.stdout) == (last_ck is not None)
    assert_same_final(ref1["dir"], out)


def test_sigkill_mid_regroup_resumes_bitwise(ref1, tmp_path):
    """SIGKILL inside the k-means regroup at the start of epoch 1 (after its first head): the groups in
    memory are half re-clustered; the rerun starts again from the end-of-epoch-0 checkpoint."""
    out = tmp_path / "run"
    r = run(train_cmd(out), env={"SMOG_TEST_DIE_IN_REGROUP": 1})
    assert r.returncode == -signal.SIGKILL and "SIGKILL self: in regroup of epoch 1" in r.stderr, (
        r.stderr[-3000:]
    )
    ck = load(out / "checkpoint.pth")
    assert (ck["step"], ck["epoch"], ck["step_in_epoch"]) == (4, 1, 0)
    r = ok(run(train_cmd(out)))
    assert "resuming at step 4" in r.stdout and "epoch 1: regrouped" in r.stdout
    assert_same_final(ref1["dir"], out)


@pytest.mark.parametrize("n_save,last_ck", [(1, None), (3, 4)], ids=["first-write", "third-write"])
def test_sigkill_during_checkpoint_write(ref1, tmp_path, n_save, last_ck):
    """SIGKILL half-way through writing a checkpoint. checkpoint.pth is still the previous complete one
    (or absent), the half-written temporary file does not load; the rerun ignores it, deletes it and ends
    bitwise identical to the uninterrupted run."""
    out = tmp_path / "run"
    r = run(train_cmd(out), env={"SMOG_TEST_DIE_IN_SAVE": n_save})
    assert r.returncode == -signal.SIGKILL and f"in checkpoint write {n_save}" in r.stderr, (
        r.stderr[-3000:]
    )
    tmps = tmp_files(out)
    assert len(tmps) == 1 and tmps[0].startswith(".checkpoint.pth.tmp-"), tmps
    with pytest.raises(ValueError, match="cannot load"):
        checkpoint.load_checkpoint(str(out / tmps[0]))
    ck = out / "checkpoint.pth"
    assert (checkpoint.load_checkpoint(str(ck))["step"] if ck.exists() else None) == last_ck
    r = ok(run(train_cmd(out)))
    assert (f"resuming at step {last_ck}" in r.stdout) == (last_ck is not None)
    assert_same_final(ref1["dir"], out)  # also: no temporary file left


def test_sigterm_checkpoints_exits_0_and_resumes_bitwise(ref1, tmp_path):
    """A real SIGTERM (the handler train.py installs) at the start of step 5: the step finishes, a
    checkpoint is written, the exit code is 0; the rerun continues to the uninterrupted result."""
    out = tmp_path / "run"
    r = ok(run(train_cmd(out), env={"SMOG_TEST_SIGTERM_AT_STEP": 5}))
    assert "SIGTERM: checkpoint written" in r.stdout and "saved" in r.stdout
    ck = load(out / "checkpoint.pth")
    assert (ck["step"], ck["epoch"], ck["step_in_epoch"]) == (6, 1, 2)
    r = ok(run(train_cmd(out)))
    assert "resuming at step 6" in r.stdout
    assert_same_final(ref1["dir"], out)


# ----------------------------------------------------------------------------------------------
# non-finite loss


def test_nonfinite_loss_stops_naming_step_and_last_good_checkpoint(ref1, tmp_path):
    """NaN loss in step 5: exit code 3, one line naming step 5 and the last good checkpoint (written
    after step 3, i.e. `step 4`), which is left as it was: rerunning without the fault continues from it
    to the bitwise result of the uninterrupted run."""
    out = tmp_path / "run"
    r = run(train_cmd(out), env={"SMOG_TEST_NAN_AT_STEP": 5})
    assert r.returncode == 3, r.stderr[-3000:]
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    ck_path = out / "checkpoint.pth"
    assert re.search(r"non-finite loss at step 5\b", err[0]) and "--skip-nonfinite" in err[0], err[
        0
    ]
    assert f"last good checkpoint: {ck_path} (step 4)" in err[0], err[0]
    assert load(ck_path)["step"] == 4 and tmp_files(out) == []
    r = ok(run(train_cmd(out)))
    assert "resuming at step 4" in r.stdout
    assert_same_final(ref1["dir"], out)


def test_skip_nonfinite_skips_the_step_and_leaves_every_state_untouched(tmp_path):
    """--skip-nonfinite 1: the NaN step changes nothing (weights, momentum network, BN statistics,
    groups, memory bank, optimiser state); the run goes on and records the skip. Shown on the last
    step: the state saved just before it (the stop of a run without the flag) equals the final state."""
    out = tmp_path / "run"
    r = run(train_cmd(out, "--save-every", "7"), env={"SMOG_TEST_NAN_AT_STEP": 7})
    assert r.returncode == 3 and "non-finite loss at step 7" in r.stderr, r.stderr[-3000:]
    before = load(out / "checkpoint.pth")
    assert before["step"] == 7
    r = ok(
        run(
            train_cmd(out, "--save-every", "7", "--skip-nonfinite", "1"),
            env={"SMOG_TEST_NAN_AT_STEP": 7},
        )
    )
    assert "warning: non-finite loss at step 7, step skipped (1/1)" in r.stdout
    after = load(out / "checkpoint.pth")
    assert (after["step"], after["skipped_nonfinite"]) == (TOTAL_STEPS, 1)
    for k in ("model", "bank"):
        assert_same(before[k], after[k], k)
    assert_same(before["optimizer"]["state"], after["optimizer"]["state"], "optimizer/state")
    assert all(torch.isfinite(v).all() for v in after["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------------------------
# two gloo processes under torchrun


def test_2proc_sigkill_one_rank_mid_iteration_resumes_bitwise(ref2, cut2, tmp_path):
    """Rank 1 is SIGKILLed in step 3; torchrun takes the job down; the same command again resumes
    from the checkpoint after step 2 and ends bitwise identical to the uninterrupted 2-process
    run."""
    out = tmp_path / "run"
    shutil.copytree(cut2, out)
    r = ok(run(train_cmd(out, nproc=2)))
    assert "resuming at step 3" in r.stdout
    assert_same_final(ref2, out)


def test_2proc_sigkill_during_checkpoint_write_resumes_bitwise(ref2, tmp_path):
    """Rank 0 (the writer) is SIGKILLed half-way through the 3rd checkpoint write."""
    out = tmp_path / "run"
    r = run(train_cmd(out, nproc=2), env={"SMOG_TEST_DIE_IN_SAVE": 3, "SMOG_TEST_DIE_RANK": 0})
    assert r.returncode != 0 and "in checkpoint write 3" in r.stderr, r.stderr[-3000:]
    assert len(tmp_files(out)) == 1 and load(out / "checkpoint.pth")["step"] == 4
    r = ok(run(train_cmd(out, nproc=2)))
    assert "resuming at step 4" in r.stdout
    assert_same_final(ref2, out)


def test_2proc_max_restarts_after_sigkill_mid_regroup(ref2, tmp_path):
    """`torchrun --max-restarts=1`: rank 1 is SIGKILLed inside the regroup of epoch 1; torchrun restarts
    both workers, which resume from the end-of-epoch-0 checkpoint -- one command, exit code 0, and the
    bitwise result of the uninterrupted run."""
    out, once = tmp_path / "run", tmp_path / "died-once"
    r = ok(
        run(
            train_cmd(out, nproc=2, torchrun=("--max-restarts=1",)),
            env={
                "SMOG_TEST_DIE_IN_REGROUP": 1,
                "SMOG_TEST_DIE_RANK": 1,
                "SMOG_TEST_DIE_ONCE": once,
            },
        )
    )
    assert once.exists() and "SIGKILL self: in regroup of epoch 1" in r.stderr
    assert "resuming at step 4" in r.stdout
    assert_same_final(ref2, out)


def test_2proc_sigterm_on_one_rank_checkpoints_exits_0_and_resumes(ref2, tmp_path):
    """SIGTERM reaches rank 1 only: the ranks agree at the end of the step (all-reduced flag), write one
    checkpoint and exit 0 together; the rerun ends bitwise identical to the uninterrupted run."""
    out = tmp_path / "run"
    r = ok(
        run(train_cmd(out, nproc=2), env={"SMOG_TEST_SIGTERM_AT_STEP": 5, "SMOG_TEST_DIE_RANK": 1})
    )
    assert "SIGTERM: checkpoint written" in r.stdout
    assert load(out / "checkpoint.pth")["step"] == 6
    r = ok(run(train_cmd(out, nproc=2)))
    assert "resuming at step 6" in r.stdout
    assert_same_final(ref2, out)


# ----------------------------------------------------------------------------------------------
# resuming on another number of processes
#
# Tolerance of a run resumed on another world size against the uninterrupted run, per tensor:
#   max |a - b| <= RTOL * max |ref| + ATOL.
# Changing the world size changes only how sums are split over ranks and in which order they are
# added (per-rank partial sums, then an all-reduce): gradients, BatchNorm statistics, group sums,
# k-means sums. fp32 rounds at u = 2^-24 = 6e-8; reordering a sum of n mixed-sign terms moves it by
# about sqrt(n) u of its terms' size. The longest sums are the BatchNorm statistics over ~10^4 pixel
# values here (16 images x (2 x 16^2 + 8^2) pixels in the first layer): sqrt(10^4) u = 6e-6, so
# ~1e-5 of a tensor's scale per step. The runs below resume 5 steps before the end and a stable
# run amplifies such perturbations by far less than 10 over that many steps: RTOL = 1e-4. Tensors
# that are zero in exact arithmetic (the gradient, hence momentum buffer, of a bias that a
# BatchNorm follows) are rounding noise, a few u times the terms summed (gradients up to ~1):
# ATOL = 1e-6 (16 u). Measured (2-vCPU AMD EPYC, torch 2.14.1): at most 3e-6 of a tensor's scale
# (bank, 5 steps and a regroup after the resume), 1.3e-7 absolute on the noise tensors: 0.13 of the
# tolerance; a real difference (one optimiser step more or less, per-rank BatchNorm, k-means
# started from other rows) is 1e-2 or more of the scale. What the tolerance cannot absorb is an
# argmax (target, group, k-means assignment) that sits within rounding of a tie and flips; none
# does in these runs, deterministically on a given machine.
RTOL, ATOL = 1e-4, 1e-6
SCHEDULE_KEYS = ("type", "step", "epoch", "lr", "beta", "m")  # exact in every log record


def batch_records(rec_dir) -> dict:
    """{global step: [(dataset index, SHA-1 of the item's crops)] of the global batch}: every
    micro-batch's items of rank 0, rank 1, ... in turn (SMOG_TEST_RECORD_BATCHES files)."""
    rank = lambda f: int(f.stem[len("batches-rank") :])  # noqa: E731
    files = sorted(Path(rec_dir).glob("batches-rank*.jsonl"), key=rank)
    per_rank = [[json.loads(line) for line in f.read_text().splitlines()] for f in files]
    out = {}
    for recs in zip(*per_rank):
        assert len({r["step"] for r in recs}) == 1, [r["step"] for r in recs]
        out[recs[0]["step"]] = [
            item
            for a in range(len(recs[0]["micro"]))
            for r in recs
            for item in zip(r["micro"][a]["idx"], r["micro"][a]["crops"])
        ]
    return out


def _leaves(x, path=""):
    if isinstance(x, dict):
        for k in x:
            yield from _leaves(x[k], f"{path}/{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, x


def tolerance_violations(ref: dict, got: dict) -> tuple:
    """Model (weights, BN statistics, groups, momentum network), optimiser state and memory bank of
    two checkpoints -> (leaves outside the tolerance, largest |a - b| / (RTOL max|ref| + ATOL)).
    Integer tensors and everything that is not a tensor must be equal."""
    bad, worst = [], 0.0
    for key in ("model", "optimizer", "bank"):
        a, b = dict(_leaves(ref[key], key)), dict(_leaves(got[key], key))
        assert set(a) == set(b), sorted(set(a) ^ set(b))
        for p, x in a.items():
            y = b[p]
            if not isinstance(x, torch.Tensor):
                if x != y:
                    bad.append(p)
            elif not x.is_floating_point() or x.numel() == 0:
                if not torch.equal(x, y):
                    bad.append(p)
            else:
                x, y = x.double(), y.double()
                ratio = ((x - y).abs().max() / (RTOL * x.abs().max() + ATOL)).item()
                worst = max(worst, ratio)
                if ratio > 1:
                    bad.append(f"{p} ({ratio:.3g} x the tolerance)")
    return bad, worst


def assert_same_log_within_tolerance(
    ref_dir, out_dir, world_from: int, world_to: int, measured_upto: int
) -> None:
    """log.jsonl of the resumed run = the uninterrupted run's plus one record of the world-size
    change: the same records, schedule values exact, measured values within the tolerance up to
    global step `measured_upto` (later, an assignment within rounding of a tie may flip)."""
    got = log_records(out_dir)
    changed = [(r["from"], r["to"]) for r in got if r["type"] == "world_size_changed"]
    assert changed == [(world_from, world_to)], changed
    got = [r for r in got if r["type"] != "world_size_changed"]
    ref = log_records(ref_dir)
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        assert {k: a.get(k) for k in SCHEDULE_KEYS} == {k: b.get(k) for k in SCHEDULE_KEYS}, (a, b)
        for k in ("loss", "nonempty", "entropy", "peak_group_hit"):
            if k in a and a["step"] <= measured_upto:
                assert abs(a[k] - b[k]) <= RTOL * abs(a[k]) + ATOL, (k, a, b)


def torchrun1(cmd: list) -> list:
    """A plain `python train.py ...` command as `torchrun --nproc_per_node=1 train.py ...`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=1",
        "--master_port",
        str(_free_port()),
        *cmd[1:],
    ]


@pytest.mark.parametrize("nproc", [1, 4])
def test_2proc_sigkill_resumes_on_another_world_size(ref2, ref2_step4, cut2, tmp_path, nproc):
    """The 2-process run SIGKILLed mid-epoch (cut2: in step 3, last checkpoint after step 2),
    resumed with the same --out-dir on 1 process (plain python) and on 4 (torchrun), against the
    uninterrupted 2-process run. First a SIGTERM stops the resumed run after one step: groups,
    weights, BN statistics, momentum network, optimiser state and memory bank are within the
    tolerance above of the uninterrupted run's after that step, and the bank rows not written
    since are the killed run's bits, re-sharded and gathered again. Then the same command
    finishes the run (the regroup of epoch 1 on the new world size included): the same global
    batches and every crop, bitwise, the same schedules, exactly. The finished states are not
    compared to a tolerance: over more steps and a k-means, an assignment within rounding of a
    tie may flip (the README says so), and then the runs part as any two runs with different
    reduction orders do. (BatchNorm is synchronised, --sync-bn, the default: normalisation does
    not depend on the per-rank batch.)"""
    out, rec = tmp_path / "run", tmp_path / "batches"
    shutil.copytree(cut2, out)
    rec.mkdir()
    cut = load(out / "checkpoint.pth")
    env = {"SMOG_TEST_RECORD_BATCHES": rec}
    r = ok(run(train_cmd(out, nproc=nproc), env={**env, "SMOG_TEST_SIGTERM_AT_STEP": 3}))
    assert "resuming at step 3" in r.stdout and f"world {nproc} (was 2)" in r.stdout, r.stdout
    assert f"world size changed from 2 to {nproc}" in r.stdout
    assert "SIGTERM: checkpoint written" in r.stdout
    mid = load(out / "checkpoint.pth")
    assert (mid["step"], mid["world_size"]) == (4, nproc)
    kept = [i for i in range(N_TRAIN) if i not in {i for i, _ in batch_records(rec)[3]}]
    assert len(kept) == N_TRAIN - 16 and torch.equal(mid["bank"][:, kept], cut["bank"][:, kept])
    bad, worst = tolerance_violations(ref2_step4, mid)
    assert bad == [], bad
    print(f"resumed on {nproc}: after one step, largest difference {worst:.3g} x the tolerance")
    # the tolerance has teeth: the state one optimiser step earlier is far outside it
    assert len(tolerance_violations(ref2_step4, cut)[0]) > 10
    r = ok(run(train_cmd(out, nproc=nproc), env=env))
    assert "resuming at step 4" in r.stdout and "epoch 1: regrouped" in r.stdout
    assert "world size changed" not in r.stdout  # it was written by this world
    ref, got = load(ref2 / "checkpoint.pth"), load(out / "checkpoint.pth")
    assert (got["step"], got["epoch"], got["world_size"]) == (TOTAL_STEPS, 2, nproc)
    for k in (
        "step",
        "epoch",
        "step_in_epoch",
        "steps_per_epoch",
        "total_steps",
        "knn",
        "skipped_nonfinite",
    ):
        assert got[k] == ref[k], k
    seen, want = batch_records(rec), batch_records(ref2.parent / "batches")
    assert sorted(seen) == list(range(3, TOTAL_STEPS)) and all(seen[s] == want[s] for s in seen)
    assert_same_log_within_tolerance(ref2, out, 2, nproc, measured_upto=3)
    assert all(torch.isfinite(v).all() for v in got["model"].values() if v.is_floating_point())
    assert tmp_files(out) == []


def test_per_rank_bn_run_resumes_on_1_process_under_torchrun(ref2, tmp_path):
    """--no-sync-bn (each rank normalises its own micro-batch): 2 processes, rank 0 SIGKILLed in
    step 3 (mid-epoch 0, after the checkpoint of step 3), resumed by `torchrun --nproc_per_node=1`.
    It finishes, and what the README says a per-rank-BN resume keeps holds: the global batches and
    crops of ref2 (BN does not enter them) and its schedules, exactly. What it cannot keep, BN
    statistics over the per-rank batch, makes the weights differ from an uninterrupted run."""
    out, rec = tmp_path / "run", tmp_path / "batches"
    rec.mkdir()
    r = run(
        train_cmd(out, "--no-sync-bn", nproc=2),
        env={"SMOG_TEST_DIE_AT_STEP": 3, "SMOG_TEST_DIE_RANK": 0},
    )
    assert r.returncode != 0 and "SIGKILL self: at step 3" in r.stderr, r.stderr[-3000:]
    assert load(out / "checkpoint.pth")["step"] == 3
    r = ok(run(torchrun1(train_cmd(out, "--no-sync-bn")), env={"SMOG_TEST_RECORD_BATCHES": rec}))
    assert "resuming at step 3" in r.stdout and "world size changed from 2 to 1" in r.stdout
    assert "epoch 1: regrouped" in r.stdout
    got = load(out / "checkpoint.pth")
    assert (got["step"], got["world_size"], got["config"]["sync_bn"]) == (TOTAL_STEPS, 1, False)
    seen, want = batch_records(rec), batch_records(ref2.parent / "batches")
    assert sorted(seen) == list(range(3, TOTAL_STEPS)) and all(seen[s] == want[s] for s in seen)
    recs = log_records(out)
    assert [(r["from"], r["to"]) for r in recs if r["type"] == "world_size_changed"] == [(2, 1)]
    sched = lambda rs: [
        {k: r.get(k) for k in SCHEDULE_KEYS}
        for r in rs  # noqa: E731
        if r["type"] == "step"
    ]
    assert sched(recs) == sched(log_records(ref2))
    assert [r["epoch"] for r in recs if r["type"] == "epoch"] == [0, 1]
    assert all(torch.isfinite(v).all() for v in got["model"].values() if v.is_floating_point())
    assert tolerance_violations(load(ref2 / "checkpoint.pth"), got)[0] != []


def test_resume_on_a_world_size_that_cannot_divide_the_batch_is_refused(cut2, tmp_path):
    """The checkpoint of a run with global batch 16, resumed on 3 processes: every worker that gets
    that far exits 2 with one line naming the problem and the world sizes that work; out_dir is
    untouched."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    shutil.copytree(
        cut2, out, ignore=shutil.ignore_patterns("run.lock")
    )  # the killed run's (stale)
    before = snapshot(out)
    r = run(train_cmd(out, nproc=3, torchrun=("--log-dir", str(logs), "--redirects", "3")))
    assert r.returncode != 0 and "exitcode  : 2" in r.stderr, r.stderr[-3000:]
    said = 0
    for e in sorted(logs.rglob("stderr.log")):
        lines = [ln for ln in e.read_text().splitlines() if ln.strip()]
        assert len(lines) <= 1, lines
        if lines:
            assert re.search(
                r"^error: --batch-size 16 is not divisible by world size 3 x "
                r"--accum 1; run on a number of processes that divides it "
                r"\(1, 2, 4, 8;",
                lines[0],
            )
            said += 1
    assert said >= 1 and snapshot(out) == before


# ----------------------------------------------------------------------------------------------
# atomic writes (unit level)


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_save_atomic_failed_write_keeps_previous_checkpoint_and_no_temp_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    checkpoint.save_atomic({"step": 1, "w": torch.ones(3)}, str(path))
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save_atomic({"step": 2, "w": torch.zeros(3), "bad": _Unpicklable()}, str(path))
    ck = checkpoint.load_checkpoint(str(path))
    assert ck["step"] == 1 and torch.equal(ck["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_truncated_checkpoint_is_refused_with_one_line(ref1, tmp_path):
    good = (ref1["dir"] / "checkpoint.pth").read_bytes()
    for n in (0, 100, len(good) // 2, len(good) - 1):
        p = tmp_path / f"cut{n}.pth"
        p.write_bytes(good[:n])
        with pytest.raises(ValueError, match="cannot load|fails verification") as e:
            checkpoint.load_checkpoint(str(p))
        assert "\n" not in str(e.value) and "truncated" in str(e.value)


# ----------------------------------------------------------------------------------------------
# safe loading: a checkpoint that would run code


class _Payload:
    """Unpickling this calls os.makedirs(path): the marker shows whether code from the file ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def snapshot(d) -> dict | None:
    """Everything about a directory tree that a write would change (None if it does not exist)."""
    d = Path(d)
    if not d.exists():
        return None
    snap = {".": d.stat().st_mtime_ns}
    for p in sorted(d.rglob("*")):
        st = p.stat()
        snap[str(p.relative_to(d))] = (
            st.st_mtime_ns,
            st.st_size,
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None,
        )
    return snap


def one_line_error(r: subprocess.CompletedProcess, code: int = 2) -> str:
    assert r.returncode == code, f"exit {r.returncode}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    return lines[0]


def test_malicious_checkpoint_is_refused_and_runs_nothing(ref1, tmp_path):
    marker = tmp_path / "PWNED"
    evil = load(ref1["dir"] / "checkpoint.pth")
    evil["extra"] = _Payload(str(marker))  # a real train.py checkpoint plus one object
    evil_path = tmp_path / "evil.pth"
    torch.save(evil, evil_path)

    # train.py --resume PATH
    out = tmp_path / "out"
    line = one_line_error(run(train_cmd(out, "--resume", evil_path)))
    assert "evil.pth" in line and "weights-only" in line and "refused for safety" in line, line
    assert not marker.exists() and not out.exists()
    # train.py auto-resume from out_dir/checkpoint.pth
    auto = tmp_path / "auto"
    auto.mkdir()
    shutil.copy(evil_path, auto / "checkpoint.pth")
    before = snapshot(auto)
    line = one_line_error(run(train_cmd(auto)))
    assert "refused for safety" in line and not marker.exists() and snapshot(auto) == before
    # eval_linear.py --checkpoint PATH
    r = run(
        [
            sys.executable,
            "eval_linear.py",
            "--checkpoint",
            str(evil_path),
            "--out-dir",
            str(out),
            "--workers",
            "0",
            "--device",
            "cpu",
        ]
    )
    assert "refused for safety" in one_line_error(r) and not marker.exists() and not out.exists()
    # python -m smog_train.export
    r = run(
        [sys.executable, "-m", "smog_train.export", str(evil_path), str(tmp_path / "backbone.pth")]
    )
    assert "refused for safety" in one_line_error(r) and not marker.exists()
    assert not (tmp_path / "backbone.pth").exists()
    # control: the payload is live -- an unsafe load (weights_only=False) does run it
    r = run(
        [
            sys.executable,
            "-c",
            f"import torch, sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); "
            f"torch.load({str(evil_path)!r}, weights_only=False)",
        ]
    )
    assert marker.exists(), r.stderr[-2000:]


def test_every_torch_load_in_the_project_is_weights_only():
    calls = []
    for f in [*ROOT.glob("*.py"), *ROOT.glob("spec/*.py"), *ROOT.glob("tests/*.py")]:
        src = f.read_text()
        for m in re.finditer(r"torch\.load\(", src):
            depth, i = 1, m.end()  # the call's argument text
            while depth and i < len(src):
                depth += {"(": 1, ")": -1}.get(src[i], 0)
                i += 1
            calls.append((f.name, src[m.end() : i - 1]))
    assert calls
    unsafe = [
        (f, a)
        for f, a in calls
        if not re.search(r"weights_only\s*=\s*True", a)
        and not (f == Path(__file__).name and "weights_only=False" in a)
    ]  # the control load above
    assert unsafe == [], unsafe


# ----------------------------------------------------------------------------------------------
# bad input: one line naming the problem and the fix, exit 2, no traceback, out_dir untouched


def _png_tree(root: Path, n_per_class: int = 17, size: int = 16) -> None:
    from PIL import Image

    for c in range(2):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.new("RGB", (size, size), (15 * i, 200 * c, 90)).save(d / f"{i:02d}.png")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    (root / "empty").mkdir()
    (root / "classes_no_images" / "a").mkdir(parents=True)
    (root / "classes_no_images" / "a" / "readme.txt").write_text("not an image")
    for name in ("corrupt", "truncated", "bad_skip"):
        _png_tree(root / name / "train")
    (root / "corrupt" / "train" / "class1" / "zz_corrupt.png").write_bytes(
        b"\x89PNG\r\n\x1a\n this is not a png"
    )
    full = (root / "truncated" / "train" / "class0" / "00.png").read_bytes()
    (root / "truncated" / "train" / "class0" / "zz_truncated.png").write_bytes(
        full[: len(full) // 2]
    )
    shutil.copy(
        root / "corrupt" / "train" / "class1" / "zz_corrupt.png",
        root / "bad_skip" / "train" / "class1",
    )
    shutil.copy(
        root / "truncated" / "train" / "class0" / "zz_truncated.png",
        root / "bad_skip" / "train" / "class0",
    )
    (root / "not_a_dir").write_text("a file")
    (root / "read_only").mkdir(mode=0o555)
    (root / "cifar_root").mkdir()
    return root


def _json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _train_bad_inputs(folders, ref1, ref2):
    """(extra args, problem regex, fix regex, out_dir state: 'absent' | 'ref1' | 'ref2')."""
    f = folders
    return [
        (
            ["--data", f"imagefolder:{f / 'missing'}"],
            r"'.*missing' does not exist",
            r"pass --data imagefolder:PATH",
        ),
        (["--data", "imagefolder:"], r"empty path", r"--data imagefolder:PATH"),
        (
            ["--data", f"imagefolder:{f / 'empty'}"],
            r"no images in '.*empty'",
            r"expected .*<class>/<image>",
        ),
        (
            ["--data", f"imagefolder:{f / 'classes_no_images'}"],
            r"no images in",
            r"expected .*<class>/<image>",
        ),
        (
            ["--data", f"imagefolder:{f / 'corrupt'}"],
            r"cannot read image '.*zz_corrupt\.png'",
            r"delete or replace it, or pass --bad-images skip",
        ),
        (
            ["--data", f"imagefolder:{f / 'truncated'}"],
            r"cannot read image '.*zz_truncated\.png'",
            r"--bad-images skip",
        ),
        (
            ["--n-groups", "65"],
            r"--n-groups 65 is more than the 64 samples in the memory bank",
            r"use fewer groups",
        ),
        (
            ["--batch-size", "128"],
            r"global batch 128 is larger than the dataset \(64 images",
            r"smaller --batch-size",
        ),
        (
            ["--beta-end", "1.5"],
            r"--beta-start/--beta-end must be in \[0, 1\], got 1.0, 1.5",
            r"in \[0, 1\]",
        ),
        (["--beta-start", "-0.1"], r"must be in \[0, 1\], got -0.1", r"in \[0, 1\]"),
        (["--tau", "0"], r"--tau must be > 0, got 0", r"> 0"),
        (["--tau", "-0.1"], r"--tau must be > 0", r"> 0"),
        (["--lr", "-0.1"], r"--lr must be >= 0", r">= 0"),
        (["--preset", "nope"], r"unknown preset 'nope'", r"choose one of demo, cifar10-r18"),
        (["--arch", "nope"], r"unknown architecture 'nope'", r"choose one of .*resnet50"),
        (["--no-such-flag"], r"unrecognized arguments: --no-such-flag", r"see python train.py -h"),
        (
            ["--data", "cifar10", "--data-root", f / "cifar_root"],
            r"cifar10 not found under '.*cifar_root'",
            r"pass --download",
        ),
        (
            ["--data", "stl10", "--data-root", f / "cifar_root", "--image-size", "16"],
            r"stl10 not found",
            r"pass --download",
        ),
        (
            ["--resume", f / "missing.pth"],
            r"'.*missing.pth' does not exist",
            r"pass the path of a \.pth",
        ),
        (
            ["--resume", f / "not_a_dir"],
            r"cannot load '.*not_a_dir' as a weights-only checkpoint",
            r"not a checkpoint",
        ),
        (
            ["--out-dir", f / "not_a_dir" / "sub"],
            r"cannot create --out-dir '.*not_a_dir/sub': '.*not_a_dir' is a file",
            r"choose another --out-dir",
        ),
        (
            ["--out-dir", f / "not_a_dir"],
            r"--out-dir '.*not_a_dir' is a file, not a folder",
            r"choose another --out-dir",
        ),
        *(
            [
                (
                    ["--out-dir", "/proc/smog-run"],
                    r"cannot write to --out-dir '/proc/smog-run'",
                    r"choose another --out-dir",
                )
            ]
            if os.path.isdir("/proc/self")
            else []
        ),  # cannot be created
        (["--resume", f], r"checkpoint '.*' is a folder", r"pass the path of a \.pth file in it"),
        (["--config", f], r"--config '.*' is a folder", r"pass a config.json file"),
        (
            ["--config", _json(f / "typed.json", {"epochs": "ten"})],
            r"'epochs' must be an integer, got 'ten'",
            r"--config",
        ),
        (
            ["--config", _json(f / "unknown.json", {"epochz": 2})],
            r"unknown key 'epochz'",
            r"keys are the option names",
        ),
        (
            ["--config", _json(f / "list.json", [1, 2])],
            r"holds a JSON list",
            r"object of option: value",
        ),
        *(
            [
                (
                    ["--out-dir", f / "read_only" / "run"],
                    r"cannot write to --out-dir '.*read_only/run'",
                    r"choose another --out-dir",
                )
            ]
            if os.geteuid() != 0
            else []
        ),  # root may write anywhere
        # resuming a run that this command cannot continue: out_dir holds the reference's checkpoint
        (
            ["--n-groups", "6"],
            r"config field 'n_groups' is 8 in the checkpoint but 6 now",
            r"pass --n-groups 8 \(or --config .*/config.json, the run's own config\) or use a new --out-dir",
            "ref1",
        ),
        (
            ["--epochs", "3"],
            r"config field 'epochs' is 2 in the checkpoint but 3 now",
            r"--epochs 2",
            "ref1",
        ),
        (["--seed", "1"], r"config field 'seed'", r"--seed 0", "ref1"),
        (
            ["--no-sync-bn"],
            r"config field 'sync_bn' is True in the checkpoint but False now",
            r"pass --sync-bn \(or --config",
            "ref2",
        ),
        # --resume of one run into an out_dir holding another
        (
            ["--resume", ref1["dir"] / "checkpoint.pth"],
            r"--out-dir '.*' holds another run \(checkpoint.pth\); "
            r"resuming '.*ref1.*checkpoint.pth' there would overwrite it",
            r"pass an empty --out-dir with --resume, or drop --resume",
            "ref2",
        ),
        (["--dist-timeout", "0"], r"--dist-timeout must be > 0 minutes, got 0", r"> 0"),
    ]


def _prepare_out(state, tmp_path, ref1, ref2, i) -> Path:
    out = tmp_path / f"out{i}"
    if state != "absent":
        shutil.copytree(ref1["dir"] if state == "ref1" else ref2, out)
    return out


def _one_line_error_problems(rc, stdout, err, problem, fix) -> list:
    """What is wrong with a bad-input exit: not code 2, not exactly one 'error: ' line naming the problem
    (regex) and the fix (regex), or a traceback. [] when all is right."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    why = []
    if rc != 2:
        why.append(f"exit {rc}")
    if len(lines) != 1 or not lines[0].startswith("error: "):
        why.append(f"stderr is not one 'error: ' line: {err!r}")
    elif not re.search(problem, lines[0]) or not re.search(fix, lines[0]):
        why.append(f"message does not match /{problem}/ and /{fix}/: {lines[0]!r}")
    if "Traceback" in err + stdout:
        why.append("traceback")
    return why


def _call_train_main(argv, capfd) -> tuple:
    import train

    threads = torch.get_num_threads()
    try:
        rc = train.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
    out, err = capfd.readouterr()
    return rc, out, err


def test_train_bad_inputs_one_line_exit_2_nothing_written(folders, ref1, ref2, tmp_path, capfd):
    """Every bad input (in this process, train.main): exit 2, exactly one stderr line that
    names the problem and the fix, no traceback, out_dir (absent, or holding a run) unchanged."""
    failures = []
    for i, case in enumerate(_train_bad_inputs(folders, ref1, ref2)):
        extra, problem, fix, state = (*case, "absent")[:4]
        out = _prepare_out(state, tmp_path, ref1, ref2, i)
        if "--out-dir" in map(str, extra):
            out = Path(str(extra[[str(e) for e in extra].index("--out-dir") + 1]))
        before = snapshot(out)
        rc, stdout, err = _call_train_main([*TINY, "--out-dir", out, *extra], capfd)
        why = _one_line_error_problems(rc, stdout, err, problem, fix)
        if snapshot(out) != before:
            why.append(f"out_dir changed: {before} -> {snapshot(out)}")
        if why:
            failures.append((extra, why))
    assert failures == [], "\n".join(map(str, failures))


def test_train_bad_inputs_as_real_processes(folders, tmp_path):
    """The same contract seen from outside: a plain process, and a data-loader worker process meeting
    the corrupt image (its exception carries a worker traceback that must not leak)."""
    for i, extra in enumerate(
        (["--tau", "0"], ["--data", f"imagefolder:{folders / 'corrupt'}", "--workers", "1"])
    ):
        out = tmp_path / f"o{i}"
        line = one_line_error(run(train_cmd(out, *extra)))
        assert (
            ("tau" in line)
            if i == 0
            else ("zz_corrupt.png" in line and "--bad-images skip" in line)
        ), line
        assert not out.exists()


def test_2proc_batch_not_divisible_by_world_size(tmp_path):
    """Global batch 17 on 2 processes: the workers exit 2 with the same one line (each its own stderr,
    kept apart by --redirects), no worker traceback, nothing written. (The failure report that torchrun
    itself prints for a worker exiting non-zero is torchrun's, not train.py's.)"""
    out, logs = tmp_path / "out", tmp_path / "logs"
    r = run(
        train_cmd(
            out,
            "--batch-size",
            "17",
            nproc=2,
            torchrun=("--log-dir", str(logs), "--redirects", "3"),
        )
    )
    assert r.returncode != 0 and "exitcode  : 2" in r.stderr, r.stderr[-3000:]
    errs = sorted(logs.rglob("stderr.log"))
    assert len(errs) == 2, errs
    said = 0
    for e in (
        errs
    ):  # a worker still starting up when the other one exits is stopped by torchrun: empty log
        lines = [ln for ln in e.read_text().splitlines() if ln.strip()]
        assert len(lines) <= 1, lines
        if lines:
            assert re.search(
                r"^error: --batch-size 17 is not divisible by world size 2 x --accum 1", lines[0]
            ), lines
            said += 1
    assert said >= 1 and not out.exists()


def test_bad_images_skip_logs_each_file_once_and_counts(folders, tmp_path):
    """--bad-images skip: the run completes, each unreadable file is reported once on stderr, listed once
    in out_dir/skipped_images.txt, and every epoch record counts them."""
    out = tmp_path / "run"
    r = ok(
        run(train_cmd(out, "--data", f"imagefolder:{folders / 'bad_skip'}", "--bad-images", "skip"))
    )
    for name in ("zz_corrupt.png", "zz_truncated.png"):
        assert len(re.findall(rf"warning: skipping unreadable image '.*{name}'", r.stderr)) == 1, (
            r.stderr
        )
    listed = (out / "skipped_images.txt").read_text().split()
    assert sorted(Path(p).name for p in listed) == ["zz_corrupt.png", "zz_truncated.png"], listed
    epochs = [rec for rec in log_records(out) if rec["type"] == "epoch"]
    assert [rec.get("skipped_images") for rec in epochs] == [2, 2], epochs


# ----------------------------------------------------------------------------------------------
# eval_linear.py bad input


def test_eval_bad_inputs_one_line_exit_2_nothing_overwritten(ref1, folders, tmp_path, capfd):
    """eval_linear.py on a file that is not a checkpoint (text, truncated, a half-written temporary
    checkpoint), on a checkpoint of another architecture, on missing CIFAR/STL files, an unknown
    architecture and an out_dir that cannot be written: exit 2, one line, no traceback; an existing
    out_dir with a previous eval-augmented.json is left exactly as it was."""
    import eval_linear

    ck = ref1["dir"] / "checkpoint.pth"
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(ck.read_bytes()[:5000])
    exported = tmp_path / "backbone.pth"
    export.export_backbone(str(ck), str(exported))
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval-augmented.json").write_text('{"previous": "result"}')
    cases = [
        (["--checkpoint", text], r"cannot load .*notes.pth", r"not a checkpoint of this project"),
        (["--checkpoint", cut], r"cannot load .*cut.pth", r"truncated"),
        (
            ["--checkpoint", ck, "--arch", "resnet18"],
            r"--arch resnet18 contradicts the checkpoint's config \(smallcnn\)",
            r"drop --arch",
        ),
        (
            ["--checkpoint", exported, "--arch", "resnet18"],
            r"does not match arch resnet18",
            r"missing keys",
        ),
        (
            ["--checkpoint", exported, "--arch", "smallcnn", "--width", "16"],
            r"shape mismatch",
            r"width=16",
        ),
        (
            ["--checkpoint", ck, "--data", "cifar10", "--data-root", folders / "cifar_root"],
            r"cifar10 not found under",
            r"pass --download",
        ),
        (
            ["--checkpoint", ck, "--data", "stl10", "--data-root", folders / "cifar_root"],
            r"stl10 not found",
            r"pass --download",
        ),
        (["--checkpoint", ck, "--arch", "nope"], r"--arch.*'nope'", r"choose|smallcnn"),
        (
            ["--checkpoint", ck, "--out-dir", folders / "not_a_dir" / "sub"],
            r"cannot create --out-dir '.*not_a_dir/sub': '.*not_a_dir' is a file",
            r"choose another --out-dir",
        ),
    ]
    failures = []
    before = snapshot(out)
    for extra, problem, fix in cases:
        argv = [
            str(a)
            for a in [
                "--out-dir",
                out,
                "--cached-features",
                "--epochs",
                "1",
                "--workers",
                "0",
                "--device",
                "cpu",
                "--quiet",
                *extra,
            ]
        ]
        threads = torch.get_num_threads()
        try:
            rc = eval_linear.main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
        finally:
            torch.set_num_threads(threads)
        stdout, err = capfd.readouterr()
        why = _one_line_error_problems(rc, stdout, err, problem, fix)
        if snapshot(out) != before:
            why.append("out_dir changed")
        if why:
            failures.append((extra[-2:], why))
    assert failures == [], "\n".join(map(str, failures))
    assert not (folders / "cifar_root").exists() or not any((folders / "cifar_root").iterdir())


# ----------------------------------------------------------------------------------------------
# one run per out_dir, checkpoint integrity, Ctrl-C, storage faults, a stopped rank, bad
# images on every decode path


def _popen(cmd: list, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


def _err_lines(r) -> list:
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


def _proc_state(pid: int) -> str:
    """R running, S sleeping, T stopped, ... (/proc/PID/stat)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def test_second_run_in_the_same_out_dir_exits_2_and_a_stale_lock_is_taken_over(ref1, tmp_path):
    """A run holds out_dir/run.lock (pid, host, start time). The same command started in the same
    out_dir meanwhile exits 2 with one line naming the holder, before loading data or writing. The
    first run is then SIGKILLed (its lock stays behind, stale): the same command takes it over with
    a line, resumes and ends bitwise identical to the uninterrupted run; no lock is left."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc (Linux)")
    out = tmp_path / "run"
    first = _popen(train_cmd(out), env={"SMOG_TEST_STOP_AT_STEP": 5})  # holds the lock, stopped
    try:
        t0 = time.time()
        while _proc_state(first.pid) != "T":  # stopped at step 5, holding the lock
            assert first.poll() is None and time.time() - t0 < 200, first.communicate()
            time.sleep(0.2)
        assert load(out / "checkpoint.pth")["step"] == 4
        holder = json.loads((out / "run.lock").read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        before = snapshot(out)
        t1 = time.time()
        r = run(train_cmd(out))
        took = time.time() - t1
        line = one_line_error(r)
        assert re.search(
            rf"--out-dir '.*run' is in use by another run \(pid {first.pid} on "
            rf"{re.escape(socket.gethostname())}, started \d{{4}}-\d\d-\d\d",
            line,
        ), line
        assert "filling the memory bank" not in r.stdout and snapshot(out) == before
        print(f"second run refused in {took:.1f}s")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    assert (out / "run.lock").exists()  # stale: its holder is gone
    r = ok(run(train_cmd(out)))
    assert re.search(
        rf"warning: taking over the lock of --out-dir .*: its run \(pid {first.pid} ", r.stderr
    )
    assert "resuming at step 4" in r.stdout
    assert_same_final(ref1["dir"], out)
    assert not (out / "run.lock").exists()


def _flip(path: Path, n: int = 16) -> None:
    b = bytearray(path.read_bytes())
    mid = len(b) // 2
    b[mid : mid + n] = bytes(x ^ 0xFF for x in b[mid : mid + n])
    path.write_bytes(bytes(b))


def test_flipped_bytes_are_detected_resume_uses_the_previous_checkpoint_bitwise(
    ref1, tmp_path, capfd
):
    """16 bytes flipped in the middle of checkpoint.pth (step 6; checkpoint.prev.pth is step 4):
    eval_linear.py and export refuse it in one line; --resume of it is refused naming the two choices;
    the same command names it, resumes from the previous checkpoint and ends bitwise identical to the
    uninterrupted run; the bad file is kept aside as checkpoint.corrupt.pth."""
    out = tmp_path / "run"
    ok(run(train_cmd(out), env={"SMOG_TEST_SIGTERM_AT_STEP": 5}))
    ck, prev = out / "checkpoint.pth", out / "checkpoint.prev.pth"
    assert (load(ck)["step"], load(prev)["step"]) == (6, 4)
    _flip(ck)
    with pytest.raises(checkpoint.DigestError):
        checkpoint.load_checkpoint(str(ck))
    import eval_linear

    for main, argv in (
        (eval_linear.main, ["--checkpoint", ck, "--device", "cpu", "--workers", "0"]),
        (export.main, [ck, tmp_path / "b.pth"]),
    ):
        threads = torch.get_num_threads()
        try:
            rc = main([str(a) for a in argv])
        finally:
            torch.set_num_threads(threads)
        stdout, err = capfd.readouterr()
        assert (
            _one_line_error_problems(
                rc,
                stdout,
                err,
                r"checkpoint '.*checkpoint.pth' fails verification: its "
                r"SHA-256 does not match",
                r"changed after it was written",
            )
            == []
        )
    assert not (out / "eval.json").exists() and not (tmp_path / "b.pth").exists()
    rc, stdout, err = _call_train_main(
        [*TINY, "--out-dir", tmp_path / "other", "--resume", ck], capfd
    )
    assert (
        _one_line_error_problems(
            rc,
            stdout,
            err,
            r"fails verification",
            rf"pass --resume {re.escape(str(prev))} \(the previous checkpoint, step 4\) "
            r"or start over in a new --out-dir",
        )
        == []
    )
    r = ok(run(train_cmd(out)))
    assert re.search(
        r"warning: checkpoint '.*checkpoint.pth' fails verification.*; resuming from the previous "
        r"checkpoint .*checkpoint.prev.pth \(step 4\) instead",
        r.stderr,
    ), r.stderr
    assert "resuming at step 4" in r.stdout and (out / "checkpoint.corrupt.pth").exists()
    assert_same_final(ref1["dir"], out)


def test_eval_refuses_nonfinite_weights_and_a_nonfinite_linear_loss_exits_3(ref1, tmp_path, capfd):
    """eval_linear.py: a checkpoint (with a valid digest) holding a NaN backbone weight is refused in
    one line (exit 2); a linear evaluation whose loss goes non-finite exits 3 without eval.json."""
    import eval_linear

    ck = load(ref1["dir"] / "checkpoint.pth")
    k = next(
        k for k in ck["model"] if k.startswith("backbone.") and ck["model"][k].is_floating_point()
    )
    ck["model"][k] = ck["model"][k].contiguous().clone()
    ck["model"][k].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.pth"
    checkpoint.save_atomic(ck, str(bad))
    out = tmp_path / "out"
    for extra, code, problem in (
        ([bad], 2, rf"holds non-finite backbone weights \(1 tensors, e.g. '{k[9:]}'\)"),
        (
            [ref1["dir"] / "checkpoint.pth", "--lr", "1e38"],
            3,
            r"linear evaluation: non-finite loss in epoch \d; .*lower --lr",
        ),
    ):
        argv = [
            str(a)
            for a in [
                "--out-dir",
                out,
                "--cached-features",
                "--epochs",
                "2",
                "--workers",
                "0",
                "--device",
                "cpu",
                "--quiet",
                "--checkpoint",
                *extra,
            ]
        ]
        threads = torch.get_num_threads()
        try:
            rc = eval_linear.main(argv)
        finally:
            torch.set_num_threads(threads)
        stdout, err = capfd.readouterr()
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == code and len(lines) == 1 and re.search(problem, lines[0]), (rc, err)
        assert not (out / "eval.json").exists()


@pytest.fixture(scope="module")
def cut_sigint(tmp_path_factory):
    """The reference command stopped by Ctrl-C (a real SIGINT) at the start of step 5: the step
    finishes, a checkpoint is written (step 6), exit 130. Tests copy it before resuming."""
    out = tmp_path_factory.mktemp("sigint") / "run"
    r = run(train_cmd(out), env={"SMOG_TEST_SIGINT_AT_STEP": 5})
    assert r.returncode == 130, (r.returncode, r.stderr[-3000:])
    assert re.search(
        r"SIGINT: checkpoint written \(.*checkpoint.pth \(step 6\)\), exiting; rerun the same "
        r"command to resume",
        r.stdout,
    ), r.stdout[-2000:]
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr
    return out


def test_ctrl_c_checkpoints_exits_130_and_resumes_bitwise(ref1, cut_sigint, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(cut_sigint, out)
    assert load(out / "checkpoint.pth")["step"] == 6 and not (out / "run.lock").exists()
    r = ok(run(train_cmd(out)))
    assert "resuming at step 6" in r.stdout
    assert_same_final(ref1["dir"], out)


def test_second_ctrl_c_exits_at_once_and_a_signal_in_the_bank_fill_says_nothing_was_saved(tmp_path):
    """Two SIGINTs in step 5: exit 130 at once, no new checkpoint (the last is the end of epoch 0), the
    lock released. SIGTERM while the memory bank fills: one line, exit 143, nothing written."""
    out = tmp_path / "run"
    r = run(train_cmd(out), env={"SMOG_TEST_SIGINT_AT_STEP": 5, "SMOG_TEST_SIGINT_TWICE": 1})
    assert r.returncode == 130 and "second Ctrl-C: exiting now, without a checkpoint" in r.stderr, (
        r.stderr
    )
    assert load(out / "checkpoint.pth")["step"] == 4 and not (out / "run.lock").exists()
    fill = tmp_path / "fill"
    r = run(train_cmd(fill), env={"SMOG_TEST_SIGTERM_IN_FILL": 1})
    assert r.returncode == 143 and _err_lines(r) == [
        "SIGTERM while loading the checkpoint or filling the memory bank: nothing was saved yet; rerun the same "
        "command to start again"
    ], r.stderr
    assert not fill.exists()


def _fsize_limit(n: int):
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))


def test_full_disk_mid_run_one_line_exit_4_previous_checkpoint_intact(ref1, cut_sigint, tmp_path):
    """A file-size limit (ulimit -f, unprivileged stand-in for a full disk) below a checkpoint's size
    but above the free-space check's estimate: the resumed run fails at its next checkpoint write with
    one line naming the file, the cause and the checkpoint to resume from, exit 4; checkpoint.pth
    (step 6) and checkpoint.prev.pth still verify, no temporary or empty file. The same command without
    the limit then ends bitwise. A limit below the estimate is refused before the bank fill."""
    out = tmp_path / "run"
    shutil.copytree(cut_sigint, out)
    size = (out / "checkpoint.pth").stat().st_size
    p = subprocess.run(
        train_cmd(out),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_fsize_limit(size - 1),
    )
    ck = out / "checkpoint.pth"
    assert (
        _one_line_error_problems(
            p.returncode + (2 - 4 if p.returncode == 4 else 0),
            p.stdout,
            p.stderr,
            rf"cannot write '{re.escape(str(ck))}': file too large \(the file-size limit, "
            r"ulimit -f\) \[EFBIG\]",
            rf"rerun the same command: it resumes from {re.escape(str(ck))} \(step 6\)",
        )
        == []
    ), (p.returncode, p.stderr[-3000:])
    assert checkpoint.load_checkpoint(str(ck))["step"] == 6
    assert checkpoint.load_checkpoint(str(out / "checkpoint.prev.pth"))["step"] == 4
    assert tmp_files(out) == [] and all(f.stat().st_size > 0 for f in out.iterdir())
    ok(run(train_cmd(out)))
    assert_same_final(ref1["dir"], out)
    new = tmp_path / "new"
    p = subprocess.run(
        train_cmd(new),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_fsize_limit(50_000),
    )
    assert p.returncode == 4 and "filling the memory bank" not in p.stdout, p.stderr[-2000:]
    assert re.search(
        r"^error: cannot write checkpoints to --out-dir '.*new': the file-size limit \(ulimit -f\) is "
        r"0.0 MiB, a checkpoint of this run needs about 0.\d MiB \[EFBIG\]; raise the limit$",
        p.stderr.strip(),
    ), p.stderr
    assert not new.exists()


def _mount(*args) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def test_read_only_file_system_mid_run_one_line_exit_4_previous_checkpoint_intact(
    ref1, cut_sigint, tmp_path
):
    """A real EROFS: the out-dir's file system (a tmpfs of its own) is remounted read-only while the
    resumed run trains. The next write (the log or a checkpoint) fails: one line naming the file,
    "read-only file system [EROFS]" and the checkpoint to resume from, exit 4, no traceback;
    checkpoint.pth (step 6) and checkpoint.prev.pth still verify. Made writable again, the same
    command ends bitwise. Needs mount privileges (root); skipped without them."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mnt)):
        pytest.skip("mounting a tmpfs needs privileges (root) that this run does not have")
    try:
        out = mnt / "run"
        shutil.copytree(cut_sigint, out)
        p = subprocess.Popen(
            train_cmd(out),
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        said = []
        for line in p.stdout:  # read-only once training has resumed
            said.append(line)
            if "resuming at step 6" in line:
                assert _mount("-o", "remount,ro", str(mnt))
                break
        stdout, err = p.communicate(timeout=300)
        stdout = "".join(said) + stdout
        assert _mount("-o", "remount,rw", str(mnt))
        ck = out / "checkpoint.pth"
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert p.returncode == 4 and len(lines) == 1, (p.returncode, err[-3000:])
        assert re.search(
            rf"^error: cannot write '{re.escape(str(out))}/[\w.]+': read-only file system "
            rf"\[EROFS\]; .*rerun the same command: it resumes from {re.escape(str(ck))} \(step 6\)",
            lines[0],
        ), lines[0]
        assert "Traceback" not in stdout + err
        assert checkpoint.load_checkpoint(str(ck))["step"] == 6
        assert checkpoint.load_checkpoint(str(out / "checkpoint.prev.pth"))["step"] == 4
        ok(run(train_cmd(out)))
        assert_same_final(ref1["dir"], out)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_enospc_on_the_log_is_one_line(tmp_path):
    """A real ENOSPC (log.jsonl is a link to /dev/full): one line naming the file and the cause."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    from types import SimpleNamespace

    (tmp_path / "log.jsonl").symlink_to("/dev/full")
    run_ = SimpleNamespace(rank=0, last_ck=None, path=lambda n: str(tmp_path / n))
    with pytest.raises(checkpoint.StorageError) as e:
        checkpoint.log(run_, {"type": "step"})
    assert re.fullmatch(
        rf"cannot write '{re.escape(str(tmp_path))}/log.jsonl': no space left on device \[ENOSPC\]; "
        r"free space .* and rerun the same command: it resumes from the start .*",
        str(e.value),
    )


def test_2proc_stopped_rank_job_exits_within_dist_timeout(tmp_path):
    """Rank 1 SIGSTOPs itself at step 2; rank 0 waits in the step's all-reduce until --dist-timeout
    (0.1 min) and exits 5 with one line naming the flag; torchrun then stops the job (its SIGTERM
    grace for the stopped rank is 30 s)."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    t0 = time.time()
    r = run(
        train_cmd(
            out,
            "--dist-timeout",
            "0.1",
            nproc=2,
            torchrun=("--log-dir", str(logs), "--redirects", "3"),
        ),
        env={"SMOG_TEST_STOP_AT_STEP": 2, "SMOG_TEST_DIE_RANK": 1},
        timeout=200,
    )
    took = time.time() - t0
    assert r.returncode != 0 and "exitcode  : 5" in r.stderr, r.stderr[-3000:]
    err0 = next(p for p in logs.rglob("stderr.log") if p.parent.name == "0").read_text()
    lines = [ln for ln in err0.splitlines() if ln.strip()]
    assert lines == [
        "error: rank 0: a collective did not complete within --dist-timeout 0.1 min: another rank is "
        "stopped, hung or dead; the job stops; rerun the same command to resume from the last "
        "checkpoint (raise --dist-timeout if a rank is legitimately slow)"
    ], err0
    print(f"stopped rank: job exited after {took:.1f}s")
    assert took < 120


def _jpeg_tree(root: Path) -> Path:
    """16 readable JPEGs per class, plus a zero-byte, a truncated, a non-image and a 20000 x 20000
    (header) JPEG, and one with corrupt entropy-coded data that libjpeg recovers from (PIL reads it)."""
    import io

    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(16):
            x = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(x).save(root / f"class{c}" / f"{i:02d}.jpg", quality=90)
    buf = io.BytesIO()
    Image.fromarray(
        torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
    ).save(buf, "JPEG", quality=90)
    good = buf.getvalue()
    (root / "class0" / "zz_zero.jpg").write_bytes(b"")
    (root / "class0" / "zz_truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "class1" / "zz_text.jpg").write_text("not an image")
    sof = next(p for p in range(2, len(good)) if good[p] == 0xFF and good[p + 1] in (0xC0, 0xC2))
    bomb = bytearray(good)
    bomb[sof + 5 : sof + 9] = (20000).to_bytes(2, "big") * 2
    (root / "class1" / "zz_bomb.jpg").write_bytes(bytes(bomb))
    noisy = bytearray(good)
    noisy[len(good) // 2 : len(good) // 2 + 8] = b"\xff\x00" * 4
    (root / "class1" / "zz_noisy.jpg").write_bytes(bytes(noisy))
    return root


def test_bad_images_skip_on_the_default_path_zero_byte_truncated_non_image_bomb(
    tmp_path, monkeypatch
):
    """--bad-images skip on the default path (tensor crops, JPEGs decoded with torchvision, the bank
    fill through PIL): the run finishes and lists each bad file once; the bomb is refused from its
    header by both decoders (decode_rgb never decodes it); libjpeg's "Corrupt JPEG data" never reaches
    the terminal. With --bad-images fail the zero-byte file is named in one line."""
    from smog_train import data, decode

    root = _jpeg_tree(tmp_path / "jpegs" / "train")
    bomb = decode.read_bytes(str(root / "class1" / "zz_bomb.jpg"))
    decoded, real = [], decode._decode_jpegs  # the torchvision decoder never sees it
    monkeypatch.setattr(
        decode, "_decode_jpegs", lambda b, dev: decoded.append(len(b)) or real(b, dev)
    )
    cpu = torch.device("cpu")
    assert (
        decode.jpeg_pixels(bomb) == 20000 * 20000
        and decode.decode_rgb([bomb], cpu) == [None]
        and not decoded
    )
    assert decode.decode_rgb([decode.read_bytes(str(root / "class0" / "00.jpg"))], cpu)[
        0
    ].shape == (3, 16, 16)
    monkeypatch.undo()
    assert decode.read_bytes(str(root / "class0" / "zz_zero.jpg")).numel() == 0
    over = bytearray(bomb.numpy().tobytes())  # 10000 x 10000: PIL itself only warns
    sof = next(p for p in range(2, len(over)) if over[p] == 0xFF and over[p + 1] in (0xC0, 0xC2))
    over[sof + 5 : sof + 9] = (10000).to_bytes(2, "big") * 2
    (tmp_path / "over.jpg").write_bytes(bytes(over))
    with pytest.raises(ValueError, match=r"10000 x 10000 pixels, over the limit of 89478485"):
        data.ImageFolderDataset(str(root))._load(str(tmp_path / "over.jpg"))
    out = tmp_path / "run"
    r = ok(run(train_cmd(out, "--data", f"imagefolder:{root.parent}", "--bad-images", "skip")))
    names = ["zz_bomb.jpg", "zz_text.jpg", "zz_truncated.jpg", "zz_zero.jpg"]
    assert sorted(Path(p).name for p in (out / "skipped_images.txt").read_text().split()) == names
    for name in names:
        assert len(re.findall(rf"warning: skipping unreadable image '.*{name}'", r.stderr)) == 1, (
            r.stderr
        )
    assert "Corrupt JPEG" not in r.stderr + r.stdout and "Traceback" not in r.stderr
    assert re.search(
        r"zz_bomb.jpg' \(.*exceeds limit|zz_bomb.jpg' \(20000 x 20000 pixels", r.stderr
    )
    zero = tmp_path / "zero" / "train"
    shutil.copytree(root, zero)
    for n in names[:3]:
        os.remove(next(zero.rglob(n)))
    line = one_line_error(run(train_cmd(tmp_path / "o2", "--data", f"imagefolder:{zero.parent}")))
    assert re.search(
        r"cannot read image '.*zz_zero.jpg' \(empty file, 0 bytes\); delete or replace it, or pass "
        r"--bad-images skip",
        line,
    ), line
