"""One process of a run: the process group under torchrun, the device, and how this machine's cores are
split over ranks, data workers and torch threads. Plain `python` (RANK unset): one process, no process
group (smog's collectives are then no-ops); under torchrun NCCL on GPUs, gloo on CPU."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys

import torch
import torch.distributed as dist

import smog
from smog_train.config import UsageError


def init_process_group(backend: str, timeout_min: float = 10.0) -> None:
    """dist.init_process_group from torchrun's environment, with one store key space per restart attempt.
    torchrun keeps its agent's TCPStore across --max-restarts attempts, and the process group's keys
    (gloo's peer addresses) are not prefixed by attempt: a restarted rank could read the
    dead attempt's addresses and fail with "Gloo connectFullMesh failed ... Connection refused"."""
    timeout = datetime.timedelta(minutes=timeout_min)  # every collective's limit (--dist-timeout)
    if (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        or "TORCHELASTIC_RESTART_COUNT" not in os.environ
    ):
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,
        timeout=dist.default_pg_timeout,
    )
    store = dist.PrefixStore(f"smog/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", base)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def keep_freed_memory() -> None:
    """glibc hands every freed block above the mmap threshold straight back to the OS, so on the CPU each
    step would page-fault its activations in again, system time of the order of the compute on a small
    model. Keep freed memory in the heap (what jemalloc/tcmalloc would do). Linux/glibc only; elsewhere
    a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: allocations below 1 GiB come from the heap
        libc.mallopt(
            -1, 1 << 30
        )  # M_TRIM_THRESHOLD: do not return the heap's top to the OS eagerly
    except (OSError, AttributeError):
        pass


def init_process(device: str, timeout_min: float = 10.0) -> tuple:
    """device auto | cpu | cuda -> (rank, world, torch.device). Plain python (RANK unset): rank 0 of
    1, no process group; under torchrun: the process group (init_process_group, every collective
    limited to timeout_min minutes) and this rank's GPU. train.py and eval_linear.py start this way."""
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not {device!r}")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available; use --device cpu")
    rank, world, local = 0, 1, 0
    if "RANK" in os.environ and not smog.dist_ready():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local)
        init_process_group("nccl" if cuda else "gloo", timeout_min)
    if smog.dist_ready():
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, torch.device(f"cuda:{local}" if cuda else "cpu")


def setup(cfg) -> tuple:
    """cfg: config.Config -> (rank, world, device) (init_process); resolves cfg.workers = -1. The
    cores of this machine are split over the local ranks, and each rank's share over its data
    workers and its torch threads."""
    rank, world, device = init_process(cfg.device, cfg.dist_timeout)
    cuda = device.type == "cuda"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cores = max(1, (os.cpu_count() or 1) // local_world)
    if not cuda:
        keep_freed_memory()  # before the data workers fork, so they inherit it
    if cfg.workers < 0:
        cfg.workers = min(10, cores - 1)
    torch.set_num_threads(
        cfg.threads or max(1, cores - cfg.workers)
    )  # workers + threads = cores: no oversubscription
    return rank, world, device


def is_timeout(e: BaseException) -> bool:
    """A collective that timed out (gloo: "Timed out waiting ...ms for recv operation"; NCCL with
    async error handling off: "... timeout ..." from the watchdog)."""
    return bool(re.search(r"timed? ?out|timeout", str(e), re.IGNORECASE))


def is_peer_lost(e: BaseException) -> bool:
    """A collective that failed because another rank's process ended (gloo: "Connection closed by
    peer"; NCCL: "remote process exited")."""
    return bool(
        re.search(
            r"closed by peer|reset by peer|remote (worker|process)|Broken pipe",
            str(e),
            re.IGNORECASE,
        )
    )


def peer_lost_line(e: BaseException) -> str:
    rank = dist.get_rank() if smog.dist_ready() else 0
    first = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(e).split())).split(". ")[0][:120]
    return (
        f"rank {rank}: another rank ended during a collective ({first}); its own error line says "
        f"why; rerun the same command to resume from the last checkpoint"
    )


def timeout_line(minutes: float) -> str:
    rank = dist.get_rank() if smog.dist_ready() else 0
    return (
        f"rank {rank}: a collective did not complete within --dist-timeout {minutes:g} min: another "
        f"rank is stopped, hung or dead; the job stops; rerun the same command to resume from the "
        f"last checkpoint (raise --dist-timeout if a rank is legitimately slow)"
    )


def rank0_print(*a):
    if not smog.dist_ready() or dist.get_rank() == 0:
        print(*a, flush=True)


def git_revision() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return rev + ("-dirty" if rev and dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def announce(run, micro: int, amp, resumed: bool, has_test: bool) -> None:
    """The run's banner: revision, world, device, precision; the resolved config as sorted
    `key: value` columns (config.json in --out-dir has it too); the batch geometry."""
    cfg = run.cfg
    items = [f"{k}: {v}" for k, v in sorted(run.cfg_dict.items()) if k not in ("model", "git")]
    width = max(len(i) for i in items) + 2
    cols = max(1, 100 // width)
    rows = -(-len(items) // cols)
    table = "\n".join(
        "".join(
            items[r + c * rows].ljust(width) for c in range(cols) if r + c * rows < len(items)
        ).rstrip()
        for r in range(rows)
    )
    changed = resumed and run.resumed_world != run.world
    was = f" (was {run.resumed_world})" if changed else ""
    rank0_print(
        f"SMoG train.py  git {run.cfg_dict['git'] or '(none)'}  world {run.world}{was}  "
        f"device {run.device}  precision {amp or torch.float32}\n{table}"
    )
    rank0_print(
        f"{run.bank.n} training images, {run.spe} steps/epoch of {cfg.batch_size} (micro-batch "
        f"{micro} x accum {cfg.accum} x world {run.world}), {run.total_steps} steps"
        + (f"; resuming at step {run.step}" if resumed else "")
    )
    if changed:
        rank0_print(
            f"world size changed from {run.resumed_world} to {run.world}: the checkpoint "
            f"was written by {run.resumed_world} process(es); same global batches, crops, "
            f"groups and schedules (README, resuming on another world size)"
        )
    if cfg.knn_every and not has_test:
        rank0_print(
            f"note: {cfg.data} has no held-out split (PATH/val); the per-epoch kNN monitor is off"
        )


def exit_process(rc: int) -> None:
    """sys.exit(rc); under torchrun, skip interpreter finalisation instead: gloo's worker threads may still
    be releasing the tensors of the last collectives, need the GIL of a finalising interpreter and abort
    the process (exit -6 after a finished run, now and then). Callers have written and flushed
    everything and destroyed the process group by now."""
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate [n_r, ...] tensors of all ranks in rank order; n_r may differ between ranks."""
    if not smog.dist_ready():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    pad = x.new_zeros((m - x.shape[0], *x.shape[1:]))
    out = [x.new_empty((m, *x.shape[1:])) for _ in sizes]
    dist.all_gather(out, torch.cat([x, pad]))
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])
