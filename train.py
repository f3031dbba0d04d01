"""SMoG pretraining (algorithm.md), from a 2-core laptop to many GPUs and nodes with the same file.

    python train.py                                         # main job: the built-in demo, ~2.5 min on 2 CPU cores
    python train.py --preset cifar10-r18 --download         # one GPU (or CPU)
    torchrun --nproc_per_node=8 train.py --preset imagenet-r50 --data imagefolder:/data/imagenet
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py --preset ...
    python train.py -h                                      # every option, the presets

`RANK` unset -> one plain process, no process group; under torchrun NCCL on GPUs, gloo on CPU.
--batch-size is the *global* batch: per rank and micro-batch it is batch / (world * accum).

Design notes (what is exact and why)
- Views: every item is made from (dataset index, online set, item seed); the seed is a function of
  (--seed, epoch, index), so crops do not depend on workers, ranks or where a run resumed. Roles of
  the augmentation sets swap every optimiser step (even step: online = A).
- Memory bank: [2, N, D] normalised online projector embeddings of the two online global crops,
  sharded by dataset index (rank r holds i = r, r+W, ...): each step the batch's (index, z) are
  all-gathered and every rank writes its own rows, so k-means over the shards (smog.spherical_kmeans,
  sums/counts all-reduced) equals k-means over the whole bank. Filled before epoch 0 by one no-grad
  pass of the online network (train-mode BN, running statistics restored afterwards), eval transform.
- Gradient accumulation (--accum A > 1): the group update must see the whole accumulated batch before
  any micro-batch's loss, and the update uses detached embeddings only. We run two passes: pass 1 (no
  grad) computes momentum targets and the online global-crop embeddings of every micro-batch; the
  groups are updated once on their concatenation (smog.update_groups, all-reduced); pass 2 recomputes
  each micro-batch with gradient and its loss against the updated groups. Pass 2 sees exactly pass 1's
  embeddings: same crops, same BN batches (all crops through backbone and projector as in
  SMoG.forward; running statistics of pass 1 are restored), same drop-path masks (the RNG state before
  each micro-batch is replayed). Exact: with one micro-batch this is the plain SMoG step (tested), and
  with several the groups and targets are those of one update over all the micro-batches' embeddings
  (BN statistics stay per micro-batch, as in the released code). Cost: one extra no-grad online
  forward. --group-grad needs the update in the graph and is refused with --accum > 1.
- Checkpoint (out_dir/checkpoint.pth, smog.save_atomic, loaded with smog.load_checkpoint, i.e.
  weights_only=True): both networks and the groups (SMoG.state_dict()), the whole memory bank in
  dataset order (fp32), optimiser, GradScaler, step/epoch/position in the epoch (the sampler is
  rebuilt from (seed, epoch) and fast-forwarded), every rank's RNG states (torch, CUDA, python,
  numpy), config as plain types, world size, kNN history, collapse-guard state and the length of
  log.jsonl (truncated back to it on resume, so logs of resumed runs equal uninterrupted ones).
  Saved at the end of every epoch, every --save-every steps and on SIGTERM (then exit 0). Schedules
  (lr, beta, m) are arrays indexed by the global step. Resuming (automatic from out_dir, or --resume)
  with a different config field or world size is refused, naming the field.
- A non-finite loss (checked every step after an all-reduce: a host sync point) stops the run with
  exit code 3, naming the step and the last good checkpoint, which is left untouched; --skip-nonfinite N
  instead skips up to N such steps (groups, BN statistics and the momentum network restored, gradients
  discarded: a skipped step leaves no trace in the state).
- Bad input (config values, missing data, unreadable images, bad resume) exits with one line on
  stderr and code 2, before anything is written.

Test-only environment variables (for the kill/resume tests; never set them in real runs)
  SMOG_TEST_DIE_AT_STEP=N      SIGKILL self in global step N (0-based), after its backward, before the
                               optimiser step (mid-iteration; nothing of step N is saved).
  SMOG_TEST_DIE_IN_REGROUP=E   SIGKILL self in the regroup at the start of epoch E, after the first head.
  SMOG_TEST_DIE_IN_SAVE=K      SIGKILL self during this process's K-th checkpoint write (1-based), after
                               writing half of the serialised bytes to the temporary file that
                               smog.save_atomic would use (.checkpoint.pth.tmp-<pid>).
  SMOG_TEST_DIE_RANK=R         the die hooks above fire on rank R only (default: every rank).
  SMOG_TEST_DIE_ONCE=PATH      a die hook fires only if PATH does not exist and creates it first (so a
                               torchrun --max-restarts restart, which inherits the env, runs through).
  SMOG_TEST_SIGTERM_AT_STEP=N  send SIGTERM to self at the start of global step N (real signal handler).
  SMOG_TEST_NAN_AT_STEP=N      the loss of global step N is multiplied by NaN (every rank).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import smog

FORMAT = "smog-train-v2"  # v2: released recipe (joint BN, LARS on all parameters, momentum local crops)


class UsageError(Exception):
    """Bad input: printed as one line 'error: ...', exit code 2, nothing written."""


# ----------------------------------------------------------------------------------------------
# configuration: one block of defaults (the released ResNet-50 recipe), presets override, CLI overrides


def opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    preset: str = opt("demo", "named recipe applied on top of these defaults (see the list below)")
    config: str = opt("", "start from this config.json (a previous run's resolved config) instead of a preset")
    # data
    data: str = opt("demo", "demo | imagefolder:PATH (PATH/train/<class>/*, optional PATH/val) | cifar10 | cifar100 | stl10")
    data_root: str = opt("data", "where cifar10/cifar100/stl10 live or are downloaded to")
    download: bool = opt(False, "download cifar10/cifar100/stl10 into --data-root if missing")
    bad_images: str = opt("fail", "unreadable image in an image folder: fail (naming the file) or skip (logged once, counted)")
    out_dir: str = opt("", "checkpoint.pth, config.json, log.jsonl go here (default runs/<preset>)")
    resume: str = opt("", "checkpoint to resume from (default: out_dir/checkpoint.pth if it exists)")
    # model (smog.SMoGConfig)
    arch: str = opt("resnet50", "backbone: " + ", ".join(smog.ARCHS))
    width: int = opt(32, "smallcnn base width")
    cifar_stem: bool = opt(False, "ResNet 3x3 stride-1 stem without max-pool, for small images")
    dim: int = opt(128, "D, projector/predictor output and group-feature dimension (256 for Swin-T)")
    hidden_dim: int = opt(2048, "projector/predictor hidden width")
    n_groups: int = opt(3000, "K, group features per head")
    n_heads: int = opt(3, "H, heads of K groups each")
    tau: float = opt(0.1, "temperature of the group logits")
    group_grad: bool = opt(False, "let gradient flow through the (1-beta) mean term of the group update (authors' README)")
    drop_path: float = opt(0.0, "stochastic depth of the online Swin")
    # views (algorithm.md "Views")
    image_size: int = opt(0, "global crop size (0: the dataset's, 224 ImageNet, 96 STL, 32 CIFAR/demo)")
    local_size: int = opt(0, "local crop size (0: image_size * 96/224)")
    n_local: int = opt(4, "local crops per image for the online network")
    global_scale_min: float = opt(0.2, "RandomResizedCrop scale range of global crops: min")
    global_scale_max: float = opt(1.0, "... max")
    local_scale_min: float = opt(0.05, "RandomResizedCrop scale range of local crops: min")
    local_scale_max: float = opt(0.2, "... max")
    blur_scale: float = opt(1.0, "Gaussian blur radius range 0.1-2.0 times this (use image_size/224 for small images)")
    # optimisation
    epochs: int = opt(400, "training epochs")
    batch_size: int = opt(4096, "GLOBAL batch size (all ranks, all accumulation micro-batches)")
    accum: int = opt(1, "gradient accumulation micro-batches per step; the group update uses all of them")
    optimizer: str = opt("lars", "lars (SGD momentum + LARS trust ratio) | sgd | adamw")
    lr: float = opt(4.8, "peak learning rate at --lr-batch; the run uses lr * batch_size / lr_batch")
    lr_batch: int = opt(4096, "the batch size --lr refers to (linear scaling)")
    min_lr_ratio: float = opt(0.001, "cosine ends at this fraction of the peak lr")
    warmup_epochs: float = opt(10.0, "linear warmup epochs")
    warmup_lr_ratio: float = opt(0.002, "warmup starts at this fraction of the peak lr (0.01 / 4.8 in the R50 recipe)")
    weight_decay: float = opt(1e-6, "weight decay (never on biases, norm weights, Swin relative position bias)")
    momentum: float = opt(0.9, "SGD/LARS momentum")
    trust_coef: float = opt(0.001, "LARS trust coefficient")
    clip_grad: float = opt(0.0, "clip the global gradient norm to this (0: off; 3.0 for Swin-T)")
    # SMoG schedules
    beta_start: float = opt(1.0, "group momentum beta at the first step (linear per step)")
    beta_end: float = opt(0.99, "group momentum beta at the last step")
    ema: float = opt(0.999, "momentum-network EMA coefficient m")
    ema_schedule: str = opt("const", "const | cosine (m -> 1 over the run)")
    regroup_every: int = opt(1, "re-cluster the groups from the memory bank every this many epochs")
    kmeans_iters: int = opt(10, "spherical k-means iterations per regroup")
    reset_momentum: bool = opt(True, "reset the momentum network to the online one at every regroup")
    # system
    device: str = opt("auto", "auto (cuda if available) | cpu | cuda")
    precision: str = opt("auto", "auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (with a GradScaler)")
    channels_last: bool = opt(True, "channels_last memory format for CNNs on CUDA")
    compile: bool = opt(False, "torch.compile the backbones")
    workers: int = opt(-1, "data loader workers per rank (-1: cores per rank - 1, at most 10)")
    threads: int = opt(0, "torch intra-op threads per rank (0: cores per rank minus workers, at least 1)")
    seed: int = opt(0, "seed of the initial weights, sampler, augmentations and k-means")
    log_every: int = opt(50, "a log line every this many steps")
    save_every: int = opt(0, "also checkpoint every this many steps (0: end of epoch and SIGTERM only)")
    knn_every: int = opt(1, "kNN monitor on the held-out split every this many epochs (0: off)")
    knn_k: int = opt(20, "kNN neighbours")
    knn_t: float = opt(0.07, "kNN temperature")
    knn_max_train: int = opt(0, "kNN uses at most this many (evenly spaced) training images (0: all)")
    collapse_threshold: float = opt(0.1, "warn if the fraction of groups hit per step (relative to the "
                                          "attainable min(1, 2B/K)) stays below this for a whole epoch")
    skip_nonfinite: int = opt(0, "skip up to this many steps with a non-finite loss instead of stopping")
    # demo table (final evaluation)
    final_eval: bool = opt(False, "after training: linear probes of raw pixels / random-init / SMoG / supervised "
                                  "(same backbone, same steps), table + out_dir/demo_results.json")
    probe_epochs: int = opt(100, "final_eval: linear-probe epochs on cached features")
    probe_lr: float = opt(0.3, "final_eval: linear-probe learning rate")
    sup_lr: float = opt(0.1, "final_eval: supervised baseline SGD lr at batch 256 (scaled linearly, cosine)")

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def model_config(self) -> smog.SMoGConfig:
        return smog.SMoGConfig.from_dict(asdict(self))


# lr values are quoted at lr_batch and scaled linearly to --batch-size
_R50 = dict(data="imagefolder:data/imagenet", arch="resnet50", epochs=400, batch_size=4096, optimizer="lars", lr=4.8,
            lr_batch=4096, save_every=1000, knn_max_train=65536, log_every=50)
PRESETS = {
    # the built-in dataset on 2 CPU cores in a few minutes: small CNN, 32 px, few groups, short run.
    # Plain SGD (no LARS): at batch 256 and a few hundred steps the trust ratio only slows the start.
    # 2 data workers + 1 torch thread: the multi-crop augmentation costs more CPU than the step itself.
    "demo": dict(data="demo", arch="smallcnn", width=16, dim=64, hidden_dim=512, n_groups=30, n_heads=3,
                 image_size=32, local_size=16, n_local=2, global_scale_min=0.35, local_scale_min=0.1,
                 local_scale_max=0.35, blur_scale=0.15, epochs=8, batch_size=256, optimizer="sgd", lr=1.0,
                 lr_batch=256, warmup_epochs=1.0, warmup_lr_ratio=0.1, weight_decay=5e-4, beta_end=0.99,
                 ema=0.99, log_every=10, final_eval=True, probe_epochs=100, sup_lr=0.1, workers=2),
    # CIFAR-10, ResNet-18 with the small-image stem, local crops scaled for 32 px, K as in Lightly's run
    "cifar10-r18": dict(data="cifar10", arch="resnet18", cifar_stem=True, n_groups=300, image_size=32, local_size=16,
                        local_scale_min=0.1, local_scale_max=0.35, blur_scale=0.15, epochs=200, batch_size=512,
                        optimizer="lars", lr=4.8, lr_batch=4096, weight_decay=1e-6, ema=0.99, log_every=20),
    "imagenet-r50": dict(_R50),
    "imagenet-r50w2": dict(_R50, arch="resnet50w2"),    # the released 2x ResNet-50 (4096-d)
    "imagenet-swin-t": dict(_R50, arch="swin_t", dim=256, optimizer="adamw", lr=1e-3, min_lr_ratio=0.04,
                            warmup_lr_ratio=0.04, weight_decay=0.05, clip_grad=3.0, drop_path=0.2),
}

# fields that may change between a checkpoint and the resumed run (they do not change the result)
RUNTIME_FIELDS = {"config", "out_dir", "resume", "data_root", "download", "bad_images", "device", "workers", "threads",
                  "compile", "log_every", "save_every", "knn_every", "knn_max_train", "collapse_threshold",
                  "skip_nonfinite", "final_eval", "probe_epochs", "probe_lr", "sup_lr"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, not argparse's usage block
        raise UsageError(f"{message} (see python train.py -h)")


def build_parser() -> argparse.ArgumentParser:
    lines = ["presets (values that differ from the defaults above):"]
    for name, over in PRESETS.items():
        lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in over.items()))
    ap = _Parser(prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                 description="SMoG pretraining. Precedence: defaults < --preset (or --config) < options given. "
                             "Run under torchrun for data parallelism.",
                 epilog="\n".join(lines), argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        hlp = f"{f.metadata['help']} (default: {f.default})"
        if f.type in ("bool", bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, help=hlp)
        else:
            ap.add_argument(flag, type={"int": int, "float": float, "str": str}[str(f.type)], help=hlp,
                            metavar=f.name.upper())
    return ap


def parse_config(argv: Optional[Sequence[str]] = None) -> Config:
    given = vars(build_parser().parse_args(argv))
    if given.get("config"):
        try:
            with open(given["config"]) as fh:
                base = Config.from_dict(json.load(fh))
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read --config {given['config']!r}: {str(e).splitlines()[0]}") from None
    else:
        preset = given.get("preset", Config.preset)
        if preset not in PRESETS:
            raise UsageError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        base = dataclasses.replace(Config(), preset=preset, **PRESETS[preset])
    cfg = dataclasses.replace(base, **given)
    # resolve the automatic values, so config.json holds what ran
    if not cfg.out_dir:
        cfg.out_dir = os.path.join("runs", cfg.preset)
    if cfg.image_size == 0:
        cfg.image_size = data.dataset_image_size(cfg.data)
    if cfg.local_size == 0:
        cfg.local_size = max(8, round(cfg.image_size * 96 / 224))
    return cfg


def check_values(cfg: Config) -> None:
    """Config values that are wrong whatever the data (one message per problem, raised as UsageError)."""
    checks = [
        (cfg.arch in smog.ARCHS, f"unknown architecture {cfg.arch!r}; choose one of {', '.join(smog.ARCHS)}"),
        (0.0 <= cfg.beta_start <= 1.0 and 0.0 <= cfg.beta_end <= 1.0,
         f"--beta-start/--beta-end must be in [0, 1], got {cfg.beta_start}, {cfg.beta_end}"),
        (0.0 <= cfg.ema <= 1.0, f"--ema must be in [0, 1], got {cfg.ema}"),
        (cfg.tau > 0, f"--tau must be > 0, got {cfg.tau}"),
        (cfg.lr >= 0 and cfg.lr_batch > 0, f"--lr must be >= 0 and --lr-batch > 0, got {cfg.lr}, {cfg.lr_batch}"),
        (cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.epochs >= 1 and cfg.batch_size >= 1 and cfg.accum >= 1,
         "--epochs, --batch-size and --accum must be positive"),
        (cfg.n_groups >= 1 and cfg.n_heads >= 1 and cfg.dim >= 1, "--n-groups, --n-heads and --dim must be positive"),
        (cfg.n_local >= 0, f"--n-local must be >= 0, got {cfg.n_local}"),
        (0 < cfg.global_scale_min <= cfg.global_scale_max <= 1 and 0 < cfg.local_scale_min <= cfg.local_scale_max <= 1,
         "crop scales must satisfy 0 < min <= max <= 1"),
        (cfg.optimizer in ("lars", "sgd", "adamw"), f"--optimizer must be lars, sgd or adamw, not {cfg.optimizer!r}"),
        (cfg.ema_schedule in ("const", "cosine"), f"--ema-schedule must be const or cosine, not {cfg.ema_schedule!r}"),
        (cfg.precision in ("auto", "fp32", "bf16", "fp16"), f"--precision must be auto, fp32, bf16 or fp16"),
        (cfg.bad_images in ("fail", "skip"), f"--bad-images must be fail or skip, not {cfg.bad_images!r}"),
        (cfg.regroup_every >= 1 and cfg.kmeans_iters >= 0, "--regroup-every must be >= 1 and --kmeans-iters >= 0"),
        (cfg.log_every >= 1 and cfg.save_every >= 0 and cfg.knn_every >= 0, "--log-every must be >= 1, "
         "--save-every and --knn-every >= 0"),
        (not (cfg.group_grad and cfg.accum > 1), "--group-grad needs the group update in the graph of every "
         "micro-batch; it cannot be combined with --accum > 1"),
        (cfg.image_size >= 8 and cfg.local_size >= 8, "--image-size and --local-size must be >= 8"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)


# ----------------------------------------------------------------------------------------------
# distributed setup: torchrun -> process group; plain python -> nothing (collectives are no-ops)


def init_process_group(backend: str) -> None:
    """dist.init_process_group from torchrun's environment, with one store key space per restart attempt.
    torchrun keeps its agent's TCPStore across --max-restarts attempts, and the process group's keys
    (gloo's peer addresses) are not prefixed by attempt (torch 2.14): a restarted rank could read the
    dead attempt's addresses and fail with "Gloo connectFullMesh failed ... Connection refused"."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        dist.init_process_group(backend)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                         timeout=dist.default_pg_timeout)
    store = dist.PrefixStore(f"smog/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", base)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def keep_freed_memory() -> None:
    """glibc hands every freed block above the mmap threshold straight back to the OS, so on the CPU each
    step page-faults its activations in again: measured on 2 cores, 0.5 ms of system time per image
    against 1.1 ms of compute (the demo step 0.41 s -> 0.28 s with this). Keep freed memory in the heap
    (what jemalloc/tcmalloc would do). Linux/glibc only; elsewhere a no-op."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)   # M_MMAP_THRESHOLD: allocations below 1 GiB come from the heap
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD: do not return the heap's top to the OS eagerly
    except (OSError, AttributeError):
        pass


def setup(cfg: Config) -> tuple:
    """-> (rank, world, device). The cores of this machine are split over the local ranks, and each rank's
    share over its data workers and its torch threads."""
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not {cfg.device!r}")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available; use --device cpu")
    rank, world, local = 0, 1, 0
    if "RANK" in os.environ and not smog.dist_ready():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local)
        init_process_group("nccl" if cuda else "gloo")
    if smog.dist_ready():
        rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cores = max(1, (os.cpu_count() or 1) // local_world)
    if not cuda:
        keep_freed_memory()  # before the data workers fork, so they inherit it
    if cfg.workers < 0:
        cfg.workers = min(10, cores - 1)
    torch.set_num_threads(cfg.threads or max(1, cores - cfg.workers))  # workers + threads = cores: no oversubscription
    return rank, world, torch.device(f"cuda:{local}" if cuda else "cpu")


def rank0_print(*a):
    if not smog.dist_ready() or dist.get_rank() == 0:
        print(*a, flush=True)


def git_revision() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("-dirty" if rev and dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


# ----------------------------------------------------------------------------------------------
# optimisers and schedules


class LARS(torch.optim.Optimizer):
    """SGD momentum wrapped in LARS, the released rule (apex LARC, clip=False, eps 1e-8), per tensor p with
    gradient g: if ||p|| > 0 and ||g|| > 0,
        g <- (g + wd * p) * trust * ||p|| / (||g|| + wd * ||p|| + eps)      (norms of p and of the raw g)
    otherwise g is left as it is (no weight decay either); then torch.optim.SGD's momentum step with the
    scheduled lr: buf <- momentum * buf + g (the first buf = g), p <- p - lr * buf. No host sync."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coef: float = 0.001, eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coef=trust_coef,
                                      eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                pn, gn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                local_lr = group["trust_coef"] * pn / (gn + wd * pn + group["eps"])
                g = torch.where((pn > 0) & (gn > 0), (g + wd * p) * local_lr, g)
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = g.clone()
                else:
                    st["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(st["momentum_buffer"], alpha=-group["lr"])


def build_optimizer(cfg: Config, model: smog.SMoG) -> torch.optim.Optimizer:
    """Online backbone + projector + predictor. LARS (the released ResNet recipe): every online parameter,
    biases and BN weights included, weight decay on all. SGD / AdamW: biases, norm weights and Swin's
    relative position bias tables without weight decay (AdamW's exclusions are the released Swin-T ones)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]     # not the momentum network
    if cfg.optimizer == "lars":
        return LARS([p for _, p in params], lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    trust_coef=cfg.trust_coef)
    decay, no_decay = [], []
    for name, p in params:
        (no_decay if p.ndim <= 1 or "relative_position_bias_table" in name else decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999))


def schedules(cfg: Config, steps_per_epoch: int) -> dict:
    """Per-step float64 arrays [total_steps]: lr (warmup then cosine), beta (linear), m (EMA)."""
    total = cfg.epochs * steps_per_epoch
    peak = cfg.lr * cfg.batch_size / cfg.lr_batch
    warm = min(total, int(round(cfg.warmup_epochs * steps_per_epoch)))
    t = torch.arange(total, dtype=torch.float64)
    lr = peak * cfg.min_lr_ratio + 0.5 * peak * (1 - cfg.min_lr_ratio) * (
        1 + torch.cos(math.pi * (t - warm) / max(1, total - warm - 1)))          # exact at the last step
    if warm:
        lr[:warm] = torch.linspace(peak * cfg.warmup_lr_ratio, peak, warm + 1, dtype=torch.float64)[:warm]
    m = torch.full((total,), cfg.ema, dtype=torch.float64)
    if cfg.ema_schedule == "cosine":
        m = 1 - (1 - cfg.ema) * (torch.cos(math.pi * t / max(1, total - 1)) + 1) / 2
    return dict(lr=lr, beta=smog.beta_schedule(cfg.beta_start, cfg.beta_end, total), m=m)


# ----------------------------------------------------------------------------------------------
# data: per-rank sampler position, seeded items


class StepBatches(torch.utils.data.Sampler):
    """Micro-batches of this rank for one epoch: a DistributedSampler permutation (seed + epoch,
    drop_last), cut into steps of `accum` micro-batches of `micro` samples; incomplete steps dropped.
    Items are (index, online set of the step, item seed). set_epoch(epoch, start_step) fast-forwards
    to an exact position, so a resumed run sees the same micro-batches as an uninterrupted one."""

    def __init__(self, n: int, rank: int, world: int, micro: int, accum: int, seed: int):
        self.n, self.rank, self.world, self.micro, self.accum, self.seed = n, rank, world, micro, accum, seed
        self.steps = (n // world) // (micro * accum)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def __len__(self):
        return (self.steps - self.start) * self.accum

    def __iter__(self):
        ds = torch.utils.data.DistributedSampler(range(self.n), num_replicas=self.world, rank=self.rank, shuffle=True,
                                                 seed=self.seed, drop_last=True)
        ds.set_epoch(self.epoch)
        idx = list(ds)
        for s in range(self.start, self.steps):
            online = "A" if (self.epoch * self.steps + s) % 2 == 0 else "B"
            for a in range(self.accum):
                chunk = idx[(s * self.accum + a) * self.micro:(s * self.accum + a + 1) * self.micro]
                yield [(i, online, item_seed(self.seed, self.epoch, i)) for i in chunk]


def item_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (1 << 63)


def _worker_init(_):
    torch.set_num_threads(1)


def loader(ds, batch_sampler, cfg: Config, device, *, persistent: bool = False):
    return torch.utils.data.DataLoader(ds, batch_sampler=batch_sampler, num_workers=cfg.workers,
                                       pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
                                       persistent_workers=persistent and cfg.workers > 0,
                                       generator=torch.Generator())  # never draws from the global RNG


def with_transform(ds, transform):
    c = copy.copy(ds)
    c.transform = transform
    return c


def reraise_data_error(e: Exception):
    """A BadImageError re-raised out of a DataLoader worker carries the worker traceback; keep its last line."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    msg = lines[-1] if lines else type(e).__name__
    raise UsageError(msg.split("Error: ", 1)[-1] if msg.startswith(("BadImageError", "ValueError")) else msg) from None


# ----------------------------------------------------------------------------------------------
# memory bank


class MemoryBank:
    """[2, N, D] normalised online embeddings of the two online global crops, sharded by dataset index:
    rank r holds rows i = r, r + W, r + 2W, ... (local row i // W). `local` [2, N_r, D]."""

    def __init__(self, n: int, dim: int, rank: int, world: int, device):
        self.n, self.rank, self.world = n, rank, world
        self.local = torch.zeros(2, len(range(rank, n, world)), dim, device=device)

    def write(self, idx: torch.Tensor, z: torch.Tensor) -> None:
        """idx [b] this rank's batch, z [2, b, D]; all-gathers the global batch (collective), keeps own rows."""
        idx_all = smog.all_gather_rows(idx)
        z_all = smog.all_gather_rows(z.transpose(0, 1).contiguous())            # (B, 2, D)
        mine = idx_all % self.world == self.rank
        self.local[:, idx_all[mine] // self.world] = z_all[mine].transpose(0, 1).to(self.local.dtype)

    def full(self) -> torch.Tensor:
        """[2, N, D] on the CPU in dataset order (collective)."""
        rows = smog.all_gather_rows(self.local.transpose(0, 1).contiguous()).cpu()  # (N, 2, D) in rank order
        order = torch.cat([torch.arange(r, self.n, self.world) for r in range(self.world)])
        out = torch.empty(self.n, *rows.shape[1:], dtype=rows.dtype)
        out[order] = rows
        return out.transpose(0, 1).contiguous()

    def load(self, full: torch.Tensor) -> None:
        if tuple(full.shape) != (2, self.n, self.local.shape[2]):
            raise UsageError(f"checkpoint memory bank has shape {tuple(full.shape)}, expected "
                             f"{(2, self.n, self.local.shape[2])}; the dataset or --dim changed")
        self.local.copy_(full[:, self.rank::self.world])


def bn_buffers(module: nn.Module) -> list:
    return [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


class restore_buffers:
    """Context: the given buffers get their values back on exit (forward passes that must not count)."""

    def __init__(self, bufs: list):
        self.bufs = bufs

    def __enter__(self):
        self.saved = [b.clone() for b in self.bufs]

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, s in zip(self.bufs, self.saved):
                b.copy_(s)


@torch.no_grad()
def fill_bank(model: smog.SMoG, bank: MemoryBank, ds, cfg: Config, device, micro: int, autocast) -> None:
    """One no-grad pass of the online network over this rank's shard (train-mode BN, statistics restored).
    Every rank runs the same number of full batches (shards padded by wrapping; padding is not written)
    so SyncBN's collectives stay in step and no batch has a single sample."""
    own = list(range(bank.rank, bank.n, bank.world))
    n_max = len(range(0, bank.n, bank.world))
    bs = max(2, min(2 * micro, n_max))
    padded = [own[j % len(own)] for j in range(-(-n_max // bs) * bs)]
    batches = [padded[s:s + bs] for s in range(0, len(padded), bs)]
    model.train()
    with restore_buffers(bn_buffers(model.backbone) + bn_buffers(model.projector)):
        try:
            for s, (x, _) in zip(range(0, len(padded), bs), loader(ds, batches, cfg, device)):
                with autocast():
                    z = model.embed(_to(x, device, cfg))                                # (bs, D) unit rows
                keep = max(0, min(bs, len(own) - s))                                     # real rows of this batch
                rows = torch.arange(s, s + keep, device=device)                          # own[j] = rank + j*W
                bank.local[:, rows] = z[:keep].to(bank.local.dtype)
        except data.BadImageError as e:
            reraise_data_error(e)


def _to(x: torch.Tensor, device, cfg: Config) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if device.type == "cuda" and cfg.channels_last and cfg.arch != "swin_t":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# ----------------------------------------------------------------------------------------------
# one training step


class StepModule(nn.Module):
    """What DDP wraps: every gradient-carrying computation of a step goes through this forward.
    targets None: a whole SMoG iteration (smog.SMoG.forward, groups updated in place) -> (loss, stats).
    targets [H][J, b]: accumulation pass 2, the loss of one micro-batch against the (already updated)
    groups, every online crop against every target, averaged over crops, targets, samples and heads."""

    def __init__(self, model: smog.SMoG):
        super().__init__()
        self.model = model

    def forward(self, online, momentum=None, beta=None, targets=None):
        m = self.model
        if targets is None:
            return m(online, momentum, beta)
        p = m.predictor(m.projector(smog.encode_crops(m.backbone, online)))          # (C*b, D)
        p = p.float().view(len(online), online[0].shape[0], -1)                        # (C, b, D)
        with torch.autocast(p.device.type, enabled=False):
            return torch.stack([smog.multi_target_loss(p, m.groups[h], t, m.cfg.tau)   # t (J, b)
                                for h, t in enumerate(targets)]).mean()


def _rng_get(device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _rng_set(state: torch.Tensor, device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def group_stats(targets: list, K: int) -> dict:
    """nonempty [H] fraction of groups hit by the targets, entropy [H] of the global target histogram."""
    hits = torch.stack([torch.zeros(K, device=t.device).index_add_(0, t.flatten(), torch.ones(t.numel(), device=t.device))
                        for t in targets])
    if smog.dist_ready():
        dist.all_reduce(hits)
    prob = hits / hits.sum(1, keepdim=True)
    return {"nonempty": (hits > 0).float().mean(1), "entropy": -(prob * prob.clamp_min(1e-12).log()).sum(1)}


def train_step(model: smog.SMoG, net: nn.Module, micro: list, beta: float, autocast, device, backward) -> tuple:
    """Forward + backward of one optimiser step over its micro-batches [(online crops, momentum crops)]
    -> (mean loss (detached), stats, z [2, b_total, D] online global embeddings for the memory bank)."""
    if len(micro) == 1:
        return forward_step(model, net, *micro[0], beta, autocast, backward)
    return accumulated_step(model, net, micro, beta, autocast, device, backward)


def forward_step(model: smog.SMoG, net: nn.Module, on: list, mo: list, beta: float, autocast, backward) -> tuple:
    """One micro-batch: a plain smog.SMoG.forward (groups updated in place), then backward."""
    captured = {}
    hook = model.projector.register_forward_hook(lambda mod, i, o: captured.__setitem__("z", o))
    try:
        with autocast():
            loss, stats = net(on, mo, beta)
    finally:
        hook.remove()
    b = on[0].shape[0]
    z = F.normalize(captured["z"][:2 * b].detach().float(), dim=-1).view(2, b, -1)   # global crops come first
    backward(loss)
    return loss.detach(), stats, z


def accumulated_step(model: smog.SMoG, net: nn.Module, micro: list, beta: float, autocast, device, backward) -> tuple:
    """Several micro-batches, one group update on their concatenation (module docstring, two passes)."""
    A = len(micro)
    # pass 1, no grad: targets and online global embeddings of every micro-batch
    zs, zts, states = [], [], []
    with torch.no_grad(), restore_buffers(bn_buffers(model.backbone) + bn_buffers(model.projector)):
        for on, mo in micro:
            b = on[0].shape[0]
            with autocast():
                zt = model.momentum_projector(smog.encode_crops(model.momentum_backbone, mo))
                states.append(_rng_get(device))                                    # replayed in pass 2
                z = model.projector(smog.encode_crops(model.backbone, on))[:2 * b]  # BN over all crops, as in pass 2
            zts.append(F.normalize(zt.float(), dim=-1).view(2, b, -1))
            zs.append(F.normalize(z.float(), dim=-1).view(2, b, -1))
    z_all, zt_all = torch.cat(zs, 1), torch.cat(zts, 1)                            # (2, A*b, D)
    H, D = model.groups.shape[0], model.groups.shape[2]
    targets, new = [], []
    with torch.no_grad():
        for h in range(H):  # (S1) targets and assignment with the groups before the update, (G2) one update
            g0 = model.groups[h]
            targets.append(smog.assign_groups(zt_all.reshape(-1, D), g0).view(2, -1))
            a = smog.assign_groups(z_all[h % 2], g0)
            new.append(smog.update_groups(g0, z_all[h % 2], a, beta))
        model.groups.copy_(torch.stack(new))
    # pass 2: each micro-batch with gradient, against the updated groups
    total = torch.zeros((), device=device)
    for m, (on, mo) in enumerate(micro):
        b = on[0].shape[0]
        _rng_set(states[m], device)
        last = m == A - 1  # DDP all-reduces the gradients once, in the last micro-batch's backward
        with (net.no_sync() if isinstance(net, nn.parallel.DistributedDataParallel) and not last else nullcontext()):
            with autocast():
                loss = net(on, targets=[t[:, m * b:(m + 1) * b] for t in targets])
            backward(loss / A)
        total += loss.detach() / A
    return total, group_stats(targets, model.cfg.n_groups), z_all


# ----------------------------------------------------------------------------------------------
# checkpoints: everything in one file, written atomically by rank 0, loaded weights_only


def _test_hook(name: str, value: int) -> bool:
    """True if the test-only variable `name` asks for an action at `value` on this rank (module docstring)."""
    v = os.environ.get(name)
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


def _die(what: str) -> None:
    print(f"[test] SIGKILL self: {what}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def rng_state(device) -> dict:
    py = random.getstate()
    npst = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0, dtype=torch.uint8),
            "python": torch.tensor(py[1], dtype=torch.int64),
            "numpy": torch.tensor([*npst[1].tolist(), npst[2], npst[3]], dtype=torch.int64),
            "numpy_gauss": torch.tensor([npst[4]], dtype=torch.float64)}


def set_rng_state(st: dict, device) -> None:
    # clone: a view with a storage offset (rank r's row of a gathered tensor in older checkpoints)
    # makes torch.set_rng_state segfault (torch 2.14)
    torch.set_rng_state(st["torch"].clone())
    if device.type == "cuda" and st["cuda"].numel():
        torch.cuda.set_rng_state(st["cuda"].clone(), device)
    random.setstate((3, tuple(int(v) for v in st["python"].tolist()), None))
    n = st["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(n[:624], dtype=np.uint32), int(n[624]), int(n[625]),
                         float(st["numpy_gauss"][0])))


def gather_rng(device) -> list:
    """Every rank's RNG states, in rank order (collective): all fields as one int64/uint8 row each."""
    st = rng_state(device)
    if not smog.dist_ready():
        return [st]
    out = {}
    for k, v in st.items():
        rows = smog.all_gather_rows(v.to(device)[None])                 # (W, L)
        out[k] = rows.cpu()
    return [{k: out[k][r].clone() for k in st} for r in range(dist.get_world_size())]  # own storage, no views


def write_checkpoint(obj: dict, path: str, n_save: int) -> None:
    """smog.save_atomic, or (test hook) die half-way through writing the same temporary file."""
    if _test_hook("SMOG_TEST_DIE_IN_SAVE", n_save):
        buf = io.BytesIO()
        torch.save(obj, buf)
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
        _die(f"in checkpoint write {n_save}")
    smog.save_atomic(obj, path)


def check_resume(ck: dict, cfg: Config, world: int, path: str) -> None:
    """The checkpoint must continue *this* run: same format, world size and every non-runtime field."""
    if str(ck.get("format", "")).startswith("smog-train-") and ck.get("format") != FORMAT:
        raise UsageError(f"cannot resume {path!r}: it was written by an older train.py (format {ck['format']!r}, "
                         f"this one writes {FORMAT!r}, which trains a different recipe); use a new --out-dir")
    if ck.get("format") != FORMAT:
        raise UsageError(f"{path!r} is not a train.py checkpoint (format {ck.get('format')!r}, expected {FORMAT!r})")
    if ck.get("world_size") != world:
        raise UsageError(f"cannot resume {path!r}: it was written with world size {ck.get('world_size')}, this run has "
                         f"{world}; rerun with the same number of processes or use a new --out-dir")
    old = ck.get("config", {})
    for f in fields(Config):
        if f.name in RUNTIME_FIELDS:
            continue
        if f.name in old and old[f.name] != getattr(cfg, f.name):
            raise UsageError(f"cannot resume {path!r}: config field {f.name!r} is {old[f.name]!r} in the checkpoint but "
                             f"{getattr(cfg, f.name)!r} now; pass --{f.name.replace('_', '-')} {old[f.name]} or use a "
                             f"new --out-dir")


def check_writable(out_dir: str) -> None:
    """out_dir (or its nearest existing parent) must be a writable directory; nothing is created here."""
    import eval_linear
    try:
        eval_linear.check_writable(out_dir)
    except ValueError as e:
        raise UsageError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# evaluation: kNN monitor each epoch; the demo table (imports eval_linear: one implementation)


def extract(backbone: nn.Module, ds, cfg: Config, device) -> tuple:
    import eval_linear
    return eval_linear.extract_features(backbone, eval_linear.shard_loader(
        ds, 256, workers=cfg.workers, pin_memory=device.type == "cuda"), device)


def knn_monitor(backbone: nn.Module, train_plain, test_ds, n_classes: int, cfg: Config, device) -> tuple:
    """Weighted kNN top-1 (%) of the online backbone on the held-out split -> (top1, train feats, test feats)."""
    import eval_linear
    tr = train_plain
    if cfg.knn_max_train and len(tr) > cfg.knn_max_train:
        tr = torch.utils.data.Subset(tr, torch.linspace(0, len(tr) - 1, cfg.knn_max_train).long().tolist())
    ftr, ytr = extract(backbone, tr, cfg, device)
    fte, yte = extract(backbone, test_ds, cfg, device)
    top1 = eval_linear.knn_eval(ftr, ytr, fte, yte, n_classes, ks=(cfg.knn_k,), T=cfg.knn_t)[cfg.knn_k]
    return top1, (ftr, ytr), (fte, yte)


def train_supervised(cfg: Config, train_raw, n_classes: int, steps: int, device, autocast) -> nn.Module:
    """The same backbone trained with labels (cross-entropy, linear head) for `steps` steps of the same
    global batch, on the global-crop augmentation of set A; SGD momentum 0.9, cosine lr, wd 5e-4."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 2)
        backbone, fdim = smog.build_backbone(cfg.arch, cifar_stem=cfg.cifar_stem, drop_path=cfg.drop_path,
                                             width=cfg.width)
        net = nn.Sequential(backbone, nn.Linear(fdim, n_classes)).to(device)
    world = dist.get_world_size() if smog.dist_ready() else 1
    rank = dist.get_rank() if smog.dist_ready() else 0
    ddp = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    aug = data.augmentation("A", cfg.image_size, (cfg.global_scale_min, cfg.global_scale_max), blur_scale=cfg.blur_scale)
    sampler = StepBatches(len(train_raw), rank, world, cfg.batch_size // world, 1, cfg.seed + 2)
    dl = loader(data.AugmentedDataset(train_raw, aug), sampler, cfg, device, persistent=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4, nesterov=True)
    peak = cfg.sup_lr * cfg.batch_size / 256
    step, epoch = 0, 0
    net.train()
    while step < steps:
        sampler.set_epoch(epoch)
        for x, y in dl:
            if step >= steps:
                break
            for g in opt.param_groups:
                g["lr"] = 0.5 * peak * (1 + math.cos(math.pi * step / steps))
            with autocast():
                loss = F.cross_entropy(ddp(_to(x, device, cfg)).float(), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        epoch += 1
    return backbone


def final_eval(cfg: Config, model: smog.SMoG, train_raw, train_plain, test_ds, n_classes: int, steps: int,
               device, autocast, smog_feats=None) -> dict:
    """The demo table: linear probes (eval_linear.linear_probe_features, cached features, last-epoch
    top-1 %) of raw pixels, a random-init encoder, the SMoG encoder and a supervised encoder."""
    import eval_linear
    t0 = time.time()

    def probe(tr, te):
        return eval_linear.linear_probe_features(*tr, *te, n_classes, epochs=cfg.probe_epochs, lr=cfg.probe_lr,
                                                 wd=1e-6, batch_size=256, seed=cfg.seed)["top1"]

    def encoder_probe(backbone):
        return probe(extract(backbone, train_plain, cfg, device), extract(backbone, test_ds, cfg, device))

    res = {}
    res["pixels"] = encoder_probe(nn.Flatten())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        rnd, _ = smog.build_backbone(cfg.arch, cifar_stem=cfg.cifar_stem, width=cfg.width)
    res["random_init"] = encoder_probe(rnd.to(device))
    res["smog"] = probe(*smog_feats) if smog_feats else encoder_probe(model.backbone)
    t1 = time.time()
    rank0_print(f"final eval: supervised baseline, {steps} steps of batch {cfg.batch_size} ...")
    res["supervised"] = encoder_probe(train_supervised(cfg, train_raw, n_classes, steps, device, autocast))
    rank0_print(f"final eval: {time.time() - t0:.0f}s (supervised baseline {time.time() - t1:.0f}s)")
    return res


def results_table(res: dict, cfg: Config) -> str:
    names = {"pixels": "raw pixels", "random_init": "random-init encoder", "smog": "SMoG encoder",
             "supervised": "supervised encoder (same backbone, same steps)"}
    w = max(len(v) for v in names.values())
    lines = [f"linear probe on {cfg.data} ({cfg.probe_epochs} epochs on frozen features), top-1 %",
             f"| {'features':<{w}} | top-1 |", f"|{'-' * (w + 2)}|-------|"]
    lines += [f"| {names[k]:<{w}} | {res[k]:5.1f} |" for k in names]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the run


_SIGTERM = {"got": False}


def _on_sigterm(signum, frame):
    _SIGTERM["got"] = True  # acted on at the next step boundary, on every rank together


def build_data(cfg: Config, rank: int) -> tuple:
    """-> (train set yielding PIL images, train set with the eval transform, test set or None)."""
    kw = dict(root=cfg.data_root, bad_images=cfg.bad_images)
    try:
        if cfg.download and smog.dist_ready():  # rank 0 downloads, the others wait and read
            if rank == 0:
                data.build_dataset(cfg.data, "train", download=True, **kw)
            dist.barrier()
        train_raw = data.build_dataset(cfg.data, "train", None, download=cfg.download, **kw)
        test = None
        if (cfg.knn_every or cfg.final_eval) and data.has_test_split(cfg.data):
            test = data.build_dataset(cfg.data, "test", data.eval_transform(cfg.image_size), download=cfg.download, **kw)
    except ValueError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    return train_raw, with_transform(train_raw, data.eval_transform(cfg.image_size)), test


def train(cfg: Config) -> int:
    check_values(cfg)
    check_writable(cfg.out_dir)  # now, not after loading the data and filling the memory bank
    rank, world, device = setup(cfg)
    train_raw, train_plain, test_ds = build_data(cfg, rank)
    n = len(train_raw)
    if cfg.final_eval and test_ds is None:
        raise UsageError(f"--final-eval needs a held-out split; {cfg.data} has none (create PATH/val)")
    if cfg.batch_size % (world * cfg.accum):
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by world size {world} x --accum {cfg.accum}")
    micro = cfg.batch_size // (world * cfg.accum)
    if micro < 2:
        raise UsageError(f"micro-batch per rank is {micro} (batch {cfg.batch_size} / world {world} / accum {cfg.accum}); "
                         f"BatchNorm needs at least 2")
    spe = (n // world) // (micro * cfg.accum)
    if spe < 1:
        raise UsageError(f"global batch {cfg.batch_size} is larger than the dataset ({n} images"
                         f"{f', {n // world} per rank' if world > 1 else ''}); use a smaller --batch-size")
    shard0 = len(range(0, n, world))
    if cfg.n_groups > shard0:
        raise UsageError(f"--n-groups {cfg.n_groups} is more than the {shard0} samples in "
                         f"{'rank 0' + chr(39) + 's shard of ' if world > 1 else ''}the memory bank; use fewer groups")
    total_steps = cfg.epochs * spe

    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32"))
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext

    # model: identical initial weights on every rank
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    model = smog.SMoG(cfg.model_config())
    sync_bn = world > 1 and device.type == "cuda"
    if sync_bn:  # both networks: SMoG.forward runs them on the same global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if device.type == "cuda" and cfg.channels_last and cfg.arch != "swin_t":
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.backbone.compile()
        model.momentum_backbone.compile()
    opt = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    step_mod = StepModule(model)
    # without SyncBN (gloo/CPU) DDP broadcasts rank 0's buffers every forward so BN statistics agree
    net = nn.parallel.DistributedDataParallel(step_mod, device_ids=[device.index] if device.type == "cuda" else None,
                                              broadcast_buffers=not sync_bn) if world > 1 else step_mod
    bank = MemoryBank(n, cfg.dim, rank, world, device)
    sched = schedules(cfg, spe)
    n_classes = data.num_classes(train_raw)
    ck_path = os.path.join(cfg.out_dir, "checkpoint.pth")
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    git = git_revision()
    cfg_dict = dict(asdict(cfg), model=asdict(cfg.model_config()), git=git)

    # resume (automatic from out_dir) or start: everything validated before anything is written
    resume = cfg.resume or (ck_path if os.path.exists(ck_path) else "")
    # last_ck: "PATH (step S)", the newest complete checkpoint this run can restart from; peak_hit: collapse guard
    st = dict(step=0, epoch=0, step_in_epoch=0, knn=[], skipped_nonfinite=0, n_save=0, log_offset=0,
              last_ck=None, peak_hit=0.0)
    if resume:
        try:
            ck = smog.load_checkpoint(resume)
        except ValueError as e:
            raise UsageError(str(e)) from None
        check_resume(ck, cfg, world, resume)
        check_writable(cfg.out_dir)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        bank.load(ck["bank"].to(device))
        for k in ("step", "epoch", "step_in_epoch", "knn", "skipped_nonfinite", "log_offset"):
            st[k] = ck[k]
        st["peak_hit"] = ck.get("peak_hit", 0.0)  # collapse guard: best group hit so far in the resumed epoch
        rng = ck["rng"][rank]
        st["last_ck"] = f"{resume} (step {ck['step']})"
        same_dir = os.path.abspath(resume) == os.path.abspath(ck_path)
        del ck
    else:
        check_writable(cfg.out_dir)
        rank0_print(f"filling the memory bank: {n} images ...")
        t0 = time.time()
        fill_bank(model, bank, train_plain, cfg, device, micro, autocast)
        rank0_print(f"memory bank filled in {time.time() - t0:.1f}s")
        rng, same_dir = None, False

    # from here on the run writes
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        for f in os.listdir(cfg.out_dir):  # temporary files of checkpoint writes that were killed
            if f.startswith(".checkpoint.pth.tmp-"):
                os.remove(os.path.join(cfg.out_dir, f))
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as fh:
            json.dump(cfg_dict, fh, indent=1)
        if not resume and os.path.exists(os.path.join(cfg.out_dir, "demo_results.json")):
            os.remove(os.path.join(cfg.out_dir, "demo_results.json"))  # a previous run's, not this one's
        if os.path.exists(log_path):
            if resume and same_dir and os.path.getsize(log_path) >= st["log_offset"]:
                os.truncate(log_path, st["log_offset"])  # drop lines written after the checkpoint
            elif not resume:
                os.truncate(log_path, 0)
    if cfg.bad_images == "skip" and hasattr(train_raw, "skip_log"):
        train_raw.skip_log = os.path.join(cfg.out_dir, "skipped_images.txt")
        if getattr(train_raw, "_reported", None):  # met while filling the bank, before out_dir could be written
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(train_raw.skip_log, "a") as fh:
                fh.writelines(p + "\n" for p in sorted(train_raw._reported))
    rank0_print(f"SMoG train.py  git {git or '(none)'}  world {world}  device {device}  precision "
                f"{amp or torch.float32}\n" + json.dumps(cfg_dict, sort_keys=True))
    rank0_print(f"{n} training images, {spe} steps/epoch of {cfg.batch_size} (micro-batch {micro} x accum "
                f"{cfg.accum} x world {world}), {total_steps} steps; resuming at step {st['step']}" if resume else
                f"{n} training images, {spe} steps/epoch of {cfg.batch_size} (micro-batch {micro} x accum "
                f"{cfg.accum} x world {world}), {total_steps} steps")

    if cfg.knn_every and test_ds is None:
        rank0_print(f"note: {cfg.data} has no held-out split (PATH/val); the per-epoch kNN monitor is off")

    def log(rec: dict) -> None:
        if rank == 0:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    def save(epoch: int, step_in_epoch: int, step: int, why: str) -> None:
        bank_full = bank.full()
        rngs = gather_rng(device)
        st["n_save"] += 1
        if rank == 0:
            obj = {"format": FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
                   "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "bank": bank_full, "rng": rngs,
                   "config": cfg_dict, "world_size": world, "step": step, "epoch": epoch,
                   "step_in_epoch": step_in_epoch, "steps_per_epoch": spe, "total_steps": total_steps,
                   "knn": st["knn"], "skipped_nonfinite": st["skipped_nonfinite"], "peak_hit": float(st["peak_hit"]),
                   "log_offset": os.path.getsize(log_path) if os.path.exists(log_path) else 0}
            write_checkpoint(obj, ck_path, st["n_save"])
            print(f"saved {ck_path} (step {step}, {why})", flush=True)
        if smog.dist_ready():
            dist.barrier()
        st["last_ck"] = f"{ck_path} (step {step})"

    views = data.ViewsDataset(train_raw, data.MultiCropViews(
        cfg.image_size, cfg.local_size, cfg.n_local, (cfg.global_scale_min, cfg.global_scale_max),
        (cfg.local_scale_min, cfg.local_scale_max), cfg.blur_scale))
    sampler = StepBatches(n, rank, world, micro, cfg.accum, cfg.seed)
    dl = loader(views, sampler, cfg, device, persistent=True)
    backward = lambda loss: scaler.scale(loss).backward()                            # noqa: E731
    attainable = min(1.0, 2 * cfg.batch_size / cfg.n_groups)                          # groups hit at most
    last_feats = None
    if rng is not None:
        set_rng_state(rng, device)
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        for epoch in range(st["epoch"], cfg.epochs):
            start = st["step_in_epoch"] if epoch == st["epoch"] else 0
            if start == 0 and epoch % cfg.regroup_every == 0:
                t0 = time.time()
                model.regroup(bank.local, cfg.kmeans_iters,
                              generator=torch.Generator().manual_seed(item_seed(cfg.seed, epoch, 1 << 40)))
                if _test_hook("SMOG_TEST_DIE_IN_REGROUP", epoch):
                    _die(f"in regroup of epoch {epoch}")
                if cfg.reset_momentum:
                    model.reset_momentum()
                rank0_print(f"epoch {epoch}: regrouped {cfg.n_heads} x {cfg.n_groups} groups over the memory bank "
                            f"({time.time() - t0:.1f}s)")
            sampler.set_epoch(epoch, start)
            it = iter(dl)
            peak_hit = torch.full((), st["peak_hit"] if start else 0.0, device=device)  # exact float32 round trip
            t_log, t_wait, imgs = time.time(), 0.0, 0
            for s in range(start, spe):
                step = epoch * spe + s
                if _test_hook("SMOG_TEST_SIGTERM_AT_STEP", step):
                    os.kill(os.getpid(), signal.SIGTERM)
                t0 = time.time()
                micro_batches, idx = [], []
                try:
                    for _ in range(cfg.accum):
                        on, mo, i = next(it)
                        micro_batches.append(([_to(x, device, cfg) for x in on], [_to(x, device, cfg) for x in mo]))
                        idx.append(i.to(device))
                except data.BadImageError as e:
                    reraise_data_error(e)
                t_wait += time.time() - t0
                lr, beta, m = (float(sched[k][step]) for k in ("lr", "beta", "m"))
                for g in opt.param_groups:
                    g["lr"] = lr
                # a skipped step must leave no trace: buffers (groups, BN statistics) and the momentum network
                saved = restore_buffers([*model.buffers(), *model.momentum_backbone.parameters(),
                                         *model.momentum_projector.parameters()]) if cfg.skip_nonfinite else None
                if saved:
                    saved.__enter__()
                model.momentum_step(m)                                              # (M1) before the forward
                loss, stats, z = train_step(model, net, micro_batches, beta, autocast, device, backward)
                if _test_hook("SMOG_TEST_NAN_AT_STEP", step):
                    loss = loss * float("nan")
                # one small all-reduce per step: mean loss, non-finite anywhere, SIGTERM anywhere (host sync)
                flags = torch.stack([loss.float(), (~torch.isfinite(loss)).float(),
                                     torch.tensor(float(_SIGTERM["got"]), device=device)])
                if smog.dist_ready():
                    dist.all_reduce(flags)
                loss_v, bad, term = flags[0].item() / world, flags[1].item() > 0, flags[2].item() > 0
                if _test_hook("SMOG_TEST_DIE_AT_STEP", step):
                    _die(f"at step {step}")
                if bad:
                    opt.zero_grad(set_to_none=True)
                    if st["skipped_nonfinite"] >= cfg.skip_nonfinite:
                        last = st["last_ck"] or "none (no checkpoint was written yet)"
                        print(f"error: non-finite loss at step {step} (epoch {epoch}); stopped without saving; "
                              f"last good checkpoint: {last}; lower --lr or use --skip-nonfinite N", file=sys.stderr)
                        return 3
                    saved.__exit__()                                   # groups, BN statistics, momentum network back
                    st["skipped_nonfinite"] += 1
                    rank0_print(f"warning: non-finite loss at step {step}, step skipped "
                                f"({st['skipped_nonfinite']}/{cfg.skip_nonfinite})")
                else:
                    if cfg.clip_grad > 0:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        bank.write(torch.cat(idx), z)
                peak_hit = st["peak_hit"] = torch.maximum(peak_hit, stats["nonempty"].mean() / attainable)
                st.update(step=step + 1, epoch=epoch, step_in_epoch=s + 1)
                imgs += cfg.batch_size
                if step % cfg.log_every == 0 or s == spe - 1:
                    dt = time.time() - t_log
                    rec = dict(type="step", step=step, epoch=epoch, loss=loss_v, lr=lr, beta=beta, m=m,
                               nonempty=stats["nonempty"].mean().item(), entropy=stats["entropy"].mean().item(),
                               img_s=imgs / max(dt, 1e-9), data_frac=t_wait / max(dt, 1e-9), time=time.time())
                    log(rec)
                    rank0_print(f"epoch {epoch} step {step}/{total_steps} loss {loss_v:.4f} lr {lr:.4g} beta {beta:.4f} "
                                f"m {m:.4f} img/s {rec['img_s']:.0f} data {100 * rec['data_frac']:.0f}% nonempty "
                                f"{rec['nonempty']:.2f} entropy {rec['entropy']:.2f} (ln K {math.log(cfg.n_groups):.2f})")
                    t_log, t_wait, imgs = time.time(), 0.0, 0
                if term:
                    save(epoch, s + 1, step + 1, "SIGTERM")
                    rank0_print("SIGTERM: checkpoint written, exiting")
                    return 0
                if cfg.save_every and (step + 1) % cfg.save_every == 0 and s + 1 < spe:
                    save(epoch, s + 1, step + 1, f"every {cfg.save_every} steps")
            # end of epoch: kNN monitor, collapse guard, groups identical on all ranks, checkpoint
            rec = dict(type="epoch", epoch=epoch, step=(epoch + 1) * spe, peak_group_hit=peak_hit.item())
            if cfg.knn_every and test_ds is not None and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
                t0 = time.time()
                rec["knn_top1"], *last_feats = knn_monitor(model.backbone, train_plain, test_ds, n_classes, cfg, device)
                st["knn"].append([epoch, rec["knn_top1"]])
                rank0_print(f"epoch {epoch}: kNN top-1 {rec['knn_top1']:.2f}% (k={cfg.knn_k}, T={cfg.knn_t}, "
                            f"{time.time() - t0:.1f}s)")
            if world > 1:
                g0 = model.groups.clone()
                dist.broadcast(g0, 0)
                diff = (model.groups - g0).abs().max()
                dist.all_reduce(diff, op=dist.ReduceOp.MAX)
                rec["groups_rank_max_diff"] = diff.item()
                if rec["groups_rank_max_diff"] != 0:
                    raise RuntimeError(f"group features differ across ranks by {rec['groups_rank_max_diff']} "
                                       f"(epoch {epoch}); the synchronous update is broken")
            if rec["peak_group_hit"] < cfg.collapse_threshold:
                rank0_print(f"warning: possible collapse: in epoch {epoch} no step hit more than "
                            f"{100 * rec['peak_group_hit']:.1f}% of the attainable groups (threshold "
                            f"{100 * cfg.collapse_threshold:.0f}%); try a lower --lr, a higher --tau, fewer "
                            f"--n-groups, a beta closer to 1 (--beta-end), or more warmup (--warmup-epochs)")
                rec["collapse_warning"] = True
            if cfg.bad_images == "skip" and rank == 0:
                skipped = os.path.join(cfg.out_dir, "skipped_images.txt")
                if os.path.exists(skipped):
                    with open(skipped) as fh:
                        rec["skipped_images"] = len(set(fh.read().split("\n")) - {""})
                    rank0_print(f"skipped {rec['skipped_images']} unreadable images so far (listed in {skipped})")
            log(rec)
            st.update(epoch=epoch + 1, step_in_epoch=0)
            save(epoch + 1, 0, (epoch + 1) * spe, f"end of epoch {epoch}")
    finally:
        signal.signal(signal.SIGTERM, old_handler)

    done = os.path.join(cfg.out_dir, "demo_results.json")
    if cfg.final_eval and os.path.exists(done) and last_feats is None and st["step"] == total_steps:  # all ranks see it
        if rank == 0:                                                    # is started by one rank alone
            with open(done) as fh:
                res = json.load(fh)
            print("run already complete; stored results:\n" + results_table(res, cfg), flush=True)
            log(dict(type="final", **res, knn=st["knn"]))                # the log was truncated to the checkpoint
        cfg = dataclasses.replace(cfg, final_eval=False)
    if cfg.final_eval:
        res = final_eval(cfg, model, train_raw, train_plain, test_ds, n_classes, total_steps, device, autocast,
                         smog_feats=last_feats)
        if rank == 0:
            print(results_table(res, cfg), flush=True)
            print("kNN top-1 per epoch: " + ", ".join(f"{e}: {a:.1f}" for e, a in st["knn"]), flush=True)
            path = os.path.join(cfg.out_dir, "demo_results.json")
            with open(path + ".tmp", "w") as fh:
                json.dump(res, fh, indent=1)
            os.replace(path + ".tmp", path)
            log(dict(type="final", **res, knn=st["knn"]))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cfg = parse_config(argv)
        return train(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if smog.dist_ready():
            dist.destroy_process_group()


if __name__ == "__main__":
    smog.exit_process(main())
