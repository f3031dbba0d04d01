"""The tensor path for image folders (decode.py, batch_augment.crop_boxes_sized / resized_crops,
MultiCropViews.batch_sources, ViewsDataset.read / finish) against independent references:
torchvision's RandomResizedCrop rule as a scalar oracle, PIL's decoder and resized crop, and the PIL
pipeline's crop statistics, on sources of several sizes and aspect ratios (greyscale and CMYK
JPEGs, PNGs included)."""

import functools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from smog_train import batch_augment as ba
from smog_train import data, decode
from test_batch_augment import box_oracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIO = (3 / 4, 4 / 3)
KINDS = ("jpg", "grey.jpg", "cmyk.jpg", "prog.jpg", "444.jpg", "png", "rgba.png", "p.png")
SIZES = ((60, 45), (45, 60), (80, 40), (36, 90), (50, 50), (70, 52), (24, 20))  # width x height


def picture(w, h, seed):
    """Blocks of random colour (several scales) + pixel noise: texture at every scale of a crop."""
    rng = np.random.default_rng(seed)
    x = np.zeros((h, w, 3))
    for cell in (3, 8, 20):
        blocks = rng.uniform(0, 255, (h // cell + 1, w // cell + 1, 3))
        x += np.kron(blocks, np.ones((cell, cell, 1)))[:h, :w] / 3
    return Image.fromarray((x + rng.normal(0, 10, x.shape)).clip(0, 255).astype(np.uint8))


def write_folder(root, n=28):
    """n images at root/train/c<k>/: sizes cycling over SIZES; JPEGs (RGB q90, greyscale, CMYK,
    progressive, 4:4:4) and PNGs (RGB, RGBA, palette)."""
    for k in range(n):
        w, h = SIZES[k % len(SIZES)]
        d = root / "train" / f"c{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        img, kind = picture(w, h, k), KINDS[k % len(KINDS)]
        path = d / f"{k:03d}.{kind}"
        if kind.endswith("jpg"):
            img = img.convert({"grey.jpg": "L", "cmyk.jpg": "CMYK"}.get(kind, "RGB"))
            img.save(
                path,
                format="JPEG",
                quality=90,
                progressive=kind == "prog.jpg",
                subsampling=0 if kind == "444.jpg" else -1,
            )
        else:
            img = img.convert({"rgba.png": "RGBA", "p.png": "P"}.get(kind, "RGB"))
            img.save(path, format="PNG")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("jpegs"))


@pytest.fixture(scope="module")
def base(folder):
    return data.build_dataset(f"imagefolder:{folder}", "train")


def test_crop_boxes_of_each_source_size_follow_torchvision_rule():
    """Per-row source sizes, tall and wide ones included (the centre-crop fallback), against the
    scalar oracle; for equal sizes the same numbers as crop_boxes (the in-memory path)."""
    g = torch.Generator().manual_seed(0)
    H = torch.tensor([375, 500, 333, 40, 24, 90, 1000, 7, 50, 200] * 50)
    W = torch.tensor([500, 375, 500, 24, 40, 36, 70, 300, 200, 50] * 50)
    for scale in ((0.2, 1.0), (0.05, 0.2), (0.95, 1.0)):
        u = torch.rand(len(H), ba.N_UNIFORM, generator=g)
        boxes = ba.crop_boxes_sized(u, H, W, scale, RATIO)
        got = list(zip(*(t.long().tolist() for t in boxes)))
        want = [box_oracle(r, int(hh), int(ww), scale) for r, hh, ww in zip(u, H, W)]
        assert got == want, scale
        n = len(u)
        same = ba.crop_boxes_sized(u, torch.full((n,), 32), torch.full((n,), 24), scale, RATIO)
        assert all(torch.equal(a, b) for a, b in zip(same, ba.crop_boxes(u, 32, 24, scale, RATIO)))


@pytest.mark.parametrize("method", ["interp", "matmul"])
@pytest.mark.parametrize("size,scale", [(32, (0.2, 1.0)), (16, (0.05, 0.2)), (64, (0.3, 1.0))])
def test_resized_crops_of_sources_of_different_sizes_match_pil(method, size, scale):
    """Shrinking (antialiased) and enlarging crops of differently sized sources, mirrored or not:
    within one grey level of PIL's crop + bilinear resize (PIL rounds each pass to uint8)."""
    imgs = [TF.pil_to_tensor(picture(w, h, k)) for k, (w, h) in enumerate(SIZES)]
    n = 3 * len(imgs)
    k = torch.arange(n) % len(imgs)
    u = torch.rand(n, ba.N_UNIFORM, generator=torch.Generator().manual_seed(size))
    H = torch.tensor([imgs[c].shape[1] for c in k])
    W = torch.tensor([imgs[c].shape[2] for c in k])
    i, j, h, w = ba.crop_boxes_sized(u, H, W, scale, RATIO)
    flip = u[:, ba._FLIP] < 0.5
    x = ba.resized_crops(imgs, k, i, j, h, w, size, flip, method=method)
    assert x.shape == (n, 3, size, size) and flip.any() and not flip.all()
    for c in range(n):
        pil = Image.fromarray(imgs[k[c]].permute(1, 2, 0).numpy())
        o = TF.resized_crop(
            pil,
            int(i[c]),
            int(j[c]),
            int(h[c]),
            int(w[c]),
            [size, size],
            InterpolationMode.BILINEAR,
        )
        o = TF.pil_to_tensor(TF.hflip(o) if flip[c] else o).float() / 255
        assert (o - x[c]).abs().max() <= 1.0001 / 255, c


def test_decoded_pixels_equal_pil(folder, base):
    """Every file as the tensor path reads it (JPEG bytes decoded by torchvision, other formats by
    PIL in the worker) equals PIL's convert("RGB"): greyscale and CMYK JPEGs, progressive, 4:4:4,
    RGBA and palette PNGs."""
    ds = data.ViewsDataset(base, data.MultiCropViews(16, 8, 1), batched=True)
    keys = [(i, "A", i) for i in range(len(base))]
    batch = ds.read(keys)
    kinds = {os.path.basename(p).split(".", 1)[1] for p, _ in base.samples}
    assert kinds == set(KINDS)
    decoded = decode.decode_rgb(batch.blobs, torch.device("cpu"))
    for b, (path, _) in enumerate(base.samples):
        want = TF.pil_to_tensor(Image.open(path).convert("RGB"))
        got = decoded[b] if path.endswith(".jpg") else batch.blobs[b]
        assert got is not None and torch.equal(got, want), path
    jpegs = sum(p.endswith(".jpg") for p, _ in base.samples)
    assert sum(x is not None for x in decoded) == jpegs


@pytest.mark.parametrize("on_device,method", [(False, None), (True, None), (True, "matmul")])
def test_folder_item_crops_do_not_depend_on_the_batch(base, on_device, method, monkeypatch):
    """An item's crops are a function of its seed: alone, or at any place in a batch, made in a
    worker or on the device (finish in the training process), with either resize (matmul: the GPU
    default); crop sizes and dtypes as the in-memory path's."""
    if method:
        resize = functools.partial(ba.resized_crops, method=method)
        monkeypatch.setattr(data, "resized_crops", resize)
    ds = data.ViewsDataset(
        base, data.MultiCropViews(32, 16, 2), batched=True, decode_on_device=on_device
    )
    keys = [(i % len(base), "AB"[i % 2], 500 + i) for i in range(20)]
    out = ds.__getitems__(keys)
    on, mo, idx = ds.finish(out, "cpu") if on_device else out
    assert [c.shape for c in on] == [(20, 3, 32, 32)] * 2 + [(20, 3, 16, 16)] * 2
    assert on[0].dtype == torch.uint8
    assert idx.tolist() == [k[0] for k in keys]
    for b in (0, 7, 19):
        alone = ds[keys[b]]
        assert all(torch.equal(x, y[b]) for x, y in zip(alone[0] + alone[1], on + mo))
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=[keys[:8], keys[8:]], collate_fn=ds.collate
    )
    first = next(ds.batches(iter(loader), "cpu"))
    assert all(torch.equal(x, y[:8]) for x, y in zip(first[0] + first[1], on + mo))


