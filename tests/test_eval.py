"""eval_linear.py: the frozen-backbone checks, the
command line on the built-in demo data (trained vs random encoder, train checkpoint vs exported
backbone, bad inputs), and real 2-process runs (gloo) that must equal the single-process result."""

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import eval_linear as E
import smog
from smog_train import backbones, checkpoint, export, probes

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 16  # smallcnn width of the test encoders


# ---------------------------------------------------------------- frozen-backbone protocol


def _image_batches(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(
        torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % 4
    )


def _run_protocol(backbone, ref, feat_dim, epochs=2):
    ds = _image_batches()
    test_f, test_y = probes.extract_features(backbone, probes.shard_loader(ds, 16), "cpu")
    head = probes.new_linear(feat_dim, 4)
    batches = E.augmented_batches(backbone, ds, "cpu", feat_dim=feat_dim, batch_size=16, seed=0)
    return head, E.run_linear(
        backbone, ref, head, batches, test_f, test_y, epochs=epochs, lr=0.3, wd=1e-6
    )


def test_frozen_backbone_passes_for_a_frozen_backbone():
    backbone, feat_dim = backbones.build_backbone("smallcnn", width=8)
    backbone.train()  # BN would move its statistics in train mode
    ref = {k: v.clone() for k, v in backbone.state_dict().items()}
    E.freeze(backbone)
    head, res = _run_protocol(backbone, ref, feat_dim)
    assert res["best_epoch"] >= 1 and not backbone.training
    assert not torch.all(head.bias == 0)  # the linear layer did train


def test_frozen_backbone_check_catches_unfrozen_parameter():
    backbone, feat_dim = backbones.build_backbone("smallcnn", width=8)
    ref = {k: v.clone() for k, v in backbone.state_dict().items()}
    E.freeze(backbone)
    backbone.features[0].weight.requires_grad_(True)  # deliberately unfrozen
    with pytest.raises(RuntimeError, match="frozen-backbone check failed.*features.0.weight"):
        _run_protocol(backbone, ref, feat_dim)


def test_frozen_backbone_check_catches_train_mode():
    backbone, feat_dim = backbones.build_backbone("smallcnn", width=8)
    ref = {k: v.clone() for k, v in backbone.state_dict().items()}
    E.freeze(backbone)
    backbone.features[1].train()  # one BatchNorm left in train mode
    with pytest.raises(RuntimeError, match="train mode.*features.1"):
        _run_protocol(backbone, ref, feat_dim)


class DriftingBackbone(nn.Module):
    """A buggy backbone: its forward changes its own weights in place, even frozen and in eval mode."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        with torch.no_grad():
            self.proj.weight.mul_(0.999)
        return self.proj(x).mean(dim=(2, 3))


def test_frozen_backbone_check_catches_changed_weights_after_training():
    backbone = DriftingBackbone()
    ref = {k: v.clone() for k, v in backbone.state_dict().items()}
    E.freeze(backbone)
    with pytest.raises(RuntimeError, match="differ from the checkpoint.*proj.weight"):
        _run_protocol(backbone, ref, 8)


# ---------------------------------------------------------------- command line on the demo data


def _write_train_checkpoint(path, backbone_state=None, width=WIDTH):
    """train.py's real checkpoint format: SMoG.state_dict() plus the plain config dict."""
    cfg = smog.SMoGConfig(
        arch="smallcnn", width=width, dim=16, hidden_dim=32, n_groups=8, n_heads=1
    )
    model = backbones.build_smog(cfg)
    if backbone_state is not None:
        model.backbone.load_state_dict(backbone_state)
    torch.save(
        {
            "format": checkpoint.FORMAT,
            "model": model.state_dict(),
            "config": {"model": asdict(cfg), "data": "demo", "image_size": 32},
        },
        path,
    )
    return model


def _normalised(images):
    """uint8 [N, H, W, 3] -> the eval transform's tensors [N, 3, H, W] (32 px: ToTensor + Normalize only)."""
    from smog_train import data

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(data.MEAN).view(1, 3, 1, 1)) / torch.tensor(data.STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """A smallcnn trained with labels for 3 epochs on 4000 images of the demo training split (seconds):
    a representation clearly better than a random one, stored as a train.py checkpoint."""
    from smog_train import data

    ds = data.build_dataset("demo", "train")  # generated once per process, then cached
    x, y = _normalised(ds.images[:4000]), torch.from_numpy(ds.labels[:4000]).long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net, head = backbones.SmallCNN(WIDTH), nn.Linear(8 * WIDTH, 10)
        opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=3e-3)
        for _ in range(3):
            for idx in torch.randperm(len(x)).split(128):
                loss = F.cross_entropy(head(net(x[idx])), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    d = tmp_path_factory.mktemp("trained")
    _write_train_checkpoint(d / "checkpoint.pth", net.state_dict())
    return d / "checkpoint.pth"


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """imagefolder:PATH with 120 train / 40 val demo images as PNGs: the same images, but small enough
    for the tests that start several processes."""
    from PIL import Image

    from smog_train import data

    root = tmp_path_factory.mktemp("folder")
    for split, (ds, lo, hi) in {
        "train": (data.build_dataset("demo", "train"), 4000, 4120),
        "val": (data.build_dataset("demo", "test"), 0, 40),
    }.items():
        for i in range(lo, hi):
            d = root / split / data.DEMO_CLASSES[int(ds.labels[i])]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ds.images[i]).save(d / f"{i}.png")
    return f"imagefolder:{root}"


