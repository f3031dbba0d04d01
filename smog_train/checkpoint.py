"""Run state of train.py: what a checkpoint holds, how it is written, checked and resumed.

Checkpoint (out_dir/checkpoint.pth, written by rank 0 with save_atomic, loaded with
load_checkpoint, i.e. weights_only=True):
  both networks and the groups (SMoG.state_dict()), the whole memory bank in dataset order (fp32),
  optimiser, GradScaler, step / epoch / position in the epoch (the sampler is rebuilt from (seed,
  epoch) and fast-forwarded), the config as plain types, the world size that wrote it, kNN history,
  collapse-guard state and the length of log.jsonl (truncated back to it on resume, so the log of a
  resumed run equals an uninterrupted one). No RNG state: train.py seeds every generator a step
  draws from with (seed, global step, rank) at the start of the step.
Nothing in it is laid out per rank, so a run resumes on another number of processes (any that
divides the global batch / accum): the bank is re-sharded, the data position is the global step;
the log and the banner say that the world size changed. It is saved at the end of every epoch,
every --save-every steps and on SIGTERM (then exit 0). Resuming with different config fields
(other than config.RUNTIME_FIELDS) is refused, naming every one. Bad input raises UsageError:
train.py prints it as one line and exits with code 2.

The test-only faults that kill a run at chosen points are in smog_train/faults.py.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.distributed as dist

import smog
from smog_train.config import UsageError

FORMAT = "smog-train-v3"  # v3: no per-rank state (no RNG states), resumable on another world size


def check_writable(out_dir: str) -> None:
    """out_dir must be a writable folder, or one that can be created; checked before any work.
    Nothing is left behind: a probe folder made in the nearest existing parent is removed."""
    d = os.path.abspath(out_dir)
    if os.path.exists(d) and not os.path.isdir(d):
        raise UsageError(f"--out-dir {out_dir!r} is a file, not a folder; choose another --out-dir")
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise UsageError(f"cannot create --out-dir {out_dir!r}: {d!r} is a file, not a folder; "
                         f"choose another --out-dir")
    if d == os.path.abspath(out_dir):      # it exists: ask, without touching it
        if not os.access(d, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write to --out-dir {out_dir!r} (not writable); choose another "
                             f"--out-dir")
        return
    try:                                   # it would be created here: try it (/proc says no only then)
        os.rmdir(tempfile.mkdtemp(prefix=".smog-probe-", dir=d))
    except OSError as e:
        raise UsageError(f"cannot write to --out-dir {out_dir!r} ({d!r}: {e.strerror}); choose "
                         f"another --out-dir") from None


# ----------------------------------------------------------------------------------------------
# one file, all state, written atomically, loaded with weights_only=True


def save_atomic(obj, path: str) -> None:
    """torch.save to `path.tmp-<pid>`, fsync, then rename: at every instant `path` is complete or absent."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """torch.load(weights_only=True); a file that is not a torch checkpoint, or carries arbitrary
    pickled objects, raises ValueError with a one-line reason (nothing from the file is executed)."""
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a folder; pass the path of a .pth file in it (e.g. "
                         f"{os.path.join(path, 'checkpoint.pth')!r})")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist; pass the path of a .pth file written by train.py "
                         f"or by `python -m smog_train.export`")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError for truncated/non-zip files, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load {path!r} as a weights-only checkpoint ({first[:200]}); it is not a "
                         f"checkpoint of this project, is truncated, or holds objects that are refused for "
                         f"safety") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj



# ----------------------------------------------------------------------------------------------
# writing, loading, checking


def load(path: str) -> dict:
    try:
        return load_checkpoint(path)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_resume(ck: dict, cfg, runtime_fields: set, path: str) -> None:
    """The checkpoint must continue *this* run: same format and every field of the config dataclass
    `cfg` except `runtime_fields`; a refusal names every field that differs, the flags that restore
    them and the run's own config.json. The world size may differ (train.py's batch_geometry has
    checked that this one divides the global batch)."""
    if str(ck.get("format", "")).startswith("smog-train-") and ck.get("format") != FORMAT:
        raise UsageError(f"cannot resume {path!r}: it was written by an older train.py (format {ck['format']!r}, "
                         f"this one writes {FORMAT!r}: another recipe or state layout); use a new "
                         f"--out-dir")
    if ck.get("format") != FORMAT:
        raise UsageError(f"{path!r} is not a train.py checkpoint (format {ck.get('format')!r}, expected {FORMAT!r})")
    old = ck.get("config", {})
    names = [f.name for f in fields(cfg) if f.name not in runtime_fields]
    missing = [n for n in names if n not in old]
    if missing:    # fields added since: the old run made them as they were then, not necessarily as now
        raise UsageError(f"cannot resume {path!r}: its config has no field {', '.join(map(repr, missing))} "
                         f"(written by an older train.py); use a new --out-dir")
    changed = [n for n in names if old[n] != getattr(cfg, n)]
    if changed:
        diffs = ", ".join(f"{n!r} is {old[n]!r} in the checkpoint but {getattr(cfg, n)!r} now" for n in changed)
        own = os.path.join(os.path.dirname(path) or ".", "config.json")
        own = f" (or --config {own}, the run's own config)" if os.path.isfile(own) else ""
        raise UsageError(f"cannot resume {path!r}: config field{'s' if len(changed) > 1 else ''} {diffs}; "
                         f"pass {' '.join(_flag(n, old[n]) for n in changed)}{own} or use a new --out-dir")


def _flag(name: str, value) -> str:
    """The command-line option that sets config field `name` to `value`."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def prepare_out_dir(out_dir: str, config_json: str, resumed: bool, same_dir: bool, log_offset: int) -> None:
    """Rank 0, once everything is validated: remove the temporary files of killed checkpoint writes and a
    previous run's results, write config.json, truncate log.jsonl to the checkpoint (or empty it)."""
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        if f.startswith(".checkpoint.pth.tmp-"):
            os.remove(os.path.join(out_dir, f))
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        fh.write(config_json)
    if not resumed and os.path.exists(os.path.join(out_dir, "demo_results.json")):
        os.remove(os.path.join(out_dir, "demo_results.json"))  # a previous run's, not this one's
    log_path = os.path.join(out_dir, "log.jsonl")
    if os.path.exists(log_path):
        if resumed and same_dir and os.path.getsize(log_path) >= log_offset:
            os.truncate(log_path, log_offset)  # drop lines written after the checkpoint
        elif not resumed:
            os.truncate(log_path, 0)


