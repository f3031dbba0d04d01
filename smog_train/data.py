"""Datasets and image transforms for train.py, eval_linear.py and bench.py.

    build_dataset(spec, split, transform)  spec: demo | demo:N | imagefolder:PATH | cifar10 | cifar100 | stl10
    MultiCropViews                         SMoG's two augmentation sets (METHOD.md, "Recipes")
    eval_transform / train_linear_transform  linear-evaluation transforms (SwAV protocol)

Every dataset yields (transform(img), label) with img a PIL RGB image and has `.classes`.
Missing data raises ValueError with a one-line message that says how to fix it.

The built-in demo dataset ("demo") is generated from a seed in a few seconds, offline, and kept in
memory (regenerated per process; 8000 train + 2000 test images of 32 px). The class of an image is
one of 10 achiral shapes (disk, ring, square, frame, triangle, plus, flower, bar, dumbbell, crescent),
drawn 2-3 times at random positions, sizes, rotations and colours over random colour-noise texture
(see make_demo). The class survives crops, flips, colour jitter and grayscale (shapes differ from the
background in luminance), while colour, position, scale, rotation and texture dominate the pixels, so
a linear probe on raw pixels and one on a random encoder are both weak.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import warnings
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from smog_train import decode
from smog_train.batch_augment import (
    _FLIP,
    N_UNIFORM,
    BatchAugment,
    crop_boxes_sized,
    recipe,
    resized_crops,
    source_rows,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.228, 0.224, 0.225)

SPECS = ("demo", "demo:N", "imagefolder:PATH", "cifar10", "cifar100", "stl10")
DEMO_CLASSES = (
    "disk",
    "ring",
    "square",
    "frame",
    "triangle",
    "plus",
    "flower",
    "bar",
    "dumbbell",
    "crescent",
)
DEMO_SIZE = 32
DEMO_TRAIN = 8000  # "demo" = "demo:8000"; test split = train / 4


# ----------------------------------------------------------------------------------------------
# the built-in demo dataset


def _shape_mask(c: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-mask of shape class c in its local frame (u, v) [n, S, S]; shape radius ~0.9."""
    if c in (0, 1, 6, 9):
        r = torch.sqrt(u * u + v * v)
    if c in (2, 3):
        m = torch.maximum(u.abs(), v.abs())  # square "radius"
    if c == 0:  # disk
        return r < 0.85
    if c == 1:  # ring
        return (r < 0.9) & (r > 0.5)
    if c == 2:  # square
        return m < 0.7
    if c == 3:  # frame
        return (m < 0.8) & (m > 0.4)
    if c == 4:  # triangle
        return (
            torch.stack(
                [
                    u * math.cos(a) + v * math.sin(a)
                    for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)
                ]
            ).amax(0)
            < 0.45
        )
    if c == 5:  # plus
        return ((u.abs() < 0.28) & (v.abs() < 0.9)) | ((v.abs() < 0.28) & (u.abs() < 0.9))
    if c == 6:  # flower, 5 petals
        return r < 0.55 + 0.35 * torch.cos(5 * torch.atan2(v, u))
    if c == 7:  # bar
        return (u.abs() < 0.95) & (v.abs() < 0.25)
    if c == 8:  # dumbbell
        return (((u - 0.5) ** 2 + v * v) < 0.16) | (((u + 0.5) ** 2 + v * v) < 0.16)
    return (r < 0.9) & (((u - 0.45) ** 2 + v * v) > 0.49)  # crescent


