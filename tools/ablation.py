"""The paper's key ablation at demo scale: synchronous group updates against groups that lag behind.

    python tools/ablation.py                        # 4 arms x 3 seeds on the built-in data, CPU
    python tools/ablation.py --dry-run              # print the commands only
    python tools/ablation.py --seeds 0,1,2,3,4 --epochs 8 --out runs/ablation
    python tools/ablation.py --data demo --batch-size 256          # the main job's data and batch (twice the cost)

SMoG updates its group features every iteration from the online embeddings (beta < 1, METHOD.md)
and also re-clusters them by k-means over the memory bank every --regroup-every epochs. Setting
beta = 1 removes the per-iteration update: the groups then only change at the k-means, i.e. they lag
behind the network for a whole regroup interval, as in offline-clustering methods (DeepCluster-style).
The arms (all with the demo preset's recipe otherwise; per seed the same initial weights, sampler,
augmentations and k-means draws). By default each run trains 8 epochs on demo:4000 at batch 128, i.e.
248 steps of the main job's 31 per epoch, on half its images, and R = 4 epochs = 124 steps of lag:

    smog             beta 1.0 -> 0.99, regroup every R epochs        (the method)
    lagging          beta 1.0 fixed, regroup every R epochs          (groups refreshed only offline)
    smog-noregroup   beta 1.0 -> 0.99, k-means only before epoch 0  (synchronous update alone)
    frozen           beta 1.0 fixed, k-means only before epoch 0     (groups never move: lag without end)

Each run is `python train.py --no-final-eval --knn-every 0 ...` then `python eval_linear.py
--cached-features --knn --knn-k 20` on its checkpoint (the demo table's probe: 100 epochs on cached
features, last-epoch top-1; and the weighted kNN top-1, k=20, T=0.07, as train.py's monitor). The
script is resumable: a run whose result.json exists is skipped, an interrupted training resumes from
its checkpoint. It writes OUT/ablation.json (every run, mean/std/min/max per arm, the exact commands,
machine, torch version) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # a checkout, not installed

ARMS = {
    "smog": (
        "beta 1.0 -> 0.99, regroup every R epochs (the method)",
        dict(beta_start=1.0, beta_end=0.99),
    ),
    "lagging": (
        "beta 1.0 fixed: groups change only at the k-means every R epochs",
        dict(beta_start=1.0, beta_end=1.0),
    ),
    "smog-noregroup": (
        "beta 1.0 -> 0.99, k-means only before epoch 0",
        dict(beta_start=1.0, beta_end=0.99, once=True),
    ),
    "frozen": (
        "beta 1.0 fixed, k-means only before epoch 0: groups never move",
        dict(beta_start=1.0, beta_end=1.0, once=True),
    ),
}
METRICS = ("linear_top1", "knn_top1")


def run_dir(out: str, arm: str, seed: int) -> str:
    return os.path.join(out, f"{arm}-seed{seed}")


def commands(arm: str, seed: int, args: argparse.Namespace) -> tuple:
    """-> (train.py argv, eval_linear.py argv), both without the interpreter."""
    over = ARMS[arm][1]
    d = run_dir(args.out, arm, seed)
    regroup = args.epochs if over.get("once") else args.regroup_every
    train = [
        "train.py",
        "--preset",
        "demo",
        "--data",
        args.data,
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--seed",
        str(seed),
        "--beta-start",
        str(over["beta_start"]),
        "--beta-end",
        str(over["beta_end"]),
        "--regroup-every",
        str(regroup),
        "--knn-every",
        "0",
        "--no-final-eval",
        "--out-dir",
        d,
        *args.train_args,
    ]
    ev = [
        "eval_linear.py",
        "--checkpoint",
        os.path.join(d, "checkpoint.pth"),
        "--cached-features",
        "--knn",
        "--knn-k",
        "20",
        "--seed",
        str(seed),
        "--quiet",
        "--device",
        "cpu",
    ]
    return train, ev


def summary(values: Sequence[float]) -> dict:
    """Mean and spread of one metric over seeds (std: sample standard deviation, 0 for one run)."""
    v = list(values)
    return dict(
        n=len(v),
        mean=statistics.fmean(v),
        std=statistics.stdev(v) if len(v) > 1 else 0.0,
        min=min(v),
        max=max(v),
    )


def aggregate(runs: dict) -> dict:
    """runs: {arm: [per-run dict with METRICS]} -> {arm: {metric: summary}} (arms in the given order)."""
    return {
        arm: {m: summary([r[m] for r in rs]) for m in METRICS} for arm, rs in runs.items() if rs
    }


def table(agg: dict) -> str:
    lines = [
        "| arm | groups | linear probe top-1 % (mean ± std) | kNN top-1 % (mean ± std) | seeds |",
        "|---|---|---|---|---|",
    ]
    for arm, a in agg.items():
        what = ARMS[arm][0] if arm in ARMS else ""
        cells = [
            f"{a[m]['mean']:.1f} ± {a[m]['std']:.1f} ({a[m]['min']:.1f}-{a[m]['max']:.1f})"
            for m in METRICS
        ]
        lines.append(f"| `{arm}` | {what} | {cells[0]} | {cells[1]} | {a[METRICS[0]]['n']} |")
    return "\n".join(lines)


def machine() -> dict:
    import torch

    from smog_train.launch import git_revision

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        git=git_revision(),
    )


def run_one(arm: str, seed: int, args: argparse.Namespace) -> dict:
    """Train + evaluate one (arm, seed) unless its result.json exists -> the per-run record."""
    d = run_dir(args.out, arm, seed)
    path = os.path.join(d, "result.json")
    train, ev = commands(arm, seed, args)
    cmd = [shlex.join(["python", *train]), shlex.join(["python", *ev])]
    if os.path.exists(path):
        with open(path) as fh:
            rec = json.load(fh)
        if rec["commands"] != cmd:
            raise SystemExit(
                f"error: {path} was made by other commands ({rec['commands'][0]!r}); "
                f"use another --out or delete {d}"
            )
        return rec
    os.makedirs(d, exist_ok=True)
    times = []
    for argv in (train, ev):
        t0 = time.time()
        p = subprocess.run(
            [sys.executable, *argv],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        times.append(round(time.time() - t0, 1))
        with open(os.path.join(d, "ablation.log"), "a") as fh:
            fh.write(p.stdout)
        if p.returncode != 0:
            tail = p.stdout.strip().splitlines()[-1:] or ["(no output)"]
            raise SystemExit(
                f"error: {argv[0]} failed for {arm} seed {seed} (exit {p.returncode}): {tail[0]}; "
                f"full log in {os.path.join(d, 'ablation.log')}; rerun to resume"
            )
    with open(os.path.join(d, "eval-cached-features.json")) as fh:
        res = json.load(fh)
    rec = dict(
        arm=arm,
        seed=seed,
        linear_top1=res["linear"]["top1"],
        linear_best_top1=res["linear"]["best_top1"],
        knn_top1=res["knn"]["20"],
        train_s=times[0],
        eval_s=times[1],
        commands=cmd,
    )
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(rec, fh, indent=1)
    os.replace(tmp, path)
    return rec


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ablation.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--seeds", default="0,1,2", help="comma-separated training seeds (default: %(default)s)"
    )
    ap.add_argument(
        "--epochs", type=int, default=8, help="training epochs per run (default: %(default)s)"
    )
    ap.add_argument(
        "--regroup-every",
        type=int,
        default=4,
        help="R: k-means every R epochs in smog/lagging (default: %(default)s)",
    )
    ap.add_argument(
        "--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS)
    )
    ap.add_argument(
        "--data",
        default="demo:4000",
        help="train.py --data (default: %(default)s: half the demo's images, see --batch-size)",
    )
    ap.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="train.py --batch-size (default: %(default)s: with demo:4000 the main job's 31 steps per "
        "epoch, so R epochs of lag are as many steps as there, at half the cost)",
    )
    ap.add_argument(
        "--out",
        default="runs/ablation",
        help="run directories and ablation.json (default: %(default)s)",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    ap.add_argument(
        "train_args",
        nargs=argparse.REMAINDER,
        help="after --: extra train.py options for every run (e.g. -- --lr 0.5)",
    )
    return ap


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    args.arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in args.arms if a not in ARMS]
    if bad or not args.arms or not args.seeds:
        ap.error(
            f"unknown arm(s) {bad}; choose from {', '.join(ARMS)}"
            if bad
            else "no arms or no seeds given"
        )
    if args.epochs < 1 or not 1 <= args.regroup_every:
        ap.error("--epochs and --regroup-every must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    plan = [
        (arm, s) for s in args.seeds for arm in args.arms
    ]  # seed-major: a partial run covers every arm
    if args.dry_run:
        for arm, s in plan:
            for c in commands(arm, s, args):
                print(shlex.join(["python", *c]))
        return 0
    t0 = time.time()
    mach = machine()  # at the start: the commit the runs are made by
    runs: dict = {arm: [] for arm in args.arms}
    for i, (arm, s) in enumerate(plan):
        rec = run_one(arm, s, args)
        runs[arm].append(rec)
        print(
            f"[{i + 1}/{len(plan)}] {arm} seed {s}: linear {rec['linear_top1']:.2f}  kNN {rec['knn_top1']:.2f}  "
            f"(train {rec['train_s']:.0f}s, eval {rec['eval_s']:.0f}s; {time.time() - t0:.0f}s so far)",
            flush=True,
        )
    agg = aggregate(runs)
    out = dict(
        description={a: ARMS[a][0] for a in args.arms},
        epochs=args.epochs,
        regroup_every=args.regroup_every,
        data=args.data,
        seeds=args.seeds,
        train_args=args.train_args,
        machine=mach,
        metrics=dict(
            linear_top1="linear probe on cached features, last-epoch top-1 % (eval_linear.py "
            "--cached-features, 100 epochs)",
            knn_top1="weighted kNN top-1 %, k=20, T=0.07",
        ),
        summary=agg,
        runs=runs,
        argv=sys.argv[1:] if argv is None else list(argv),
    )
    path = os.path.join(args.out, "ablation.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(out, fh, indent=1)
    os.replace(path + ".tmp", path)
    print(table(agg))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
