"""data.py: the built-in dataset, image folders, torchvision sources, transforms and SMoG's views."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from smog_train import data


def test_demo_is_deterministic_balanced_and_split():
    x1, y1 = data.make_demo(60, seed=3)
    x2, y2 = data.make_demo(60, seed=3)
    x3, _ = data.make_demo(60, seed=4)
    assert x1.shape == (60, 32, 32, 3) and x1.dtype == np.uint8
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    assert np.bincount(y1).tolist() == [6] * 10
    tr, te = data.build_dataset("demo:200", "train"), data.build_dataset("demo:200", "test")
    assert (len(tr), len(te)) == (200, 50) and data.num_classes(tr) == 10 == len(tr.classes)
    assert not np.array_equal(tr.images[:50], te.images)  # different seeds per split
    img, label = tr[0]
    assert (
        isinstance(img, Image.Image)
        and img.mode == "RGB"
        and img.size == (32, 32)
        and isinstance(label, int)
    )
    x, _ = data.build_dataset("demo:200", "train", data.eval_transform(32))[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_demo_pixels_are_dominated_by_nuisance():
    """Class means of raw pixels are nearly interchangeable: a nearest-class-mean classifier on pixels
    is close to chance (10 %), while every image still shows its shape."""
    xtr, ytr = data.make_demo(2000, seed=0)
    xte, yte = data.make_demo(500, seed=1)
    f = lambda x: torch.from_numpy(x).float().flatten(1) / 255  # noqa: E731
    means = torch.stack([f(xtr)[torch.from_numpy(ytr) == c].mean(0) for c in range(10)])
    pred = torch.cdist(f(xte), means).argmin(1)
    assert (pred == torch.from_numpy(yte)).float().mean() < 0.2


def test_unknown_and_missing_sources_explain_the_fix(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        data.build_dataset("mnist", "train")
    with pytest.raises(ValueError, match="--download"):
        data.build_dataset("cifar10", "train", root=str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        data.build_dataset(f"imagefolder:{tmp_path}/nope", "train")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        data.build_dataset(f"imagefolder:{tmp_path}/empty", "train")
    with pytest.raises(ValueError, match="demo:N"):
        data.build_dataset("demo:abc", "train")


def _write_folder(root, classes=("cat", "dog"), n=3, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png"
                )


def test_imagefolder_layout_and_bad_images(tmp_path, capsys):
    _write_folder(tmp_path)
    tr = data.build_dataset(f"imagefolder:{tmp_path}", "train", data.eval_transform(32))
    te = data.build_dataset(f"imagefolder:{tmp_path}", "test")
    assert (
        len(tr) == 6 and tr.classes == ["cat", "dog"] and data.num_classes(tr) == 2 and len(te) == 6
    )
    assert tr[0][0].shape == (3, 32, 32) and tr[5][1] == 1
    bad = tmp_path / "train" / "cat" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    tr = data.build_dataset(f"imagefolder:{tmp_path}", "train")
    with pytest.raises(data.BadImageError, match="1.png.*--bad-images skip"):
        tr[1]
    log = tmp_path / "skipped.txt"
    sk = data.build_dataset(
        f"imagefolder:{tmp_path}", "train", bad_images="skip", skip_log=str(log)
    )
    assert sk[1][0].size == (40, 40) and sk[1][1] == sk[2][1]  # replaced by the next readable image
    sk[1]
    assert capsys.readouterr().err.count("skipping unreadable image") == 1  # reported once
    assert log.read_text().splitlines() == [str(bad)]
    os.rename(tmp_path / "val", tmp_path / "held")
    assert not data.has_test_split(f"imagefolder:{tmp_path}")
    with pytest.raises(ValueError, match="val"):
        data.build_dataset(f"imagefolder:{tmp_path}", "test")


def test_eval_and_linear_transforms_sizes():
    big = Image.new("RGB", (300, 260))
    assert data.eval_transform(224)(big).shape == (3, 224, 224)
    assert data.train_linear_transform(96)(big).shape == (3, 96, 96)
    assert data.eval_transform(32)(Image.new("RGB", (32, 32))).shape == (3, 32, 32)
    assert data.dataset_image_size("demo") == 32 == data.dataset_image_size("cifar100")
    assert (
        data.dataset_image_size("stl10") == 96 and data.dataset_image_size("imagefolder:/x") == 224
    )


def test_views_are_seeded_per_item_and_leave_the_global_rng_alone():
    base = data.build_dataset("demo:20", "train")
    views = data.ViewsDataset(base, data.MultiCropViews(32, 16, 3, blur_scale=0.15))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    on, mo, i = views[(4, "A", 77)]
    assert torch.equal(torch.get_rng_state(), before)
    assert i == 4 and [tuple(x.shape) for x in on] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert [tuple(x.shape) for x in mo] == [(3, 32, 32)] * 2 + [
        (3, 16, 16)
    ] * 3  # momentum set: 2 global + local too
    on2, mo2, _ = views[(4, "A", 77)]
    assert all(torch.equal(a, b) for a, b in zip(on + mo, on2 + mo2))
    on3, _, _ = views[(4, "A", 78)]
    assert not torch.equal(on[0], on3[0])
    # with B online the counts are the same (which set is used: test_release_rules pins the sets)
    onb, mob, _ = views[(4, "B", 77)]
    assert len(onb) == 5 and len(mob) == 5
    aug = data.AugmentedDataset(base, data.Augmentation("A", 24, (0.3, 1.0)))
    x, y = aug[(3, "A", 5)]
    assert x.shape == (3, 24, 24) and y == base[3][1] and torch.equal(x, aug[(3, "A", 5)][0])


def test_uint8_crops_normalised_per_batch_equal_totensor_normalize_per_crop():
    """Augmentation hands out uint8 crops and data.normalize() converts whole batches: bit for bit what
    ToTensor + Normalize per crop gives (the released pipeline's float crops)."""
    import torchvision.transforms as T

    base = data.build_dataset("demo:40", "train")
    aug = data.Augmentation("B", 32, (0.2, 1.0), blur_scale=0.15)
    per_crop = T.Compose([*aug.pil.transforms[:-1], T.ToTensor(), T.Normalize(data.MEAN, data.STD)])
    new, old = [], []
    for i in range(40):
        img, _ = base[i]
        torch.manual_seed(i)
        new.append(aug(img))
        torch.manual_seed(i)
        old.append(per_crop(img))
    assert new[0].dtype == torch.uint8
    assert torch.equal(data.normalize(torch.stack(new)), torch.stack(old))
    x = torch.stack(old)
    assert data.normalize(x) is x  # float input passes through


def test_eval_set_of_an_array_dataset_equals_the_pil_eval_transform():
    """data.eval_set skips PIL for in-memory arrays already at the eval size: bit for bit the items of the eval
    transform (Resize + CenterCrop are identities there, ToTensor + Normalize = data.normalize); other sizes and
    transformed sets take the PIL path."""
    raw = data.build_dataset("demo:60", "train")
    fast = data.eval_set(raw, 32)
    ref = data.build_dataset("demo:60", "train", data.eval_transform(32))
    assert torch.equal(fast.x, torch.stack([ref[i][0] for i in range(60)]))
    assert fast.y.tolist() == [ref[i][1] for i in range(60)]
    resized = data.eval_set(raw, 24)  # not the stored size: PIL resize + crop
    ref24 = data.build_dataset("demo:60", "train", data.eval_transform(24))
    assert torch.equal(resized.x, torch.stack([ref24[i][0] for i in range(60)]))
    assert data.eval_set(None, 32) is None