def _eval(args, capsys):
    rc = E.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


FAST = [
    "--cached-features",
    "--knn",
    "--knn-k",
    "10,20",
    "--epochs",
    "10",
    "--workers",
    "0",
    "--quiet",
]


def test_cli_trained_encoder_beats_random_init(trained_ckpt, tmp_path, capsys):
    rc, out, err = _eval(["--checkpoint", trained_ckpt, "--out-dir", tmp_path / "t", *FAST], capsys)
    assert rc == 0, err
    t = json.loads((tmp_path / "t" / "eval-cached-features.json").read_text())
    assert "| linear, best" in out and "| kNN k=20 T=0.07" in out
    rc, out, err = _eval(
        ["--checkpoint", trained_ckpt, "--random-init", "--out-dir", tmp_path / "r", *FAST], capsys
    )
    assert rc == 0, err
    r = json.loads((tmp_path / "r" / "eval-cached-features.json").read_text())
    assert (t["source"], r["source"]) == ("train-checkpoint", "random-init")
    assert t["n_classes"] == 10 and (t["n_train"], t["n_test"]) == (8000, 2000)
    assert t["data"] == "demo" and t["protocol"] == "cached-features"
    # the demo is built so that a random encoder is weak (chance 10 %); supervised training helps a lot
    assert t["linear"]["best_top1"] > r["linear"]["best_top1"] + 15, (t["linear"], r["linear"])
    assert t["knn"]["20"] > r["knn"]["20"] + 10, (t["knn"], r["knn"])
    assert t["linear"]["top5"] >= t["linear"]["top1"] and t["linear"]["epochs"] == 10
    assert (t["linear"]["lr"], t["linear"]["wd"]) == (
        0.3,
        1e-6,
    )  # ResNet/smallcnn protocol defaults
    # another mode, the same out_dir: its own file, the other one left as it was
    rc, out, err = _eval(
        [
            "--checkpoint",
            trained_ckpt,
            "--out-dir",
            tmp_path / "t",
            "--no-linear",
            "--knn",
            "--knn-k",
            "20",
            "--workers",
            "0",
        ],
        capsys,
    )
    assert rc == 0 and out.strip().endswith("eval-knn.json"), err
    k = json.loads((tmp_path / "t" / "eval-knn.json").read_text())
    assert k["protocol"] == "knn" and "linear" not in k and k["knn"] == {"20": t["knn"]["20"]}
    assert json.loads((tmp_path / "t" / "eval-cached-features.json").read_text()) == t


