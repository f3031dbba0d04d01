"""SMoG pretraining: the same file from a 2-core laptop to many GPUs and nodes.

    python train.py                                    # the main job: built-in demo data, CPU
    python train.py --preset cifar10-r18 --download    # one GPU (or CPU)
    torchrun --nproc_per_node=8 train.py --preset imagenet-r50 --data imagefolder:/data/imagenet
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        train.py --preset imagenet-r50 --data imagefolder:/data/imagenet
    python train.py -h                                 # every option, the presets

--batch-size is the *global* batch: per rank and micro-batch it is batch / (world * accum). A run
in --out-dir resumes from its checkpoint.pth automatically. METHOD.md explains the method, the
recipes and what is exact here (gradient accumulation, resume, non-finite losses); smog.py is the
method itself; smog_train/ holds the machinery this file calls (config, data, checkpoint, ...).

Read top to bottom: main() and train(), the whole run; the epoch loop; the pieces of one step in
their order; the optimisers and schedules; building the model.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import smog
from smog_train import backbones, checkpoint, compat, data, evaluation, faults, launch, runlock
from smog_train import sync_bn as smog_sync_bn
from smog_train.batches import (
    StepBatches,
    batch_geometry,
    build_data,
    item_seed,
    loader,
    reraise_data_error,
    to_device,
)
from smog_train.checkpoint import Run, log, resume_or_start, save
from smog_train.config import RUNTIME_FIELDS, Config, UsageError, check_values, parse_config
from smog_train.launch import rank0_print
from smog_train.memory_bank import MemoryBank, bn_buffers, fill_bank, restore_buffers

# ------------------------------------------------------------------------------------------------
# the run


def main(argv: Optional[Sequence[str]] = None) -> int:
    """-> exit code: 0 done (or SIGTERM, checkpoint written), 2 bad input, 3 non-finite loss, 4 a
    full / read-only disk, 5 a collective timed out (--dist-timeout), 130 Ctrl-C (checkpoint
    written), 128 + signal for a signal before the first step (nothing saved yet). docs/RELIABILITY.md."""
    lock = runlock.RunLock()
    cfg = None
    if hasattr(signal, "SIGXFSZ"):  # past ulimit -f: an EFBIG error (one line), not a core dump
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        cfg = parse_config(argv)
        return train(cfg, lock)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except checkpoint.StorageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 4
    except FloatingPointError as e:  # the final evaluation's linear probe
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    except checkpoint.Interrupted as e:
        if lock.phase.startswith("in the final evaluation"):
            print(
                f"{e} {lock.phase}: training is complete; rerun the same command to redo the "
                f"evaluation",
                file=sys.stderr,
                flush=True,
            )
        else:
            resume = os.path.exists(os.path.join(cfg.out_dir, "checkpoint.pth"))
            print(
                f"{e} {lock.phase}: nothing was saved yet; rerun the same command to "
                f"{'resume from its checkpoint' if resume else 'start again'}",
                file=sys.stderr,
                flush=True,
            )
        return 128 + e.signum
    except RuntimeError as e:  # a collective failed: one line (torchrun reports the exit codes)
        if cfg is None or not smog.dist_ready():
            raise
        if launch.is_timeout(e):
            print(f"error: {launch.timeout_line(cfg.dist_timeout)}", file=sys.stderr, flush=True)
            launch.exit_process(5)  # the process group cannot be destroyed cleanly after this
        if launch.is_peer_lost(e):
            print(f"error: {launch.peer_lost_line(e)}", file=sys.stderr, flush=True)
            launch.exit_process(1)
        raise
    finally:
        lock.release()
        if smog.dist_ready():
            dist.destroy_process_group()


def train(cfg: Config, lock: Optional[runlock.RunLock] = None) -> int:
    """The whole run -> exit code: set up, build data / model / optimiser / schedules, resume or
    start, the epoch loop (regroup at the start of an epoch), the final evaluation."""
    lock = lock or runlock.RunLock()
    with checkpoint.on_signals(lock) as signals:
        lock.phase = "during setup"
        return _train(cfg, lock, signals)


def _train(cfg: Config, lock: runlock.RunLock, signals) -> int:
    check_values(cfg)
    checkpoint.check_writable(cfg.out_dir)  # now, not after loading the data and filling the bank
    rank, world, device = launch.setup(cfg)
    take_lock(lock, cfg.out_dir, rank)  # one run per out_dir, before anything is written
    train_raw, train_plain, test_ds = build_data(cfg, rank)
    if cfg.final_eval and test_ds is None:
        raise UsageError(
            f"--final-eval needs a held-out split; {cfg.data} has none (create PATH/val)"
        )
    if (
        cfg.augment == "tensor"
        and data.in_memory_arrays(train_raw) is None
        and not isinstance(train_raw, data.ImageFolderDataset)
    ):
        raise UsageError(
            f"--augment tensor needs a dataset held as one array (demo, cifar10, "
            f"cifar100, stl10) or an image folder, not {cfg.data}; use --augment "
            f"pil or auto"
        )
    micro, spe = batch_geometry(cfg, len(train_raw), world)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    )
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext

    model, sync_bn = build_model(cfg, rank, world, device)  # identical initial weights everywhere
    optimizer = build_optimizer(cfg, model)
    step_module = StepModule(model)
    # --no-sync-bn: DDP broadcasts rank 0's buffers every forward, so BN statistics agree
    net = (
        step_module
        if world == 1
        else nn.parallel.DistributedDataParallel(
            step_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            **compat.ddp_buffer_sync(not sync_bn),
        )
    )
    bank = MemoryBank(len(train_raw), cfg.dim, rank, world, device)  # [2, N, D], sharded by index
    run = Run(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        model=model,
        net=net,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
        bank=bank,
        sched=schedules(cfg, spe),
        spe=spe,
        autocast=autocast,
        cfg_dict=dict(asdict(cfg), model=asdict(cfg.model_config()), git=launch.git_revision()),
        hooks=faults.from_env(),
        lock=lock,
    )
    n_classes = data.num_classes(train_raw)
    lock.phase = "while loading the checkpoint or filling the memory bank"
    resumed = resume_or_start(
        run,
        train_raw,
        RUNTIME_FIELDS,
        start=lambda: fill_bank(model, bank, train_plain, cfg, device, micro, autocast),
    )  # restore all, or fill the bank
    launch.announce(run, micro, amp, resumed, test_ds is not None)

    views = data.ViewsDataset(
        train_raw,
        data.MultiCropViews(
            cfg.image_size,
            cfg.local_size,
            cfg.n_local,
            (cfg.global_scale_min, cfg.global_scale_max),
            (cfg.local_scale_min, cfg.local_scale_max),
            cfg.blur_scale,
        ),
        batched=cfg.augment != "pil",
        decode_on_device=data.decode_on_device(device, cfg.workers),
    )
    sampler = StepBatches(len(train_raw), rank, world, micro, cfg.accum, cfg.seed)
    batches = loader(views, sampler, cfg, device, persistent=True)
    lock.phase = "before the first step"
    for epoch in range(run.epoch, cfg.epochs):
        start = run.step_in_epoch if epoch == run.epoch else 0
        if start == 0 and epoch % cfg.regroup_every == 0:
            regroup(run, epoch)  # k-means over the memory bank
        sampler.set_epoch(epoch, start)  # resumes mid-epoch at the exact batch
        signals.loop = True  # a signal now: checkpoint at the step's end
        code = train_one_epoch(run, views.batches(iter(batches), device), epoch, start, signals)
        if code is not None:
            return code  # SIGTERM (0), Ctrl-C (130), non-finite (3)
        end_of_epoch(run, epoch, train_plain, test_ds, n_classes)
    signals.loop, lock.phase = False, "in the final evaluation, after the last checkpoint"
    return evaluation.final_evaluation(run, train_raw, train_plain, test_ds, n_classes)


def take_lock(lock: runlock.RunLock, out_dir: str, rank: int) -> None:
    """Rank 0 takes out_dir's lock; every rank learns the outcome (all exit 2 if it is held)."""
    err = None
    if rank == 0:
        try:
            note = lock.acquire(out_dir)
            if note:
                print(note, file=sys.stderr, flush=True)
        except UsageError as e:
            err = str(e)
    if smog.dist_ready():
        box = [err]
        dist.broadcast_object_list(box, 0)
        err = box[0]
    if err:
        raise UsageError(err)