def crop_stats(on_mo):
    """Per-crop statistics of (online crops, momentum crops) lists of [n, 3, s, s]."""
    on, mo = on_mo
    out = {}
    px = (-1, -2, -3)
    for name, crops in (("global", on[:2] + mo[:2]), ("local", on[2:] + mo[2:])):
        x = torch.stack(crops, 1).float()
        out |= {
            f"{name} mean": x.mean(px),
            f"{name} std": x.std(px),
            f"{name} colour": (x.amax(-3) - x.amin(-3)).mean((-1, -2)),
            f"{name} sharpness": (x[..., 1:] - x[..., :-1]).abs().mean(px),
            f"{name} grey": (x.amax(-3) == x.amin(-3)).all(-1).all(-1).float(),
        }
    g = torch.stack(on[:2], 1).float()
    out["pair distance"] = (g[:, 0] - g[:, 1]).abs().mean(px)
    return {k: v.flatten() for k, v in out.items()}


def test_folder_crop_statistics_match_the_pil_pipeline(base):
    """The tensor path draws the PIL pipeline's distribution on a folder of mixed sizes and
    formats: per-crop brightness, contrast, colourfulness, sharpness, greyscale share and the
    distance between an image's two global crops agree within 4 standard errors (400 items, sets A
    and B). Blur at full strength (blur_scale 1), so that its radius shows in 32 px crops. A crop
    scale range or a blur sigma off by 2x fails this test (checked by breaking each on purpose)."""
    views = data.MultiCropViews(32, 16, 2, (0.2, 1.0), (0.05, 0.3), 1.0)
    keys = [(i % len(base), "AB"[i % 2], 10**6 + i) for i in range(400)]
    pil_ds = data.ViewsDataset(base, views)
    pil = [pil_ds[k] for k in keys]
    pil = (
        [torch.stack([it[0][c] for it in pil]) for c in range(4)],
        [torch.stack([it[1][c] for it in pil]) for c in range(4)],
    )
    ten = data.ViewsDataset(base, views, batched=True).__getitems__(keys)[:2]
    a, b = crop_stats(pil), crop_stats(ten)
    for k in a:
        se = math.sqrt(a[k].var() / len(a[k]) + b[k].var() / len(b[k]))
        assert abs(a[k].mean() - b[k].mean()) < 4 * se, (
            k,
            float(a[k].mean()),
            float(b[k].mean()),
            se,
        )