def test_knn_is_the_train_monitors_number_bit_for_bit(trained_ckpt):
    """eval_linear.py runs the backbone in the memory format train.py ran it in (channels_last by
    default), so its features are the kNN monitor's bit for bit and both print one kNN number. A
    contiguous copy rounds differently (about 1e-7), enough to flip near-ties of the vote."""
    from smog_train import data, evaluation
    from smog_train.config import Config

    train_ds, test_ds = (
        torch.utils.data.Subset(data.eval_set(data.build_dataset("demo", s, None), 32), range(n))
        for s, n in (("train", 1000), ("test", 300))
    )
    ck = checkpoint.load_checkpoint(str(trained_ckpt))
    model = backbones.build_smog(smog.SMoGConfig.from_dict(ck["config"]["model"]))
    model.load_state_dict(ck["model"])
    model.to(memory_format=torch.channels_last)  # train.py's build_model, --channels-last
    cfg = Config(knn_k=20, workers=0)
    top1, (ftr, _), (fte, yte) = evaluation.knn_monitor(
        model.backbone, train_ds, test_ds, 10, cfg, torch.device("cpu")
    )
    backbone, *_, info = E.load_backbone(str(trained_ckpt))
    feats = [
        probes.extract_features(backbone, probes.shard_loader(ds, 256), "cpu")
        for ds in (train_ds, test_ds)
    ]
    assert info["channels_last"] and torch.equal(feats[0][0], ftr) and torch.equal(feats[1][0], fte)
    assert probes.knn_eval(*feats[0], *feats[1], 10, ks=(20,))[20] == top1
    contiguous = backbone.to(memory_format=torch.contiguous_format)
    assert not torch.equal(
        probes.extract_features(contiguous, probes.shard_loader(test_ds, 256), "cpu")[0], fte
    )


def test_cli_exported_backbone_gives_the_same_numbers(trained_ckpt, demo_folder, tmp_path, capsys):
    exported = tmp_path / "backbone.pth"
    assert export.main([str(trained_ckpt), str(exported)]) == 0
    capsys.readouterr()
    args = [
        "--data",
        demo_folder,
        "--cached-features",
        "--epochs",
        "3",
        "--knn",
        "--workers",
        "0",
        "--quiet",
    ]
    rc, _, err = _eval(["--checkpoint", trained_ckpt, "--out-dir", tmp_path / "a", *args], capsys)
    assert rc == 0, err
    # an exported file records no training resolution: a folder's default would be 224 (Resize 256 + crop)
    rc, _, err = _eval(
        [
            "--checkpoint",
            exported,
            "--arch",
            "smallcnn",
            "--width",
            WIDTH,
            "--image-size",
            32,
            "--out-dir",
            tmp_path / "b",
            *args,
        ],
        capsys,
    )
    assert rc == 0, err
    a, b = (json.loads((tmp_path / d / "eval-cached-features.json").read_text()) for d in "ab")
    assert (a["source"], b["source"]) == ("train-checkpoint", "exported-backbone")
    assert (a["n_train"], a["n_test"], a["n_classes"], a["image_size"], b["image_size"]) == (
        120,
        40,
        10,
        32,
        32,
    )
    assert (
        set(a["knn"]) == {"10", "20", "100", "200"}
        and a["knn"] == b["knn"]
        and a["linear"] == b["linear"]
    )


def _bad_inputs(tmp_path, trained_ckpt):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    other = tmp_path / "other.pth"
    torch.save({"epoch": 3, "lr": [0.1]}, other)
    exported = tmp_path / "backbone.pth"
    export.export_backbone(str(trained_ckpt), str(exported))
    return [
        (["--checkpoint", tmp_path / "missing.pth"], "does not exist"),
        (["--checkpoint", text], "cannot load"),
        (["--checkpoint", other], "neither a train.py checkpoint"),
        (["--checkpoint", exported], "pass --arch"),
        (
            ["--checkpoint", exported, "--arch", "resnet18"],
            "does not match arch resnet18.*missing keys.*bn1",
        ),
        (
            ["--checkpoint", exported, "--arch", "smallcnn", "--width", "8"],
            "shape mismatch features.0.weight",
        ),
        (["--checkpoint", trained_ckpt, "--arch", "resnet50"], "--arch resnet50 contradicts"),
        (["--checkpoint", trained_ckpt, "--data", "nosuchdata"], "unknown dataset"),
        (
            ["--checkpoint", trained_ckpt, "--data", f"imagefolder:{tmp_path / 'nothing'}"],
            "does not exist|no held-out split",
        ),
        (["--random-init"], "no architecture"),
        ([], "pass --checkpoint"),
    ]


def test_cli_bad_inputs_one_line_exit_2_nothing_written(trained_ckpt, tmp_path, capsys):
    for args, msg in _bad_inputs(tmp_path, trained_ckpt):
        out_dir = tmp_path / "out"
        rc, _, err = _eval([*args, "--out-dir", out_dir, "--workers", "0"], capsys)
        assert rc == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), (args, err)
        assert re.search(msg, err), (args, err)
        assert not out_dir.exists(), args


