"""Test-only fault injection for the kill / resume / non-finite tests of train.py.

A run holds a `Hooks` object and calls it at a few named points; the plain `Hooks` does nothing.
`from_env()` returns `FaultHooks` only when one of the SMOG_TEST_* variables below is set (the tests
set them for a subprocess; never set them in real runs). Each point acts when its variable equals
the value it is called with:
  point             variable                    action
  step_start        SMOG_TEST_SIGTERM_AT_STEP=N send SIGTERM to self at the start of global step N
                                                (the real signal handler acts on it)
  step_start        SMOG_TEST_SIGINT_AT_STEP=N  the same with SIGINT (what Ctrl-C sends); with
                    SMOG_TEST_SIGINT_TWICE=1    two SIGINTs at once (a second Ctrl-C)
  step_start        SMOG_TEST_STOP_AT_STEP=N    SIGSTOP self at the start of global step N (a hung
                                                rank: the others wait in the step's all-reduce)
  filling           SMOG_TEST_SIGTERM_IN_FILL=1 send SIGTERM to self when the memory-bank fill starts
  loss              SMOG_TEST_NAN_AT_STEP=N     the loss of global step N becomes NaN (every rank)
  after_backward    SMOG_TEST_DIE_AT_STEP=N     SIGKILL self in global step N (0-based) after its
                                                backward, before the optimiser step
  regrouped         SMOG_TEST_DIE_IN_REGROUP=E  SIGKILL self in the regroup at the start of epoch E,
                                                after the k-means of every head, before the momentum reset
  checkpoint_write  SMOG_TEST_DIE_IN_SAVE=K     SIGKILL self during this process's K-th checkpoint write
                                                (1-based), after writing half of the serialised bytes to
                                                the temporary file save_atomic would use
                                                (.checkpoint.pth.tmp-<pid>)
  batch             SMOG_TEST_RECORD_BATCHES=D  records, does not act: rank r appends one JSON
                                                line per step to D/batches-rank<r>.jsonl: the
                                                step, and per micro-batch the dataset indices and
                                                a SHA-1 of each item's crops as they reach the
                                                model
  SMOG_TEST_DIE_RANK=R     every point acts on rank R only (default: every rank).
  SMOG_TEST_DIE_ONCE=PATH  a point acts only if PATH does not exist, and creates it first (so a torchrun
                           --max-restarts restart, which inherits the environment, runs through).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

import smog

VARIABLES = {
    "step_start": "SMOG_TEST_SIGTERM_AT_STEP",
    "loss": "SMOG_TEST_NAN_AT_STEP",
    "after_backward": "SMOG_TEST_DIE_AT_STEP",
    "regrouped": "SMOG_TEST_DIE_IN_REGROUP",
    "checkpoint_write": "SMOG_TEST_DIE_IN_SAVE",
    "batch": "SMOG_TEST_RECORD_BATCHES",
    "sigint": "SMOG_TEST_SIGINT_AT_STEP",
    "stop": "SMOG_TEST_STOP_AT_STEP",
    "filling": "SMOG_TEST_SIGTERM_IN_FILL",
}


class Hooks:
    """The fault points of a run; a real run's hooks do nothing."""

    def step_start(self, step: int) -> None:
        pass

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def after_backward(self, step: int) -> None:
        pass

    def regrouped(self, epoch: int) -> None:
        pass

    def filling(self) -> None:
        pass

    def checkpoint_write(self, n_save: int, obj: dict, path: str) -> None:
        pass

    def batch(self, step: int, rank: int, micro_batches: list, idx: list) -> None:
        pass


class FaultHooks(Hooks):
    """Acts as the SMOG_TEST_* variables (module docstring) ask."""

    def _due(self, point: str, value: int) -> bool:
        v = os.environ.get(VARIABLES[point])
        if v is None or int(v) != value:
            return False
        r = os.environ.get("SMOG_TEST_DIE_RANK")
        if r is not None and smog.dist_ready() and int(r) != dist.get_rank():
            return False
        once = os.environ.get("SMOG_TEST_DIE_ONCE")
        if once:
            if os.path.exists(once):
                return False
            open(once, "w").close()
        return True

    def step_start(self, step: int) -> None:
        if self._due("step_start", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if self._due("sigint", step):
            for _ in range(2 if os.environ.get("SMOG_TEST_SIGINT_TWICE") else 1):
                os.kill(os.getpid(), signal.SIGINT)
        if self._due("stop", step):
            print(f"[test] SIGSTOP self at step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)

    def filling(self) -> None:
        if self._due("filling", 1):
            os.kill(os.getpid(), signal.SIGTERM)

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self._due("loss", step) else loss

    def after_backward(self, step: int) -> None:
        if self._due("after_backward", step):
            _die(f"at step {step}")

    def regrouped(self, epoch: int) -> None:
        if self._due("regrouped", epoch):
            _die(f"in regroup of epoch {epoch}")

    def checkpoint_write(self, n_save: int, obj: dict, path: str) -> None:
        if not self._due("checkpoint_write", n_save):
            return
        buf = io.BytesIO()
        torch.save(obj, buf)
        d, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        with open(os.path.join(d, f".{name}.tmp-{os.getpid()}"), "wb") as f:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
        _die(f"in checkpoint write {n_save}")

    def batch(self, step: int, rank: int, micro_batches: list, idx: list) -> None:
        d = os.environ.get(VARIABLES["batch"])
        if not d:
            return
        rec = {"step": step, "micro": []}
        for (online, momentum), i in zip(micro_batches, idx):
            crops = [c.detach().cpu().contiguous() for c in [*online, *momentum]]
            rec["micro"].append(
                {
                    "idx": i.tolist(),
                    "crops": [
                        hashlib.sha1(b"".join(c[b].numpy().tobytes() for c in crops)).hexdigest()
                        for b in range(len(i))
                    ],
                }
            )
        with open(os.path.join(d, f"batches-rank{rank}.jsonl"), "a") as fh:
            fh.write(json.dumps(rec) + "\n")


def _die(what: str) -> None:
    print(f"[test] SIGKILL self: {what}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def from_env() -> Hooks:
    return FaultHooks() if any(v in os.environ for v in VARIABLES.values()) else Hooks()
