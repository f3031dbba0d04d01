"""train.py's configuration: one block of defaults (the released ResNet-50 ImageNet recipe), the named
presets that override it, the command line, and the checks of the values. Precedence:
defaults < --preset (or --config FILE) < options given on the command line. A --config file goes
through the same checks as the command line: unknown keys and wrong types are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Sequence

import smog
from smog_train import data
from smog_train.backbones import ARCHS


class UsageError(ValueError):
    """Bad input: printed as one line 'error: ...', exit code 2, nothing written."""


def error_line(e: Exception) -> str:
    """The one line printed for a bad-input error: its message. An exception re-raised out of a
    DataLoader worker carries the worker's traceback ("Caught BadImageError in DataLoader worker
    process 0. ... smog_train.data.BadImageError: msg"): its last line, without the exception name."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if lines[0].startswith("Caught ") and len(lines) > 1:
        return lines[-1].split("Error: ", 1)[-1]
    return lines[0]


# ------------------------------------------------------------------------------------------------
# the defaults; presets override them; the command line overrides both


def opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    preset: str = opt("demo", "named recipe applied on top of these defaults (see the list below)")
    config: str = opt(
        "", "start from this config.json (a previous run's resolved config) instead of a preset"
    )
    # data
    data: str = opt(
        "demo",
        "demo | imagefolder:PATH (PATH/train/<class>/*, optional PATH/val) | cifar10 | cifar100 | stl10",
    )
    data_root: str = opt("data", "where cifar10/cifar100/stl10 live or are downloaded to")
    download: bool = opt(False, "download cifar10/cifar100/stl10 into --data-root if missing")
    bad_images: str = opt(
        "fail",
        "unreadable image in an image folder: fail (naming the file) or skip (logged once, counted)",
    )
    out_dir: str = opt("", "checkpoint.pth, config.json, log.jsonl go here (default runs/<preset>)")
    resume: str = opt(
        "", "checkpoint to resume from (default: out_dir/checkpoint.pth if it exists)"
    )
    # model (smog.SMoGConfig)
    arch: str = opt("resnet50", "backbone: " + ", ".join(ARCHS))
    width: int = opt(32, "smallcnn base width")
    cifar_stem: bool = opt(False, "ResNet 3x3 stride-1 stem without max-pool, for small images")
    dim: int = opt(
        128, "D, projector/predictor output and group-feature dimension (256 for Swin-T)"
    )
    hidden_dim: int = opt(2048, "projector/predictor hidden width")
    n_groups: int = opt(3000, "K, group features per head")
    n_heads: int = opt(3, "H, heads of K groups each")
    tau: float = opt(0.1, "temperature of the group logits")
    group_grad: bool = opt(
        False,
        "let gradient flow through the (1-beta) mean term of the group update (authors' README)",
    )
    drop_path: float = opt(0.0, "stochastic depth of the online Swin")
    # views (METHOD.md, "Recipes": 2 global + n_local local crops per augmentation set)
    image_size: int = opt(
        0, "global crop size (0: the dataset's, 224 ImageNet, 96 STL, 32 CIFAR/demo)"
    )
    local_size: int = opt(0, "local crop size (0: image_size * 96/224)")
    n_local: int = opt(4, "local crops per image in each augmentation set (online and momentum)")
    global_scale_min: float = opt(0.2, "RandomResizedCrop scale range of global crops: min")
    global_scale_max: float = opt(1.0, "... max")
    local_scale_min: float = opt(0.05, "RandomResizedCrop scale range of local crops: min")
    local_scale_max: float = opt(0.2, "... max")
    blur_scale: float = opt(
        1.0, "Gaussian blur radius range 0.1-2.0 times this (use image_size/224 for small images)"
    )
    augment: str = opt(
        "auto",
        "how crops are made: tensor (a whole batch at once with tensor "
        "ops: datasets held as one array, and image folders, whose JPEGs "
        "are decoded per batch -- nvJPEG on a GPU, in the loader workers "
        "on a CPU-only run) | pil (decode, then crop by crop with "
        "torchvision's PIL ops, in the workers) | auto (tensor: faster on "
        "the CPU for both kinds, measured in docs/BENCHMARKS.md). Same "
        "recipe, different pixels",
    )
    # optimisation
    epochs: int = opt(400, "training epochs")
    batch_size: int = opt(4096, "GLOBAL batch size (all ranks, all accumulation micro-batches)")
    accum: int = opt(
        1, "gradient accumulation micro-batches per step; the group update uses all of them"
    )
    optimizer: str = opt("lars", "lars (SGD momentum + LARS trust ratio) | sgd | adamw")
    lr: float = opt(
        4.8, "peak learning rate at --lr-batch; the run uses lr * batch_size / lr_batch"
    )
    lr_batch: int = opt(4096, "the batch size --lr refers to (linear scaling)")
    min_lr_ratio: float = opt(0.001, "cosine ends at this fraction of the peak lr")
    warmup_epochs: float = opt(10.0, "linear warmup epochs")
    warmup_lr_ratio: float = opt(
        0.01 / 4.8, "warmup starts at this fraction of the peak lr (released R50: from 0.01 to 4.8)"
    )
    weight_decay: float = opt(
        1e-6,
        "lars: on every parameter (released); sgd/adamw: not on biases, norm weights, Swin rel. pos. bias",
    )
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
    reset_momentum: bool = opt(
        True, "reset the momentum network to the online one at every regroup"
    )
    # system
    device: str = opt("auto", "auto (cuda if available) | cpu | cuda")
    precision: str = opt(
        "auto", "auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (with a GradScaler)"
    )
    channels_last: bool = opt(
        True,
        "channels_last memory format for CNNs, CUDA and CPU (joint BN's pixel rows "
        "are then free views)",
    )
    compile: bool = opt(False, "torch.compile the backbones")
    sync_bn: bool = opt(
        True,
        "several processes: BatchNorm statistics over the samples of all "
        "ranks (CUDA: torch's SyncBatchNorm; CPU/gloo: the same reduction, "
        "smog_train/sync_bn.py); --no-sync-bn: each rank normalises its own "
        "micro-batch, and results depend on the number of processes",
    )
    workers: int = opt(-1, "data loader workers per rank (-1: cores per rank - 1, at most 10)")
    threads: int = opt(
        0, "torch intra-op threads per rank (0: cores per rank minus workers, at least 1)"
    )
    dist_timeout: float = opt(
        10.0,
        "minutes a collective (all-reduce, barrier) may wait for the other "
        "ranks before the job stops with a line naming this flag (torchrun)",
    )
    seed: int = opt(0, "seed of the initial weights, sampler, augmentations and k-means")
    log_every: int = opt(50, "a log line every this many steps")
    save_every: int = opt(
        0, "also checkpoint every this many steps (0: end of epoch and SIGTERM only)"
    )
    knn_every: int = opt(1, "kNN monitor on the held-out split every this many epochs (0: off)")
    knn_k: int = opt(20, "kNN neighbours")
    knn_t: float = opt(0.07, "kNN temperature")
    knn_max_train: int = opt(
        0, "kNN uses at most this many (evenly spaced) training images (0: all)"
    )
    collapse_threshold: float = opt(
        0.1,
        "warn if the fraction of groups hit per step (relative to the "
        "attainable min(1, 2B/K)) stays below this for a whole epoch",
    )
    skip_nonfinite: int = opt(
        0, "skip up to this many steps with a non-finite loss instead of stopping"
    )
    # demo table (final evaluation)
    final_eval: bool = opt(
        False,
        "after training: linear probes of raw pixels / random-init / SMoG / supervised "
        "(same backbone, same steps), table + out_dir/demo_results.json",
    )
    probe_epochs: int = opt(100, "final_eval: linear-probe epochs on cached features")
    probe_lr: float = opt(0.3, "final_eval: linear-probe learning rate")
    sup_lr: float = opt(
        0.1, "final_eval: supervised baseline SGD lr at batch 256 (scaled linearly, cosine)"
    )

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def model_config(self) -> smog.SMoGConfig:
        return smog.SMoGConfig.from_dict(asdict(self))