def test_cli_subprocess_help_and_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "eval_linear.py", "-h"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0
    for opt in (
        "--checkpoint",
        "--cached-features",
        "--knn",
        "--random-init",
        "--arch",
        "--cifar-stem",
        "--out-dir",
    ):
        assert opt in r.stdout
    bad = tmp_path / "x.pth"
    bad.write_bytes(b"\x00garbage")
    r = subprocess.run(
        [
            sys.executable,
            "eval_linear.py",
            "--checkpoint",
            str(bad),
            "--out-dir",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert (
        r.returncode == 2
        and "Traceback" not in r.stderr
        and len(r.stderr.strip().splitlines()) == 1
    )
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- two processes (gloo) equal one


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _indexed_images(n):
    """n random 16 px images labelled with their own index, so any order can be undone."""
    g = torch.Generator().manual_seed(n)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.arange(n))


def _extract_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = backbones.SmallCNN(4)
        out = {}
        for n in (5, 1):  # 5: uneven shards; 1: rank 1 gets nothing
            ds = _indexed_images(n)
            out[f"shard{n}"] = probes.extract_features(net, probes.shard_loader(ds, 2), "cpu")
            f, y = out[f"shard{n}"]
            out[f"knn{n}"] = torch.tensor(
                probes.knn_eval(f, y, f, y, n, ks=(1,))[1]
            )  # test rows split over ranks
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_extract_features_two_ranks_counts_every_sample_once(tmp_path):
    mp.spawn(_extract_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    net = backbones.SmallCNN(4)
    for n in (5, 1):
        want_f, want_y = probes.extract_features(
            net, probes.shard_loader(_indexed_images(n), 2), "cpu"
        )  # one process
        assert torch.equal(want_y, torch.arange(n))
        for r in range(2):
            f, y = got[r][f"shard{n}"]  # contiguous shards gathered in rank order: dataset order
            assert torch.equal(y, want_y)
            torch.testing.assert_close(f, want_f, rtol=1e-5, atol=1e-6)
            assert float(got[r][f"knn{n}"]) == 100.0


def _torchrun(args, cwd, nproc):
    cmd = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_port",
            str(_free_port()),
            "eval_linear.py",
            *args,
        ]
        if nproc > 1
        else [sys.executable, "eval_linear.py", *args]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_torchrun_two_processes_equal_single_process(trained_ckpt, demo_folder, tmp_path):
    """The augmented protocol (per-sample seeded augmentations, global batches split over ranks, an
    uneven last batch) and kNN: the same numbers from `torchrun --nproc_per_node=2` as from a plain process."""
    common = [
        "--checkpoint",
        trained_ckpt,
        "--data",
        demo_folder,
        "--knn",
        "--knn-k",
        "10,20",
        "--epochs",
        "4",
        "--batch-size",
        "25",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--quiet",
    ]
    _torchrun([*common, "--out-dir", tmp_path / "one"], ROOT, 1)
    r = _torchrun([*common, "--out-dir", tmp_path / "two"], ROOT, 2)
    one, two = (
        json.loads((tmp_path / d / "eval-augmented.json").read_text()) for d in ("one", "two")
    )
    assert (one["world_size"], two["world_size"], one["protocol"]) == (1, 2, "augmented")
    assert r.stdout.count("| linear, best") == 1  # only rank 0 prints
    assert two["knn"] == one["knn"]
    for key in ("top1", "top5", "best_top1", "best_top5", "best_epoch", "top1_history"):
        assert two["linear"][key] == one["linear"][key], key


def test_cli_unreadable_image_in_a_loader_worker_is_one_line(trained_ckpt, tmp_path, capsys):
    """A bad image met inside a DataLoader worker (whose exception carries the worker traceback) still ends
    as one line naming the file, exit code 2, nothing written."""
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / "imgs" / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (32, 32), (40 * i, 100, 200 if c == "a" else 0)).save(
                    d / f"{i}.png"
                )
    (tmp_path / "imgs" / "val" / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    rc, _, err = _eval(
        [
            "--checkpoint",
            trained_ckpt,
            "--data",
            f"imagefolder:{tmp_path / 'imgs'}",
            "--knn",
            "--no-linear",
            "--workers",
            "1",
            "--out-dir",
            tmp_path / "o",
        ],
        capsys,
    )
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot read image" in err and "broken.png" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
