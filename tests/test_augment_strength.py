"""The tensor crop pipeline (batch_augment.py) against the PIL pipeline (data.Augmentation.pil:
torchvision's PIL ops and PIL's GaussianBlur, as released), one operation at a time, by a statistic
that measures that operation's strength. Each check also runs the tensor side with the operation's
strength doubled or halved and requires that change to be caught: the test shows its own power
instead of assuming it.

With the other operations switched off on both sides (probability 0; crop scale and ratio 1, which
makes the crop the whole image), each statistic is a per-crop number whose mean depends on one
parameter; the two pipelines' means must agree within Z_SAME standard errors, and the 2x-off tensor
pipeline must differ by more than Z_OFF. Draws are seeded, so the verdicts are deterministic."""

import math

import pytest
import torch
from PIL import Image

from smog_train import batch_augment as ba
from smog_train import data

Z_SAME, Z_OFF = 3.5, 6.0
# crops per pipeline; 400 for the others
N = {"grayscale": 2400, "solarize": 3000, "crop scale": 500}


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops: more threads only wait at barriers on a machine with few cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ramp_images(n):
    """32x32 images whose red channel rises left to right and green top to bottom: a crop's red and
    green ranges measure its width and height, the sign of its red slope its flip."""
    x = torch.arange(32) * 8
    img = torch.stack(
        [x.view(1, -1).expand(32, 32), x.view(-1, 1).expand(32, 32), torch.full((32, 32), 128)]
    )
    return img.to(torch.uint8).expand(n, 3, 32, 32).contiguous()


def demo_images(n):
    imgs, _ = data.make_demo(64, 5)
    return torch.from_numpy(imgs).permute(0, 3, 1, 2)[torch.arange(n) % 64].contiguous()


def isolated(kind, scale=(1.0, 1.0), ratio=(1.0, 1.0), blur_scale=1.0, keep=()):
    """An Augmentation of set `kind` with every operation not in `keep` switched off on both sides."""
    a = data.Augmentation(kind, 32, scale, blur_scale=blur_scale)
    t = {type(o).__name__: o for o in a.pil.transforms}
    b = a.batch
    t["RandomResizedCrop"].ratio = b.ratio = ratio
    cj = t["RandomApply"].transforms[0]
    for i, name in enumerate(("brightness", "contrast", "saturation", "hue")):
        if name not in keep:
            setattr(cj, name, None)
            b.jitter = b.jitter[:i] + (0.0,) + b.jitter[i + 1 :]
    if not {"brightness", "contrast", "saturation", "hue"} & set(keep):
        t["RandomApply"].p = b.jitter_p = 0.0
    if "gray" not in keep:
        t["RandomGrayscale"].p = b.gray_p = 0.0
    if "GaussianBlur" in t and "blur" not in keep:
        t["GaussianBlur"].p = b.blur_p = 0.0
    if "Solarize" in t and "solarize" not in keep:
        t["Solarize"].p = b.sol_p = 0.0
    flip = "flip" in keep
    if not flip:
        t["RandomHorizontalFlip"].p = 0.0
    return a, flip


