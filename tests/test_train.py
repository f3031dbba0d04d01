"""train.py: CLI and presets, the optimiser and schedules, the accumulated step, and real runs:
one process on the built-in data and on an image folder, two gloo processes under torchrun, and a run
killed mid-epoch (SIGKILL) then resumed, bitwise equal to an uninterrupted one."""

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import smog
import train
from smog_train import backbones, checkpoint, config
from state_compare import assert_same

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a tiny run: 96 images, 6 steps per epoch of 16, a 4-wide CNN, 2 heads of 8 groups
TINY = [
    "--data",
    "demo:96",
    "--width",
    "4",
    "--dim",
    "16",
    "--hidden-dim",
    "32",
    "--n-groups",
    "8",
    "--n-heads",
    "2",
    "--batch-size",
    "16",
    "--epochs",
    "2",
    "--n-local",
    "1",
    "--no-final-eval",
    "--workers",
    "0",
    "--threads",
    "1",
    "--log-every",
    "1",
]


def run_train(args, cwd, env=None, nproc=1, timeout=240):
    e = {k: v for k, v in os.environ.items() if not k.startswith("SMOG_TEST_")}
    e.update({"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}, **(env or {}))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            *cmd[1:],
        ]
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def ok(r):
    assert r.returncode == 0, (
        f"rc {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    )
    return r


def records(out, kind):
    with open(os.path.join(out, "log.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r["type"] == kind]


# ----------------------------------------------------------------------------------------------
# configuration


def test_help_lists_every_option_and_preset():
    r = ok(
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "train.py"), "-h"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
    )
    for f in dataclasses.fields(config.Config):
        assert "--" + f.name.replace("_", "-") in r.stdout
    for p in config.PRESETS:
        assert f"  {p}:" in r.stdout
    line = train.StepLog.step.__code__.co_consts  # the step line's literal pieces
    for field in ("loss", "lr", "beta", "m", "img/s", "data", "nonempty", "entropy", "ETA"):
        assert any(f" {field} " in f" {c}" for c in line if isinstance(c, str)), (
            field
        )  # printed ...
        assert f"\n  {field} " in r.stdout, field  # ... and explained


def test_refused_resume_names_every_changed_field_and_the_runs_config(tmp_path):
    """One refusal lists every field that differs, the flags that restore them and the run's own
    config.json, which --config reads back into the config the checkpoint holds."""
    saved = config.parse_config(["--data", "demo:100", "--out-dir", str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(saved)))
    ck = {"format": checkpoint.FORMAT, "world_size": 1, "config": dataclasses.asdict(saved)}
    now = config.parse_config(
        ["--data", "demo:100", "--n-groups", "6", "--epochs", "3", "--no-sync-bn"]
    )
    with pytest.raises(config.UsageError) as e:
        checkpoint.check_resume(ck, now, config.RUNTIME_FIELDS, str(tmp_path / "checkpoint.pth"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        f"cannot resume '{tmp_path}/checkpoint.pth': config fields "
    )
    for name, was, new in (
        ("epochs", saved.epochs, 3),
        ("n_groups", saved.n_groups, 6),
        ("sync_bn", True, False),
    ):
        assert f"'{name}' is {was!r} in the checkpoint but {new!r} now" in msg
    fix = msg.split("; pass ")[1]
    assert {f"--epochs {saved.epochs}", f"--n-groups {saved.n_groups}", "--sync-bn"} <= set(
        fix.split(" (or ")[0].replace(" --", "\n--").splitlines()
    )
    assert fix.endswith(
        f"(or --config {tmp_path}/config.json, the run's own config) or use a new --out-dir"
    )
    again = config.parse_config(["--config", str(tmp_path / "config.json")])
    checkpoint.check_resume(ck, again, config.RUNTIME_FIELDS, str(tmp_path / "checkpoint.pth"))


def test_presets_set_what_they_claim_and_options_win():
    c = config.parse_config([])
    assert (c.preset, c.data, c.arch, c.image_size, c.out_dir, c.final_eval) == (
        "demo",
        "demo",
        "smallcnn",
        32,
        os.path.join("runs", "demo"),
        True,
    )
    r50 = config.parse_config(["--preset", "imagenet-r50"])
    assert (r50.arch, r50.optimizer, r50.lr, r50.lr_batch, r50.batch_size, r50.epochs) == (
        "resnet50",
        "lars",
        4.8,
        4096,
        4096,
        400,
    )
    assert (r50.n_groups, r50.n_heads, r50.dim, r50.tau, r50.ema, r50.beta_start, r50.beta_end) == (
        3000,
        3,
        128,
        0.1,
        0.999,
        1.0,
        0.99,
    )
    assert (r50.image_size, r50.local_size, r50.n_local, r50.weight_decay, r50.warmup_epochs) == (
        224,
        96,
        4,
        1e-6,
        10,
    )
    assert (r50.global_scale_min, r50.local_scale_min, r50.local_scale_max) == (0.2, 0.05, 0.2)
    assert config.parse_config(["--preset", "imagenet-r50w2"]).arch == "resnet50w2"
    sw = config.parse_config(["--preset", "imagenet-swin-t"])
    assert (sw.arch, sw.dim, sw.optimizer, sw.lr, sw.weight_decay, sw.clip_grad, sw.drop_path) == (
        "swin_t",
        256,
        "adamw",
        1e-3,
        0.05,
        3.0,
        0.2,
    )
    assert math.isclose(sw.lr * sw.min_lr_ratio, 4e-5) and math.isclose(
        sw.lr * sw.warmup_lr_ratio, 4e-5
    )
    c10 = config.parse_config(["--preset", "cifar10-r18", "--lr", "1.0", "--epochs", "3"])
    assert (c10.data, c10.arch, c10.cifar_stem, c10.image_size, c10.lr, c10.epochs) == (
        "cifar10",
        "resnet18",
        True,
        32,
        1.0,
        3,
    )
    with pytest.raises(config.UsageError, match="unknown preset"):
        config.parse_config(["--preset", "nope"])
    with pytest.raises(config.UsageError, match="invalid float"):
        config.parse_config(["--lr", "abc"])


def test_schedules_warmup_cosine_beta_and_ema():
    c = dataclasses.replace(
        config.parse_config(["--preset", "imagenet-r50"]), epochs=20, batch_size=2048
    )
    s = train.schedules(c, 10)
    peak = 4.8 * 2048 / 4096
    # the released end points (main_SMoG.py): warmup linspace(start, peak, W), then the cosine over
    # t = 0 .. T-W-1 with period 2 (T - W), one step short of the minimum
    assert s["lr"].shape == (200,) and math.isclose(s["lr"][0], peak * c.warmup_lr_ratio)
    assert math.isclose(s["lr"][99], peak) and math.isclose(s["lr"][100], peak)
    start = peak * c.warmup_lr_ratio
    assert math.isclose(s["lr"][98], start + 98 / 99 * (peak - start))
    low = peak * 0.001
    assert math.isclose(s["lr"][-1], low + (peak - low) * (1 + math.cos(math.pi * 99 / 100)) / 2)
    assert bool((s["lr"][100:].diff() <= 0).all())
    # C_momentum decreased by (1 - 0.99) / T before each use
    assert math.isclose(s["beta"][0], 1 - 0.01 / 200) and math.isclose(s["beta"][-1], 0.99)
    assert bool((s["m"] == 0.999).all())
    m = train.schedules(dataclasses.replace(c, ema_schedule="cosine"), 10)["m"]
    assert math.isclose(m[0], 0.999) and m[-1] > 0.99999 and bool((m.diff() >= 0).all())


# ----------------------------------------------------------------------------------------------
# the accumulated step


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return backbones.build_smog(
        smog.SMoGConfig(arch="smallcnn", width=4, dim=8, hidden_dim=16, n_groups=5, n_heads=3)
    )


def _micro(b, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)]
        + [torch.randn(b, 3, 8, 8, generator=g)],
        [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)],
    )


def _grads(m):
    return [p.grad.clone() for p in m.parameters() if p.requires_grad]


def _run(m):
    """The run state train_step and accumulated_step read: this model, no DDP, fp32, plain backward."""
    return checkpoint.Run(
        cfg=None,
        rank=0,
        world=1,
        device=torch.device("cpu"),
        model=m,
        net=train.StepModule(m),
        optimizer=None,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        bank=None,
        sched={},
        spe=1,
        autocast=nullcontext,
        cfg_dict={},
    )


def test_step_batches_global_batch_is_the_same_block_whatever_the_world_size():
    """StepBatches: the global batch of step s, gathered over ranks in rank order (micro-batch by
    micro-batch), is perm[s*B:(s+1)*B] of the epoch's permutation for any world size and --accum,
    also after set_epoch(epoch, start); on one process it is DistributedSampler's order (as
    before)."""
    from smog_train.batches import StepBatches

    n, B, seed = 103, 12, 5
    for epoch in (0, 3):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        ds = torch.utils.data.DistributedSampler(
            range(n), num_replicas=1, rank=0, seed=seed, drop_last=True
        )
        ds.set_epoch(epoch)
        assert list(ds) == perm
        for accum in (1, 2):
            for world in (1, 2, 3, 6):
                micro = B // (world * accum)
                for start in (0, 4):
                    ranks = []
                    for r in range(world):
                        sb = StepBatches(n, r, world, micro, accum, seed)
                        sb.set_epoch(epoch, start)
                        ranks.append(list(sb))
                    assert all(len(x) == (n // B - start) * accum for x in ranks)
                    for s in range(start, n // B):
                        j = (s - start) * accum
                        items = [it for a in range(accum) for x in ranks for it in x[j + a]]
                        idx = [i for i, _, _ in items]
                        assert idx == perm[s * B : (s + 1) * B], (world, accum, s)
                        online = "A" if (epoch * (n // B) + s) % 2 == 0 else "B"
                        assert {o for _, o, _ in items} == {online}
                        seeds = [train.item_seed(seed, epoch, i) for i in idx]
                        assert [k for _, _, k in items] == seeds


def test_accumulated_step_of_one_micro_batch_equals_the_plain_step():
    """The two-pass path (pass 1 no grad + replayed RNG, pass 2 loss against fixed updated groups) gives the
    plain smog.SMoG.forward step: same loss, groups, gradients, memory-bank rows and BN statistics."""
    mb = _micro(6, 1)
    res = []
    for path in ("forward", "accumulated"):
        m = _tiny_model()
        step = (
            train.train_step if path == "forward" else train.accumulated_step
        )  # one micro-batch: plain
        loss, stats, z = step(_run(m), [mb], 0.9)
        res.append(
            (loss, m.groups.clone(), _grads(m), z, stats, [b.clone() for b in train.bn_buffers(m)])
        )
    (l1, g1, d1, z1, s1, b1), (l2, g2, d2, z2, s2, b2) = res
    assert (
        torch.allclose(l1, l2, atol=1e-6)
        and torch.allclose(g1, g2, atol=1e-6)
        and torch.allclose(z1, z2, atol=1e-6)
    )
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(d1, d2))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(b1, b2))
    assert torch.allclose(s1["nonempty"], s2["nonempty"]) and torch.allclose(
        s1["entropy"], s2["entropy"]
    )


def test_accumulated_step_updates_groups_once_on_the_concatenation():
    """Two micro-batches: targets from the groups before the step, one update (G2) from the concatenated online
    embeddings, each recomputed independently here, and gradients are the mean of the micro-batch gradients."""
    mbs = [_micro(5, 2), _micro(5, 3)]
    m = _tiny_model()
    ref = _tiny_model()
    g0 = ref.groups.clone()
    loss, stats, z = train.accumulated_step(_run(m), mbs, 0.8)
    with torch.no_grad():
        zs = [
            F.normalize(ref.projector(backbones.encode_crops(ref.backbone, on))[:10], dim=-1).view(
                2, 5, -1
            )
            for on, _ in mbs
        ]
        zt = [
            F.normalize(
                ref.momentum_projector(backbones.encode_crops(ref.momentum_backbone, mo)), dim=-1
            ).view(2, 5, -1)
            for _, mo in mbs
        ]
    zc, ztc = torch.cat(zs, 1), torch.cat(zt, 1)
    assert torch.allclose(z, zc, atol=1e-6)
    expect = torch.stack(
        [
            smog.update_groups(g0[h], zc[h % 2], smog.assign_groups(zc[h % 2], g0[h]), 0.8)
            for h in range(3)
        ]
    )
    assert torch.allclose(m.groups, expect, atol=1e-6)
    # loss of micro-batch k = SMoG loss of its crops against the updated groups and the pre-update targets
    total = 0
    for k, (on, _) in enumerate(mbs):
        p = ref.predictor(ref.projector(backbones.encode_crops(ref.backbone, on))).view(3, 5, -1)
        t = [
            smog.assign_groups(ztc[:, 5 * k : 5 * k + 5].reshape(-1, 8), g0[h]).view(2, 5)
            for h in range(3)
        ]
        total = (
            total
            + sum(
                smog.smog_loss(p[c], expect[h], t[h][j], ref.cfg.tau)
                for h in range(3)
                for c in range(3)
                for j in range(2)
            )
            / 18
            / 2
        )
    total.backward()
    assert torch.allclose(loss, total.detach(), atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(_grads(m), _grads(ref)))


# ----------------------------------------------------------------------------------------------
# real runs


DETERMINISTIC = (
    "step",
    "epoch",
    "loss",
    "lr",
    "beta",
    "m",
    "nonempty",
    "entropy",
    "knn_top1",
    "peak_group_hit",
)


def test_kill_mid_epoch_then_resume_is_bitwise_identical(tmp_path):
    args = [*TINY, "--save-every", "2", "--accum", "2"]
    ok(run_train([*args, "--out-dir", "full"], tmp_path))
    r = run_train([*args, "--out-dir", "cut"], tmp_path, env={"SMOG_TEST_DIE_AT_STEP": "9"})
    assert r.returncode == -9, r.stderr[-2000:]
    ck = checkpoint.load_checkpoint(str(tmp_path / "cut" / "checkpoint.pth"))
    assert (ck["step"], ck["epoch"], ck["step_in_epoch"]) == (8, 1, 2)  # mid-epoch checkpoint
    ok(run_train([*args, "--out-dir", "cut"], tmp_path))  # auto-resume from out_dir
    a = checkpoint.load_checkpoint(str(tmp_path / "full" / "checkpoint.pth"))
    b = checkpoint.load_checkpoint(str(tmp_path / "cut" / "checkpoint.pth"))
    assert a["step"] == 12
    for k in ("model", "optimizer", "bank", "knn", "step", "epoch"):
        assert_same(a[k], b[k], k)
    la = [
        {k: r[k] for k in DETERMINISTIC if k in r}
        for r in records(tmp_path / "full", "step") + records(tmp_path / "full", "epoch")
    ]
    lb = [
        {k: r[k] for k in DETERMINISTIC if k in r}
        for r in records(tmp_path / "cut", "step") + records(tmp_path / "cut", "epoch")
    ]
    assert la == lb and len(records(tmp_path / "full", "step")) == 12
    assert all(math.isfinite(r["loss"]) for r in records(tmp_path / "full", "step"))


def test_final_eval_names_its_results_file(tmp_path):
    """The demo table at the end of a run, then the file it went to; started again, the finished run
    prints the stored table and names the file too."""
    args = [
        *TINY,
        "--data",
        "demo:48",
        "--epochs",
        "1",
        "--final-eval",
        "--probe-epochs",
        "1",
        "--out-dir",
        "run",
    ]
    r = ok(run_train(args, tmp_path))
    path = os.path.join("run", "demo_results.json")
    assert r.stdout.strip().splitlines()[-1].startswith(f"results: {path} (the table)"), r.stdout[
        -500:
    ]
    assert set(json.loads((tmp_path / path).read_text())) == {
        "pixels",
        "random_init",
        "smog",
        "supervised",
    }
    r = ok(run_train(args, tmp_path))
    assert f"run already complete; stored results ({path}):" in r.stdout


def test_two_gloo_processes_agree_on_groups(tmp_path):
    r = ok(run_train([*TINY, "--out-dir", "dist", "--accum", "2"], tmp_path, nproc=2))
    assert "world 2" in r.stdout
    ep = records(tmp_path / "dist", "epoch")
    assert len(ep) == 2 and all(e["groups_rank_max_diff"] == 0.0 for e in ep)
    steps = records(tmp_path / "dist", "step")
    assert len(steps) == 12 and all(
        math.isfinite(s["loss"]) for s in steps
    )  # 96 / 2 ranks / (4 x 2 accum): 6 per epoch
    ck = checkpoint.load_checkpoint(str(tmp_path / "dist" / "checkpoint.pth"))
    assert ck["format"] == checkpoint.FORMAT and ck["world_size"] == 2 and "rng" not in ck
    assert ck["bank"].shape == (2, 96, 16) and torch.allclose(
        ck["bank"].norm(dim=-1), torch.ones(2, 96)
    )
    assert ck["config"]["model"]["n_groups"] == 8 and ck["step"] == 12


def test_imagefolder_run_and_config_json_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 3)):
        for c in ("a", "b"):
            os.makedirs(tmp_path / "imgs" / split / c)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / c / f"{i}.png"
                )
    args = [
        *TINY,
        "--data",
        f"imagefolder:{tmp_path / 'imgs'}",
        "--image-size",
        "16",
        "--local-size",
        "8",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--out-dir",
        "folder",
    ]
    r = ok(run_train(args, tmp_path))
    assert "20 training images" in r.stdout and "kNN top-1" in r.stdout
    ck = checkpoint.load_checkpoint(str(tmp_path / "folder" / "checkpoint.pth"))
    assert ck["bank"].shape == (2, 20, 16) and ck["config"]["data"].startswith("imagefolder:")
    assert ck["config"]["image_size"] == 16
    with open(tmp_path / "folder" / "config.json") as fh:
        saved = json.load(fh)
    assert saved["model"] == dataclasses.asdict(smog.SMoGConfig.from_dict(saved["model"]))
    again = config.parse_config(["--config", str(tmp_path / "folder" / "config.json")])
    assert again.config.endswith("config.json")  # the one field that names where it came from
    assert dataclasses.replace(again, config="") == config.Config.from_dict(saved)
    assert dataclasses.asdict(config.Config.from_dict(saved)) == {
        k: saved[k] for k in dataclasses.asdict(again)
    }
    assert dataclasses.asdict(again.model_config()) == saved["model"]