# ------------------------------------------------------------------------------------------------
# the epoch loop


def regroup(run: Run, epoch: int) -> None:
    """Re-cluster the groups of every head from the memory bank (smog.regroup: spherical k-means of
    head h over bank row h mod 2, identical on all ranks), then reset the momentum network to the
    online one. The initial rows are drawn by a generator seeded by (seed, epoch): the same rows
    whatever the number of ranks."""
    cfg, model, bank, t0 = run.cfg, run.model, run.bank, time.time()
    gen = torch.Generator().manual_seed(item_seed(cfg.seed, epoch, 1 << 40))
    model.groups.copy_(
        smog.regroup(
            bank.local,
            bank.index,
            bank.n,
            cfg.n_heads,
            cfg.n_groups,
            cfg.kmeans_iters,
            generator=gen,
        )
    )
    run.hooks.regrouped(epoch)
    if cfg.reset_momentum:
        run.model.reset_momentum()
    rank0_print(
        f"epoch {epoch}: regrouped {cfg.n_heads} x {cfg.n_groups} groups over the memory "
        f"bank ({time.time() - t0:.1f}s)"
    )


def train_one_epoch(run: Run, batches, epoch: int, start: int, signals) -> Optional[int]:
    """Steps start .. spe-1 of `epoch`. -> None, or the exit code when the run stops here: 0 after
    the SIGTERM checkpoint, 130 after the Ctrl-C (SIGINT) one, 3 for a non-finite loss beyond
    --skip-nonfinite."""
    cfg, model = run.cfg, run.model
    attainable = min(1.0, 2 * cfg.batch_size / cfg.n_groups)  # groups hit at most
    run.peak_hit = torch.full((), run.peak_hit if start else 0.0, device=run.device)
    meter = StepLog(run)
    for s in range(start, run.spe):
        step = epoch * run.spe + s
        seed_step(cfg.seed, step, run.rank)
        run.hooks.step_start(step)
        micro_batches, idx = next_step(batches, run, meter)  # [(online, momentum crops)] x accum
        run.hooks.batch(step, run.rank, micro_batches, idx)
        lr, beta, m = (float(run.sched[k][step]) for k in ("lr", "beta", "m"))
        for g in run.optimizer.param_groups:
            g["lr"] = lr
        undo = undo_point(model) if cfg.skip_nonfinite else None  # a skipped step leaves no trace
        model.momentum_step(m)  # (M1) EMA before the forward
        loss, stats, bank_z = train_step(run, micro_batches, beta)
        loss = run.hooks.loss(step, loss)
        loss_v, bad, term, intr = step_flags(loss, signals, run)  # one all-reduce: a host sync
        run.hooks.after_backward(step)
        if bad and not skip_nonfinite(run, step, epoch, undo):
            return 3
        if not bad:
            optimizer_step(run)
            run.bank.write(torch.cat(idx), bank_z)  # this step's global embeddings
        run.peak_hit = torch.maximum(run.peak_hit, stats["nonempty"].mean() / attainable)
        run.step, run.epoch, run.step_in_epoch = step + 1, epoch, s + 1
        meter.step(step, s, loss_v, lr, beta, m, stats)
        if term or intr:
            name = "SIGINT" if intr else "SIGTERM"
            save(run, name)
            rank0_print(
                f"{name}: checkpoint written ({run.last_ck}), exiting; rerun the same "
                f"command to resume"
            )
            return 130 if intr else 0
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and s + 1 < run.spe:
            save(run, f"every {cfg.save_every} steps")
    return None