def pil_crops(a, images, seed):
    torch.manual_seed(seed)
    return torch.stack([a.pil(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])


def tensor_crops(b, images, seed, flip):
    u = torch.rand(len(images), ba.N_UNIFORM, generator=torch.Generator().manual_seed(seed))
    if not flip:
        u[:, ba._FLIP] = 1.0  # the tensor side flips where u < 0.5
    return b(images, u)


def z(a, b):
    return float((a.mean() - b.mean()) / math.sqrt(a.var() / len(a) + b.var() / len(b)))


def hue(x):
    """HSV hue in turns of float RGB [n, 3, h, w] in [0, 1]; nan where the pixel is grey."""
    v, arg = x.max(1)
    c = v - x.min(1).values
    r, g, b = x.unbind(1)
    d = c.clamp(min=1e-6)
    h = (
        torch.where(
            arg == 0, ((g - b) / d) % 6, torch.where(arg == 1, (b - r) / d + 2, (r - g) / d + 4)
        )
        / 6
    )
    return torch.where(c > 0.1, h, torch.nan)


def sharp(x):
    return (x[..., 1:] - x[..., :-1]).abs().mean((-1, -2, -3)) + (
        x[..., 1:, :] - x[..., :-1, :]
    ).abs().mean((-1, -2, -3))


# name -> (set, Augmentation settings, images, statistic(out, images), the tensor side's parameter
# made 2x off)
def _brightness(b):
    b.jitter = (0.8, 0, 0, 0)


def _contrast(b):
    b.jitter = (0, 0.8, 0, 0)


def _saturation(b):
    b.jitter = (0, 0, 0.4, 0)


def _hue(b):
    b.jitter = (0, 0, 0, 0.05)


def _scale(b):
    b.scale = (0.35 / 2, 1.0)


def _gray(b):
    b.gray_p = 0.4


def _blur(b):
    b.sigma = (2 * b.sigma[0], 2 * b.sigma[1])


def _solarize(b):
    b.sol_p = 0.1


def _rel(f):
    return lambda out, img: (f(out.float()) / f(img.float()) - 1).abs()


CHECKS = {
    "crop scale": (
        "A",
        dict(scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)),
        ramp_images,
        lambda out, img: (
            (out[:, 0].float().amax((-1, -2)) - out[:, 0].float().amin((-1, -2)))
            * (out[:, 1].float().amax((-1, -2)) - out[:, 1].float().amin((-1, -2)))
        ),
        _scale,
    ),
    "brightness": (
        "A",
        dict(keep=("brightness",)),
        demo_images,
        _rel(lambda x: x.mean((1, 2, 3))),
        _brightness,
    ),
    "contrast": (
        "A",
        dict(keep=("contrast",)),
        demo_images,
        _rel(lambda x: x.std((1, 2, 3))),
        _contrast,
    ),
    "saturation": (
        "A",
        dict(keep=("saturation",)),
        demo_images,
        _rel(lambda x: (x.amax(1) - x.amin(1)).mean((1, 2))),
        _saturation,
    ),
    "hue": (
        "A",
        dict(keep=("hue",)),
        demo_images,
        lambda out, img: (
            torch.nanmean(
                0.5
                - ((hue(out.float() / 255) - hue(img.float() / 255)) % 1 - 0.5).abs().flatten(1),
                1,
            )
            * -1
            + 0.5
        ),
        _hue,
    ),
    "grayscale": (
        "A",
        dict(keep=("gray",)),
        demo_images,
        lambda out, img: (out.amax(1) == out.amin(1)).all(-1).all(-1).float(),
        _gray,
    ),
    "blur (demo scale)": (
        "A",
        dict(keep=("blur",), blur_scale=0.15),
        demo_images,
        lambda out, img: sharp(out.float()) / sharp(img.float()),
        _blur,
    ),
    "blur": (
        "A",
        dict(keep=("blur",), blur_scale=1.0),
        demo_images,
        lambda out, img: sharp(out.float()) / sharp(img.float()),
        _blur,
    ),
    "solarize": (
        "B",
        dict(keep=("solarize",)),
        demo_images,
        lambda out, img: (out != img).any(1).flatten(1).any(1).float(),
        _solarize,
    ),
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_each_operation_has_the_pil_pipelines_strength(name):
    kind, settings, make, stat, off = CHECKS[name]
    a, flip = isolated(kind, **settings)
    images = make(N.get(name, 400))
    want = stat(pil_crops(a, images, 1), images)
    got = stat(tensor_crops(a.batch, images, 2, flip), images)
    assert abs(z(want, got)) < Z_SAME, (name, float(want.mean()), float(got.mean()), z(want, got))
    # the same operation, 2x too strong or weak
    off(a.batch)
    bad = stat(tensor_crops(a.batch, images, 2, flip), images)
    assert abs(z(want, bad)) > Z_OFF, (
        name,
        "2x off not caught",
        float(want.mean()),
        float(bad.mean()),
        z(want, bad),
    )


def test_flip_probability():
    a, flip = isolated("A", keep=("flip",))
    images = ramp_images(1000)
    # mirrored ramp
    slope = lambda out: (out[:, 0, :, -1].float() - out[:, 0, :, 0].float()).mean(1) < 0
    want, got = (
        slope(pil_crops(a, images, 1)).float(),
        slope(tensor_crops(a.batch, images, 2, flip)).float(),
    )
    assert abs(z(want, got)) < Z_SAME and abs(float(want.mean()) - 0.5) < 0.05