def make_demo(n: int, seed: int, size: int = DEMO_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """-> (images uint8 [n, size, size, 3], labels int64 [n]); deterministic in (n, seed, size).

    Each image: 2-3 copies of its class's shape, each with its own position, radius (4.5-8 px of 32),
    rotation and colour (dark or bright, random hue), over a background of mid-luminance colour noise
    (12 x 12 random colours, bilinear), plus pixel noise. Any crop that holds a copy shows the class;
    the copies contrast with the background in luminance, so the class survives grayscale and colour
    jitter. The background's colours are a fresh random sample in every image, so its colour statistics
    say little about the image (no colour shortcut for self-supervision) while dominating the pixels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(
        min(threads, 2)
    )  # many small ops: more threads do not help; the bits do not depend on it
    try:
        g = torch.Generator().manual_seed(seed)
        ss, J, grid = 2 * size, 3, 12  # render at 2x, then 2x2 average (anti-aliasing)
        lum = torch.tensor([0.299, 0.587, 0.114])
        label = (torch.arange(n) % len(DEMO_CLASSES))[torch.randperm(n, generator=g)]
        rad = (
            4.5 + 3.5 * torch.rand(n, J, generator=g)
        ) * 2  # radius of each copy in render pixels
        bg = torch.rand(
            n, 3, grid, grid, generator=g
        )  # background colours, luminance set to 0.5 +- 0.12
        bg = (
            bg
            - (bg * lum.view(1, 3, 1, 1)).sum(1, keepdim=True)
            + 0.5
            + 0.24 * (torch.rand(n, 1, grid, grid, generator=g) - 0.5)
        )
        dark = torch.rand(n, J, generator=g) < 0.5
        level = torch.where(
            dark,
            0.05 + 0.12 * torch.rand(n, J, generator=g),
            0.83 + 0.12 * torch.rand(n, J, generator=g),
        )
        hue = torch.rand(n, J, 3, generator=g) - 0.5
        hue = hue - (hue * lum).sum(-1, keepdim=True)  # zero-luminance colour offset
        p = {
            "label": label,
            "rad": rad,
            "bg": bg,  # every random factor drawn up front
            "present": torch.arange(J).expand(n, J) < torch.randint(2, J + 1, (n, 1), generator=g),
            "cx": rad + (ss - 2 * rad) * torch.rand(n, J, generator=g),
            "cy": rad + (ss - 2 * rad) * torch.rand(n, J, generator=g),
            "ang": 2 * math.pi * torch.rand(n, J, generator=g),
            "fg": (level[..., None] + 0.35 * hue).clamp(0, 1),  # (n, J, 3)
            "noise": 0.03 * torch.randn(n, 3, size, size, generator=g),
        }
        out = torch.empty(n, size, size, 3, dtype=torch.uint8)
        for s in range(0, n, 256):  # chunks stay in cache
            out[s : s + 256] = _render({k: v[s : s + 256] for k, v in p.items()}, ss)
    finally:
        torch.set_num_threads(threads)
    return out.numpy(), label.numpy()


def _render(p: dict, ss: int) -> torch.Tensor:
    """Parameters of n images (see make_demo) -> uint8 [n, ss/2, ss/2, 3]."""
    n, J = p["rad"].shape
    v1 = lambda t: t.view(-1, 1, 1)  # noqa: E731
    ys, xs = torch.meshgrid(
        torch.arange(ss, dtype=torch.float32) + 0.5,
        torch.arange(ss, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    img = F.interpolate(
        p["bg"], size=(ss, ss), mode="bilinear", align_corners=False
    )  # (n, 3, ss, ss)
    for j in range(J):
        dx = (xs - v1(p["cx"][:, j])) / v1(p["rad"][:, j])  # the copy's local frame
        dy = (ys - v1(p["cy"][:, j])) / v1(p["rad"][:, j])
        ca, sa = v1(p["ang"][:, j].cos()), v1(p["ang"][:, j].sin())
        u, v = ca * dx + sa * dy, -sa * dx + ca * dy
        mask = torch.zeros(n, ss, ss)
        for c in range(len(DEMO_CLASSES)):
            idx = ((p["label"] == c) & p["present"][:, j]).nonzero()[:, 0]
            mask[idx] = _shape_mask(c, u[idx], v[idx]).float()
        img = img + (p["fg"][:, j].view(n, 3, 1, 1) - img) * mask[:, None]
    img = F.avg_pool2d(img, 2) + p["noise"]
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 images [N, H, W, 3] in memory -> (transform(PIL image), label)."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, classes, transform: Optional[Callable] = None
    ):
        self.images, self.labels, self.classes, self.transform = (
            images,
            labels,
            list(classes),
            transform,
        )

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), int(self.labels[i])


_DEMO_CACHE: dict = {}


def demo_dataset(
    split: str, transform=None, *, n_train: int = DEMO_TRAIN, seed: int = 0
) -> ArrayDataset:
    """The built-in dataset: n_train train / n_train // 4 test images (at least 10), 32 px, 10 classes;
    the two splits use different seeds. Generated once per process and kept in memory."""
    n = n_train if split == "train" else max(10, n_train // 4)
    key = (n, 2 * seed + (split != "train"))
    if key not in _DEMO_CACHE:
        _DEMO_CACHE[key] = make_demo(*key)
    images, labels = _DEMO_CACHE[key]
    return ArrayDataset(images, labels, DEMO_CLASSES, transform)


# ----------------------------------------------------------------------------------------------
# real data


class BadImageError(ValueError):
    """An unreadable image with --bad-images fail (re-raised with this type out of DataLoader workers;
    the message's last line is the one-line reason)."""


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolderDataset(torch.utils.data.Dataset):
    """PATH/<class>/<image>; unreadable images fail (naming the file) or are skipped (`bad_images`).

    skip: the item is replaced by the next readable one (deterministic), the file is reported once
    per process on stderr and appended to `skip_log` if set (train.py counts that file per epoch).
    """

    def __init__(
        self, root: str, transform=None, bad_images: str = "fail", skip_log: Optional[str] = None
    ):
        from torchvision.datasets.folder import find_classes, make_dataset

        if not os.path.isdir(root):
            raise ValueError(
                f"image folder {root!r} does not exist; pass --data imagefolder:PATH with "
                f"PATH/train/<class>/*.jpg (and optionally PATH/val/<class>/*)"
            )
        try:
            self.classes, self.class_to_idx = find_classes(root)
            self.samples = make_dataset(root, self.class_to_idx, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as e:
            raise ValueError(
                f"no images in {root!r} ({str(e).splitlines()[0]}); expected "
                f"{root}/<class>/<image> with extensions {', '.join(IMG_EXTENSIONS)}"
            ) from None
        if not self.samples:
            raise ValueError(f"no images in {root!r}; expected {root}/<class>/<image>")
        if bad_images not in ("fail", "skip"):
            raise ValueError(f"--bad-images must be 'fail' or 'skip', not {bad_images!r}")
        self.root, self.transform, self.bad_images, self.skip_log = (
            root,
            transform,
            bad_images,
            skip_log,
        )
        self.targets = [t for _, t in self.samples]
        self._reported: set = set()

    def __len__(self):
        return len(self.samples)

    def _load(self, path: str) -> Image.Image:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ValueError("empty file, 0 bytes")
            with warnings.catch_warnings():  # PIL's bomb warning: such an image is refused below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(f)
            w, h = img.size  # from the header: a bomb is refused before decoding
            if w * h > decode.MAX_PIXELS:
                raise ValueError(
                    f"{w} x {h} pixels, over the limit of {decode.MAX_PIXELS} "
                    f"(PIL.Image.MAX_IMAGE_PIXELS): a decompression bomb?"
                )
            img.load()
            return img.convert("RGB")

    def __getitem__(self, i):
        for j in range(len(self.samples)):
            path, target = self.samples[(i + j) % len(self.samples)]
            try:
                img = self._load(path)
            except Exception as e:  # PIL.UnidentifiedImageError, OSError (truncated), ...
                reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                if self.bad_images == "fail":
                    raise BadImageError(
                        f"cannot read image {path!r} ({reason}); delete or replace it, or pass "
                        f"--bad-images skip"
                    ) from None
                if path not in self._reported:
                    self._reported.add(path)
                    print(
                        f"warning: skipping unreadable image {path!r} ({reason})", file=sys.stderr
                    )
                    if self.skip_log:
                        with open(self.skip_log, "a") as f:
                            f.write(path + "\n")
                continue
            return (self.transform(img) if self.transform else img), target
        raise ValueError(f"no readable image in {self.root!r}")


def skipped_images(out_dir: str) -> dict:
    """{"skipped_images": n} for the unreadable images an --bad-images skip run listed in
    out_dir/skipped_images.txt so far ({} if none), and one console line saying so."""
    path = os.path.join(out_dir, "skipped_images.txt")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        n = len(set(fh.read().split("\n")) - {""})
    print(f"skipped {n} unreadable images so far (listed in {path})", flush=True)
    return {"skipped_images": n}


def _torchvision(name: str, split: str, transform, root: str, download: bool):
    import torchvision.datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "stl10": tvd.STL10}[name]
    kw = {"split": split} if name == "stl10" else {"train": split == "train"}
    try:
        ds = cls(root, download=download, transform=transform, **kw)
    except RuntimeError as e:
        if download:
            raise ValueError(
                f"{name}: download to {root!r} failed ({str(e).splitlines()[0]})"
            ) from None
        raise ValueError(
            f"{name} not found under {root!r}; pass --download to fetch it (needs network), or "
            f"--data-root DIR pointing at an existing copy"
        ) from None
    except OSError as e:  # network errors while downloading
        raise ValueError(
            f"{name}: cannot download to {root!r} ({str(e).splitlines()[0][:120]}); fetch it "
            f"elsewhere and pass --data-root"
        ) from None
    return ds


def build_dataset(
    spec: str,
    split: str,
    transform=None,
    *,
    root: str = "data",
    download: bool = False,
    bad_images: str = "fail",
    skip_log: Optional[str] = None,
) -> torch.utils.data.Dataset:
    """spec in demo | demo:N (N training images, for tests) | imagefolder:PATH | cifar10 | cifar100 | stl10;
    split in train | test.
    For imagefolder, train is PATH/train (or PATH itself if it has no train/), test is PATH/val."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if spec == "demo" or spec.startswith("demo:"):
        n = spec[len("demo:") :] or str(DEMO_TRAIN)
        if not n.isdigit() or int(n) < 10:
            raise ValueError(
                f"--data demo:N needs an integer N >= 10 training images, got {spec!r}"
            )
        return demo_dataset(split, transform, n_train=int(n))
    if spec.startswith("imagefolder:"):
        path = spec[len("imagefolder:") :]
        if not path:
            raise ValueError("empty path in --data imagefolder:PATH")
        if split == "train":
            sub = os.path.join(path, "train")
            d = sub if os.path.isdir(sub) else path
        else:
            d = os.path.join(path, "val")
            if not os.path.isdir(d):
                raise ValueError(
                    f"no held-out split {d!r}; create PATH/val/<class>/* for evaluation"
                )
        return ImageFolderDataset(d, transform, bad_images=bad_images, skip_log=skip_log)
    if spec in ("cifar10", "cifar100", "stl10"):
        return _torchvision(spec, split, transform, root, download)
    raise ValueError(f"unknown dataset {spec!r}; choose one of {', '.join(SPECS)}")


class InMemory(torch.utils.data.Dataset):
    """A dataset under a deterministic transform (the eval transform), evaluated once and kept as one tensor.
    train.py reads its eval sets many times (memory-bank fill, kNN every epoch, four final probes); on small
    images the PIL transform costs more than the network. Items are exactly the transformed dataset's."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y  # [N, 3, H, W] float32, [N]

    @classmethod
    def of(cls, ds, workers: int = 0) -> "InMemory":
        xs, ys = zip(*torch.utils.data.DataLoader(ds, batch_size=256, num_workers=workers))
        return cls(torch.cat(xs), torch.cat(ys))

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def in_memory_if_small(ds, max_bytes: int = 1 << 30, workers: int = 0):
    """InMemory.of(ds) for sets whose images are arrays in memory already (demo, CIFAR, STL) if the transformed
    items fit in max_bytes; else ds unchanged. Image folders stay lazy, so an unreadable file is met where
    it is read and handled by --bad-images."""
    if ds is None or len(ds) == 0 or isinstance(ds, ImageFolderDataset):
        return ds
    x0 = ds[0][0]
    return InMemory.of(ds, workers) if len(ds) * x0.numel() * x0.element_size() <= max_bytes else ds


def eval_set(raw, image_size: int, *, workers: int = 0, max_bytes: int = 1 << 30):
    """`raw` (untransformed) under eval_transform(image_size), in memory where small (in_memory_if_small). A set
    held as one array whose images already are image_size (<= 96 px) square skips PIL: Resize and CenterCrop
    are then identities and normalize() of the array gives the bits of ToTensor + Normalize, in one pass."""
    if raw is None:
        return None
    arrays = in_memory_arrays(raw)
    if (
        arrays is not None
        and image_size <= 96
        and arrays[0].shape[-2:] == (image_size, image_size)
        and arrays[0].numel() * 4 <= max_bytes
    ):
        return InMemory(normalize(arrays[0]).contiguous(), arrays[1])
    c = copy.copy(raw)
    c.transform = eval_transform(image_size)
    return in_memory_if_small(c, max_bytes, workers)


def has_test_split(spec: str) -> bool:
    """Whether build_dataset(spec, 'test') can exist (imagefolder needs PATH/val)."""
    if spec.startswith("imagefolder:"):
        return os.path.isdir(os.path.join(spec[len("imagefolder:") :], "val"))
    return True


def num_classes(ds) -> int:
    while isinstance(ds, torch.utils.data.Subset):
        ds = ds.dataset
    return len(ds.classes)


def dataset_image_size(spec: str) -> int:
    """Native/default training resolution of a dataset spec."""
    if spec in ("demo", "cifar10", "cifar100") or spec.startswith("demo:"):
        return 32
    if spec == "stl10":
        return 96
    return 224


# ----------------------------------------------------------------------------------------------
# transforms


def _normalize():
    import torchvision.transforms as T

    return [T.ToTensor(), T.Normalize(MEAN, STD)]


def eval_transform(image_size: int):
    """Resize(size * 256/224) + CenterCrop(size) + normalise; small images (<= 96 px) are only resized."""
    import torchvision.transforms as T

    if image_size <= 96:
        return T.Compose([T.Resize(image_size), T.CenterCrop(image_size), *_normalize()])
    return T.Compose(
        [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size), *_normalize()]
    )


def train_linear_transform(image_size: int):
    """RandomResizedCrop + flip + normalise (linear-probe training)."""
    import torchvision.transforms as T

    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *_normalize()])