def end_of_epoch(run: Run, epoch: int, train_plain, test_ds, n_classes: int) -> None:
    """kNN monitor, groups identical on all ranks, collapse guard, bad images, log, checkpoint."""
    cfg = run.cfg
    rec = dict(
        type="epoch", epoch=epoch, step=(epoch + 1) * run.spe, peak_group_hit=run.peak_hit.item()
    )
    last = epoch + 1 == cfg.epochs
    if cfg.knn_every and test_ds is not None and ((epoch + 1) % cfg.knn_every == 0 or last):
        t0 = time.time()
        rec["knn_top1"], *run.knn_feats = evaluation.knn_monitor(
            run.model.backbone, train_plain, test_ds, n_classes, cfg, run.device
        )
        run.knn.append([epoch, rec["knn_top1"]])
        rank0_print(
            f"epoch {epoch}: kNN top-1 {rec['knn_top1']:.2f}% (k={cfg.knn_k}, "
            f"T={cfg.knn_t}, "
            f"{time.time() - t0:.1f}s)"
        )
    if run.world > 1:
        rec["groups_rank_max_diff"] = groups_rank_max_diff(run.model, epoch)
    if rec["peak_group_hit"] < cfg.collapse_threshold:
        rank0_print(
            f"warning: possible collapse: in epoch {epoch} no step hit more than "
            f"{100 * rec['peak_group_hit']:.1f}% of the attainable groups (threshold "
            f"{100 * cfg.collapse_threshold:.0f}%); try a lower --lr, a higher --tau, "
            f"fewer --n-groups, a beta closer to 1 (--beta-end), or more warmup "
            f"(--warmup-epochs)"
        )
        rec["collapse_warning"] = True
    if cfg.bad_images == "skip" and run.rank == 0:
        rec.update(data.skipped_images(cfg.out_dir))
    log(run, rec)
    run.epoch, run.step_in_epoch = epoch + 1, 0
    save(run, f"end of epoch {epoch}")


