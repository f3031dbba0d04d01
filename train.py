"""SMoG pretraining (METHOD.md), from a 2-core laptop to many GPUs and nodes with the same file.

    python train.py                                         # main job: the built-in demo, a few minutes on 2 CPU cores
    python train.py --preset cifar10-r18 --download         # one GPU (or CPU)
    torchrun --nproc_per_node=8 train.py --preset imagenet-r50 --data imagefolder:/data/imagenet
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py --preset ...
    python train.py -h                                      # every option, the values a plain run uses, the presets

--batch-size is the *global* batch: per rank and micro-batch it is batch / (world * accum).
Top to bottom: the config and presets; train(), the whole run; the epoch loop and the pieces of one
step in its order; the optimisers and schedules; building the model. Beside it: smog.py (the method),
batches.py (datasets, seeded and resumable batches), memory_bank.py, checkpoint.py (run state: what a
checkpoint holds, resume or start, save, SIGTERM, the test-only faults), launch.py (process group,
device, threads, the run's banner), pretrain_eval.py (kNN monitor, final table).
The test-only fault injection (SMOG_TEST_* variables, one fault(site, value) call per site) is
documented in checkpoint.py.

What is exact and why
- Gradient accumulation (--accum A > 1): the group update must see the whole accumulated batch before
  any micro-batch's loss, and the update uses detached embeddings only. accumulated_step runs two
  passes: pass 1 (no grad) computes momentum targets and the online global-crop embeddings of every
  micro-batch; the groups are updated once on their concatenation (smog.update_groups, all-reduced);
  pass 2 recomputes each micro-batch with gradient and its loss against the updated groups. Pass 2 sees
  exactly pass 1's embeddings: same crops, same BN batches (running statistics of pass 1 are
  restored), same drop-path masks (the RNG state before each micro-batch is replayed). With one
  micro-batch this is the plain SMoG step (tested); BN statistics stay per micro-batch, as in the
  released code. Cost: one extra no-grad online forward. --group-grad is refused with --accum > 1.
- Schedules (lr, beta, m) are arrays indexed by the global step, so a resumed run continues exactly.
- A non-finite loss (checked every step after an all-reduce: a host sync point) stops the run with
  exit code 3, naming the step and the last good checkpoint, which is left untouched; --skip-nonfinite N
  instead skips up to N such steps (groups, BN statistics and the momentum network restored, gradients
  discarded: a skipped step leaves no trace in the state).
- Bad input (config values, missing data, unreadable images, bad resume) exits with one line on
  stderr and code 2, before anything is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
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

import checkpoint
import data
import launch
import pretrain_eval
import smog
from batches import StepBatches, batch_geometry, build_data, item_seed, loader, reraise_data_error, to_device
from checkpoint import Run, UsageError, fault, log, resume_or_start, save
from launch import rank0_print
from memory_bank import MemoryBank, bn_buffers, fill_bank, restore_buffers


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
    # views (METHOD.md, "Recipes": 2 global + n_local local crops per augmentation set)
    image_size: int = opt(0, "global crop size (0: the dataset's, 224 ImageNet, 96 STL, 32 CIFAR/demo)")
    local_size: int = opt(0, "local crop size (0: image_size * 96/224)")
    n_local: int = opt(4, "local crops per image in each augmentation set (online and momentum)")
    global_scale_min: float = opt(0.2, "RandomResizedCrop scale range of global crops: min")
    global_scale_max: float = opt(1.0, "... max")
    local_scale_min: float = opt(0.05, "RandomResizedCrop scale range of local crops: min")
    local_scale_max: float = opt(0.2, "... max")
    blur_scale: float = opt(1.0, "Gaussian blur radius range 0.1-2.0 times this (use image_size/224 for small images)")
    augment: str = opt("auto", "how crops are made: tensor (a whole batch at once with tensor ops, for datasets held "
                               "as one array: demo, CIFAR, STL; ~8x less CPU on 32 px) | pil (crop by crop, torchvision's "
                               "PIL ops; any data) | auto (tensor where possible). Same distribution, different pixels")
    # optimisation
    epochs: int = opt(400, "training epochs")
    batch_size: int = opt(4096, "GLOBAL batch size (all ranks, all accumulation micro-batches)")
    accum: int = opt(1, "gradient accumulation micro-batches per step; the group update uses all of them")
    optimizer: str = opt("lars", "lars (SGD momentum + LARS trust ratio) | sgd | adamw")
    lr: float = opt(4.8, "peak learning rate at --lr-batch; the run uses lr * batch_size / lr_batch")
    lr_batch: int = opt(4096, "the batch size --lr refers to (linear scaling)")
    min_lr_ratio: float = opt(0.001, "cosine ends at this fraction of the peak lr")
    warmup_epochs: float = opt(10.0, "linear warmup epochs")
    warmup_lr_ratio: float = opt(0.01 / 4.8, "warmup starts at this fraction of the peak lr (released R50: from 0.01 to 4.8)")
    weight_decay: float = opt(1e-6, "lars: on every parameter (released); sgd/adamw: not on biases, norm weights, Swin rel. pos. bias")
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
    channels_last: bool = opt(True, "channels_last memory format for CNNs (CUDA and CPU: on a 2-core AMD EPYC "
                                     "the demo step took 0.7x the time of NCHW; joint BN's pixel rows are free views)")
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
    # no data workers, every core for torch: the crops of a batch are made with tensor ops (--augment), about
    # 0.15 s of a 0.55 s step on 2 cores (the PIL crops took 1.3-1.8 s of one core per batch; bench.py crops).
    "demo": dict(data="demo", arch="smallcnn", width=16, dim=64, hidden_dim=512, n_groups=30, n_heads=3,
                 image_size=32, local_size=16, n_local=2, global_scale_min=0.35, local_scale_min=0.1,
                 local_scale_max=0.35, blur_scale=0.15, epochs=10, batch_size=256, optimizer="sgd", lr=1.0,
                 lr_batch=256, warmup_epochs=1.0, warmup_lr_ratio=0.1, weight_decay=5e-4, beta_end=0.99,
                 ema=0.99, log_every=10, final_eval=True, probe_epochs=100, sup_lr=0.1, workers=0),
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
    """Every Config field as an option. The help shows both layers a run is made of: the default (the
    released ResNet-50 recipe) and, where it differs, the value of the demo preset that a plain
    `python train.py` runs; the epilog lists every preset."""
    demo = PRESETS[Config.preset]
    lines = ["presets (values that differ from the defaults above):"]
    for name, over in PRESETS.items():
        lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in over.items()))
    ap = _Parser(prog="train.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                 description=f"SMoG pretraining. Precedence: defaults < --preset (or --config) < options given. "
                             f"A plain `python train.py` runs --preset {Config.preset}: each option shows "
                             f"'{Config.preset}: VALUE' where that preset overrides the default. "
                             f"Run under torchrun for data parallelism.",
                 epilog="\n".join(lines), argument_default=argparse.SUPPRESS)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        plain = f"; {Config.preset}: {demo[f.name]}" if demo.get(f.name, f.default) != f.default else ""
        hlp = f"{f.metadata['help']} (default: {f.default}{plain})"
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
        (cfg.augment in ("auto", "tensor", "pil"), f"--augment must be auto, tensor or pil, not {cfg.augment!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)


# ----------------------------------------------------------------------------------------------
# the run


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


def train(cfg: Config) -> int:
    """The whole run -> exit code: set up, build data / model / optimiser / schedules, resume or start,
    the epoch loop (regroup at the start of an epoch), the final evaluation."""
    check_values(cfg)
    checkpoint.check_writable(cfg.out_dir)  # now, not after loading the data and filling the memory bank
    rank, world, device = launch.setup(cfg)
    train_raw, train_plain, test_ds = build_data(cfg, rank)
    if cfg.final_eval and test_ds is None:
        raise UsageError(f"--final-eval needs a held-out split; {cfg.data} has none (create PATH/val)")
    if cfg.augment == "tensor" and data.in_memory_arrays(train_raw) is None:
        raise UsageError(f"--augment tensor needs a dataset held as one array (demo, cifar10, cifar100, stl10), not "
                         f"{cfg.data}; use --augment pil or auto")
    micro, spe = batch_geometry(cfg, len(train_raw), world)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32"))
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext

    model, sync_bn = build_model(cfg, rank, world, device)       # identical initial weights on every rank
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    step_mod = StepModule(model)
    # without SyncBN (gloo/CPU) DDP broadcasts rank 0's buffers every forward so BN statistics agree
    net = nn.parallel.DistributedDataParallel(step_mod, device_ids=[device.index] if device.type == "cuda" else None,
                                              broadcast_buffers=not sync_bn) if world > 1 else step_mod
    bank = MemoryBank(len(train_raw), cfg.dim, rank, world, device)             # [2, N, D], sharded by index
    cfg_dict = dict(asdict(cfg), model=asdict(cfg.model_config()), git=launch.git_revision())
    run = Run(cfg, rank, world, device, model, net, optimizer, scaler, bank, schedules(cfg, spe), spe, autocast, cfg_dict)
    n_classes = data.num_classes(train_raw)
    rng, resumed = resume_or_start(run, train_raw, RUNTIME_FIELDS, start=lambda: fill_bank(
        model, bank, train_plain, cfg, device, micro, autocast))      # restore everything, or fill the bank
    launch.announce(run, micro, amp, resumed, test_ds is not None)

    views = data.ViewsDataset(train_raw, data.MultiCropViews(
        cfg.image_size, cfg.local_size, cfg.n_local, (cfg.global_scale_min, cfg.global_scale_max),
        (cfg.local_scale_min, cfg.local_scale_max), cfg.blur_scale), batched=cfg.augment != "pil")
    sampler = StepBatches(len(train_raw), rank, world, micro, cfg.accum, cfg.seed)
    dl = loader(views, sampler, cfg, device, persistent=True)
    if rng is not None:
        checkpoint.set_rng_state(rng, device)
    with checkpoint.on_sigterm() as sigterm:
        for epoch in range(run.epoch, cfg.epochs):
            start = run.step_in_epoch if epoch == run.epoch else 0
            if start == 0 and epoch % cfg.regroup_every == 0:
                regroup(run, epoch)                                  # per-epoch k-means over the memory bank
            sampler.set_epoch(epoch, start)                          # resumes mid-epoch at the exact batch
            code = train_one_epoch(run, iter(dl), epoch, start, sigterm)
            if code is not None:
                return code                                          # SIGTERM (0) or a non-finite loss (3)
            end_of_epoch(run, epoch, train_plain, test_ds, n_classes)
    return pretrain_eval.final_evaluation(run, train_raw, train_plain, test_ds, n_classes)


# ----------------------------------------------------------------------------------------------
# the epoch loop


def regroup(run: Run, epoch: int) -> None:
    """Re-cluster the groups of every head from the memory bank (spherical k-means, identical on all
    ranks), then reset the momentum network to the online one."""
    cfg, t0 = run.cfg, time.time()
    run.model.regroup(run.bank.local, cfg.kmeans_iters,
                      generator=torch.Generator().manual_seed(item_seed(cfg.seed, epoch, 1 << 40)))
    fault("die_in_regroup", epoch)
    if cfg.reset_momentum:
        run.model.reset_momentum()
    rank0_print(f"epoch {epoch}: regrouped {cfg.n_heads} x {cfg.n_groups} groups over the memory bank "
                f"({time.time() - t0:.1f}s)")


def train_one_epoch(run: Run, batches, epoch: int, start: int, sigterm) -> Optional[int]:
    """Steps start .. spe-1 of `epoch`. -> None, or the exit code when the run stops here: 0 after the
    SIGTERM checkpoint, 3 for a non-finite loss beyond --skip-nonfinite."""
    cfg, model = run.cfg, run.model
    attainable = min(1.0, 2 * cfg.batch_size / cfg.n_groups)                            # groups hit at most
    run.peak_hit = torch.full((), run.peak_hit if start else 0.0, device=run.device)  # exact float32 round trip
    meter = StepLog()
    for s in range(start, run.spe):
        step = epoch * run.spe + s
        fault("sigterm_at_step", step)
        crops, idx = next_step(batches, run, meter)                    # [(online crops, momentum crops)] x accum
        lr, beta, m = (float(run.sched[k][step]) for k in ("lr", "beta", "m"))
        for g in run.optimizer.param_groups:
            g["lr"] = lr
        undo = undo_point(model) if cfg.skip_nonfinite else None      # a skipped step must leave no trace
        model.momentum_step(m)                                          # (M1) EMA before the forward
        loss, stats, z = train_step(model, run.net, crops, beta, run.autocast, run.device, run.backward)
        if fault("nan_at_step", step):
            loss = loss * float("nan")
        loss_v, bad, term = step_flags(loss, sigterm.got, run)         # one all-reduce: a host sync point
        fault("die_at_step", step)
        if bad and not skip_nonfinite(run, step, epoch, undo):
            return 3
        if not bad:
            optimizer_step(run)
            with torch.no_grad():
                run.bank.write(torch.cat(idx), z)                       # this step's online global embeddings
        run.peak_hit = torch.maximum(run.peak_hit, stats["nonempty"].mean() / attainable)   # collapse guard
        run.step, run.epoch, run.step_in_epoch = step + 1, epoch, s + 1
        meter.step(run, step, s, loss_v, lr, beta, m, stats)
        if term:
            save(run, "SIGTERM")
            rank0_print("SIGTERM: checkpoint written, exiting")
            return 0
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and s + 1 < run.spe:
            save(run, f"every {cfg.save_every} steps")
    return None


def end_of_epoch(run: Run, epoch: int, train_plain, test_ds, n_classes: int) -> None:
    """kNN monitor, groups identical on all ranks, collapse guard, bad-image count, log record, checkpoint."""
    cfg = run.cfg
    rec = dict(type="epoch", epoch=epoch, step=(epoch + 1) * run.spe, peak_group_hit=run.peak_hit.item())
    if cfg.knn_every and test_ds is not None and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
        t0 = time.time()
        rec["knn_top1"], *run.knn_feats = pretrain_eval.knn_monitor(run.model.backbone, train_plain, test_ds,
                                                                    n_classes, cfg, run.device)
        run.knn.append([epoch, rec["knn_top1"]])
        rank0_print(f"epoch {epoch}: kNN top-1 {rec['knn_top1']:.2f}% (k={cfg.knn_k}, T={cfg.knn_t}, "
                    f"{time.time() - t0:.1f}s)")
    if run.world > 1:
        rec["groups_rank_max_diff"] = groups_rank_max_diff(run.model, epoch)
    if rec["peak_group_hit"] < cfg.collapse_threshold:
        rank0_print(f"warning: possible collapse: in epoch {epoch} no step hit more than "
                    f"{100 * rec['peak_group_hit']:.1f}% of the attainable groups (threshold "
                    f"{100 * cfg.collapse_threshold:.0f}%); try a lower --lr, a higher --tau, fewer "
                    f"--n-groups, a beta closer to 1 (--beta-end), or more warmup (--warmup-epochs)")
        rec["collapse_warning"] = True
    if cfg.bad_images == "skip" and run.rank == 0:
        skipped = os.path.join(cfg.out_dir, "skipped_images.txt")
        if os.path.exists(skipped):
            with open(skipped) as fh:
                rec["skipped_images"] = len(set(fh.read().split("\n")) - {""})
            rank0_print(f"skipped {rec['skipped_images']} unreadable images so far (listed in {skipped})")
    log(run, rec)
    run.epoch, run.step_in_epoch = epoch + 1, 0
    save(run, f"end of epoch {epoch}")


# ----------------------------------------------------------------------------------------------
# one step: the pieces the loop calls, in its order


def next_step(batches, run: Run, meter: StepLog) -> tuple:
    """The `accum` micro-batches of one step, on the device -> ([(online crops, momentum crops)], [indices])."""
    t0 = time.time()
    micro_batches, idx = [], []
    try:
        for _ in range(run.cfg.accum):
            on, mo, i = next(batches)
            micro_batches.append(([to_device(x, run.device, run.cfg) for x in on],
                                  [to_device(x, run.device, run.cfg) for x in mo]))
            idx.append(i.to(run.device))
    except data.BadImageError as e:
        reraise_data_error(e)
    meter.wait += time.time() - t0
    return micro_batches, idx


def undo_point(model: smog.SMoG) -> restore_buffers:
    """Buffers (groups, BN statistics) and the momentum network as they are now; __exit__ puts them back."""
    saved = restore_buffers([*model.buffers(), *model.momentum_backbone.parameters(),
                             *model.momentum_projector.parameters()])
    saved.__enter__()
    return saved


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
        p = m.online_forward(online)[1]                                                # (C*b, D)
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
                zt = model.momentum_embed(mo)[:2 * b]
                states.append(_rng_get(device))                                    # replayed in pass 2
                z = model.update_embed(on)                                             # BN over all crops, as in pass 2
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
    return total, smog.target_stats(targets, model.cfg.n_groups), z_all


def step_flags(loss: torch.Tensor, sigterm_got: bool, run: Run) -> tuple:
    """One small all-reduce per step -> (mean loss over ranks, non-finite on any rank, SIGTERM on any rank)."""
    flags = torch.stack([loss.float(), (~torch.isfinite(loss)).float(),
                         torch.tensor(float(sigterm_got), device=run.device)])
    if smog.dist_ready():
        dist.all_reduce(flags)
    return flags[0].item() / run.world, flags[1].item() > 0, flags[2].item() > 0


def skip_nonfinite(run: Run, step: int, epoch: int, undo: Optional[restore_buffers]) -> bool:
    """The non-finite-loss policy -> True: the step was skipped (gradients dropped; groups, BN statistics and
    momentum network restored); False: the run stops (one line on stderr naming the last good checkpoint)."""
    run.optimizer.zero_grad(set_to_none=True)
    if run.skipped_nonfinite >= run.cfg.skip_nonfinite:
        last = run.last_ck or "none (no checkpoint was written yet)"
        print(f"error: non-finite loss at step {step} (epoch {epoch}); stopped without saving; "
              f"last good checkpoint: {last}; lower --lr or use --skip-nonfinite N", file=sys.stderr)
        return False
    undo.__exit__()
    run.skipped_nonfinite += 1
    rank0_print(f"warning: non-finite loss at step {step}, step skipped "
                f"({run.skipped_nonfinite}/{run.cfg.skip_nonfinite})")
    return True


def optimizer_step(run: Run) -> None:
    if run.cfg.clip_grad > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


class StepLog:
    """A log.jsonl record and a console line every --log-every steps and at the end of an epoch, with the
    throughput and the fraction of time spent waiting for data since the previous one."""

    def __init__(self):
        self.t, self.wait, self.imgs = time.time(), 0.0, 0

    def step(self, run: Run, step: int, s: int, loss_v: float, lr: float, beta: float, m: float, stats: dict):
        self.imgs += run.cfg.batch_size
        if step % run.cfg.log_every == 0 or s == run.spe - 1:
            dt = time.time() - self.t
            rec = dict(type="step", step=step, epoch=run.epoch, loss=loss_v, lr=lr, beta=beta, m=m,
                       nonempty=stats["nonempty"].mean().item(), entropy=stats["entropy"].mean().item(),
                       img_s=self.imgs / max(dt, 1e-9), data_frac=self.wait / max(dt, 1e-9), time=time.time())
            log(run, rec)
            rank0_print(f"epoch {run.epoch} step {step}/{run.total_steps} loss {loss_v:.4f} lr {lr:.4g} beta "
                        f"{beta:.4f} m {m:.4f} img/s {rec['img_s']:.0f} data {100 * rec['data_frac']:.0f}% nonempty "
                        f"{rec['nonempty']:.2f} entropy {rec['entropy']:.2f} (ln K {math.log(run.cfg.n_groups):.2f})")
            self.t, self.wait, self.imgs = time.time(), 0.0, 0


def groups_rank_max_diff(model: smog.SMoG, epoch: int) -> float:
    """Group features must be identical on every rank (the synchronous update); checked once per epoch."""
    g0 = model.groups.clone()
    dist.broadcast(g0, 0)
    diff = (model.groups - g0).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if diff.item() != 0:
        raise RuntimeError(f"group features differ across ranks by {diff.item()} (epoch {epoch}); the synchronous "
                           f"update is broken")
    return diff.item()


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
# building the model (data: batches.py; run state, resume or start, save: checkpoint.py)


def build_model(cfg: Config, rank: int, world: int, device) -> tuple:
    """-> (SMoG on the device, whether it uses SyncBN). Seeds first: identical initial weights on every rank."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    model = smog.SMoG(cfg.model_config())
    sync_bn = world > 1 and device.type == "cuda"
    if sync_bn:  # both networks: SMoG.forward runs them on the same global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if cfg.channels_last and cfg.arch != "swin_t":
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.backbone.compile()
        model.momentum_backbone.compile()
    return model, sync_bn


if __name__ == "__main__":
    smog.exit_process(main())