# lr values are quoted at lr_batch and scaled linearly to --batch-size
_R50 = dict(
    data="imagefolder:data/imagenet",
    arch="resnet50",
    epochs=400,
    batch_size=4096,
    optimizer="lars",
    lr=4.8,
    lr_batch=4096,
    save_every=1000,
    knn_max_train=65536,
    log_every=50,
)
PRESETS = {
    # the built-in dataset on 2 CPU cores in a few minutes: small CNN, 32 px, few groups, short run.
    # Plain SGD (no LARS): at batch 256 and a few hundred steps the trust ratio only slows the start.
    # no data workers, every core for torch: the crops of a batch are made with tensor ops (--augment) in
    # the training process, a fraction of the step (PIL crops would cost more than the step; bench.py crops).
    "demo": dict(
        data="demo",
        arch="smallcnn",
        width=16,
        dim=64,
        hidden_dim=512,
        n_groups=30,
        n_heads=3,
        image_size=32,
        local_size=16,
        n_local=2,
        global_scale_min=0.35,
        local_scale_min=0.1,
        local_scale_max=0.35,
        blur_scale=0.15,
        epochs=10,
        batch_size=256,
        optimizer="sgd",
        lr=1.0,
        lr_batch=256,
        warmup_epochs=1.0,
        warmup_lr_ratio=0.1,
        weight_decay=5e-4,
        beta_end=0.99,
        ema=0.99,
        log_every=10,
        final_eval=True,
        probe_epochs=100,
        sup_lr=0.1,
        workers=0,
    ),
    # CIFAR-10, ResNet-18 with the small-image stem, local crops scaled for 32 px, K as in Lightly's run
    "cifar10-r18": dict(
        data="cifar10",
        arch="resnet18",
        cifar_stem=True,
        n_groups=300,
        image_size=32,
        local_size=16,
        local_scale_min=0.1,
        local_scale_max=0.35,
        blur_scale=0.15,
        epochs=200,
        batch_size=512,
        optimizer="lars",
        lr=4.8,
        lr_batch=4096,
        weight_decay=1e-6,
        ema=0.99,
        log_every=20,
    ),
    "imagenet-r50": dict(_R50),
    "imagenet-r50w2": dict(_R50, arch="resnet50w2"),  # the released 2x ResNet-50 (4096-d)
    "imagenet-swin-t": dict(
        _R50,
        arch="swin_t",
        dim=256,
        optimizer="adamw",
        lr=1e-3,
        min_lr_ratio=0.04,
        warmup_lr_ratio=0.04,
        weight_decay=0.05,
        clip_grad=3.0,
        drop_path=0.2,
    ),
}