# ------------------------------------------------------------------------------------------------
# one step: the pieces the loop calls, in its order


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch's (CPU and CUDA), python's and numpy's global generators from (seed, global step,
    rank) at the start of every step: all that a step draws from them (drop-path masks; crops and
    k-means have their own generators) follows from the position in the run, so no checkpoint has to
    carry RNG states and a resumed run, on any number of ranks, draws what it would have drawn."""
    s = item_seed(seed, step, (1 << 41) + rank)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % (1 << 32))


def next_step(batches, run: Run, meter: StepLog) -> tuple:
    """The `accum` micro-batches of one step, on the device
    -> ([(online crops, momentum crops)] per micro-batch, [dataset indices] per micro-batch)."""
    t0 = time.time()
    micro_batches, idx = [], []
    try:
        for _ in range(run.cfg.accum):
            online, momentum, i = next(batches)
            micro_batches.append(
                (
                    [to_device(x, run.device, run.cfg) for x in online],
                    [to_device(x, run.device, run.cfg) for x in momentum],
                )
            )
            idx.append(i.to(run.device))
    except data.BadImageError as e:
        reraise_data_error(e)
    meter.wait += time.time() - t0
    return micro_batches, idx


def undo_point(model: smog.SMoG) -> restore_buffers:
    """Buffers (groups, BN statistics) and the momentum network as they are now; __exit__ puts
    them back."""
    saved = restore_buffers(
        [
            *model.buffers(),
            *model.momentum_backbone.parameters(),
            *model.momentum_projector.parameters(),
        ]
    )
    saved.__enter__()
    return saved


class StepModule(nn.Module):
    """What DDP wraps. DDP synchronises the gradients of what runs through its forward, so forward
    only dispatches to one of the two named computations of a step:
      iteration(online, momentum, beta): one SMoG iteration (SMoG.forward; groups updated in place)
      loss_against_groups(online, targets): gradient accumulation's second pass, one micro-batch's
        loss against the already updated groups (every online crop against every target)."""

    def __init__(self, model: smog.SMoG):
        super().__init__()
        self.model = model

    def forward(self, computation: str, *args):
        return getattr(self, computation)(*args)

    def iteration(self, online: list, momentum: list, beta: float) -> tuple:
        return self.model(online, momentum, beta)

    def loss_against_groups(self, online: list, targets: torch.Tensor) -> torch.Tensor:
        """targets [H, J, b]: the mean over heads of smog.multi_target_loss with head h's groups."""
        m = self.model
        p = m.online_forward(online)[1]  # (C*b, D)
        p = p.float().view(len(online), online[0].shape[0], -1)  # (C, b, D)
        with torch.autocast(p.device.type, enabled=False):
            return torch.stack(
                [
                    smog.multi_target_loss(p, m.groups[h], t, m.cfg.tau)
                    for h, t in enumerate(targets)
                ]
            ).mean()


