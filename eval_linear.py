"""Linear and kNN evaluation of a SMoG backbone: the SwAV linear protocol, as released.

    python eval_linear.py --checkpoint runs/demo/checkpoint.pth                     # augmented protocol
    python eval_linear.py --checkpoint runs/demo/checkpoint.pth --cached-features --knn
    python eval_linear.py --checkpoint backbone.pth --arch resnet50 --data imagefolder:/imagenet
    torchrun --nproc_per_node=2 eval_linear.py --checkpoint ...                      # same numbers

Protocol: frozen backbone in eval() mode (BatchNorm statistics never move), global-average-pooled
features, one nn.Linear initialised N(0, 0.01) with zero bias, SGD momentum 0.9, lr cosine to 0 per
epoch. ResNet: lr 0.3, wd 1e-6, 100 epochs; Swin-T: lr 0.1, wd 0, 150 epochs. Top-1 and top-5 of the
best and the last epoch. Before training: exactly the linear layer's two tensors require gradient;
after training: every backbone tensor is bit-identical to the checkpoint, or we fail loudly.

The test set's features are extracted once (the backbone is frozen) and scored after every epoch.

Distributed without changing the result: every global batch is split into contiguous per-rank slices,
each rank runs the (expensive) backbone on its slice, the features are gathered in rank order, and
every rank takes the same (cheap) linear step on the whole global batch. Augmentations are seeded per
(seed, epoch, sample index), so they do not depend on which rank or worker loads a sample. Metrics
are reduced exactly: correct counts and totals are summed over ranks, then divided. On CPU the numbers
equal a plain process's (tested); on GPUs, kernels may round differently for other batch sizes.

Features, kNN and the cached-feature probe live in smog_train/probes.py (train.py's evaluations use
them too); this file adds the frozen-backbone checks, the augmented protocol and the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

import smog
from smog_train import backbones, checkpoint, launch
from smog_train.batches import item_seed
from smog_train.checkpoint import FORMAT as TRAIN_FORMAT
from smog_train.checkpoint import check_writable
from smog_train.config import Config, error_line
from smog_train.probes import (
    cached_batches,
    extract_features,
    fit_linear,
    knn_eval,
    new_linear,
    rank_world,
    shard_loader,
)

KNN_KS = (10, 20, 100, 200)
# per-architecture defaults of the released linear protocol: (lr, weight decay, epochs)
PROTOCOL = {"swin_t": (0.1, 0.0, 150)}
PROTOCOL_DEFAULT = (0.3, 1e-6, 100)
CLASSIFIER_KEYS = {
    "fc.weight",
    "fc.bias",
    "head.weight",
    "head.bias",
}  # torchvision heads (not a backbone)


# ----------------------------------------------------------------------------------------------
# the frozen-backbone protocol checks


def freeze(backbone: nn.Module) -> nn.Module:
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


def check_trainable(backbone: nn.Module, head: nn.Linear) -> None:
    """Exactly the linear layer's weight and bias require gradient, nothing of the backbone."""
    train = [n for n, p in backbone.named_parameters() if p.requires_grad]
    head_ok = [p.requires_grad for p in head.parameters()] == [True, True]
    if train or not head_ok:
        raise RuntimeError(
            f"frozen-backbone check failed: expected exactly the linear layer's 2 tensors to "
            f"require grad; backbone tensors requiring grad: {train[:5]}"
            f"{' ...' if len(train) > 5 else ''}; linear layer ok: {head_ok}"
        )


def check_eval_mode(backbone: nn.Module) -> None:
    """No module of the backbone in train mode (BatchNorm statistics would move, dropout would be active)."""
    train = [n or "<backbone>" for n, m in backbone.named_modules() if m.training]
    if train:
        raise RuntimeError(
            f"frozen-backbone check failed: {len(train)} backbone modules in train mode "
            f"({', '.join(train[:5])}{', ...' if len(train) > 5 else ''}); call backbone.eval()"
        )