# fields that may change between a checkpoint and the resumed run (they do not change the result)
RUNTIME_FIELDS = {
    "config",
    "out_dir",
    "resume",
    "data_root",
    "download",
    "bad_images",
    "device",
    "workers",
    "threads",
    "dist_timeout",
    "compile",
    "log_every",
    "save_every",
    "knn_every",
    "knn_max_train",
    "collapse_threshold",
    "skip_nonfinite",
    "final_eval",
    "probe_epochs",
    "probe_lr",
    "sup_lr",
}


STEP_LINE = """\
the step line (every --log-every steps; log.jsonl holds the same fields):
  loss      the SMoG loss, mean over ranks
  lr        this step's learning rate (warmup, then cosine)
  beta      the groups' momentum: c <- normalise(beta c + (1 - beta) mean of its members)
  m         the momentum network's EMA coefficient (--ema)
  img/s     training images per second since the previous line
  data      the share of that time spent waiting for the next batch (high: the input limits the run)
  nonempty  the fraction of the K groups that some sample of the step is assigned to, mean over heads
  entropy   of the step's assignment histogram, mean over heads; ln K is every group used equally
  ETA       the steps left at this epoch's mean step time, evaluations not included
where the results go (--out-dir): checkpoint.pth, config.json (--config reads it back), log.jsonl,
and with --final-eval demo_results.json (the table printed at the end)"""


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
    lines += ["", STEP_LINE]
    ap = _Parser(
        prog="train.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"SMoG pretraining. Precedence: defaults < --preset (or --config) < options given. "
        f"A plain `python train.py` runs --preset {Config.preset}: each option shows "
        f"'{Config.preset}: VALUE' where that preset overrides the default. "
        f"Run under torchrun for data parallelism.",
        epilog="\n".join(lines),
        argument_default=argparse.SUPPRESS,
    )
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        plain = (
            f"; {Config.preset}: {demo[f.name]}" if demo.get(f.name, f.default) != f.default else ""
        )
        hlp = f"{f.metadata['help']} (default: {f.default}{plain})"
        if f.type in ("bool", bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, help=hlp)
        else:
            ap.add_argument(
                flag,
                type={"int": int, "float": float, "str": str}[str(f.type)],
                help=hlp,
                metavar=f.name.upper(),
            )
    return ap


def parse_config(argv: Optional[Sequence[str]] = None) -> Config:
    given = vars(build_parser().parse_args(argv))
    if given.get("config"):
        base = Config(**read_config_file(given["config"]))
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


RUN_ONLY_KEYS = {"model", "git"}  # written into a run's config.json, derived, not options