def train_step(run: Run, micro_batches: list, beta: float) -> tuple:
    """Forward + backward of one optimiser step
    -> (mean loss (detached), stats, bank embeddings [2, b_total, D] of the online global crops)."""
    if len(micro_batches) > 1:
        return accumulated_step(run, micro_batches, beta)
    online, momentum = micro_batches[0]
    with run.autocast():
        loss, stats, bank_z = run.net("iteration", online, momentum, beta)
    run.backward(loss)
    return loss.detach(), stats, bank_z


def accumulated_step(run: Run, micro_batches: list, beta: float) -> tuple:
    """Several micro-batches, one group update on all of them (METHOD.md, gradient accumulation).
    Pass 1, no grad: the momentum targets' embeddings and the online global-crop embeddings of
    every micro-batch; then smog.targets_and_update once on their concatenation, as SMoG.forward
    does for one batch. Pass 2: each micro-batch with gradient, its loss against the new groups,
    with the RNG state recorded in pass 1 and its BN running statistics replayed (pass 1 runs
    with drop-path off; pass 2's drop-path masks are drawn from the replayed state)."""
    model, A = run.model, len(micro_batches)
    z_update, z_target, rng_states = [], [], []
    with torch.no_grad(), restore_buffers(bn_buffers(model.backbone) + bn_buffers(model.projector)):
        for online, momentum in micro_batches:
            b = online[0].shape[0]
            with run.autocast():
                zt = model.momentum_embed(momentum)[: 2 * b]
                rng_states.append(_rng_get(run.device))  # replayed in pass 2
                z = model.update_embed(online)  # BN over all crops
            z_target.append(F.normalize(zt.float(), dim=-1).view(2, b, -1))
            z_update.append(F.normalize(z.float(), dim=-1).view(2, b, -1))
    z_all, zt_all = torch.cat(z_update, 1), torch.cat(z_target, 1)  # (2, A*b, D)
    with torch.no_grad():
        new_groups, targets = smog.targets_and_update(model.groups, z_all, zt_all, beta)
        model.groups.copy_(new_groups)  # targets (H, 2, A*b)
    total = torch.zeros((), device=run.device)
    ddp = isinstance(run.net, nn.parallel.DistributedDataParallel)
    for i, (online, _) in enumerate(micro_batches):
        b = online[0].shape[0]
        _rng_set(rng_states[i], run.device)
        last = i == A - 1  # DDP all-reduces the gradients once, in the last micro-batch's backward
        with run.net.no_sync() if ddp and not last else nullcontext():
            with run.autocast():
                loss = run.net("loss_against_groups", online, targets[:, :, i * b : (i + 1) * b])
            run.backward(loss / A)
        total += loss.detach() / A
    return total, smog.target_stats(targets, model.cfg.n_groups), z_all


