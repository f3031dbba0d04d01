"""The evaluations train.py runs (one implementation: probes.py's): the kNN monitor on the held-out
split after each epoch, and the final table of the demo (linear probes of raw pixels, a random-init
encoder, the SMoG encoder and a supervised encoder trained for the same steps)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import smog
from smog_train import backbones, checkpoint, data, probes
from smog_train.batches import StepBatches, loader, to_device
from smog_train.launch import rank0_print


def extract(backbone: nn.Module, ds, cfg, device) -> tuple:
    return probes.extract_features(
        backbone,
        probes.shard_loader(ds, 256, workers=cfg.workers, pin_memory=device.type == "cuda"),
        device,
    )


def knn_monitor(backbone: nn.Module, train_plain, test_ds, n_classes: int, cfg, device) -> tuple:
    """Weighted kNN top-1 (%) of the online backbone on the held-out split -> (top1, train feats, test feats)."""
    tr = train_plain
    if cfg.knn_max_train and len(tr) > cfg.knn_max_train:
        tr = torch.utils.data.Subset(
            tr, torch.linspace(0, len(tr) - 1, cfg.knn_max_train).long().tolist()
        )
    ftr, ytr = extract(backbone, tr, cfg, device)
    fte, yte = extract(backbone, test_ds, cfg, device)
    top1 = probes.knn_eval(ftr, ytr, fte, yte, n_classes, ks=(cfg.knn_k,), T=cfg.knn_t)[cfg.knn_k]
    return top1, (ftr, ytr), (fte, yte)


def train_supervised(cfg, train_raw, n_classes: int, steps: int, device, autocast) -> nn.Module:
    """The same backbone trained with labels (cross-entropy, linear head) for `steps` steps of the same
    global batch, on the global-crop augmentation of set A; SGD momentum 0.9, cosine lr, wd 5e-4."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 2)
        backbone, fdim = backbones.build_backbone(
            cfg.arch, cifar_stem=cfg.cifar_stem, drop_path=cfg.drop_path, width=cfg.width
        )
        net = nn.Sequential(backbone, nn.Linear(fdim, n_classes)).to(device)
    if cfg.channels_last and cfg.arch != "swin_t":
        net.to(memory_format=torch.channels_last)  # as the SMoG networks
    world = dist.get_world_size() if smog.dist_ready() else 1
    rank = dist.get_rank() if smog.dist_ready() else 0
    ddp = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    aug = data.Augmentation(
        "A", cfg.image_size, (cfg.global_scale_min, cfg.global_scale_max), blur_scale=cfg.blur_scale
    )
    sampler = StepBatches(len(train_raw), rank, world, cfg.batch_size // world, 1, cfg.seed + 2)
    dl = loader(
        data.AugmentedDataset(train_raw, aug, batched=cfg.augment != "pil"),
        sampler,
        cfg,
        device,
        persistent=True,
    )
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
                loss = F.cross_entropy(ddp(to_device(x, device, cfg)).float(), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        epoch += 1
    return backbone


def final_eval(
    cfg,
    model: smog.SMoG,
    train_raw,
    train_plain,
    test_ds,
    n_classes: int,
    steps: int,
    device,
    autocast,
    smog_feats=None,
) -> dict:
    """The demo table: linear probes (probes.linear_probe_features, cached features, last-epoch
    top-1 %) of raw pixels, a random-init encoder, the SMoG encoder and a supervised encoder."""
    t0 = time.time()

    def probe(tr, te):
        return probes.linear_probe_features(
            *tr,
            *te,
            n_classes,
            epochs=cfg.probe_epochs,
            lr=cfg.probe_lr,
            wd=1e-6,
            batch_size=256,
            seed=cfg.seed,
        )["top1"]

    def encoder_probe(backbone):
        return probe(
            extract(backbone, train_plain, cfg, device), extract(backbone, test_ds, cfg, device)
        )

    res = {}
    res["pixels"] = encoder_probe(nn.Flatten())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        rnd, _ = backbones.build_backbone(cfg.arch, cifar_stem=cfg.cifar_stem, width=cfg.width)
    res["random_init"] = encoder_probe(rnd.to(device))
    res["smog"] = probe(*smog_feats) if smog_feats else encoder_probe(model.backbone)
    t1 = time.time()
    rank0_print(f"final eval: supervised baseline, {steps} steps of batch {cfg.batch_size} ...")
    res["supervised"] = encoder_probe(
        train_supervised(cfg, train_raw, n_classes, steps, device, autocast)
    )
    rank0_print(
        f"final eval: {time.time() - t0:.0f}s (supervised baseline {time.time() - t1:.0f}s)"
    )
    return res


def results_table(res: dict, cfg) -> str:
    names = {
        "pixels": "raw pixels",
        "random_init": "random-init encoder",
        "smog": "SMoG encoder",
        "supervised": "supervised encoder (same backbone, same steps)",
    }
    w = max(len(v) for v in names.values())
    lines = [
        f"linear probe on {cfg.data} ({cfg.probe_epochs} epochs on frozen features), top-1 %",
        f"| {'features':<{w}} | top-1 |",
        f"|{'-' * (w + 2)}|-------|",
    ]
    lines += [f"| {names[k]:<{w}} | {res[k]:5.1f} |" for k in names]
    return "\n".join(lines)


def final_evaluation(run, train_raw, train_plain, test_ds, n_classes: int) -> int:
    """--final-eval for a checkpoint.Run: the demo table (final_eval) -> out_dir/demo_results.json; a finished run
    that is started again prints the stored table instead."""
    cfg, done = run.cfg, run.path("demo_results.json")
    if (
        cfg.final_eval
        and os.path.exists(done)
        and run.knn_feats is None
        and run.step == run.total_steps
    ):
        if run.rank == 0:  # all ranks see it; one rank prints
            with open(done) as fh:
                res = json.load(fh)
            print(
                f"run already complete; stored results ({done}):\n" + results_table(res, cfg),
                flush=True,
            )
            checkpoint.log(
                run, dict(type="final", **res, knn=run.knn)
            )  # the log was truncated to the checkpoint
        cfg = dataclasses.replace(cfg, final_eval=False)
    if cfg.final_eval:
        res = final_eval(
            cfg,
            run.model,
            train_raw,
            train_plain,
            test_ds,
            n_classes,
            run.total_steps,
            run.device,
            run.autocast,
            smog_feats=run.knn_feats,
        )
        if run.rank == 0:
            print(results_table(res, cfg), flush=True)
            print(
                "kNN top-1 per epoch: " + ", ".join(f"{e}: {a:.1f}" for e, a in run.knn), flush=True
            )
            with open(done + ".tmp", "w") as fh:
                json.dump(res, fh, indent=1)
            os.replace(done + ".tmp", done)
            checkpoint.log(run, dict(type="final", **res, knn=run.knn))
            print(
                f"results: {done} (the table), {run.path('log.jsonl')} (every step and epoch)",
                flush=True,
            )
    return 0