class on_sigterm:
    """Context: SIGTERM only sets `.got`; the loop acts on it at the next step boundary, on every rank
    together (it is part of the step's all-reduce), by saving and exiting 0."""

    def __init__(self):
        self.got = False

    def _handler(self, signum, frame):
        self.got = True

    def __enter__(self):
        self.old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self.old)


# ----------------------------------------------------------------------------------------------
# the run's state, resume or start, save, log


@dataclass
class Run:
    """What the loop reads and a checkpoint holds: the built objects and the position in the run."""
    cfg: object                          # config.Config
    rank: int
    world: int
    device: torch.device
    model: smog.SMoG
    net: torch.nn.Module                 # train.StepModule, DDP-wrapped when world > 1
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    bank: object                         # memory_bank.MemoryBank
    sched: dict                          # per-step lr, beta, m (train.schedules)
    spe: int                             # optimiser steps per epoch
    autocast: object
    cfg_dict: dict                       # config.json and the checkpoint's "config"
    step: int = 0                        # optimiser steps done, over all epochs
    epoch: int = 0
    step_in_epoch: int = 0
    knn: list = field(default_factory=list)      # [[epoch, kNN top-1 %], ...]
    skipped_nonfinite: int = 0
    n_save: int = 0                      # checkpoint writes by this process
    log_offset: int = 0                  # length of log.jsonl at the resumed checkpoint
    last_ck: Optional[str] = None        # "PATH (step S)": the newest complete checkpoint to restart from
    peak_hit: object = 0.0               # collapse guard: best fraction of attainable groups hit this epoch
    knn_feats: Optional[list] = None     # the last kNN monitor's (train, test) features, reused by the final eval
    resumed_world: Optional[int] = None  # world size that wrote the resumed checkpoint
    hooks: object = None                 # faults.Hooks: test-only fault points, no-ops in a real run

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.spe

    def path(self, name: str) -> str:
        return os.path.join(self.cfg.out_dir, name)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()