def _rng_get(device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _rng_set(state: torch.Tensor, device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def step_flags(loss: torch.Tensor, signals, run: Run) -> tuple:
    """One small all-reduce per step -> (mean loss over ranks, non-finite on any rank, SIGTERM on
    any rank, SIGINT on any rank)."""
    flags = torch.stack(
        [
            loss.float(),
            (~torch.isfinite(loss)).float(),
            torch.tensor(float(signals.term), device=run.device),
            torch.tensor(float(signals.int), device=run.device),
        ]
    )
    if smog.dist_ready():
        dist.all_reduce(flags)
    return (
        flags[0].item() / run.world,
        flags[1].item() > 0,
        flags[2].item() > 0,
        flags[3].item() > 0,
    )


def skip_nonfinite(run: Run, step: int, epoch: int, undo: Optional[restore_buffers]) -> bool:
    """The non-finite-loss policy -> True: the step was skipped (gradients dropped; groups, BN
    statistics and momentum network restored); False: the run stops (one line on stderr naming the
    last good checkpoint)."""
    run.optimizer.zero_grad(set_to_none=True)
    if run.skipped_nonfinite >= run.cfg.skip_nonfinite:
        last = run.last_ck or "none (no checkpoint was written yet)"
        print(
            f"error: non-finite loss at step {step} (epoch {epoch}); stopped without saving; "
            f"last good checkpoint: {last}; lower --lr or use --skip-nonfinite N",
            file=sys.stderr,
        )
        return False
    undo.__exit__()
    run.skipped_nonfinite += 1
    rank0_print(
        f"warning: non-finite loss at step {step}, step skipped "
        f"({run.skipped_nonfinite}/{run.cfg.skip_nonfinite})"
    )
    return True


def optimizer_step(run: Run) -> None:
    if run.cfg.clip_grad > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


class StepLog:
    """A log.jsonl record and a console line every --log-every steps and at the end of an epoch:
    throughput, the fraction of time spent waiting for data, and the run's ETA."""

    def __init__(self, run: Run):
        self.run, self.t, self.wait, self.imgs = run, time.time(), 0.0, 0
        self.t_start, self.step_start = self.t, run.step

    def step(self, step: int, s: int, loss_v: float, lr: float, beta: float, m: float, stats: dict):
        run = self.run
        self.imgs += run.cfg.batch_size
        if step % run.cfg.log_every != 0 and s != run.spe - 1:
            return
        now = time.time()
        dt = now - self.t
        rec = dict(
            type="step",
            step=step,
            epoch=run.epoch,
            loss=loss_v,
            lr=lr,
            beta=beta,
            m=m,
            nonempty=stats["nonempty"].mean().item(),
            entropy=stats["entropy"].mean().item(),
            img_s=self.imgs / max(dt, 1e-9),
            data_frac=self.wait / max(dt, 1e-9),
            time=now,
        )
        log(run, rec)
        per_step = (now - self.t_start) / max(1, step + 1 - self.step_start)
        eta = per_step * (run.total_steps - step - 1)
        rank0_print(
            f"epoch {run.epoch} step {step}/{run.total_steps} loss {loss_v:.4f} "
            f"lr {lr:.4g} "
            f"beta {beta:.4f} m {m:.4f} img/s {rec['img_s']:.0f} data "
            f"{100 * rec['data_frac']:.0f}% nonempty {rec['nonempty']:.2f} entropy "
            f"{rec['entropy']:.2f} (ln K {math.log(run.cfg.n_groups):.2f}) "
            f"ETA {_duration(eta)}"
        )
        self.t, self.wait, self.imgs = now, 0.0, 0


def _duration(seconds: float) -> str:
    """h:mm:ss; the ETA is the steps left times this epoch's mean step time (no evaluations)."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def groups_rank_max_diff(model: smog.SMoG, epoch: int) -> float:
    """Group features must be identical on every rank (the synchronous update); checked each
    epoch."""
    g0 = model.groups.clone()
    dist.broadcast(g0, 0)
    diff = (model.groups - g0).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if diff.item() != 0:
        raise RuntimeError(
            f"group features differ across ranks by {diff.item()} (epoch {epoch}); "
            f"the synchronous update is broken"
        )
    return diff.item()


# ------------------------------------------------------------------------------------------------
# optimisers and schedules


class LARS(torch.optim.Optimizer):
    """SGD momentum wrapped in LARS, the released rule (apex LARC, clip=False, eps 1e-8), per tensor
    p with gradient g: if ||p|| > 0 and ||g|| > 0,
        g <- (g + wd * p) * trust * ||p|| / (||g|| + wd * ||p|| + eps)    (norms of p and raw g)
    otherwise g is left as it is (no weight decay either); then torch.optim.SGD's momentum step with
    the scheduled lr: buf <- momentum * buf + g (the first buf = g), p <- p - lr * buf. No host
    sync."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coef: float = 0.001,
        eps: float = 1e-8,
    ):
        super().__init__(
            params,
            dict(
                lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coef=trust_coef, eps=eps
            ),
        )

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
    """Online backbone + projector + predictor. LARS (the released ResNet recipe): every online
    parameter, biases and BN weights included, weight decay on all. SGD / AdamW: biases, norm
    weights and Swin's relative position bias tables without weight decay (the released Swin-T
    exclusions)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # no momentum net
    if cfg.optimizer == "lars":
        return LARS(
            [p for _, p in params],
            lr=0.0,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            trust_coef=cfg.trust_coef,
        )
    decay, no_decay = [], []
    for name, p in params:
        (no_decay if p.ndim <= 1 or "relative_position_bias_table" in name else decay).append(p)
    groups = [
        dict(params=decay, weight_decay=cfg.weight_decay),
        dict(params=no_decay, weight_decay=0.0),
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999))


def schedules(cfg: Config, steps_per_epoch: int) -> dict:
    """Per-step float64 arrays [total_steps]: lr (warmup then cosine), beta (linear), m (EMA).
    End points as released (main_SMoG.py): the warmup is linspace(start, peak, W), so its last step
    is at the peak, and the cosine over the T - W remaining steps t is min + (peak - min) (1 +
    cos(pi t / (T - W))) / 2, one step short of the minimum at the end; beta decreases by
    (start - end) / T before every step's use, so it is start - (t + 1)(start - end) / T at step
    t."""
    total = cfg.epochs * steps_per_epoch
    peak = cfg.lr * cfg.batch_size / cfg.lr_batch
    warm = min(total, int(round(cfg.warmup_epochs * steps_per_epoch)))
    t = torch.arange(total, dtype=torch.float64)
    lr = peak * cfg.min_lr_ratio + 0.5 * peak * (1 - cfg.min_lr_ratio) * (
        1 + torch.cos(math.pi * (t - warm) / max(1, total - warm))
    )
    if warm:
        lr[:warm] = torch.linspace(peak * cfg.warmup_lr_ratio, peak, warm, dtype=torch.float64)
    m = torch.full((total,), cfg.ema, dtype=torch.float64)
    if cfg.ema_schedule == "cosine":
        m = 1 - (1 - cfg.ema) * (torch.cos(math.pi * t / max(1, total - 1)) + 1) / 2
    beta = smog.beta_schedule(cfg.beta_start, cfg.beta_end, total + 1)[1:]
    return dict(lr=lr, beta=beta, m=m)


# ------------------------------------------------------------------------------------------------
# building the model


def build_model(cfg: Config, rank: int, world: int, device) -> tuple:
    """-> (SMoG on the device, whether it uses SyncBN). Seeds first: identical initial weights on
    every rank."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    model = backbones.build_smog(cfg.model_config())
    sync_bn = world > 1 and cfg.sync_bn
    if sync_bn:  # both networks: SMoG.forward runs them on the same global batch
        model = (
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
            if device.type == "cuda"
            else smog_sync_bn.convert(model)
        )
    model.to(device)
    if cfg.channels_last and cfg.arch != "swin_t":
        model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.backbone.compile()
        model.momentum_backbone.compile()
    return model, sync_bn


if __name__ == "__main__":
    launch.exit_process(main())