# Every random draw of an augmentation comes from torch's global RNG (as in torchvision's transforms),
# so seeding torch per item (ViewsDataset) makes a sample's crops independent of worker and rank.


class GaussianBlur:
    """PIL Gaussian blur with probability p and radius uniform in [lo, hi] (SwAV/BYOL)."""

    def __init__(self, p: float, lo: float = 0.1, hi: float = 2.0):
        self.p, self.lo, self.hi = p, lo, hi

    def __call__(self, img):
        if float(torch.rand(())) >= self.p:
            return img
        return img.filter(
            ImageFilter.GaussianBlur(radius=self.lo + (self.hi - self.lo) * float(torch.rand(())))
        )


class Solarize:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if float(torch.rand(())) < self.p else img


_MEAN_T, _STD_T = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 crops [..., 3, h, w] (what Augmentation makes) -> normalised float32, on x's device, the same
    bits as ToTensor + Normalize per crop. Done per batch after the transfer: a quarter of the bytes cross
    from the loader workers (and to the GPU), and one conversion per batch costs less than one per crop.
    Float input is returned unchanged."""
    if x.dtype != torch.uint8:
        return x
    return x.float().div_(255).sub_(_MEAN_T.to(x.device)).div_(_STD_T.to(x.device))


class Augmentation:
    """One crop of augmentation set A or B (METHOD.md), as uint8 (see normalize); blur_scale scales the blur radius,
    so small images (32 px) get a proportionally smaller blur than 224 px ones. Two implementations of one
    distribution: called on a PIL image, torchvision's PIL ops draw from torch's global RNG (any image size);
    batch(images, u) makes one crop per same-size uint8 image from rows of uniforms (batch_augment.py)."""

    def __init__(self, kind: str, size: int, scale: tuple, *, blur_scale: float = 1.0):
        import torchvision.transforms as T

        r = recipe(kind)
        ops = [
            T.RandomResizedCrop(size, scale=scale),  # bilinear, torchvision's default, as released
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(*r.jitter)], p=r.jitter_p),
            T.RandomGrayscale(p=r.gray_p),
        ]
        if r.blur_p > 0:
            ops.append(GaussianBlur(r.blur_p, r.sigma[0] * blur_scale, r.sigma[1] * blur_scale))
        if r.sol_p > 0:
            ops.append(Solarize(r.sol_p))
        self.pil = T.Compose(
            [*ops, T.PILToTensor()]
        )  # uint8 [3, size, size]; data.normalize() per batch
        self.batch = BatchAugment(kind, size, scale, blur_scale=blur_scale)

    def __call__(self, img) -> torch.Tensor:
        return self.pil(img)


def in_memory_arrays(ds) -> Optional[tuple]:
    """(images uint8 [N, 3, H, W] (a view, no copy), labels int64 [N]) of an untransformed dataset held as one
    array: the demo, CIFAR-10/100, STL-10. None for anything else (image folders, transformed sets)."""
    if getattr(ds, "transform", None) is not None:
        return None
    if isinstance(ds, ArrayDataset):
        return torch.from_numpy(ds.images).permute(0, 3, 1, 2), torch.as_tensor(
            ds.labels, dtype=torch.int64
        )
    import torchvision.datasets as tvd

    if isinstance(ds, tvd.STL10):  # stored [N, 3, H, W]
        return torch.from_numpy(ds.data), torch.as_tensor(ds.labels, dtype=torch.int64)
    if isinstance(ds, tvd.CIFAR10):  # CIFAR-100 too; stored [N, H, W, 3]
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.as_tensor(
            ds.targets, dtype=torch.int64
        )
    return None


def pil_to_tensor(img) -> torch.Tensor:
    """PIL RGB image -> uint8 [3, H, W]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def item_uniforms(seed: int, n_crops: int) -> torch.Tensor:
    """[n_crops, N_UNIFORM] uniforms of one item for Augmentation.batch, from a generator seeded by the item only."""
    return torch.rand(n_crops, N_UNIFORM, generator=torch.Generator().manual_seed(seed))


