"""bench.py -- how close is a SMoG step to the cost of its networks, and how far ahead of naive grouping?

    python tools/bench.py --preset cpu-small     # demo model, 1 thread: 1:59 idle, 2-vCPU EPYC (docs/BENCHMARKS.md)
    python tools/bench.py --preset r50-224       # ResNet-50, 2x224 + 4x96, batch 256, bf16, channels_last (GPU)
    python tools/bench.py --smoke                # seconds; CI checks that every section runs (no timing claims)

Everything is measured in one process on one device; every figure is the median of repeated runs after
warm-up (CUDA timed with events). Sections (`--sections`):
  step     1. ideal step: the same networks, crops, optimiser and momentum EMA as a SMoG step, with the
              grouping replaced by fixed groups -- one assignment matmul + argmax for all heads and the
              cross-entropy; no update, no k-means (`ideal_loss`). Checked to equal SMoG.forward's loss
              at beta = 1 (where the update is the identity) before anything is timed.
           2. full step: SMoG.forward + backward + optimiser + momentum EMA (`model.momentum_step`).
              Ideal and full steps alternate A B B A A B ..., so drift on a shared machine hits both
              alike; `step_ratio` = the median over adjacent (ideal, full) pairs of full / ideal, with a
              bootstrap 95% interval; the ratio of the two medians is reported beside it (it is the
              same quantity, but load that shifts between runs moves it far more on a shared machine).
              A low-noise cross-check: the extra ms of the full step with stub backbones.
  jointbn     one BatchNorm across crop sizes (the released ResNet recipe, backbones.encode_crops) against
              one backbone pass per size: forward + backward, the preset's backbone and resnet18;
              `joint_bn_ratio[arch]` = median over interleaved pairs of joint / per-size.
  update   3. smog.update_groups against `update_groups_loop` (a Python loop over the groups hit, the
              style of existing implementations), K in {300, 3000} x N in {512, 4096}, D = 128; the two
              are checked to agree before timing. `update_speedup["K=..,N=.."]` = loop / vectorised.
  kmeans   4. smog.spherical_kmeans, D = 128, K = 3000, 10 iterations, N = 65,536 (and 1,281,167 on the
              r50-224 preset); plus the preset's own regroup (H heads over its dataset size) as a share
              of an epoch of full steps.
  input    5. train.py's whole input path, images/s with the preset's workers: PIL (--augment
              pil: decode and crop by crop in the workers) against the tensor path (--augment
              tensor: workers read bytes, each batch is decoded -- nvJPEG on a GPU -- and cropped
              on the device; on a CPU in the workers), interleaved rounds, on a generated folder
              of ImageNet-like JPEGs (500x375 ..., quality 90; --data jpeg-folder, or any data.py
              spec); both against the full step's images/s (starved?). `--write-jpegs DIR --jpegs
              N` writes such a folder (DIR/train/<class>/*.jpg) for train.py.
  crops       one batch of views made by data.ViewsDataset both ways, in this process, interleaved: crop by crop
              with PIL, and all at once with tensor ops (`--augment tensor`, batch_augment.py) on the images of the
              demo (held as one array); `crops_speedup` = median over pairs of PIL / tensor time.
Output: a table on stdout and every figure in `--out` (bench.json): device name, torch version, the
config and the command, and the top-level keys `step_ratio`, `joint_bn_ratio` and `update_speedup`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # a checkout, not installed
import smog
from smog_train import backbones

try:
    import resource
except ImportError:  # not on Windows
    resource = None

# ----------------------------------------------------------------------------------------------
# defaults (the cpu-small preset) -- every field is also a command-line flag


@dataclass
class BenchConfig:
    preset: str = "cpu-small"
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    threads: int = 1  # torch intra-op threads; 0 keeps torch's default
    malloc_top_pad_mb: int = (
        0  # >0: glibc mallopt(M_TOP_PAD) before anything runs (see docs/BENCHMARKS.md)
    )
    sections: str = "step,jointbn,update,kmeans,input,crops"
    out: str = "bench.json"
    profile: bool = False  # torch.profiler tables of both steps after the timed runs
    # model, crops and optimiser of the step (smog.SMoGConfig fields + the crops)
    arch: str = "smallcnn"
    width: int = 32  # smallcnn base width
    cifar_stem: bool = False
    dim: int = 64
    hidden_dim: int = 512
    n_groups: int = 60  # K of the model (the update and k-means sections sweep their own K)
    n_heads: int = 3
    tau: float = 0.1
    batch: int = 128  # per device
    global_px: int = 32
    local_px: int = 16
    n_local: int = 2
    amp: str = "none"  # none | bf16 (autocast; grouping and logits stay fp32 inside smog.py)
    channels_last: bool = False
    optimizer: str = (
        "sgd"  # sgd (torch, momentum 0.9: train.py's demo) | lars (train.LARS: the R50 recipe)
    )
    lr: float = 0.3  # the same optimiser and values for both steps
    weight_decay: float = 5e-4  # not on biases and norm weights (as train.py)
    ema: float = 0.999  # momentum-network EMA m
    beta: float = 0.99  # group momentum of the full step
    step_warmup: int = 3  # untimed steps of each kind
    step_pairs: int = 16  # timed (ideal, full) pairs
    # joint BN
    jointbn_archs: str = (
        "arch"  # backbones of the jointbn section, comma-separated; "arch" = --arch
    )
    jointbn_batch: int = 0  # per crop; 0 = --batch
    jointbn_budget_s: float = 15.0  # per backbone: no new timed pair after this (at least 4 pairs)
    # group update
    update_k: tuple = (300, 3000)
    update_n: tuple = (512, 4096)
    update_d: int = 128
    update_repeats: int = (
        15  # timed runs of each implementation (fewer if update_budget_s runs out)
    )
    update_budget_s: float = 2.0  # per implementation and size
    # regrouping
    kmeans_k: int = 3000
    kmeans_n: tuple = (65536,)
    kmeans_iters: int = 10
    kmeans_repeats: int = 2
    data_size: int = 8000  # the preset's training set (data.py's demo: 8000), for the epoch share
    # input pipeline
    data: str = "jpeg-folder"  # input: jpeg-folder (write_jpeg_folder) or a data.py spec
    workers: int = -1  # DataLoader workers; -1 = cores - 1 (at least 1, at most 10), as train.py
    loader_batches: int = 6  # timed batches after the first one (worker start-up is not timed)
    jpegs: int = 0  # generated JPEGs; 0: batch x (loader_batches + 2)
    input_pairs: int = 2  # input: interleaved (PIL, tensor) rounds of loader_batches
    crop_pairs: int = 5  # crops section: timed (PIL, tensor) pairs of one batch each


PRESETS = {
    # train.py's demo model (smallcnn, D=64, K=60, H=3, 2x32 + 2x16 px crops, SGD) at half the demo's batch, with
    # 16 interleaved step pairs, 2 k-means repeats and 6 loader batches per round, so that the whole run takes about
    # 2 minutes on an idle 2-core machine (docs/BENCHMARKS.md). One intra-op thread (docs/BENCHMARKS.md: on a shared
    # 2-core machine two threads were 2-3x slower and far noisier); the other core loads data. Its jointbn section
    # times the demo backbone only (ResNet-18 at batch 128 on one thread would take several minutes more);
    # add it with `--sections jointbn --jointbn-archs arch,resnet18 --batch 32` (docs/BENCHMARKS.md).
    "cpu-small": {},
    "r50-224": dict(
        threads=0,
        arch="resnet50",
        dim=128,
        hidden_dim=2048,
        n_groups=3000,
        n_heads=3,
        batch=256,
        global_px=224,
        local_px=96,
        n_local=4,
        amp="bf16",
        channels_last=True,
        optimizer="lars",
        lr=0.3,
        weight_decay=1e-6,
        step_warmup=5,
        step_pairs=20,
        update_repeats=50,
        kmeans_n=(65536, 1281167),
        kmeans_repeats=5,
        data_size=1281167,
        loader_batches=20,
        jointbn_archs="arch,resnet18",
        jointbn_budget_s=60.0,
    ),
    "smoke": dict(
        width=8,
        dim=32,
        hidden_dim=64,
        n_groups=64,
        n_heads=2,
        batch=8,
        global_px=16,
        local_px=8,
        n_local=2,
        step_warmup=1,
        step_pairs=2,
        update_repeats=1,
        update_budget_s=0.0,
        kmeans_k=128,
        kmeans_n=(2048,),
        kmeans_iters=2,
        kmeans_repeats=1,
        data_size=512,
        workers=0,
        loader_batches=2,
        input_pairs=1,
        crop_pairs=1,
        jointbn_archs="arch,resnet18",
        out="runs/bench-smoke.json",
    ),
}

# the targets bench.py checks, per device type
TARGETS = {
    "cpu": {"step_ratio_max": 1.05, "update_speedup_min": 20.0},
    "cuda": {"step_ratio_max": 1.03, "update_speedup_min": 100.0, "kmeans_1281167_max_s": 1.0},
}
SPEEDUP_KEY = "K=3000,N=4096"


def parse_args(argv=None) -> BenchConfig:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (= --preset smoke)")
    ap.add_argument(
        "--write-jpegs",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="only write --jpegs N ImageNet-like JPEGs to DIR/train/<class>/ "
        "(for train.py) and exit",
    )
    for f in fields(BenchConfig):
        flag = "--" + f.name.replace("_", "-")
        presets = [f"cpu-small: {f.default}"] + [
            f"{p}: {v[f.name]}" for p, v in PRESETS.items() if f.name in v
        ]
        kw = {"default": argparse.SUPPRESS, "help": ", ".join(presets)}
        if f.type == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.type == "tuple":
            ap.add_argument(flag, nargs="+", type=int, **kw)
        else:
            ap.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), **kw)
    ns = vars(ap.parse_args(argv))
    write = ns.pop("write_jpegs", None)
    preset = "smoke" if ns.pop("smoke") else ns.get("preset", BenchConfig.preset)
    if preset not in PRESETS:
        ap.error(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    vals = {**PRESETS[preset], **{k: tuple(v) if isinstance(v, list) else v for k, v in ns.items()}}
    cfg = BenchConfig(**{**vals, "preset": preset})
    cfg.write_jpegs = write
    return cfg


# ----------------------------------------------------------------------------------------------
# the machine, and timing


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(dev: torch.device) -> dict:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=here,
            timeout=5,
        ).stdout.strip()
        if (
            rev
            and subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                cwd=here,
                timeout=5,
            ).stdout.strip()
        ):
            rev += "+uncommitted changes"
    except (OSError, subprocess.SubprocessError):
        rev = ""
    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:
        tv = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "device": dev.type,
        "cpu_model": cpu_model(),
        "cpu_cores": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": tv,
        "python": platform.python_version(),
        "git_rev": rev or None,
    }
    if dev.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = (
            f"{info['cpu_model']} ({cores} cores, {info['torch_threads']} torch threads)"
        )
    return info


class Clock:
    """Milliseconds of one call of fn: CUDA events on a GPU (the stream's span, host gaps included),
    perf_counter on the CPU."""

    def __init__(self, dev: torch.device):
        self.cuda = dev.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, fn: Callable, inner: int = 1) -> float:
        return self.time(fn, inner)[0]

    def time(self, fn: Callable, inner: int = 1) -> tuple:
        """-> (wall ms, process CPU ms or None on CUDA) per call. On a shared CPU the process CPU time
        (all threads, time.process_time) does not count time spent descheduled, the wall clock does."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / inner, None
        t, c = time.perf_counter(), time.process_time()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t) * 1e3 / inner, (time.process_time() - c) * 1e3 / inner