def test_unreadable_jpeg_on_the_device_path_fails_naming_the_file_or_is_skipped(tmp_path):
    """A corrupt or truncated JPEG met where the batch is decoded (the training process):
    --bad-images fail raises BadImageError naming the file and the fix; skip reads the next
    readable image, reports the file once and lists it in the skip log, as the PIL path does."""
    root = write_folder(tmp_path / "f", n=6)
    good = root / "train" / "c0" / "000.jpg"
    (root / "train" / "c0" / "000zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 20)
    blob = good.read_bytes()
    (root / "train" / "c0" / "000zz_trunc.jpg").write_bytes(blob[: len(blob) // 2])
    views = data.MultiCropViews(16, 8, 1)
    fail = data.build_dataset(f"imagefolder:{root}", "train")
    bad = [i for i, (p, _) in enumerate(fail.samples) if "zz" in p]
    ds = data.ViewsDataset(fail, views, batched=True, decode_on_device=True)
    for i in bad:
        batch = ds.__getitems__([(0, "A", 1), (i, "A", 2)])
        msg = r"cannot read image '.*zz_.*\.jpg'.*--bad-images skip"
        with pytest.raises(data.BadImageError, match=msg):
            ds.finish(batch, "cpu")
    log = tmp_path / "skipped.txt"
    skip = data.build_dataset(f"imagefolder:{root}", "train", bad_images="skip", skip_log=str(log))
    ds = data.ViewsDataset(skip, views, batched=True, decode_on_device=True)
    keys = [(i, "A", 3) for i in range(len(skip))] * 2
    on, mo, idx = ds.finish(ds.__getitems__(keys), "cpu")
    assert idx.tolist() == [k[0] for k in keys] and on[0].shape[0] == len(keys)
    listed = sorted(os.path.basename(p) for p in log.read_text().split())
    assert listed == ["000zz_corrupt.jpg", "000zz_trunc.jpg"]
    nxt = ds.finish(ds.__getitems__([(bad[-1] + 1, "A", 3)]), "cpu")  # the next readable one
    assert torch.equal(on[0][bad[-1]], nxt[0][0][0])


def test_train_on_a_jpeg_folder_with_the_tensor_path(tmp_path):
    """train.py --augment tensor on an image folder runs with the decode in the training process
    (--workers 0) and --bad-images skip: each unreadable JPEG reported once, counted per epoch."""
    root = write_folder(tmp_path / "f", n=24)
    (root / "train" / "c1" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg" * 20)
    out = tmp_path / "out"
    args = [
        "--data",
        f"imagefolder:{root}",
        "--augment",
        "tensor",
        "--bad-images",
        "skip",
        "--arch",
        "smallcnn",
        "--width",
        "4",
        "--dim",
        "16",
        "--hidden-dim",
        "32",
        "--n-groups",
        "4",
        "--image-size",
        "16",
        "--local-size",
        "8",
        "--n-local",
        "1",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--knn-every",
        "0",
        "--no-final-eval",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--threads",
        "1",
        "--out-dir",
        str(out),
    ]
    r = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("warning: skipping unreadable image") == 1
    assert "zz_corrupt.jpg" in r.stderr
    recs = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [x.get("skipped_images") for x in recs if x["type"] == "epoch"] == [1]
    assert json.loads((out / "config.json").read_text())["augment"] == "tensor"