def read_config_file(path: str) -> dict:
    """--config FILE -> {field: value}, with the command line's rules: every key an option (the
    derived keys a run writes, RUN_ONLY_KEYS, are skipped), every value of the option's type."""
    if os.path.isdir(path):
        raise UsageError(
            f"--config {path!r} is a folder; pass a config.json file (a run's out_dir/config.json)"
        )
    try:
        with open(path) as fh:
            raw = json.load(fh)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read --config {path!r}: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UsageError(
            f"--config {path!r} holds a JSON {type(raw).__name__}, not an object of option: value"
        )
    types = {f.name: str(f.type) for f in fields(Config)}
    out = {}
    for key, value in raw.items():
        if key in RUN_ONLY_KEYS:
            continue
        if key not in types:
            raise UsageError(
                f"--config {path!r}: unknown key {key!r}; keys are the option names "
                f"with '_' for '-' (see python train.py -h)"
            )
        want = types[key]
        ok = {
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        }[want]
        if not ok:
            kind = {
                "int": "an integer",
                "float": "a number",
                "bool": "true or false",
                "str": "a string",
            }[want]
            raise UsageError(f"--config {path!r}: {key!r} must be {kind}, got {value!r}")
        out[key] = float(value) if want == "float" else value
    return out


def check_values(cfg: Config) -> None:
    """Config values that are wrong whatever the data (one message per problem, raised as UsageError)."""
    checks = [
        (cfg.arch in ARCHS, f"unknown architecture {cfg.arch!r}; choose one of {', '.join(ARCHS)}"),
        (
            0.0 <= cfg.beta_start <= 1.0 and 0.0 <= cfg.beta_end <= 1.0,
            f"--beta-start/--beta-end must be in [0, 1], got {cfg.beta_start}, {cfg.beta_end}",
        ),
        (0.0 <= cfg.ema <= 1.0, f"--ema must be in [0, 1], got {cfg.ema}"),
        (cfg.tau > 0, f"--tau must be > 0, got {cfg.tau}"),
        (
            cfg.lr >= 0 and cfg.lr_batch > 0,
            f"--lr must be >= 0 and --lr-batch > 0, got {cfg.lr}, {cfg.lr_batch}",
        ),
        (cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        (
            cfg.epochs >= 1 and cfg.batch_size >= 1 and cfg.accum >= 1,
            "--epochs, --batch-size and --accum must be positive",
        ),
        (
            cfg.n_groups >= 1 and cfg.n_heads >= 1 and cfg.dim >= 1,
            "--n-groups, --n-heads and --dim must be positive",
        ),
        (cfg.n_local >= 0, f"--n-local must be >= 0, got {cfg.n_local}"),
        (
            0 < cfg.global_scale_min <= cfg.global_scale_max <= 1
            and 0 < cfg.local_scale_min <= cfg.local_scale_max <= 1,
            "crop scales must satisfy 0 < min <= max <= 1",
        ),
        (
            cfg.optimizer in ("lars", "sgd", "adamw"),
            f"--optimizer must be lars, sgd or adamw, not {cfg.optimizer!r}",
        ),
        (
            cfg.ema_schedule in ("const", "cosine"),
            f"--ema-schedule must be const or cosine, not {cfg.ema_schedule!r}",
        ),
        (
            cfg.precision in ("auto", "fp32", "bf16", "fp16"),
            "--precision must be auto, fp32, bf16 or fp16",
        ),
        (cfg.dist_timeout > 0, f"--dist-timeout must be > 0 minutes, got {cfg.dist_timeout}"),
        (
            cfg.bad_images in ("fail", "skip"),
            f"--bad-images must be fail or skip, not {cfg.bad_images!r}",
        ),
        (
            cfg.regroup_every >= 1 and cfg.kmeans_iters >= 0,
            "--regroup-every must be >= 1 and --kmeans-iters >= 0",
        ),
        (
            cfg.log_every >= 1 and cfg.save_every >= 0 and cfg.knn_every >= 0,
            "--log-every must be >= 1, --save-every and --knn-every >= 0",
        ),
        (
            not (cfg.group_grad and cfg.accum > 1),
            "--group-grad needs the group update in the graph of every "
            "micro-batch; it cannot be combined with --accum > 1",
        ),
        (cfg.image_size >= 8 and cfg.local_size >= 8, "--image-size and --local-size must be >= 8"),
        (
            cfg.augment in ("auto", "tensor", "pil"),
            f"--augment must be auto, tensor or pil, not {cfg.augment!r}",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)