def summary(xs) -> dict:
    """median, quartiles, min, n of a list of samples."""
    t = torch.tensor(xs, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {"median": q[1], "q1": q[0], "q3": q[2], "min": float(t.min()), "n": len(xs)}


def repeat(
    clock: Clock,
    fn: Callable,
    warmup: int,
    repeats: int,
    budget_s: float = math.inf,
    inner: int = 1,
) -> list:
    """warmup untimed calls, then `repeats` timed ones (at least 1, fewer if budget_s runs out after 3)."""
    for _ in range(warmup):
        fn()
    clock.sync()
    out, t0 = [], time.perf_counter()
    for i in range(max(1, repeats)):
        out.append(clock.ms(fn, inner))
        if i >= 2 and time.perf_counter() - t0 > budget_s:
            break
    return out


# ----------------------------------------------------------------------------------------------
# 1-2: ideal step and full step


def ideal_loss(model: smog.SMoG, online_crops, momentum_crops) -> torch.Tensor:
    """SMoG.forward's loss with the grouping replaced by the fixed groups in model.groups [H, K, D]:
    the same networks and crops, targets by one matmul + argmax over all heads, the same cross-entropy
    (every online crop against every target, mean over crops, targets, samples and heads). No update,
    no statistics. At beta = 1 the update is the identity and SMoG.forward returns this same loss."""
    C, J, B = len(online_crops), 2, online_crops[0].shape[0]
    H, K, D = model.groups.shape
    zt = model.momentum_embed(momentum_crops)[: J * B]  # (J*B, D): targets from the global crops
    p = model.online_forward(online_crops)[1]  # (C*B, D)
    with torch.autocast(p.device.type, enabled=False):
        g = model.groups.view(H * K, D)
        t = (F.normalize(zt.float(), dim=-1) @ g.T).view(J, B, H, K).argmax(-1)  # (J, B, H)
        logp = (
            (F.normalize(p.float(), dim=-1) @ g.T / model.cfg.tau).view(C, B, H, K).log_softmax(-1)
        )
        nll = -logp.gather(3, t.permute(1, 2, 0).unsqueeze(0).expand(C, B, H, J))  # (C, B, H, J)
    return nll.mean()


def build_optimizer(cfg: BenchConfig, model: smog.SMoG) -> torch.optim.Optimizer:
    """train.py's choices: SGD with weight decay only on weights with ndim > 1; LARS (the released recipe)
    over every parameter with weight decay on all."""
    train = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        groups = [
            dict(params=[p for p in train if p.ndim > 1], weight_decay=cfg.weight_decay),
            dict(params=[p for p in train if p.ndim <= 1], weight_decay=0.0),
        ]
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    if cfg.optimizer == "lars":
        from train import LARS  # the entry point's optimiser, benchmarked as train.py runs it

        return LARS(train, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise ValueError(f"--optimizer must be sgd or lars, not {cfg.optimizer!r}")


class PooledPixels(torch.nn.Module):
    """Stand-in backbone for the overhead measurement: mean colour -> Linear -> [B, feat_dim]; almost free."""

    def __init__(self, feat_dim: int):
        super().__init__()
        self.fc = torch.nn.Linear(3, feat_dim)

    def forward(self, x):
        return self.fc(x.float().mean(dim=(2, 3)))


def build_step(cfg: BenchConfig, dev: torch.device, stub_backbone: bool = False):
    """-> (model, {"ideal": fn, "full": fn}, online crops, momentum crops, autocast factory).
    stub_backbone: both backbones replaced by PooledPixels, so the two steps differ only by the grouping
    and its difference in ms can be measured without the backbone's noise."""
    torch.manual_seed(0)
    mcfg = smog.SMoGConfig(
        arch=cfg.arch,
        width=cfg.width,
        cifar_stem=cfg.cifar_stem,
        dim=cfg.dim,
        hidden_dim=cfg.hidden_dim,
        n_groups=cfg.n_groups,
        n_heads=cfg.n_heads,
        tau=cfg.tau,
    )
    model = backbones.build_smog(mcfg)
    if stub_backbone:
        model.backbone, model.momentum_backbone = (
            PooledPixels(model.feat_dim),
            PooledPixels(model.feat_dim),
        )
        model.momentum_backbone.requires_grad_(False)
        model.reset_momentum()
    model = model.to(dev).train()
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    if cfg.channels_last:
        model = model.to(memory_format=fmt)
    opt = build_optimizer(cfg, model)
    g = torch.Generator().manual_seed(1)

    def crops(n, px):  # fixed random crops: the input pipeline is measured on its own (section 5)
        return [
            torch.randn(cfg.batch, 3, px, px, generator=g).to(dev).contiguous(memory_format=fmt)
            for _ in range(n)
        ]

    online = crops(2, cfg.global_px) + crops(cfg.n_local, cfg.local_px)
    momentum = crops(2, cfg.global_px) + crops(
        cfg.n_local, cfg.local_px
    )  # both sets: 2 global + n_local
    if cfg.amp not in ("none", "bf16"):
        raise ValueError(f"--amp must be none or bf16, not {cfg.amp!r}")

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")

    def step(loss_fn):
        def run():
            model.momentum_step(cfg.ema)  # EMA before the forward, as in the released code
            with autocast():
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    steps = {
        "ideal": step(lambda: ideal_loss(model, online, momentum)),
        "full": step(lambda: model(online, momentum, cfg.beta)[0]),
    }
    return model, steps, online, momentum, autocast


def check_ideal_matches_full(model, online, momentum, autocast, rtol: float) -> dict:
    """At beta = 1 the update is the identity, so SMoG.forward's loss must equal ideal_loss's: the ideal
    step computes exactly the full step's loss minus the grouping. Raises if not."""
    with torch.no_grad(), autocast():
        li = float(ideal_loss(model, online, momentum))
        lf = float(model(online, momentum, 1.0)[0])
    rel = abs(lf - li) / max(abs(li), 1e-12)
    if not rel <= rtol:
        raise AssertionError(
            f"ideal_loss {li!r} != SMoG.forward loss {lf!r} at beta=1 (rel {rel:.2e} > {rtol})"
        )
    return {"ideal_loss": li, "full_loss": lf, "rel_diff": rel}


def bootstrap_median_ci(xs, n: int = 2000, seed: int = 0) -> list:
    t = torch.tensor(xs, dtype=torch.float64)
    idx = torch.randint(len(xs), (n, len(xs)), generator=torch.Generator().manual_seed(seed))
    meds = t[idx].median(dim=1).values
    return torch.quantile(meds, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()


def bench_step(cfg: BenchConfig, dev: torch.device, clock: Clock) -> dict:
    model, steps, online, momentum, autocast = build_step(cfg, dev)
    check = check_ideal_matches_full(
        model, online, momentum, autocast, 1e-2 if cfg.amp == "bf16" else 1e-4
    )
    for _ in range(cfg.step_warmup):
        steps["ideal"]()
        steps["full"]()
    clock.sync()
    ms, cpu = {"ideal": [], "full": []}, {"ideal": [], "full": []}
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    ru0 = resource.getrusage(resource.RUSAGE_SELF) if resource else None
    for i in range(cfg.step_pairs):  # A B, B A, A B, ...: drift hits both alike
        for name in ("ideal", "full") if i % 2 == 0 else ("full", "ideal"):
            w, c = clock.time(steps[name])
            ms[name].append(w)
            cpu[name].append(c)
    ratios = [f / i for f, i in zip(ms["full"], ms["ideal"])]
    ideal, full = summary(ms["ideal"]), summary(ms["full"])
    out = {
        "ideal_ms": ideal,
        "full_ms": full,
        "ratio": summary(ratios)["median"],
        "ratio_ci95": bootstrap_median_ci(ratios),
        "ratio_of_medians": full["median"] / ideal["median"],
        "ideal_images_per_s": cfg.batch * 1e3 / ideal["median"],
        "full_images_per_s": cfg.batch * 1e3 / full["median"],
        "crops": {
            "online": [2, cfg.global_px, cfg.n_local, cfg.local_px],
            "momentum": [2, cfg.global_px, cfg.n_local, cfg.local_px],
        },
        "beta1_check": check,
        "samples_ms": ms,
        "loadavg_1min": [load0, os.getloadavg()[0] if load0 is not None else None],
    }
    if ru0 is not None:  # user vs kernel time: page faults show up as sys
        ru1, n = resource.getrusage(resource.RUSAGE_SELF), 2 * cfg.step_pairs
        out["rusage_per_step"] = {
            "user_ms": (ru1.ru_utime - ru0.ru_utime) * 1e3 / n,
            "sys_ms": (ru1.ru_stime - ru0.ru_stime) * 1e3 / n,
            "minor_faults": (ru1.ru_minflt - ru0.ru_minflt) / n,
        }
    if not clock.cuda:  # process CPU time: a cross-check on a shared CPU
        ci, cf = summary(cpu["ideal"]), summary(cpu["full"])
        out["cpu_time"] = {
            "ideal_ms": ci,
            "full_ms": cf,
            "ratio": cf["median"] / ci["median"],
            "paired_ratio_ci95": bootstrap_median_ci(
                [f / i for f, i in zip(cpu["full"], cpu["ideal"])]
            ),
            "samples_ms": cpu,
        }
    if cfg.profile:
        out["profile"] = profile_steps(steps, clock, dev)
    del model, steps
    out["grouping_overhead"] = bench_overhead(cfg, dev, clock, ideal["median"])
    return out


def bench_overhead(cfg: BenchConfig, dev: torch.device, clock: Clock, ideal_ms: float) -> dict:
    """The full step's extra cost over the ideal one, measured where it is not buried in backbone noise:
    the same steps with stub backbones (projector, predictor, crops, grouping, optimiser and EMA as
    before). extra_ms = median(full) - median(ideal) over interleaved pairs; implied ratio =
    1 + extra_ms / ideal step of the real model."""
    _, steps, *_ = build_step(cfg, dev, stub_backbone=True)
    for _ in range(3):
        steps["ideal"]()
        steps["full"]()
    clock.sync()
    ms = {"ideal": [], "full": []}
    t0 = time.perf_counter()
    for i in range(max(4, 4 * cfg.step_pairs)):
        for name in ("ideal", "full") if i % 2 == 0 else ("full", "ideal"):
            ms[name].append(clock.ms(steps[name]))
        if time.perf_counter() - t0 > 10 and i >= 20:
            break
    ideal, full = summary(ms["ideal"]), summary(ms["full"])
    extra = summary([f - i for f, i in zip(ms["full"], ms["ideal"])])["median"]
    return {
        "stub_ideal_ms": ideal,
        "stub_full_ms": full,
        "extra_ms": extra,
        "implied_ratio": 1 + extra / ideal_ms,
    }


def bench_joint_bn(cfg: BenchConfig, dev: torch.device, clock: Clock) -> list:
    """Cost of one BatchNorm across crop sizes: forward + backward of backbones.encode_crops (joint BN, training
    mode) against one plain net() call per crop size (separate BN statistics, what SwAV does), on the
    preset's crops (2 global + n_local local, batch cfg.jointbn_batch or cfg.batch), for the backbones in
    cfg.jointbn_archs ("arch" = cfg.arch; ResNets get the 3x3 stem below 64 px). Interleaved pairs, at most
    cfg.step_pairs, none started after cfg.jointbn_budget_s (but at least 4); `ratio` = median over pairs of
    joint / separate."""
    out = []
    batch = cfg.jointbn_batch or cfg.batch
    archs = [
        cfg.arch if a.strip() == "arch" else a.strip()
        for a in cfg.jointbn_archs.split(",")
        if a.strip()
    ]
    for arch in dict.fromkeys(archs):
        torch.manual_seed(0)
        net, _ = backbones.build_backbone(
            arch, width=cfg.width, cifar_stem=arch.startswith("resnet") and cfg.global_px <= 64
        )
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        net = net.to(dev, memory_format=fmt).train()
        g = torch.Generator().manual_seed(1)
        sizes = [cfg.global_px] * 2 + [cfg.local_px] * cfg.n_local
        crops = [
            torch.randn(batch, 3, px, px, generator=g).to(dev).contiguous(memory_format=fmt)
            for px in sizes
        ]
        per_size = (
            [torch.cat(crops[:2]), torch.cat(crops[2:])] if cfg.n_local else [torch.cat(crops)]
        )

        def autocast():
            return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")

        def joint():
            with autocast():
                y = backbones.encode_crops(net, crops)
            y.float().square().mean().backward()

        def separate():
            with autocast():
                y = torch.cat([net(x) for x in per_size])
            y.float().square().mean().backward()

        fns = {"joint": joint, "separate": separate}
        for _ in range(max(1, cfg.step_warmup)):
            joint()
            separate()
        clock.sync()
        ms = {"joint": [], "separate": []}
        t0 = time.perf_counter()
        for i in range(cfg.step_pairs):
            for name in ("joint", "separate") if i % 2 == 0 else ("separate", "joint"):
                ms[name].append(clock.ms(fns[name]))
            if time.perf_counter() - t0 > cfg.jointbn_budget_s and i >= 3:
                break
        ratios = [j / s for j, s in zip(ms["joint"], ms["separate"])]
        out.append(
            {
                "arch": arch,
                "batch": batch,
                "crops": [2, cfg.global_px, cfg.n_local, cfg.local_px],
                "joint_ms": summary(ms["joint"]),
                "separate_ms": summary(ms["separate"]),
                "ratio": summary(ratios)["median"],
                "ratio_ci95": bootstrap_median_ci(ratios),
            }
        )
        net.zero_grad(set_to_none=True)
    return out


def profile_steps(steps: dict, clock: Clock, dev: torch.device, n: int = 3, top: int = 25) -> dict:
    """torch.profiler over n steps of each kind; prints the tables, returns the top ops (self ms / step)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    res = {}
    for name, fn in steps.items():
        with profile(activities=acts) as prof:
            for _ in range(n):
                fn()
            clock.sync()
        ka = prof.key_averages()
        print(f"\n--- profile: {name} step, {n} steps, sorted by {key} ---")
        print(ka.table(sort_by=key, row_limit=top))
        rows = sorted(ka, key=lambda e: getattr(e, key), reverse=True)[:top]
        res[name] = [
            {
                "op": e.key,
                "calls_per_step": e.count / n,
                "self_ms_per_step": getattr(e, key) / 1e3 / n,
            }
            for e in rows
        ]
    return res


# ----------------------------------------------------------------------------------------------
# 3: the group update, vectorised vs a Python loop over the groups hit


def update_groups_loop(
    groups: torch.Tensor, z: torch.Tensor, assign: torch.Tensor, beta
) -> torch.Tensor:
    """The naive update of existing implementations: for each group hit, mask its members, average,
    mix, normalise. One host sync (unique -> list) plus a handful of small ops per group hit."""
    dt = torch.promote_types(groups.dtype, torch.float32)
    zn = F.normalize(z.to(dt), dim=-1)
    g = groups.to(dt)
    new = g.clone()
    for k in torch.unique(assign).tolist():
        v = beta * g[k] + (1 - beta) * zn[assign == k].mean(0)
        new[k] = v / v.norm().clamp_min(1e-12)
    return new.to(groups.dtype)


def check_update_agreement(
    vectorised: torch.Tensor, loop: torch.Tensor, atol: float = 2e-5
) -> float:
    """max |vectorised - loop|; raises AssertionError if over atol (or shapes differ)."""
    if vectorised.shape != loop.shape:
        raise AssertionError(
            f"update shapes differ: {tuple(vectorised.shape)} vs {tuple(loop.shape)}"
        )
    diff = float((vectorised.double() - loop.double()).abs().max()) if loop.numel() else 0.0
    if not diff <= atol:
        raise AssertionError(
            f"smog.update_groups and the loop reference disagree: max abs diff {diff:.3e} > {atol}"
        )
    return diff


def update_inputs(k: int, n: int, d: int, dev: torch.device, seed: int = 0):
    """unit groups [K, D], features [N, D], assignment [N] to the nearest group (as in a step)."""
    g = torch.Generator().manual_seed(seed)
    groups = F.normalize(torch.randn(k, d, generator=g), dim=-1).to(dev)
    z = torch.randn(n, d, generator=g).to(dev)
    return groups, z, smog.assign_groups(z, groups)


def bench_update(cfg: BenchConfig, dev: torch.device, clock: Clock) -> list:
    rows, beta = [], 0.5  # a large step so that a wrong update cannot hide in the agreement check
    inner = 10 if clock.cuda else 1
    for k in cfg.update_k:
        for n in cfg.update_n:
            groups, z, a = update_inputs(k, n, cfg.update_d, dev)
            vec = smog.update_groups(groups, z, a, beta)
            diff = check_update_agreement(vec, update_groups_loop(groups, z, a, beta))
            t_vec = repeat(
                clock,
                lambda: smog.update_groups(groups, z, a, beta),
                3,
                cfg.update_repeats,
                cfg.update_budget_s,
                inner,
            )
            t_loop = repeat(
                clock,
                lambda: update_groups_loop(groups, z, a, beta),
                1,
                cfg.update_repeats,
                cfg.update_budget_s,
            )
            lv, ll = summary(t_vec), summary(t_loop)
            rows.append(
                {
                    "K": k,
                    "N": n,
                    "D": cfg.update_d,
                    "groups_hit": int(torch.unique(a).numel()),
                    "vectorised_ms": lv,
                    "loop_ms": ll,
                    "speedup": ll["median"] / lv["median"],
                    "max_abs_diff": diff,
                    "agree": True,
                }
            )
    return rows


# ----------------------------------------------------------------------------------------------
# 4: regrouping


def bench_kmeans(cfg: BenchConfig, dev: torch.device, clock: Clock, sizes) -> list:
    """sizes: (N, K) pairs; random unit rows, D = 128 (the time does not depend on the data)."""
    rows = []
    for n, k in sizes:
        g = torch.Generator().manual_seed(n)
        x = F.normalize(torch.randn(n, 128, generator=g), dim=-1).to(dev)
        smog.spherical_kmeans(
            x[: max(2 * k, min(n, 8192))], k, 1, generator=torch.Generator().manual_seed(0)
        )
        gens = iter(range(1, 1 + cfg.kmeans_repeats))
        ms = repeat(
            clock,
            lambda: smog.spherical_kmeans(
                x, k, cfg.kmeans_iters, generator=torch.Generator().manual_seed(next(gens))
            ),
            0,
            cfg.kmeans_repeats,
        )
        s = summary([m / 1e3 for m in ms])
        rows.append({"N": n, "K": k, "D": 128, "iters": cfg.kmeans_iters, "seconds": s})
        x = None  # frees the rows before the next size's
    return rows


def epoch_share(cfg: BenchConfig, kmeans_s: float, step_ms: float) -> dict:
    """One regroup (H heads of k-means over the dataset) against one epoch of full steps."""
    steps = cfg.data_size // cfg.batch
    regroup = cfg.n_heads * kmeans_s
    epoch = steps * step_ms / 1e3 + regroup
    return {
        "data_size": cfg.data_size,
        "K": cfg.n_groups,
        "heads": cfg.n_heads,
        "steps_per_epoch": steps,
        "regroup_s": regroup,
        "epoch_s": epoch,
        "share": regroup / epoch,
    }


# ----------------------------------------------------------------------------------------------
# 5: input pipeline


JPEG_SIZES = (
    (500, 375),
    (375, 500),
    (500, 333),
    (333, 500),
    (500, 500),
    (500, 400),
    (640, 480),
    (400, 300),
)


def write_jpeg_folder(root: str, n: int, classes: int = 2, seed: int = 0) -> str:
    """An image folder of n ImageNet-like JPEGs (quality 90, sizes cycling over JPEG_SIZES, width x
    height, ImageNet's common shapes) at root/train/<class>/: smooth random pictures + pixel noise,
    about 80 kB a file -> root. Deterministic in (n, classes, seed)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for k in range(n):
        w, h = JPEG_SIZES[k % len(JPEG_SIZES)]
        d = os.path.join(root, "train", f"c{k % classes}")
        os.makedirs(d, exist_ok=True)
        img = F.interpolate(
            torch.rand(1, 3, 12, 16, generator=g), size=(h, w), mode="bicubic", align_corners=False
        )[0]
        img = (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(0, 1)
        pixels = (img * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(os.path.join(d, f"{k:06d}.jpg"), quality=90)
    return root


class AlternatingBatches(torch.utils.data.Sampler):
    """Shuffled batches of (index, online set, item seed) keys for data.ViewsDataset; the online set
    alternates A, B, A, ... per batch as the roles of the augmentation sets swap every iteration."""

    def __init__(self, n: int, batch: int, seed: int = 0):
        self.n, self.batch, self.seed = n, batch, seed

    def __len__(self):
        return self.n // self.batch

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        for b in range(len(self)):
            s = "AB"[b % 2]
            yield [
                (i, s, self.seed * self.n + i) for i in perm[b * self.batch : (b + 1) * self.batch]
            ]


def loader_images_per_s(ds, cfg: BenchConfig, dev: torch.device, workers: int) -> float:
    """Images/s of train.py's input path over ds: a DataLoader with its workers, the device's share
    (ViewsDataset.batches: decode + crops of an image folder on the device), crops on the device.
    The first batch (worker start-up) is not timed."""
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=AlternatingBatches(len(ds), cfg.batch),
        num_workers=workers,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
        collate_fn=ds.collate,
        prefetch_factor=4 if workers > 0 else None,
    )
    nb = min(cfg.loader_batches, len(loader) - 1)
    if nb < 1:
        raise ValueError(
            f"input section: {len(ds)} images make fewer than 2 batches of {cfg.batch}"
        )
    it = ds.batches(iter(loader), dev)
    next(it)
    t0 = time.perf_counter()
    for _ in range(nb):
        on, mo, _ = next(it)
        [c.to(dev, non_blocking=True) for c in on + mo]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del it
    return nb * cfg.batch / dt


def bench_input(cfg: BenchConfig, dev: torch.device, step_images_per_s: Optional[float]) -> dict:
    """train.py's whole input path, both ways, in interleaved rounds (pil, tensor, tensor, pil,
    ...): PIL (decode + crop by crop in the workers, --augment pil) and tensor (--augment tensor: on
    a GPU the workers read bytes, the batch is decoded with nvJPEG and cropped on the GPU; on a CPU
    the same operations in the workers). Source: a generated folder of ImageNet-like JPEGs (--data
    jpeg-folder; write_jpeg_folder), or any data.py spec."""
    import tempfile

    from smog_train import data

    views = data.MultiCropViews(
        cfg.global_px, cfg.local_px, cfg.n_local, blur_scale=cfg.global_px / 224
    )
    workers = max(1, min(10, len(os.sched_getaffinity(0)) - 1)) if cfg.workers < 0 else cfg.workers
    on_device = data.decode_on_device(dev, workers)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.data in ("jpeg-folder", "synthetic-jpeg"):
            n = cfg.jpegs or cfg.batch * (cfg.loader_batches + 2)
            base = data.build_dataset(f"imagefolder:{write_jpeg_folder(tmp, n)}", "train")
            source = (
                f"jpeg-folder: {n} generated JPEGs, quality 90, sizes {JPEG_SIZES[0][0]}x"
                f"{JPEG_SIZES[0][1]} ... (bench.write_jpeg_folder)"
            )
        else:
            base = data.build_dataset(cfg.data, "train", None)
            source = f"data.build_dataset({cfg.data!r})"
        ways = {
            "pil": data.ViewsDataset(base, views),
            "tensor": data.ViewsDataset(base, views, batched=True, decode_on_device=on_device),
        }
        ips = {"pil": [], "tensor": []}
        for r in range(max(1, cfg.input_pairs)):
            for way in ("pil", "tensor") if r % 2 == 0 else ("tensor", "pil"):
                ips[way].append(loader_images_per_s(ways[way], cfg, dev, workers))
        if dev.type == "cuda" and isinstance(base, data.ImageFolderDataset):
            res["nvjpeg_vs_libjpeg"] = decoder_agreement(base, dev)
    pil, ten = statistics.median(ips["pil"]), statistics.median(ips["tensor"])
    crops = 2 * (2 + cfg.n_local)
    st = step_images_per_s
    res.update(
        {
            "source": source,
            "workers": workers,
            "crops_per_image": crops,
            "decode_on_device": on_device,
            "batches": min(cfg.loader_batches, len(base) // cfg.batch - 1),
            "pil_images_per_s": pil,
            "tensor_images_per_s": ten,
            "samples": ips,
            "tensor_over_pil": statistics.median(t / p for p, t in zip(ips["pil"], ips["tensor"])),
            "images_per_s": ten,
            "crops_per_s": ten * crops,
            "step_images_per_s": st,
            "loader_over_step": ten / st if st else None,
            "pil_over_step": pil / st if st else None,
            "starved": (ten < st) if st else None,
        }
    )
    return res


def decoder_agreement(base, dev: torch.device, n: int = 256) -> dict:
    """The folder's first n JPEGs decoded by nvJPEG on `dev` and by libjpeg-turbo on the CPU (PIL's
    pixels there): the largest and mean absolute difference in grey levels, and the share of
    differing values."""
    from smog_train import decode

    blobs = [decode.read_bytes(p) for p, _ in base.samples[:n]]
    gpu = decode.decode_rgb(blobs, dev)
    cpu = decode.decode_rgb(blobs, torch.device("cpu"))
    d = torch.cat([(g.cpu().int() - c.int()).abs().flatten() for g, c in zip(gpu, cpu)])
    return {
        "images": len(blobs),
        "max_abs": int(d.max()),
        "mean_abs": float(d.float().mean()),
        "share_differing": float((d > 0).float().mean()),
    }


def bench_crops(cfg: BenchConfig) -> dict:
    """The preset's views of one batch of demo images, made crop by crop (PIL) and as one batch (tensor ops),
    alternating PIL, tensor, tensor, PIL, ... on the host CPU with the process's torch threads."""
    from smog_train import data

    base = data.build_dataset(f"demo:{max(10, cfg.batch)}", "train", None)
    views = data.MultiCropViews(
        cfg.global_px, cfg.local_px, cfg.n_local, blur_scale=cfg.global_px / 224
    )
    ways = {
        "pil": data.ViewsDataset(base, views),
        "tensor": data.ViewsDataset(base, views, batched=True),
    }
    times = {"pil": [], "tensor": []}
    for r in range(cfg.crop_pairs + 1):  # the first pair warms up, untimed
        keys = [
            (i, "AB"[r % 2], 7 * i + r) for i in range(cfg.batch)
        ]  # one online set per batch, as in train.py
        for way in ("pil", "tensor") if r % 2 == 0 else ("tensor", "pil"):
            t0 = time.perf_counter()
            ways[way].__getitems__(keys)
            if r:
                times[way].append(time.perf_counter() - t0)
    ratios = [p / t for p, t in zip(times["pil"], times["tensor"])]
    return {
        "batch": cfg.batch,
        "crops_per_image": 2 * (2 + cfg.n_local),
        "px": (cfg.global_px, cfg.local_px),
        "threads": torch.get_num_threads(),
        "pil_s": summary(times["pil"]),
        "tensor_s": summary(times["tensor"]),
        "speedup": statistics.median(ratios),
    }


# ----------------------------------------------------------------------------------------------
# driver


def evaluate_targets(res: dict, dev: torch.device) -> list:
    tg, out = TARGETS[dev.type], []
    if res.get("step_ratio") is not None:
        out.append(
            {
                "what": "full / ideal step",
                "value": res["step_ratio"],
                "target": f"<= {tg['step_ratio_max']}",
                "met": res["step_ratio"] <= tg["step_ratio_max"],
            }
        )
    sp = res.get("update_speedup", {}).get(SPEEDUP_KEY)
    if sp is not None:
        out.append(
            {
                "what": f"update speed-up {SPEEDUP_KEY}",
                "value": sp,
                "target": f">= {tg['update_speedup_min']}",
                "met": sp >= tg["update_speedup_min"],
            }
        )
    for r in res.get("kmeans", []):
        if "kmeans_1281167_max_s" in tg and r["N"] == 1281167 and r["K"] == 3000:
            v = r["seconds"]["median"]
            out.append(
                {
                    "what": "k-means 1,281,167 x 128 -> 3000, 10 iters (s)",
                    "value": v,
                    "target": f"< {tg['kmeans_1281167_max_s']}",
                    "met": v < tg["kmeans_1281167_max_s"],
                }
            )
    return out


def report(res: dict) -> str:
    m, L = res["machine"], []
    L.append(
        f"bench.py --preset {res['preset']}  |  {m['device_name']}  |  torch {m['torch']}  |  "
        f"host {m['cpu_model']} x{m['cpu_cores']}  |  git {m['git_rev']}"
    )
    L.append(f"command: {res['command']}")
    if "step" in res:
        s = res["step"]
        L.append(
            f"step (batch {res['config']['batch']}, {res['config']['arch']}, median of {s['ideal_ms']['n']} "
            f"interleaved pairs)"
        )
        L.append(
            f"  ideal step                {s['ideal_ms']['median']:10.2f} ms   {s['ideal_images_per_s']:9.1f} img/s"
            f"   (q1 {s['ideal_ms']['q1']:.2f}, q3 {s['ideal_ms']['q3']:.2f})"
        )
        L.append(
            f"  full SMoG step            {s['full_ms']['median']:10.2f} ms   {s['full_images_per_s']:9.1f} img/s"
            f"   (q1 {s['full_ms']['q1']:.2f}, q3 {s['full_ms']['q3']:.2f})"
        )
        ci = s["ratio_ci95"]
        L.append(
            f"  full / ideal (pairs)      {s['ratio']:10.3f}      95% CI {ci[0]:.3f}-{ci[1]:.3f}; "
            f"ratio of the medians {s['ratio_of_medians']:.3f}"
        )
        o = s["grouping_overhead"]
        L.append(
            f"  grouping overhead with stub backbones: {o['extra_ms']:.2f} ms per step (stub steps "
            f"{o['stub_ideal_ms']['median']:.2f} / {o['stub_full_ms']['median']:.2f} ms) -> implied ratio "
            f"{o['implied_ratio']:.4f}"
        )
        if "cpu_time" in s:
            c = s["cpu_time"]
            L.append(
                f"  by process CPU time: ideal {c['ideal_ms']['median']:.2f} ms, full {c['full_ms']['median']:.2f} ms,"
                f" ratio {c['ratio']:.3f} (95% CI {c['paired_ratio_ci95'][0]:.3f}-{c['paired_ratio_ci95'][1]:.3f})"
            )
        if "rusage_per_step" in s:
            r = s["rusage_per_step"]
            L.append(
                f"  per step (both kinds): user {r['user_ms']:.1f} ms, sys {r['sys_ms']:.1f} ms, "
                f"{r['minor_faults']:.0f} minor page faults"
            )
        la = s["loadavg_1min"]
        if la[0] is not None:
            L.append(
                f"  1-min load average before / after: {la[0]:.2f} / {la[1]:.2f} (cores: {res['machine']['cpu_cores']})"
            )
    for r in res.get("joint_bn", []):
        c = r["crops"]
        L.append(
            f"joint BN, {r['arch']} forward+backward, batch {r['batch']} x ({c[0]}x{c[1]} + {c[2]}x{c[3]} px): "
            f"joint {r['joint_ms']['median']:.2f} ms, per size {r['separate_ms']['median']:.2f} ms, "
            f"ratio {r['ratio']:.3f} (95% CI {r['ratio_ci95'][0]:.3f}-{r['ratio_ci95'][1]:.3f}, "
            f"n={r['joint_ms']['n']})"
        )
    if "update" in res:
        L.append(
            "group update, D=128          vectorised ms     loop ms   speed-up   groups hit   max|diff|"
        )
        for r in res["update"]:
            L.append(
                f"  K={r['K']:<5d} N={r['N']:<5d}         {r['vectorised_ms']['median']:10.3f}  "
                f"{r['loop_ms']['median']:10.2f}  {r['speedup']:8.1f}x   {r['groups_hit']:10d}   "
                f"{r['max_abs_diff']:.1e}"
            )
    if "kmeans" in res:
        L.append("spherical k-means, D=128              seconds (median)")
        for r in res["kmeans"]:
            L.append(
                f"  N={r['N']:<9,d} K={r['K']:<5d} {r['iters']} iters  {r['seconds']['median']:10.3f}"
                f"   (n={r['seconds']['n']})"
            )
        e = res.get("regroup_epoch_share")
        if e:
            L.append(
                f"  regroup of the preset: {e['heads']} heads x N={e['data_size']:,} K={e['K']}: "
                f"{e['regroup_s']:.3f} s = {100 * e['share']:.2f}% of an epoch of {e['steps_per_epoch']} full steps"
            )
    if "input_pipeline" in res:
        p = res["input_pipeline"]
        step = f"{p['step_images_per_s']:.1f}" if p["step_images_per_s"] else "n/a"
        where = "on the device" if p["decode_on_device"] else "in the workers"
        L.append(
            f"input pipeline ({p['source']}, {p['workers']} workers, "
            f"{p['crops_per_image']} crops/image, tensor path decodes {where})"
        )
        L.append(
            f"  PIL {p['pil_images_per_s']:.1f} img/s, tensor {p['tensor_images_per_s']:.1f} "
            f"img/s (tensor/PIL {p['tensor_over_pil']:.2f}, median of "
            f"{len(p['samples']['pil'])} interleaved rounds)"
        )
        verdict = ""
        if p["starved"] is not None:
            verdict = (
                f"  -> {'STARVED' if p['starved'] else 'not starved'} (loader/step "
                f"{p['loader_over_step']:.2f}; PIL/step {p['pil_over_step']:.2f})"
            )
        L.append(f"  tensor path {p['images_per_s']:.1f} img/s vs full step {step} img/s{verdict}")
        if "nvjpeg_vs_libjpeg" in p:
            a = p["nvjpeg_vs_libjpeg"]
            L.append(
                f"  nvJPEG vs libjpeg-turbo on {a['images']} JPEGs: max |diff| {a['max_abs']} "
                f"grey levels, mean {a['mean_abs']:.4f}, {100 * a['share_differing']:.2f}% "
                f"of values differ"
            )
    if "crops" in res:
        c = res["crops"]
        L.append(
            f"crops of one batch ({c['batch']} images x {c['crops_per_image']} crops, {c['px'][0]}/{c['px'][1]} px, "
            f"{c['threads']} threads): PIL {c['pil_s']['median']:.3f} s, tensor {c['tensor_s']['median']:.3f} s, "
            f"speed-up {c['speedup']:.1f}x (median of {c['pil_s']['n']} pairs)"
        )
    for t in res.get("targets", []):
        verdict = {True: "met", False: "MISSED", None: "not judged (smoke sizes)"}[t["met"]]
        L.append(f"target {t['what']}: {t['value']:.3f} (target {t['target']}) -> {verdict}")
    L.append(f"wall time {res['wall_s']:.1f} s")
    return "\n".join(L)


def run(cfg: BenchConfig, argv_display: str) -> dict:
    t_start = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if (
        cfg.malloc_top_pad_mb > 0
    ):  # keep freed heap instead of returning it to the OS and faulting it back in
        import ctypes

        if not ctypes.CDLL("libc.so.6").mallopt(-2, cfg.malloc_top_pad_mb << 20):  # -2 = M_TOP_PAD
            raise RuntimeError("mallopt(M_TOP_PAD) failed (glibc only)")
    dev = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sections = [s.strip() for s in cfg.sections.split(",") if s.strip()]
    unknown = set(sections) - {"step", "jointbn", "update", "kmeans", "input", "crops"}
    if unknown:
        raise ValueError(
            f"unknown sections {sorted(unknown)}; choose from step, jointbn, update, kmeans, input, crops"
        )
    clock = Clock(dev)
    info = machine_info(dev)
    res: dict = {
        "preset": cfg.preset,
        "command": argv_display,
        "device_name": info["device_name"],
        "torch_version": torch.__version__,
        "machine": info,
        "config": asdict(cfg),
        "step_ratio": None,
        "joint_bn_ratio": {},
        "update_speedup": {},
    }

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    if "step" in sections:
        log("step: ideal vs full")
        res["step"] = bench_step(cfg, dev, clock)
        res["step_ratio"] = res["step"]["ratio"]
    if "jointbn" in sections:
        log("jointbn: one BatchNorm across crop sizes vs one pass per size")
        res["joint_bn"] = bench_joint_bn(cfg, dev, clock)
        res["joint_bn_ratio"] = {r["arch"]: r["ratio"] for r in res["joint_bn"]}
    if "update" in sections:
        log("update: vectorised vs loop")
        res["update"] = bench_update(cfg, dev, clock)
        res["update_speedup"] = {f"K={r['K']},N={r['N']}": r["speedup"] for r in res["update"]}
    if "kmeans" in sections:
        sizes = [(n, cfg.kmeans_k) for n in cfg.kmeans_n]
        own = (cfg.data_size, cfg.n_groups)
        log(f"kmeans: {sizes + ([own] if own not in sizes else [])}")
        res["kmeans"] = bench_kmeans(cfg, dev, clock, sizes + ([own] if own not in sizes else []))
        if "step" in res:
            km = next(r for r in res["kmeans"] if (r["N"], r["K"]) == own)
            res["regroup_epoch_share"] = epoch_share(
                cfg, km["seconds"]["median"], res["step"]["full_ms"]["median"]
            )
    if "input" in sections:
        log("input pipeline")
        res["input_pipeline"] = bench_input(
            cfg, dev, res["step"]["full_images_per_s"] if "step" in res else None
        )
    if "crops" in sections:
        log("crops: PIL one by one vs tensor ops per batch")
        res["crops"] = bench_crops(cfg)
        res["crops_speedup"] = res["crops"]["speedup"]
    res["targets"] = evaluate_targets(res, dev)
    if cfg.preset == "smoke":  # too small to judge: structure only
        for t in res["targets"]:
            t["met"] = None
    res["wall_s"] = time.perf_counter() - t_start
    return res


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv)
    if cfg.write_jpegs:
        if cfg.jpegs < 1:
            print("error: --write-jpegs needs --jpegs N (N >= 1 images)", file=sys.stderr)
            return 2
        write_jpeg_folder(cfg.write_jpegs, cfg.jpegs)
        print(f"wrote {cfg.jpegs} JPEGs to {cfg.write_jpegs}/train")
        return 0
    res = run(cfg, " ".join(["python tools/bench.py", *argv]))
    print(report(res))
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    tmp = cfg.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, cfg.out)
    print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
