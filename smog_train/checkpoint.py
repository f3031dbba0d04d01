"""Run state of train.py: what a checkpoint holds, how it is written, checked and resumed.

Checkpoint (out_dir/checkpoint.pth, written by rank 0 with save_atomic -- temporary file, fsync,
rename, a SHA-256 trailer of its bytes; the previous one kept as checkpoint.prev.pth -- and loaded
with load_checkpoint, which verifies the trailer, then torch.load(weights_only=True); a resume that
finds checkpoint.pth damaged uses checkpoint.prev.pth, see choose_checkpoint):
  both networks and the groups (SMoG.state_dict()), the whole memory bank in dataset order (fp32),
  optimiser, GradScaler, step / epoch / position in the epoch (the sampler is rebuilt from (seed,
  epoch) and fast-forwarded), the config as plain types, the world size that wrote it, kNN history,
  collapse-guard state and the length of log.jsonl (truncated back to it on resume, so the log of a
  resumed run equals an uninterrupted one). No RNG state: train.py seeds every generator a step
  draws from with (seed, global step, rank) at the start of the step.
Nothing in it is laid out per rank, so a run resumes on another number of processes (any that
divides the global batch / accum): the bank is re-sharded, the data position is the global step;
the log and the banner say that the world size changed. It is saved at the end of every epoch,
every --save-every steps and on SIGTERM (then exit 0) or SIGINT (exit 130). Resuming with different config
fields (other than config.RUNTIME_FIELDS) is refused, naming every one. Bad input raises UsageError:
train.py prints it as one line and exits with code 2.

The test-only faults that kill a run at chosen points are in smog_train/faults.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.distributed as dist

import smog
from smog_train.config import UsageError

FORMAT = "smog-train-v3"  # v3: no per-rank state (no RNG states), resumable on another world size
PREV = "checkpoint.prev.pth"  # the previous checkpoint, kept beside checkpoint.pth (rotation)
CORRUPT = "checkpoint.corrupt.pth"  # a checkpoint.pth that failed verification, set aside on resume
# Every file save_atomic writes ends with this trailer: DIGEST_MAGIC, the SHA-256 (hex) of all the
# bytes before the trailer, a newline. torch.load ignores bytes after the zip archive.
DIGEST_MAGIC = b"SMOG-SHA256:"
TRAILER_LEN = len(DIGEST_MAGIC) + 64 + 1
INTEGRITY = (
    "sha256-trailer"  # train.py checkpoints say so: a missing trailer is then a corruption too
)


class StorageError(OSError):
    """Writing into out_dir failed for lack of space, quota, file-size limit or write permission. The
    message is one line naming the path and the cause; train.py exits 4 with it."""

    def __str__(self):  # the message alone, without OSError's "[Errno N]" prefix
        return self.strerror


class DigestError(ValueError):
    """A checkpoint whose bytes do not match the SHA-256 digest written with it (or that lost it)."""


STORAGE_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large (the file-size limit, ulimit -f)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def storage_error(path: str, e: OSError, fix: str = "") -> OSError:
    """-> StorageError for the errors of a full / read-only / quota-limited disk (one line naming
    path, cause and errno name, then `fix`), else `e` itself."""
    if not isinstance(e, OSError) or e.errno not in STORAGE_CAUSES or isinstance(e, StorageError):
        return e
    return StorageError(
        e.errno,
        f"cannot write {path!r}: {STORAGE_CAUSES[e.errno]} "
        f"[{errno.errorcode[e.errno]}]" + (f"; {fix}" if fix else ""),
    )


def check_writable(out_dir: str) -> None:
    """out_dir must be a writable folder, or one that can be created; checked before any work.
    Nothing is left behind: a probe folder made in the nearest existing parent is removed."""
    d = os.path.abspath(out_dir)
    if os.path.exists(d) and not os.path.isdir(d):
        raise UsageError(f"--out-dir {out_dir!r} is a file, not a folder; choose another --out-dir")
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise UsageError(
            f"cannot create --out-dir {out_dir!r}: {d!r} is a file, not a folder; "
            f"choose another --out-dir"
        )
    if d == os.path.abspath(out_dir):  # it exists: ask, without touching it
        if not os.access(d, os.W_OK | os.X_OK):
            ck = os.path.join(d, "checkpoint.pth")
            keep = (
                f"; to continue its run elsewhere pass --resume {ck} --out-dir NEW"
                if os.path.exists(ck)
                else ""
            )
            raise UsageError(
                f"cannot write to --out-dir {out_dir!r} (not writable); make it "
                f"writable and rerun, or choose another --out-dir{keep}"
            )
        return
    try:  # it would be created here: try it (/proc says no only then)
        os.rmdir(tempfile.mkdtemp(prefix=".smog-probe-", dir=d))
    except OSError as e:
        raise UsageError(
            f"cannot write to --out-dir {out_dir!r} ({d!r}: {e.strerror}); choose another --out-dir"
        ) from None


# ----------------------------------------------------------------------------------------------
# one file, all state, written atomically, loaded with weights_only=True


class _HashingWriter:
    """What torch.save writes to: passes the bytes on to `f`, hashes them (SHA-256), and keeps the
    first OSError of a write (torch's C++ writer turns it into an unreadable multi-line error)."""

    def __init__(self, f):
        self.f, self.sha, self.error = f, hashlib.sha256(), None

    def write(self, b) -> int:
        try:
            n = self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise
        self.sha.update(b)
        return n

    def flush(self) -> None:
        self.f.flush()


def save_atomic(obj, path: str, keep_previous: str = "") -> None:
    """torch.save to `.NAME.tmp-<pid>` with the digest trailer, fsync, then rename: at every instant
    `path` is complete or absent. keep_previous: the file `path` held so far is kept under this name
    (hard link, then renamed over the old one: `path` never goes missing). A full disk, a read-only
    folder, a quota or a file-size limit raise StorageError (one line); the temporary file is
    removed and `path` (and the kept previous one) are left as they were."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    prev_tmp = f"{keep_previous}.tmp-{os.getpid()}" if keep_previous else ""
    try:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            try:
                torch.save(obj, w)
            except Exception:
                if w.error is not None:
                    raise w.error from None
                raise
            f.write(DIGEST_MAGIC + w.sha.hexdigest().encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and os.path.exists(path):
            try:
                os.link(path, prev_tmp)
                os.replace(prev_tmp, keep_previous)
            except OSError as e:
                if e.errno in STORAGE_CAUSES and e.errno not in (errno.EPERM,):
                    raise
                os.replace(path, keep_previous)  # no hard links here: `path` is absent a moment
        os.replace(tmp, path)
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise storage_error(path, e) from None
    finally:
        for t in (tmp, prev_tmp):
            if t and os.path.exists(t):
                os.remove(t)


def write_text_atomic(text: str, path: str) -> None:
    """A small text file (config.json) complete or absent, never empty: temporary file, rename;
    StorageError as save_atomic."""
    tmp = os.path.join(
        os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}"
    )
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise storage_error(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def verify_digest(path: str) -> bool:
    """-> True: the file ends with a digest trailer that matches its bytes; False: it has no trailer.
    DigestError: it has one that does not match (the bytes changed after they were written)."""
    size = os.path.getsize(path)
    if size < TRAILER_LEN:
        return False
    with open(path, "rb") as f:
        f.seek(size - TRAILER_LEN)
        t = f.read(TRAILER_LEN)
        if not (t.startswith(DIGEST_MAGIC) and t.endswith(b"\n")):
            return False
        f.seek(0)
        sha, left = hashlib.sha256(), size - TRAILER_LEN
        while left > 0:
            b = f.read(min(left, 1 << 22))
            if not b:
                break
            sha.update(b)
            left -= len(b)
    if sha.hexdigest().encode() != t[len(DIGEST_MAGIC) : -1]:
        raise DigestError(
            f"checkpoint {path!r} fails verification: its SHA-256 does not match the "
            f"digest written with it (the file changed after it was written: disk, copy "
            f"or memory corruption)"
        )
    return True


def nonfinite_tensors(sd: dict) -> list:
    """Names of the floating-point tensors of a state_dict holding a NaN or an infinity."""
    return [
        k
        for k, v in sd.items()
        if isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and not bool(torch.isfinite(v).all())
    ]


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """The digest trailer verified (DigestError if it does not match, or if a train.py checkpoint lost
    it), then torch.load(weights_only=True); a file that is not a torch checkpoint, or carries
    arbitrary pickled objects, raises ValueError with a one-line reason (nothing from the file is
    executed, nothing of a file that fails verification is even unpickled)."""
    if os.path.isdir(path):
        raise ValueError(
            f"checkpoint {path!r} is a folder; pass the path of a .pth file in it (e.g. "
            f"{os.path.join(path, 'checkpoint.pth')!r})"
        )
    if not os.path.isfile(path):
        raise ValueError(
            f"checkpoint {path!r} does not exist; pass the path of a .pth file written by train.py "
            f"or by `python -m smog_train.export`"
        )
    digested = verify_digest(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError for truncated/non-zip files, ...
        raise ValueError(
            f"cannot load {path!r} as a weights-only checkpoint ({_first_sentence(e)}); "
            f"it is not a checkpoint of this project, is truncated, or holds objects that "
            f"are refused for safety"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a checkpoint dict")
    if not digested and obj.get("integrity") == INTEGRITY:
        raise DigestError(
            f"checkpoint {path!r} fails verification: its digest trailer is missing or "
            f"damaged (the file is truncated, or its end changed after it was written)"
        )
    return obj


def _first_sentence(e: Exception) -> str:
    """torch's reason, complete and on one line: the weights-only unpickler's own reason, or the
    first sentence of the message (cut at a word beyond ~160 characters)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if text.startswith("Weights only load failed."):
        for key in ("WeightsUnpickler error: ", "from a trusted source. "):
            if key in text:
                text = text.split(key, 1)[1].split(" Check the documentation")[0]
                break
        return "weights-only load: " + _cut(text)
    return _cut(text.split(" This is an internal miniz error")[0])


def _cut(text: str) -> str:
    if ". " in text:
        text = text[: text.index(". ") + 1]
    if len(text) > 160:
        text = text[:160].rsplit(" ", 1)[0] + " ..."
    return text.rstrip(".")


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
        raise UsageError(
            f"cannot resume {path!r}: it was written by an older train.py (format {ck['format']!r}, "
            f"this one writes {FORMAT!r}: another recipe or state layout); use a new "
            f"--out-dir"
        )
    if ck.get("format") != FORMAT:
        raise UsageError(
            f"{path!r} is not a train.py checkpoint (format {ck.get('format')!r}, expected {FORMAT!r})"
        )
    old = ck.get("config", {})
    names = [f.name for f in fields(cfg) if f.name not in runtime_fields]
    missing = [n for n in names if n not in old]
    if (
        missing
    ):  # fields added since: the old run made them as they were then, not necessarily as now
        raise UsageError(
            f"cannot resume {path!r}: its config has no field {', '.join(map(repr, missing))} "
            f"(written by an older train.py); use a new --out-dir"
        )
    changed = [n for n in names if old[n] != getattr(cfg, n)]
    if changed:
        diffs = ", ".join(
            f"{n!r} is {old[n]!r} in the checkpoint but {getattr(cfg, n)!r} now" for n in changed
        )
        own = os.path.join(os.path.dirname(path) or ".", "config.json")
        own = f" (or --config {own}, the run's own config)" if os.path.isfile(own) else ""
        raise UsageError(
            f"cannot resume {path!r}: config field{'s' if len(changed) > 1 else ''} {diffs}; "
            f"pass {' '.join(_flag(n, old[n]) for n in changed)}{own} or use a new --out-dir"
        )


def _flag(name: str, value) -> str:
    """The command-line option that sets config field `name` to `value`."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def prepare_out_dir(
    out_dir: str, config_json: str, resumed: bool, same_dir: bool, log_offset: int
) -> None:
    """Rank 0, once everything is validated: remove the temporary files of killed checkpoint writes and a
    previous run's results, write config.json (atomically: never empty), truncate log.jsonl to the
    checkpoint (or empty it). StorageError (one line) if the disk refuses."""
    fix = "free space (or make it writable) and rerun the same command"
    try:
        os.makedirs(out_dir, exist_ok=True)
        for f in os.listdir(out_dir):
            if f.startswith((".checkpoint.pth.tmp-", f"{PREV}.tmp-", ".config.json.tmp-")):
                os.remove(os.path.join(out_dir, f))
        write_text_atomic(config_json, os.path.join(out_dir, "config.json"))
        if not resumed and os.path.exists(os.path.join(out_dir, "demo_results.json")):
            os.remove(
                os.path.join(out_dir, "demo_results.json")
            )  # a previous run's, not this one's
        log_path = os.path.join(out_dir, "log.jsonl")
        if os.path.exists(log_path):
            if resumed and same_dir and os.path.getsize(log_path) >= log_offset:
                os.truncate(log_path, log_offset)  # drop lines written after the checkpoint
            elif not resumed:
                os.truncate(log_path, 0)
    except StorageError as e:
        raise StorageError(e.errno, f"{e}; {fix}") from None
    except OSError as e:
        raise storage_error(getattr(e, "filename", None) or out_dir, e, fix) from None


class Interrupted(Exception):
    """SIGINT / SIGTERM before the training loop (setup, memory-bank fill) or after it (final
    evaluation): nothing to checkpoint there; train.py prints one line and exits 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class on_signals:
    """SIGTERM and SIGINT (Ctrl-C) for the whole run. In the training loop (`.loop = True`) they only
    set `.term` / `.int`; the loop acts at the next step boundary, on every rank together (the step's
    all-reduce): checkpoint, then exit 0 (SIGTERM) or 130 (SIGINT). A second Ctrl-C exits at once
    (130, no checkpoint; the lock is released). Outside the loop a signal raises Interrupted."""

    def __init__(self, lock=None):
        self.term = self.int = self.loop = False
        self.lock = lock

    def _handler(self, signum, frame):
        if not self.loop:
            raise Interrupted(signum)
        if signum == signal.SIGINT:
            if self.int:
                print(
                    "second Ctrl-C: exiting now, without a checkpoint", file=sys.stderr, flush=True
                )
                if self.lock is not None:
                    self.lock.release()
                sys.stdout.flush()
                os._exit(130)
            self.int = True
            print(
                "Ctrl-C: finishing this step, then writing a checkpoint (Ctrl-C again to exit "
                "now without one)",
                file=sys.stderr,
                flush=True,
            )
        else:
            self.term = True

    def __enter__(self):
        self.old = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
# the run's state, resume or start, save, log


@dataclass
class Run:
    """What the loop reads and a checkpoint holds: the built objects and the position in the run."""

    cfg: object  # config.Config
    rank: int
    world: int
    device: torch.device
    model: smog.SMoG
    net: torch.nn.Module  # train.StepModule, DDP-wrapped when world > 1
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    bank: object  # memory_bank.MemoryBank
    sched: dict  # per-step lr, beta, m (train.schedules)
    spe: int  # optimiser steps per epoch
    autocast: object
    cfg_dict: dict  # config.json and the checkpoint's "config"
    step: int = 0  # optimiser steps done, over all epochs
    epoch: int = 0
    step_in_epoch: int = 0
    knn: list = field(default_factory=list)  # [[epoch, kNN top-1 %], ...]
    skipped_nonfinite: int = 0
    n_save: int = 0  # checkpoint writes by this process
    log_offset: int = 0  # length of log.jsonl at the resumed checkpoint
    last_ck: Optional[str] = None  # "PATH (step S)": the newest complete checkpoint to restart from
    peak_hit: object = 0.0  # collapse guard: best fraction of attainable groups hit this epoch
    knn_feats: Optional[list] = (
        None  # the last kNN monitor's (train, test) features, reused by the final eval
    )
    resumed_world: Optional[int] = None  # world size that wrote the resumed checkpoint
    hooks: object = None  # faults.Hooks: test-only fault points, no-ops in a real run
    lock: object = None  # runlock.RunLock of out_dir (rank 0)
    set_aside: Optional[str] = None  # a checkpoint.pth that failed verification, renamed on start

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.spe

    def path(self, name: str) -> str:
        return os.path.join(self.cfg.out_dir, name)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()


def _usable(path: str) -> tuple:
    """-> (checkpoint dict, None) if `path` loads, verifies and holds finite weights, else (None, the
    one-line reason)."""
    try:
        ck = load_checkpoint(path)
    except ValueError as e:
        return None, str(e)
    bad = nonfinite_tensors(ck.get("model") or {})
    if bad:
        return None, (
            f"checkpoint {path!r} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]!r})"
        )
    return ck, None


def _step_of(path: str) -> str:
    ck, why = _usable(path)
    return f"step {ck.get('step')}" if ck is not None else ""


def choose_checkpoint(run: Run) -> tuple:
    """The checkpoint to resume -> (path or "", checkpoint dict or None). --resume PATH must verify
    (else UsageError naming the two choices: the previous checkpoint beside it, or a new --out-dir).
    Automatic: out_dir/checkpoint.pth, or -- if it fails verification, does not load, or holds
    non-finite weights -- the previous one, checkpoint.prev.pth (a line says so; the bad file is set
    aside as checkpoint.corrupt.pth when the run starts writing); refused if neither is usable."""
    cfg = run.cfg
    ck_path, prev = run.path("checkpoint.pth"), run.path(PREV)
    if cfg.resume:
        if not os.path.isfile(cfg.resume):
            load(cfg.resume)  # the one-line "does not exist" etc.
        ck, why = _usable(cfg.resume)
        if ck is None:
            alt = os.path.join(os.path.dirname(os.path.abspath(cfg.resume)), PREV)
            step = _step_of(alt) if os.path.abspath(alt) != os.path.abspath(cfg.resume) else ""
            other = f"pass --resume {alt} (the previous checkpoint, {step}) or " if step else ""
            raise UsageError(f"{why}; {other}start over in a new --out-dir")
        same = os.path.dirname(os.path.abspath(cfg.resume)) == os.path.dirname(
            os.path.abspath(ck_path)
        )
        if (
            same
            and os.path.abspath(cfg.resume) != os.path.abspath(ck_path)
            and os.path.exists(ck_path)
            and _usable(ck_path)[0] is None
        ):
            run.set_aside = ck_path  # a bad checkpoint.pth is not rotated into the kept one
        return cfg.resume, ck
    if not os.path.exists(ck_path) and not os.path.exists(prev):
        return "", None
    why = f"{ck_path!r} is missing"
    if os.path.exists(ck_path):
        ck, why = _usable(ck_path)
        if ck is not None:
            return ck_path, ck
    if os.path.exists(prev):
        ck, why_prev = _usable(prev)
        if ck is not None:
            if run.rank == 0:
                print(
                    f"warning: {why}; resuming from the previous checkpoint {prev} (step "
                    f"{ck['step']}) instead"
                    + (
                        f"; the bad file is kept as {run.path(CORRUPT)}"
                        if os.path.exists(ck_path)
                        else ""
                    ),
                    file=sys.stderr,
                    flush=True,
                )
            run.set_aside = ck_path if os.path.exists(ck_path) else None
            return prev, ck
        why = f"{why}, and the previous checkpoint too ({why_prev})"
    raise UsageError(
        f"{why}; no usable checkpoint to resume: restore {ck_path} from a backup, or "
        f"start over in a new --out-dir"
    )


def check_out_dir_for_resume(run: Run) -> None:
    """--resume X into an out_dir that holds another run (its own checkpoint.pth) is refused: its
    checkpoints would be overwritten."""
    cfg = run.cfg
    if not cfg.resume:
        return
    mine = {os.path.abspath(run.path(n)) for n in ("checkpoint.pth", PREV)}
    held = [n for n in ("checkpoint.pth", PREV) if os.path.exists(run.path(n))]
    if held and os.path.abspath(cfg.resume) not in mine:
        raise UsageError(
            f"--out-dir {cfg.out_dir!r} holds another run ({held[0]}); resuming "
            f"{cfg.resume!r} there would overwrite it: pass an empty --out-dir with "
            f"--resume, or drop --resume to continue the run in {cfg.out_dir!r}"
        )


def checkpoint_bytes(run: Run) -> int:
    """A lower bound of a checkpoint's size: the model's tensors, the optimiser's state (one buffer per
    parameter for SGD/LARS, two for AdamW) and the memory bank (fp32)."""
    model = sum(t.numel() * t.element_size() for t in run.model.state_dict().values())
    params = sum(
        p.numel() * p.element_size() for g in run.optimizer.param_groups for p in g["params"]
    )
    per = 2 if isinstance(run.optimizer, torch.optim.AdamW) else 1
    return model + per * params + 4 * run.bank.n * run.bank.local.shape[-1] * 2


def check_space(run: Run) -> None:
    """Rank 0, before the memory-bank fill (or the first resumed step): room in out_dir for at least one
    checkpoint -- free disk space and the file-size limit (ulimit -f). StorageError (one line)."""
    import resource
    import shutil

    need, d = checkpoint_bytes(run), os.path.abspath(run.cfg.out_dir)
    while not os.path.exists(d):
        d = os.path.dirname(d)
    mb = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    free = shutil.disk_usage(d).free
    if free < need:
        raise StorageError(
            errno.ENOSPC,
            f"cannot write checkpoints to --out-dir {run.cfg.out_dir!r}: "
            f"{mb(free)} free, a checkpoint of this run needs about "
            f"{mb(need)} [ENOSPC]; free space or choose another --out-dir",
        )
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < need:
        raise StorageError(
            errno.EFBIG,
            f"cannot write checkpoints to --out-dir {run.cfg.out_dir!r}: "
            f"the file-size limit (ulimit -f) is {mb(limit)}, a checkpoint "
            f"of this run needs about {mb(need)} [EFBIG]; raise the limit",
        )


def resume_or_start(run: Run, train_raw, runtime_fields: set, start) -> bool:
    """Restore everything from the checkpoint (automatic from out_dir, or --resume; choose_checkpoint),
    or call start() (fill the memory bank) for a new run; all is validated, and the space for a
    checkpoint checked, before the run writes anything, then out_dir is prepared. A checkpoint written
    with another world size is re-sharded (the bank), and a record of the change is appended to
    log.jsonl. -> resumed?"""
    cfg, ck_path = run.cfg, run.path("checkpoint.pth")
    check_out_dir_for_resume(run)
    run.set_aside = None
    resume, ck = choose_checkpoint(run)
    same_dir = False
    if resume:
        check_resume(ck, cfg, runtime_fields, resume)
        check_writable(cfg.out_dir)
        if run.rank == 0:
            check_space(run)
        run.model.load_state_dict(ck["model"])
        run.optimizer.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            run.scaler.load_state_dict(ck["scaler"])
        run.bank.load(ck["bank"].to(run.device))  # re-sharded for this world size
        for k in ("step", "epoch", "step_in_epoch", "knn", "skipped_nonfinite", "log_offset"):
            setattr(run, k, ck[k])
        run.peak_hit = ck.get(
            "peak_hit", 0.0
        )  # collapse guard: best group hit so far in the resumed epoch
        run.resumed_world, run.last_ck = ck["world_size"], f"{resume} (step {ck['step']})"
        same_dir = os.path.dirname(os.path.abspath(resume)) == os.path.dirname(
            os.path.abspath(ck_path)
        )
        del ck
    else:
        check_writable(cfg.out_dir)
        if run.rank == 0:
            check_space(run)
        t0 = time.time()
        if run.rank == 0:
            print(f"filling the memory bank: {run.bank.n} images ...", flush=True)
        run.hooks.filling()  # does nothing outside fault tests
        start()
        if run.rank == 0:
            print(f"memory bank filled in {time.time() - t0:.1f}s", flush=True)
    # from here on the run writes
    if run.rank == 0:
        if run.lock is not None:
            run.lock.wrote = True
        prepare_out_dir(
            cfg.out_dir, json.dumps(run.cfg_dict, indent=1), bool(resume), same_dir, run.log_offset
        )
        if run.set_aside:
            os.replace(run.set_aside, run.path(CORRUPT))
    if resume and run.resumed_world != run.world:
        log(
            run,
            {
                "type": "world_size_changed",
                "step": run.step,
                "from": run.resumed_world,
                "to": run.world,
            },
        )
    if cfg.bad_images == "skip" and hasattr(train_raw, "skip_log"):
        train_raw.skip_log = run.path("skipped_images.txt")
        if getattr(
            train_raw, "_reported", None
        ):  # met while filling the bank, before out_dir could be written
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(train_raw.skip_log, "a") as fh:
                fh.writelines(p + "\n" for p in sorted(train_raw._reported))
    return bool(resume)


SAVE_FIX = "free space (or make the folder writable) and rerun the same command: it resumes from {}"


def save(run: Run, why: str) -> None:
    """Checkpoint the current position (the module docstring lists what it holds). Collective: the bank
    is gathered; rank 0 writes atomically, with the digest trailer, keeping the previous checkpoint as
    checkpoint.prev.pth. A full disk: StorageError naming the file and the checkpoint to resume from."""
    bank_full = run.bank.full()
    run.n_save += 1
    ck_path, log_path = run.path("checkpoint.pth"), run.path("log.jsonl")
    if run.rank == 0:
        obj = {
            "format": FORMAT,
            "integrity": INTEGRITY,
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
            "bank": bank_full,
            "config": run.cfg_dict,
            "world_size": run.world,
            "step": run.step,
            "epoch": run.epoch,
            "step_in_epoch": run.step_in_epoch,
            "steps_per_epoch": run.spe,
            "total_steps": run.total_steps,
            "knn": run.knn,
            "skipped_nonfinite": run.skipped_nonfinite,
            "peak_hit": float(run.peak_hit),
            "log_offset": os.path.getsize(log_path) if os.path.exists(log_path) else 0,
        }
        run.hooks.checkpoint_write(run.n_save, obj, ck_path)  # does nothing outside fault tests
        try:
            save_atomic(obj, ck_path, keep_previous=run.path(PREV))
        except StorageError as e:
            last = run.last_ck or "the start (no checkpoint was written yet)"
            raise StorageError(e.errno, f"{e}; {SAVE_FIX.format(last)}") from None
        print(f"saved {ck_path} (step {run.step}, {why})", flush=True)
    if smog.dist_ready():
        dist.barrier()
    run.last_ck = f"{ck_path} (step {run.step})"


def log(run: Run, rec: dict) -> None:
    if run.rank == 0:
        path = run.path("log.jsonl")
        try:
            with open(path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        except OSError as e:
            last = run.last_ck or "the start (no checkpoint was written yet)"
            raise storage_error(path, e, SAVE_FIX.format(last)) from None