def resume_or_start(run: Run, train_raw, runtime_fields: set, start) -> bool:
    """Restore everything from the checkpoint (automatic from out_dir, or --resume), or call start() (fill
    the memory bank) for a new run; all is validated before the run writes anything, then out_dir is
    prepared. A checkpoint written with another world size is re-sharded (the bank), and a record
    of the change is appended to log.jsonl. -> resumed?"""
    cfg, ck_path = run.cfg, run.path("checkpoint.pth")
    resume = cfg.resume or (ck_path if os.path.exists(ck_path) else "")
    same_dir = False
    if resume:
        ck = load(resume)
        check_resume(ck, cfg, runtime_fields, resume)
        check_writable(cfg.out_dir)
        run.model.load_state_dict(ck["model"])
        run.optimizer.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            run.scaler.load_state_dict(ck["scaler"])
        run.bank.load(ck["bank"].to(run.device))                    # re-sharded for this world size
        for k in ("step", "epoch", "step_in_epoch", "knn", "skipped_nonfinite", "log_offset"):
            setattr(run, k, ck[k])
        run.peak_hit = ck.get("peak_hit", 0.0)  # collapse guard: best group hit so far in the resumed epoch
        run.resumed_world, run.last_ck = ck["world_size"], f"{resume} (step {ck['step']})"
        same_dir = os.path.abspath(resume) == os.path.abspath(ck_path)
        del ck
    else:
        check_writable(cfg.out_dir)
        t0 = time.time()
        if run.rank == 0:
            print(f"filling the memory bank: {run.bank.n} images ...", flush=True)
        start()
        if run.rank == 0:
            print(f"memory bank filled in {time.time() - t0:.1f}s", flush=True)
    # from here on the run writes
    if run.rank == 0:
        prepare_out_dir(cfg.out_dir, json.dumps(run.cfg_dict, indent=1), bool(resume), same_dir, run.log_offset)
    if resume and run.resumed_world != run.world:
        log(run, {"type": "world_size_changed", "step": run.step, "from": run.resumed_world,
                  "to": run.world})
    if cfg.bad_images == "skip" and hasattr(train_raw, "skip_log"):
        train_raw.skip_log = run.path("skipped_images.txt")
        if getattr(train_raw, "_reported", None):  # met while filling the bank, before out_dir could be written
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(train_raw.skip_log, "a") as fh:
                fh.writelines(p + "\n" for p in sorted(train_raw._reported))
    return bool(resume)


def save(run: Run, why: str) -> None:
    """Checkpoint the current position (the module docstring lists what it holds). Collective: the bank
    is gathered; rank 0 writes atomically."""
    bank_full = run.bank.full()
    run.n_save += 1
    ck_path, log_path = run.path("checkpoint.pth"), run.path("log.jsonl")
    if run.rank == 0:
        obj = {"format": FORMAT, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
               "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
               "bank": bank_full,
               "config": run.cfg_dict, "world_size": run.world, "step": run.step, "epoch": run.epoch,
               "step_in_epoch": run.step_in_epoch, "steps_per_epoch": run.spe, "total_steps": run.total_steps,
               "knn": run.knn, "skipped_nonfinite": run.skipped_nonfinite, "peak_hit": float(run.peak_hit),
               "log_offset": os.path.getsize(log_path) if os.path.exists(log_path) else 0}
        run.hooks.checkpoint_write(run.n_save, obj, ck_path)   # does nothing outside fault tests
        save_atomic(obj, ck_path)
        print(f"saved {ck_path} (step {run.step}, {why})", flush=True)
    if smog.dist_ready():
        dist.barrier()
    run.last_ck = f"{ck_path} (step {run.step})"


def log(run: Run, rec: dict) -> None:
    if run.rank == 0:
        with open(run.path("log.jsonl"), "a") as fh:
            fh.write(json.dumps(rec) + "\n")