def check_backbone_unchanged(backbone: nn.Module, reference: dict) -> None:
    """Every backbone tensor (parameters and buffers, BN statistics included) bit-identical to `reference`."""
    sd = backbone.state_dict()
    changed = [
        k
        for k, v in sd.items()
        if k not in reference or not torch.equal(v.cpu(), reference[k].cpu())
    ]
    changed += [k for k in reference if k not in sd]
    if changed:
        raise RuntimeError(
            f"frozen-backbone check failed: {len(changed)} backbone tensors differ from the "
            f"checkpoint after linear training ({', '.join(changed[:5])}"
            f"{', ...' if len(changed) > 5 else ''}); the evaluation is invalid"
        )


def run_linear(
    backbone: nn.Module,
    reference: dict,
    head: nn.Linear,
    batches: Callable[[int], Iterable],
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    wd: float,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """The protocol around fit_linear: before training, exactly the linear layer's two tensors require
    gradient and the backbone is in eval mode; after training, every backbone tensor is bit-identical to
    `reference` (the checkpoint's). Either failure raises RuntimeError: the numbers would be invalid."""
    check_trainable(backbone, head)
    check_eval_mode(backbone)
    res = fit_linear(head, batches, test_f, test_y, epochs=epochs, lr=lr, wd=wd, log=log)
    check_backbone_unchanged(backbone, reference)
    return res


# ----------------------------------------------------------------------------------------------
# augmented protocol: frozen backbone on fresh augmentations every epoch


class SeededItems(torch.utils.data.Dataset):
    """ds[i] with the torch and Python RNGs seeded from (seed, epoch, i): a sample's augmentation is the same whichever
    rank or worker loads it, so the augmented protocol gives the same numbers at every world size."""

    def __init__(self, ds, seed: int):
        self.ds, self.seed, self.epoch = ds, seed, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        s = item_seed(self.seed, self.epoch, int(i))
        # torchvision draws from torch's CPU generator, PIL-based transforms often from `random`; both are
        # restored afterwards. Only the CPU generator: torch.manual_seed would also seed CUDA, per item.
        gen = torch.default_generator
        states = gen.get_state(), random.getstate()
        try:
            gen.manual_seed(s)
            random.seed(s)
            return self.ds[i]
        finally:
            gen.set_state(states[0])
            random.setstate(states[1])


def augmented_batches(
    backbone: nn.Module, ds, device, *, feat_dim: int, batch_size: int, seed: int, workers: int = 0
) -> Callable[[int], Iterable]:
    """-> batches(epoch): global batches (features [B, F], labels [B]) of a seeded permutation of the
    augmented `ds`; this rank runs the backbone on its contiguous slice of each batch, the slices are
    gathered in rank order. Ranks with an empty slice (a last batch smaller than the world) send 0 rows."""
    seeded = SeededItems(ds, seed)
    r, w = rank_world()
    pin = torch.device(device).type == "cuda"

    def batches(epoch):
        seeded.epoch = epoch  # read by the workers, which a new iterator creates
        perm = torch.randperm(
            len(ds), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
        ).tolist()
        mine = [
            b[r * len(b) // w : (r + 1) * len(b) // w]
            for b in (perm[i : i + batch_size] for i in range(0, len(perm), batch_size))
        ]
        it = iter(
            torch.utils.data.DataLoader(
                seeded, batch_sampler=[m for m in mine if m], num_workers=workers, pin_memory=pin
            )
        )
        for m in mine:
            if m:
                x, y = next(it)
                with torch.no_grad():
                    f = backbone(x.to(device, non_blocking=True)).float().flatten(1)
                y = torch.as_tensor(y).to(device=device, dtype=torch.long)
            else:
                f = torch.zeros(0, feat_dim, device=device)
                y = torch.zeros(0, dtype=torch.long, device=device)
            yield launch.all_gather_rows(f), launch.all_gather_rows(y)

    return batches


# ----------------------------------------------------------------------------------------------
# checkpoints: a train.py checkpoint or an exported backbone


def _name_keys(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _match_state(path: str, model: nn.Module, sd: dict, what: str) -> None:
    """One-line ValueError naming missing, unexpected and shape-mismatched keys."""
    want = model.state_dict()
    missing = set(want) - set(sd)
    unexpected = set(sd) - set(want)
    shape = [
        f"{k} {list(sd[k].shape)} vs {list(want[k].shape)}"
        for k in sorted(set(want) & set(sd))
        if not isinstance(sd[k], torch.Tensor) or sd[k].shape != want[k].shape
    ]
    if missing or unexpected or shape:
        parts = [
            f"missing keys {_name_keys(missing)}" if missing else "",
            f"unexpected keys {_name_keys(unexpected)}" if unexpected else "",
            f"shape mismatch {'; '.join(shape[:3])}{' ...' if len(shape) > 3 else ''}"
            if shape
            else "",
        ]
        raise ValueError(f"{path!r} does not match {what}: " + "; ".join(p for p in parts if p))


def load_backbone(
    path: Optional[str],
    *,
    arch: Optional[str] = None,
    cifar_stem: Optional[bool] = None,
    width: Optional[int] = None,
    random_init: bool = False,
) -> tuple:
    """-> (backbone, feat_dim, reference state_dict, info dict with arch/cifar_stem/width/source/train config).

    `path` is a train.py checkpoint ("format": TRAIN_FORMAT, online backbone under "model"/"backbone.*";
    the architecture comes from its config and --arch/--cifar-stem must agree with it) or an exported
    backbone (a flat {name: tensor} dict as written by `python -m smog_train.export`; the architecture comes
    from arch/cifar_stem/width). A torchvision classifier (fc.*/head.*) in an exported file is dropped.
    random_init: the same architecture, untrained (the baseline row). ValueError (one line) otherwise."""
    train_cfg: dict = {}
    sd = None
    source = "random-init"
    if path is not None:
        ck = checkpoint.load_checkpoint(path)
        fmt = ck.get("format")
        if isinstance(ck.get("model"), dict):
            if fmt is not None and fmt != TRAIN_FORMAT:
                raise ValueError(
                    f"{path!r} has checkpoint format {fmt!r}; this eval_linear.py reads {TRAIN_FORMAT!r} "
                    f"(an older train.py built other networks); retrain or use the train.py that wrote it"
                )
            train_cfg = ck.get("config") if isinstance(ck.get("config"), dict) else {}
            mcfg = smog.SMoGConfig.from_dict(train_cfg.get("model") or {})
            for name, given, saved in (
                ("--arch", arch, mcfg.arch),
                ("--cifar-stem", cifar_stem, mcfg.cifar_stem),
                ("--width", width, mcfg.width),
            ):
                if given is not None and given != saved:
                    raise ValueError(
                        f"{name} {given} contradicts the checkpoint's config ({saved}); drop {name}, "
                        f"a train.py checkpoint knows its architecture"
                    )
            arch, cifar_stem, width = mcfg.arch, mcfg.cifar_stem, mcfg.width
            sd = {
                k[len("backbone.") :]: v
                for k, v in ck["model"].items()
                if k.startswith("backbone.")
            }
            if not sd:
                raise ValueError(
                    f"{path!r} has a 'model' entry without online backbone keys ('backbone.*'); "
                    f"it is not a train.py checkpoint"
                )
            source = "train-checkpoint"
        elif ck and all(isinstance(v, torch.Tensor) for v in ck.values()):
            if arch is None:
                raise ValueError(
                    f"{path!r} is an exported backbone, which does not record its architecture; "
                    f"pass --arch (and --cifar-stem if it was trained with one)"
                )
            sd = {k: v for k, v in ck.items() if k not in CLASSIFIER_KEYS}
            source = "exported-backbone"
        else:
            raise ValueError(
                f"{path!r} is neither a train.py checkpoint (no 'model' dict) nor an exported backbone "
                f"(not a flat name->tensor dict); top-level keys: {_name_keys(map(str, ck))}"
            )
    bad = checkpoint.nonfinite_tensors(sd or {})
    if bad:
        raise ValueError(
            f"{path!r} holds non-finite backbone weights ({len(bad)} tensors, e.g. {bad[0]!r}); "
            f"evaluate another checkpoint (e.g. {checkpoint.PREV} beside it)"
        )
    if arch is None:
        raise ValueError("no architecture: pass --checkpoint, or --arch with --random-init")
    cifar_stem, width = bool(cifar_stem), 32 if width is None else int(width)
    backbone, feat_dim = backbones.build_backbone(arch, cifar_stem=cifar_stem, width=width)
    if sd is not None:
        _match_state(
            path,
            backbone,
            sd,
            f"arch {arch} (cifar_stem={cifar_stem}"
            f"{f', width={width}' if arch == 'smallcnn' else ''})",
        )
        if not random_init:
            backbone.load_state_dict(sd, strict=True)
    if random_init:
        source = "random-init"
    ref = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    # the memory format train.py ran the backbone in (its --channels-last): other kernels round
    # differently, and the kNN monitor's features are then reproduced bit for bit
    channels_last = bool(train_cfg.get("channels_last", Config.channels_last)) and arch != "swin_t"
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    info = dict(
        arch=arch,
        cifar_stem=cifar_stem,
        width=width,
        source=source,
        train_config=train_cfg,
        channels_last=channels_last,
    )
    return freeze(backbone), feat_dim, ref, info


# ----------------------------------------------------------------------------------------------
# command line


def _int_list(s: str) -> tuple:
    try:
        return tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 10,20,100,200, got {s!r}"
        ) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, not argparse's usage block
        print(f"error: {message} (see python eval_linear.py -h)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="eval_linear.py",
        description="Linear (SwAV protocol) and kNN evaluation of a SMoG backbone. Runs as a plain process or "
        "under torchrun (identical numbers). Prints a results table and writes OUT_DIR/eval-MODE.json, "
        "MODE augmented, cached-features or knn (--no-linear).",
    )
    a = ap.add_argument
    a(
        "--checkpoint",
        help="train.py checkpoint (out_dir/checkpoint.pth) or a backbone exported with "
        "`python -m smog_train.export` (then pass --arch, and --cifar-stem if used in training)",
    )
    a(
        "--random-init",
        action="store_true",
        help="evaluate an untrained encoder of the same architecture "
        "(the baseline row); with --checkpoint only its architecture is used",
    )
    a(
        "--arch",
        choices=backbones.ARCHS,
        default=None,
        help="backbone architecture; required for exported backbones and "
        "--random-init without --checkpoint (default: from the checkpoint)",
    )
    a(
        "--cifar-stem",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="3x3 stride-1 stem without max-pool (ResNets, small images) (default: from the checkpoint, else off)",
    )
    a(
        "--width",
        type=int,
        default=None,
        help="smallcnn base width (default: from the checkpoint, else 32)",
    )
    a(
        "--data",
        default=None,
        help="demo | imagefolder:PATH | cifar10 | cifar100 | stl10 (default: the checkpoint's "
        "training data, else demo)",
    )
    a(
        "--data-root",
        default=None,
        help="where cifar10/cifar100/stl10 live (or are downloaded to) (default: the "
        "checkpoint's, else data)",
    )
    a(
        "--download",
        action="store_true",
        help="download cifar10/cifar100/stl10 into --data-root if missing",
    )
    a(
        "--image-size",
        type=int,
        default=None,
        help="evaluation crop size (default: a train.py checkpoint's; for an "
        "exported backbone the dataset's: 224 for image folders, native "
        "for demo/CIFAR/STL; pass the training resolution)",
    )
    a(
        "--out-dir",
        default=None,
        help="where eval-MODE.json goes (default: the checkpoint's directory; "
        "<that>/random-init with --random-init; runs/random-init without a checkpoint)",
    )
    a(
        "--cached-features",
        action="store_true",
        help="extract features once without augmentation and train the "
        "linear layer on them (orders of magnitude faster on a CPU); "
        "the default is the augmented protocol",
    )
    a(
        "--no-linear",
        dest="linear",
        action="store_false",
        help="skip the linear evaluation (e.g. with --knn)",
    )
    a(
        "--knn",
        action="store_true",
        help="also run weighted kNN (L2-normalised features, votes exp(sim/T))",
    )
    a(
        "--knn-k",
        type=_int_list,
        default=KNN_KS,
        help="comma-separated k values for --knn (default: 10,20,100,200)",
    )
    a("--knn-t", type=float, default=0.07, help="kNN temperature T (default: %(default)s)")
    a(
        "--epochs",
        type=int,
        default=None,
        help="linear epochs (default: 100 ResNet/smallcnn, 150 Swin-T)",
    )
    a(
        "--lr",
        type=float,
        default=None,
        help="linear learning rate, cosine to 0 per epoch "
        "(default: 0.3 ResNet/smallcnn, 0.1 Swin-T)",
    )
    a(
        "--wd",
        type=float,
        default=None,
        help="linear weight decay (default: 1e-6 ResNet/smallcnn, 0 Swin-T)",
    )
    a(
        "--batch-size",
        type=int,
        default=256,
        help="global batch size of the linear layer, split over ranks (default: %(default)s)",
    )
    a(
        "--seed",
        type=int,
        default=0,
        help="seed of the linear layer's init, the batch order, the augmentations and --random-init "
        "(default: %(default)s)",
    )
    a(
        "--workers",
        type=int,
        default=None,
        help="data loader workers per rank (default: min(8, cores per rank - 1))",
    )
    a(
        "--device",
        default="auto",
        help="auto | cpu | cuda (default: %(default)s: cuda if available; under torchrun "
        "cuda:LOCAL_RANK)",
    )
    a(
        "--bad-images",
        choices=("fail", "skip"),
        default="fail",
        help="imagefolder: stop at an unreadable image (naming it) or skip it (default: %(default)s)",
    )
    a("--quiet", action="store_true", help="no per-epoch log lines")
    return ap


def _table(res: dict) -> str:
    rows = [("method", "top-1", "top-5")]
    if "linear" in res:
        lin = res["linear"]
        rows.append(
            (
                f"linear, best (epoch {lin['best_epoch']})",
                f"{lin['best_top1']:.2f}",
                f"{lin['best_top5']:.2f}",
            )
        )
        rows.append(
            (f"linear, last (epoch {lin['epochs']})", f"{lin['top1']:.2f}", f"{lin['top5']:.2f}")
        )
    for k, v in res.get("knn", {}).items():
        rows.append((f"kNN k={k} T={res['knn_t']}", f"{v:.2f}", "-"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    line = lambda r: f"| {r[0]:<{w[0]}} | {r[1]:>{w[1]}} | {r[2]:>{w[2]}} |"
    head = (
        f"{res['source']} {res['checkpoint'] or ''} | arch {res['arch']} | data {res['data']} "
        f"({res['n_train']} train / {res['n_test']} test, {res['n_classes']} classes, {res['image_size']} px) | "
        f"{res['protocol']} | world {res['world_size']}"
    )
    return "\n".join(
        [head, line(rows[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|", *map(line, rows[1:])]
    )


def results_mode(args: argparse.Namespace) -> str:
    """augmented | cached-features (the linear protocol; with --knn the kNN too) | knn (--no-linear):
    each mode writes its own OUT_DIR/eval-MODE.json."""
    return "knn" if not args.linear else "cached-features" if args.cached_features else "augmented"


def evaluate(args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> dict:
    from smog_train import data  # the data sources shared with train.py

    if args.checkpoint is None and not args.random_init:
        raise ValueError(
            "pass --checkpoint PATH (or --random-init --arch NAME for the untrained baseline)"
        )
    if args.batch_size < 1 or (args.epochs is not None and args.epochs < 1):
        raise ValueError("--batch-size and --epochs must be positive")
    if any(k < 1 for k in args.knn_k):
        raise ValueError(f"--knn-k values must be positive, got {args.knn_k}")
    if not args.linear and not args.knn:
        raise ValueError("--no-linear without --knn evaluates nothing; add --knn")
    torch.manual_seed(args.seed)  # --random-init weights
    backbone, feat_dim, ref, info = load_backbone(
        args.checkpoint,
        arch=args.arch,
        cifar_stem=args.cifar_stem,
        width=args.width,
        random_init=args.random_init,
    )
    tcfg = info.pop("train_config")
    spec = args.data or tcfg.get("data") or "demo"
    image_size = args.image_size or tcfg.get("image_size") or data.dataset_image_size(spec)
    lr0, wd0, ep0 = PROTOCOL.get(info["arch"], PROTOCOL_DEFAULT)
    lr, wd, epochs = (
        ep if ep is not None else d
        for ep, d in ((args.lr, lr0), (args.wd, wd0), (args.epochs, ep0))
    )
    r, w = rank_world()
    workers = (
        args.workers if args.workers is not None else max(0, min(8, (os.cpu_count() or 1) // w - 1))
    )
    kw = dict(
        root=args.data_root or tcfg.get("data_root") or "data",
        download=args.download,
        bad_images=args.bad_images,
    )
    aug = args.linear and not args.cached_features

    def datasets():
        return (
            data.build_dataset(spec, "test", data.eval_transform(image_size), **kw),
            data.build_dataset(spec, "train", data.eval_transform(image_size), **kw),
            data.build_dataset(spec, "train", data.train_linear_transform(image_size), **kw)
            if aug
            else None,
        )

    if args.download and smog.dist_ready():  # rank 0 downloads, then the others read
        if r == 0:
            sets = datasets()
        dist.barrier()
        if r != 0:
            sets = datasets()
    else:
        sets = datasets()
    test_ds, train_plain, train_aug = sets
    n_classes = data.num_classes(train_plain)
    backbone = backbone.to(device)
    pin = device.type == "cuda"

    res = dict(
        checkpoint=args.checkpoint,
        source=info["source"],
        arch=info["arch"],
        cifar_stem=info["cifar_stem"],
        width=info["width"],
        data=spec,
        image_size=image_size,
        n_classes=n_classes,
        n_train=len(train_plain),
        n_test=len(test_ds),
        world_size=w,
        seed=args.seed,
        channels_last=info["channels_last"],
        protocol=results_mode(args),
    )
    t0 = time.time()
    test_f, test_y = extract_features(
        backbone, shard_loader(test_ds, args.batch_size, workers=workers, pin_memory=pin), device
    )
    train_f = train_y = None
    if args.cached_features or args.knn:
        train_f, train_y = extract_features(
            backbone,
            shard_loader(train_plain, args.batch_size, workers=workers, pin_memory=pin),
            device,
        )
    log(
        f"features: train {None if train_f is None else tuple(train_f.shape)}, test {tuple(test_f.shape)} "
        f"({time.time() - t0:.1f}s)"
    )
    if args.knn:
        res["knn_t"] = args.knn_t
        res["knn"] = {
            str(k): v
            for k, v in knn_eval(
                train_f, train_y, test_f, test_y, n_classes, ks=args.knn_k, T=args.knn_t
            ).items()
        }
    if args.linear:
        head = new_linear(feat_dim, n_classes, args.seed).to(device)
        if args.cached_features:
            batches = cached_batches(train_f, train_y, args.batch_size, args.seed)
        else:
            batches = augmented_batches(
                backbone,
                train_aug,
                device,
                feat_dim=feat_dim,
                batch_size=args.batch_size,
                seed=args.seed,
                workers=workers,
            )
        lin = run_linear(
            backbone,
            ref,
            head,
            batches,
            test_f,
            test_y,
            epochs=epochs,
            lr=lr,
            wd=wd,
            log=None if args.quiet else log,
        )
        res["linear"] = dict(lin, epochs=epochs, lr=lr, wd=wd, batch_size=args.batch_size)
    res["time_s"] = round(time.time() - t0, 2)
    return res


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        r, _, device = launch.init_process(args.device)
        log = (lambda s: print(s, flush=True)) if r == 0 else (lambda s: None)
        out_dir = args.out_dir or (
            os.path.dirname(os.path.abspath(args.checkpoint))
            if args.checkpoint
            else os.path.join("runs", "random-init")
        )
        if args.random_init and args.checkpoint and args.out_dir is None:
            out_dir = os.path.join(out_dir, "random-init")
        check_writable(out_dir)  # before the evaluation, not after hours of it
        res = evaluate(args, device, log)
        if r == 0:
            print(_table(res), flush=True)
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, f"eval-{res['protocol']}.json")
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(dict(res, args=vars(args)), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: the file is complete or absent
            print(f"wrote {path}", flush=True)
        return 0
    except (ValueError, OSError) as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a non-finite linear loss: no eval.json
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        if smog.dist_ready():
            dist.destroy_process_group()


if __name__ == "__main__":
    launch.exit_process(main())