class MultiCropViews:
    """SMoG's views of one image (METHOD.md): the online network sees 2 global + n_local local crops
    of one augmentation set, the momentum network 2 global + n_local local crops of the other (targets
    come from its global crops; its local crops take part in its BatchNorm statistics, as released).
    Which set is online alternates every iteration, so the caller says which (see ViewsDataset)."""

    def __init__(
        self,
        global_size: int,
        local_size: int,
        n_local: int,
        global_scale=(0.2, 1.0),
        local_scale=(0.05, 0.2),
        blur_scale: float = 1.0,
    ):
        self.glob = {
            k: Augmentation(k, global_size, tuple(global_scale), blur_scale=blur_scale)
            for k in "AB"
        }
        self.loc = {
            k: Augmentation(k, local_size, tuple(local_scale), blur_scale=blur_scale) for k in "AB"
        }
        self.n_local = n_local

    def crops(self, img, s: str) -> list:
        """2 global + n_local local crops of augmentation set `s`, global first."""
        return [self.glob[s](img) for _ in range(2)] + [
            self.loc[s](img) for _ in range(self.n_local)
        ]

    def __call__(self, img, online: str):
        """-> (online crops [2 + n_local] of set `online`, momentum crops [2 + n_local] of the other set)."""
        return self.crops(img, online), self.crops(img, "B" if online == "A" else "A")

    def batch(self, images: torch.Tensor, seeds: list, online: list) -> tuple:
        """The views of many images at once with tensor ops (Augmentation.batch: __call__'s recipe,
        each operation as PIL computes it up to rounding, blur included): images uint8 [n, 3, H, W],
        each item's seed and online set -> (online crops, momentum crops), lists of 2 + n_local
        uint8 tensors [n, 3, s, s]. An item's crops depend on its seed only."""
        m, n = 2 + self.n_local, len(seeds)
        u = torch.stack(
            [item_uniforms(s, 2 * m) for s in seeds]
        )  # [n, 2m, N_UNIFORM], online crops first
        is_a = torch.tensor([o == "A" for o in online])
        src = source_rows(images)  # shared by the 2m crops
        same = bool((is_a == is_a[0]).all())  # one online set for all (train.py)
        slots = {}  # (set or None, global?) -> crop slots
        for c in range(2 * m):
            k = ("A" if bool(is_a[0]) == (c < m) else "B") if same else None
            slots.setdefault((k, c % m < 2), []).append(c)
        crops = [None] * (2 * m)
        for (k, glob), cs in slots.items():  # one call per set and crop size
            aug = self.glob if glob else self.loc
            if k is None:  # mixed online sets: slot by slot
                for c in cs:
                    sel_a = is_a if c < m else ~is_a
                    out = torch.empty(
                        (n, 3, aug["A"].batch.size, aug["A"].batch.size), dtype=torch.uint8
                    )
                    for kk, sel in (("A", sel_a), ("B", ~sel_a)):
                        out[sel] = aug[kk].batch(images[sel], u[sel, c], src[sel])
                    crops[c] = out
                continue
            rep = len(cs)
            out = aug[k].batch(
                images.repeat(rep, 1, 1, 1),
                u[:, cs].transpose(0, 1).reshape(rep * n, -1),
                src.repeat(rep, 1, 1),
            )
            for r, c in enumerate(cs):
                crops[c] = out[r * n : (r + 1) * n]
        return crops[:m], crops[m:]

    def batch_sources(self, images: list, seeds: list, online: list) -> tuple:
        """batch() for sources of different sizes (image folders): images a list of uint8
        [3, H_b, W_b] on one device -> the same lists of crops, on that device. Each crop's box is
        drawn from its own source's size with crop_boxes' rule; crop + resize by
        batch_augment.resized_crops, the set's other operations batched as in batch(). An item's
        crops depend on its seed only."""
        dev = images[0].device
        m, n = 2 + self.n_local, len(seeds)
        u = torch.stack([item_uniforms(s, 2 * m) for s in seeds]).to(dev)  # [n, 2m, N_UNIFORM]
        is_a = torch.tensor([o == "A" for o in online], device=dev)
        H = torch.tensor([x.shape[-2] for x in images], device=dev)
        W = torch.tensor([x.shape[-1] for x in images], device=dev)
        crops = [None] * (2 * m)
        # a GPU: constants the operations make (kernels, jitter ranges) on it too; not on the CPU,
        # where the device context would cost a Python call per operation
        on_device = torch.device(dev) if dev.type != "cpu" else contextlib.nullcontext()
        for glob in (True, False):
            slots = [c for c in range(2 * m) if (c % m < 2) == glob]
            aug, r = (self.glob if glob else self.loc), len(slots)
            geo = aug["A"].batch  # sets A and B share size, scale and ratio
            uu = u[:, slots].reshape(n * r, N_UNIFORM)  # row b r + t: item b, slot t
            k = torch.arange(n, device=dev).repeat_interleave(r)
            i, j, h, w = crop_boxes_sized(uu, H[k], W[k], geo.scale, geo.ratio)
            x = resized_crops(images, k, i, j, h, w, geo.size, uu[:, _FLIP] < 0.5)
            x, uu = x.view(n, r, *x.shape[1:]), uu.view(n, r, N_UNIFORM)
            set_a = is_a.view(n, 1) == (torch.tensor(slots, device=dev) < m).view(1, r)
            out = torch.empty(x.shape, dtype=torch.uint8, device=dev)
            for kk, sel in (("A", set_a), ("B", ~set_a)):
                if bool(sel.any()):
                    with on_device:
                        out[sel] = aug[kk].batch.finish(x[sel], uu[sel])
            for t, c in enumerate(slots):
                crops[c] = out[:, t].contiguous()
        return crops[:m], crops[m:]


