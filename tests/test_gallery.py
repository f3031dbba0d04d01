"""gallery.py: the rows are the most populated groups and each row's tiles are the true nearest
training images of the group feature (brute-force oracle, one image at a time), the PNG has the grid's
size and a tile's pixels are the training image's; bad input is one line and exit code 2."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import smog
from smog_train import backbones, data
from tools import gallery

N_TRAIN, K, H = 96, 6, 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint in train.py's layout ('model', 'config' with its 'model' section), random weights,
    groups spread over the embeddings so that several groups have members."""
    torch.manual_seed(0)
    mcfg = smog.SMoGConfig(arch="smallcnn", width=8, dim=16, hidden_dim=32, n_groups=K, n_heads=H)
    model = backbones.build_smog(mcfg).eval()
    ds = data.build_dataset(f"demo:{N_TRAIN}", "train", data.eval_transform(32))
    with torch.no_grad():
        z = model.embed(torch.stack([ds[i][0] for i in range(N_TRAIN)]))
        model.groups.copy_(
            F.normalize(
                z[torch.randperm(N_TRAIN)[: H * K]].view(H, K, -1)
                + 0.05 * torch.randn(H, K, mcfg.dim),
                dim=-1,
            )
        )
    cfg = {
        "data": f"demo:{N_TRAIN}",
        "image_size": 32,
        "data_root": "data",
        "model": {f: getattr(mcfg, f) for f in mcfg.__dataclass_fields__},
    }
    path = tmp_path_factory.mktemp("ck") / "checkpoint.pth"
    # format deliberately not train.py's current tag: gallery must not depend on it
    torch.save(
        {"format": "smog-train-v999", "model": model.state_dict(), "config": cfg, "step": 0}, path
    )
    return str(path), model, ds


def oracle(model, ds, head, n, m):
    """One image at a time (eval-mode BN: batch-independent), plain Python loops for the choice."""
    with torch.no_grad():
        z = [
            F.normalize(model.projector(model.backbone(ds[i][0][None])), dim=-1)[0]
            for i in range(len(ds))
        ]
    g = F.normalize(model.groups[head], dim=-1)
    pop = [0] * K
    for zi in z:
        pop[int(torch.argmax(g @ zi))] += 1
    rows = sorted(range(K), key=lambda k: (-pop[k], k))[:n]
    near = [sorted(range(len(z)), key=lambda i: -float(g[k] @ z[i]))[:m] for k in rows]
    return rows, [pop[k] for k in rows], near


@pytest.mark.parametrize("head,n,m", [(0, 3, 5), (1, K, 4)])
def test_rows_are_true_nearest_neighbours(checkpoint, tmp_path, head, n, m):
    path, model, ds = checkpoint
    out = str(tmp_path / "g.png")
    r = gallery.gallery(path, out, head=head, n_groups=n, per_group=m)
    rows, pops, near = oracle(model, ds, head, n, m)
    assert r["groups"].tolist() == rows
    assert r["populations"].tolist() == pops
    assert sum(pops) <= N_TRAIN and (n < K or sum(pops) == N_TRAIN)
    assert r["indices"].tolist() == near

    img = np.asarray(Image.open(out).convert("RGB"))
    tile = 32 + gallery.PAD
    assert img.shape == (gallery.PAD + n * tile, gallery.LABEL_WIDTH + gallery.PAD + m * tile, 3)
    assert r["size"] == (img.shape[1], img.shape[0])
    raw = data.build_dataset(f"demo:{N_TRAIN}", "train")  # PIL images, no transform
    for row, col in ((0, 0), (n - 1, m - 1)):
        y, x = gallery.PAD + row * tile, gallery.LABEL_WIDTH + gallery.PAD + col * tile
        want = np.asarray(raw[near[row][col]][0])
        assert np.array_equal(img[y : y + 32, x : x + 32], want)
    assert img[:, : gallery.LABEL_WIDTH].min() < 128  # the labels are drawn


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--checkpoint", "MISSING"], "does not exist"),
        (["--head", "2"], "--head 2 is out of range"),
        (["--groups", str(K + 1)], f"--groups {K + 1} is more than the {K} groups"),
        (
            ["--per-group", str(N_TRAIN + 1)],
            f"--per-group {N_TRAIN + 1} is more than the {N_TRAIN}",
        ),
        (["--groups", "0"], "must be at least 1"),
        (["--out", "groups.jpg"], "must end in .png"),
    ],
)
def test_bad_input_one_line_nothing_written(checkpoint, tmp_path, capsys, args, msg):
    path, _, _ = checkpoint
    argv = {"--checkpoint": path, "--out": str(tmp_path / "g.png"), "--groups": "3"}
    for k, v in zip(args[::2], args[1::2]):
        argv[k] = str(tmp_path / v) if v in ("MISSING", "groups.jpg") else v
    assert gallery.main([x for kv in argv.items() for x in kv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_not_a_train_checkpoint(tmp_path, capsys):
    p = tmp_path / "exported.pth"
    torch.save({"conv.weight": torch.zeros(1)}, p)
    assert gallery.main(["--checkpoint", str(p), "--out", str(tmp_path / "g.png")]) == 2
    assert "not a train.py checkpoint" in capsys.readouterr().err