def decode_on_device(device, workers: int) -> bool:
    """Where an image folder's batches are decoded and cropped on the tensor path: by the training
    process on a GPU (the workers only read bytes); on a CPU-only run in the loader workers when
    there are any (the same operations on the same CPU, overlapped with the step), else in the
    training process."""
    return torch.device(device).type != "cpu" or workers <= 0


class EncodedBatch:
    """One batch of image-folder keys as a loader worker leaves it for the device: JPEG files as
    bytes (uint8 [n]); other formats already decoded by PIL in the worker (uint8 [3, H, W]).
    ViewsDataset.finish makes the views."""

    def __init__(self, keys: list, blobs: list):
        self.keys, self.blobs = keys, blobs


class seeded:
    """Context: torch's CPU generator seeded for one item, the caller's state restored afterwards (so
    workers=0 leaves the training process's RNG alone). Only the CPU generator: torch.manual_seed would
    also queue CUDA seeding with a formatted stack trace, per item."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.state = torch.get_rng_state()
        torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.set_rng_state(self.state)


class ViewsDataset(torch.utils.data.Dataset):
    """Indexed by (dataset index, online set "A"/"B", item seed) -- what train.py's batch sampler yields
    -> (online crops, momentum crops, dataset index). The crops are drawn from the item seed alone, so they do
    not depend on which worker or rank makes them, nor on where a run resumed. `base` must return PIL images
    (transform=None). batched=True and a dataset held as one array (in_memory_arrays): a whole batch of keys is
    made at once with tensor ops (MultiCropViews.batch; the DataLoader calls __getitems__); else crop by crop
    with PIL."""

    def __init__(
        self, base, views: MultiCropViews, batched: bool = False, decode_on_device: bool = False
    ):
        self.base, self.views = base, views
        self.arrays = in_memory_arrays(base) if batched else None
        self.folder = batched and isinstance(base, ImageFolderDataset) and base.transform is None
        self.decode_on_device = decode_on_device

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        if self.arrays is not None:
            return self.__getitems__([key])[0]
        if self.folder:
            on, mo, _ = self.finish(self.read([key]), torch.device("cpu"))
            return [c[0] for c in on], [c[0] for c in mo], key[0]
        i, online, seed = key
        img, _ = self.base[i]
        with seeded(seed):
            on, mo = self.views(img, online)
        return on, mo, i

    # image folders, batched: workers read bytes, the device decodes and crops (decode.py)

    def read(self, keys: list) -> EncodedBatch:
        """A loader worker's share: each JPEG's bytes; other formats decoded with PIL here (their
        only decoder), under --bad-images as on the PIL path."""
        blobs = []
        for i, _, _ in keys:
            blob = decode.read_bytes(self.base.samples[i][0])
            if not decode.is_jpeg(blob):
                blob = pil_to_tensor(self.base[i][0])
            blobs.append(blob)
        return EncodedBatch(list(keys), blobs)

    def finish(self, batch: EncodedBatch, device) -> tuple:
        """Decode (decode.decode_rgb) and crop (MultiCropViews.batch_sources) one batch on
        `device` -> (online crops, momentum crops, dataset indices), what the loader yields for
        arrays. A JPEG the decoder refuses is read through the PIL path (self.base[i]): decoded if
        PIL can, else --bad-images (fail naming the file, or skip: the next readable image of the
        folder, reported once)."""
        device = torch.device(device)
        none = torch.empty(0, dtype=torch.uint8)
        imgs = decode.decode_rgb([b if b.dim() == 1 else none for b in batch.blobs], device)
        for b, (key, blob) in enumerate(zip(batch.keys, batch.blobs)):
            if blob.dim() == 3:
                imgs[b] = blob.to(device)
            elif imgs[b] is None:
                imgs[b] = pil_to_tensor(self.base[key[0]][0]).to(device)
        seeds, online = [k[2] for k in batch.keys], [k[1] for k in batch.keys]
        on, mo = self.views.batch_sources(imgs, seeds, online)
        return on, mo, torch.tensor([k[0] for k in batch.keys])

    def batches(self, it, device):
        """The loader's batches with the device's share done: what train.py iterates."""
        for b in it:
            yield self.finish(b, device) if isinstance(b, EncodedBatch) else b

    @staticmethod
    def collate(items):
        """The DataLoader's collate_fn: an EncodedBatch or a finished batch (a tuple) as it is,
        else the default."""
        if isinstance(items, (EncodedBatch, tuple)):
            return items
        return torch.utils.data.default_collate(items)

    def __getitems__(self, keys: list):
        if self.folder:
            batch = self.read(keys)
            return batch if self.decode_on_device else self.finish(batch, torch.device("cpu"))
        if self.arrays is None:
            return [self[k] for k in keys]
        idx = [k[0] for k in keys]
        on, mo = self.views.batch(self.arrays[0][idx], [k[2] for k in keys], [k[1] for k in keys])
        return [([c[b] for c in on], [c[b] for c in mo], i) for b, i in enumerate(idx)]


class AugmentedDataset(torch.utils.data.Dataset):
    """Indexed by (dataset index, ..., item seed) -- first and last element, so train.py's ViewsDataset keys
    serve -> (transform(img), label), the transform's randomness seeded per item like ViewsDataset
    (train.py's supervised baseline); batched as ViewsDataset when the transform is an Augmentation."""

    def __init__(self, base, transform, batched: bool = False):
        self.base, self.transform = base, transform
        self.arrays = (
            in_memory_arrays(base) if batched and isinstance(transform, Augmentation) else None
        )

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        if self.arrays is not None:
            return self.__getitems__([key])[0]
        img, label = self.base[key[0]]
        with seeded(key[-1]):
            return self.transform(img), label

    def __getitems__(self, keys: list) -> list:
        if self.arrays is None:
            return [self[k] for k in keys]
        idx = [k[0] for k in keys]
        x = self.transform.batch(
            self.arrays[0][idx], torch.cat([item_uniforms(k[-1], 1) for k in keys])
        )
        return [(x[b], int(self.arrays[1][i])) for b, i in enumerate(idx)]
