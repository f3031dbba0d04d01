"""SMoG's crop augmentation (sets A and B: recipe) as tensor operations on a batch of same-size uint8 images.

data.Augmentation makes one crop at a time with torchvision's PIL operations: any image size, but a Python call
per operation and crop, and a demo batch holds 256 x 8 crops (more than the step costs on a CPU). For datasets
held as one uint8 array (demo, CIFAR, STL) this module makes every crop of a batch at once:

    crop + resize   per-crop interpolation matrices (PIL's bilinear filter, antialiased when shrinking), two matmuls
    flip            the column matrix reversed
    colour jitter   brightness, contrast, saturation, hue with per-crop factors, in a per-crop random order
    grayscale
    Gaussian blur   PIL's GaussianBlur computed as PIL does (gaussian_blur: 3 + 3 extended box
                    passes, edges clamped, rounding after each), on the image rounded to uint8
    solarise        on the uint8 result

The crops follow the PIL pipeline's recipe parameter for parameter (RandomResizedCrop's ten
area/ratio attempts and centre-crop fallback, the jitter ranges, the probabilities, the blur's
radius range); the pixels differ by rounding (PIL rounds to uint8 after each operation, this rounds
before the blur, inside it as PIL does, and at the end). tests/test_batch_augment.py checks each
operation against torchvision's functional ops, PIL's resize and PIL's blur, and the distribution of
whole crops against the PIL pipeline by crop statistics (it lists which 2x errors they notice).

Randomness: every crop reads its parameters from one row of uniforms, u [n, N_UNIFORM]; data.py draws the rows of
an item from a generator seeded by the item, so a crop does not depend on the batch it is made in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

ATTEMPTS = 10  # RandomResizedCrop's tries before the centre-crop fallback
# columns of u: area and log-ratio per attempt, crop position, flip, jitter (apply, 4 factors, 4 order keys),
# grayscale, blur (apply, sigma), solarise
_AREA, _RATIO, _POS, _FLIP = 0, ATTEMPTS, 2 * ATTEMPTS, 2 * ATTEMPTS + 2
_JIT, _FACT, _ORDER = _FLIP + 1, _FLIP + 2, _FLIP + 6
_GRAY, _BLUR, _SIGMA, _SOL = _ORDER + 4, _ORDER + 5, _ORDER + 6, _ORDER + 7
N_UNIFORM = _SOL + 1
LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@dataclass(frozen=True)
class Recipe:
    """The parameters of one augmentation set (METHOD.md, "Recipes"), besides the crop's size and
    scale: read by both implementations, the PIL pipeline (data.Augmentation) and BatchAugment."""

    blur_p: float  # Gaussian blur probability
    sol_p: float  # solarise probability
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # colour jitter: brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    sigma: tuple = (0.1, 2.0)  # blur radius range, times blur_scale


RECIPES = {"A": Recipe(blur_p=1.0, sol_p=0.0), "B": Recipe(blur_p=0.1, sol_p=0.2)}


def recipe(kind: str) -> Recipe:
    if kind not in RECIPES:
        raise ValueError(f"augmentation set must be 'A' or 'B', not {kind!r}")
    return RECIPES[kind]


class BatchAugment:
    """One crop of augmentation set A or B (recipe(kind)) for each image of a batch."""

    def __init__(
        self, kind: str, size: int, scale: tuple, *, blur_scale: float = 1.0, ratio=(3 / 4, 4 / 3)
    ):
        r = recipe(kind)
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)
        self.blur_p, self.sol_p, self.jitter_p, self.gray_p = (
            r.blur_p,
            r.sol_p,
            r.jitter_p,
            r.gray_p,
        )
        self.jitter = r.jitter
        self.sigma = (r.sigma[0] * blur_scale, r.sigma[1] * blur_scale)

    def __call__(
        self, images: torch.Tensor, u: torch.Tensor, src: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """images uint8 [n, 3, H, W], u float [n, N_UNIFORM] in [0, 1) -> crops uint8 [n, 3, size, size].
        src: source_rows(images), when several crops are made from the same images."""
        i, j, h, w = crop_boxes(u, images.shape[-2], images.shape[-1], self.scale, self.ratio)
        src = source_rows(images) if src is None else src
        x = resized_crop(src, i, j, h, w, self.size, images.shape[-3], flip=u[:, _FLIP] < 0.5)
        return self.finish(x, u)

    def finish(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Everything after crop + resize + flip: x float [n, 3, size, size] in [0, 1]
        (overwritten), u its rows -> uint8 crops. Shared by __call__ and the crops of sources of
        different sizes (resized_crops)."""
        x = color_jitter(x, u, self.jitter, self.jitter_p)
        gray = u[:, _GRAY] < self.gray_p
        x = torch.where(gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
        blur = u[:, _BLUR] < self.blur_p
        if blur.any():
            sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u[blur, _SIGMA]
            x[blur] = gaussian_blur(x[blur], sigma)
        q = x.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
        sol = (u[:, _SOL] < self.sol_p).view(-1, 1, 1, 1)
        return torch.where(sol & (q >= 128), 255 - q, q)  # PIL's ImageOps.solarize(threshold=128)


def crop_boxes(u: torch.Tensor, H: int, W: int, scale: tuple, ratio: tuple) -> tuple:
    """RandomResizedCrop.get_params for every row of u -> (top i, left j, height h, width w), float
    tensors [n] of integers: the first of ATTEMPTS (area, log-ratio) draws whose box fits, else the
    centre crop of the clamped ratio."""
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[:, _AREA : _AREA + ATTEMPTS])
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(lr[0] + (lr[1] - lr[0]) * u[:, _RATIO : _RATIO + ATTEMPTS])
    w, h = (
        torch.sqrt(area * aspect).round(),
        torch.sqrt(area / aspect).round(),
    )  # round half to even, as Python
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    if W / H < ratio[0]:
        fw, fh = W, round(W / ratio[0])
    elif W / H > ratio[1]:
        fw, fh = round(H * ratio[1]), H
    else:
        fw, fh = W, H
    ok = fits.any(1)
    w, h = torch.where(ok, w, float(fw)), torch.where(ok, h, float(fh))
    i = torch.where(ok, torch.floor(u[:, _POS] * (H - h + 1)), float((H - fh) // 2))
    j = torch.where(ok, torch.floor(u[:, _POS + 1] * (W - w + 1)), float((W - fw) // 2))
    return i, j, h, w


def interpolation_matrix(
    start: torch.Tensor, length: torch.Tensor, size: int, n_in: int
) -> torch.Tensor:
    """Rows of PIL's bilinear resize of the pixels start .. start+length-1 of an axis of n_in pixels to `size`
    pixels -> [n, size, n_in]: output pixel o weighs input pixel p by the triangle max(0, 1 - |p + 0.5 - c| / s)
    around its centre c = start + (o + 0.5) * length / size, s = max(1, length / size) (antialiased when
    shrinking), restricted to the crop and normalised to sum 1."""
    step = (length / size).view(-1, 1, 1)
    o = torch.arange(size, dtype=step.dtype, device=step.device).view(1, -1, 1)
    centre = start.view(-1, 1, 1) + (o + 0.5) * step
    p = torch.arange(n_in, dtype=step.dtype, device=step.device).view(1, 1, -1)
    wt = (1 - (p + 0.5 - centre).abs() / step.clamp(min=1)).clamp_(min=0)
    wt = wt * ((p >= start.view(-1, 1, 1)) & (p < (start + length).view(-1, 1, 1)))
    return wt / wt.sum(-1, keepdim=True)


def source_rows(images: torch.Tensor) -> torch.Tensor:
    """uint8 [n, C, H, W] -> float [n, H, C W], values 0-255: the layout resized_crop multiplies by its row matrices."""
    n, C, H, W = images.shape
    return images.permute(0, 2, 1, 3).reshape(n, H, C * W).float()


def resized_crop(
    src: torch.Tensor, i, j, h, w, size: int, channels: int, flip: torch.Tensor
) -> torch.Tensor:
    """src = source_rows(images) -> the box (i, j, h, w) of each image resized to size x size, mirrored where flip,
    float [n, C, size, size] in [0, 1]."""
    n, H, CW = src.shape
    W = CW // channels
    rows = interpolation_matrix(i, h, size, H) / 255  # [n, size, H], and 0-255 -> 0-1
    cols = interpolation_matrix(j, w, size, W)  # [n, size, W]
    cols = torch.where(flip.view(-1, 1, 1), cols.flip(1), cols)
    y = torch.bmm(rows, src)  # [n, size, C W]
    y = torch.bmm(y.view(n, size * channels, W), cols.transpose(1, 2))  # [n, size C, size]
    return y.view(n, size, channels, size).permute(0, 2, 1, 3).contiguous()


# sources of different sizes (image folders): each crop's box from its own source's size, crop +
# resize per crop on the CPU (torch's antialiased uint8 resize, PIL's algorithm), batched matmuls on
# a GPU


def crop_boxes_sized(
    u: torch.Tensor, H: torch.Tensor, W: torch.Tensor, scale: tuple, ratio: tuple
) -> tuple:
    """crop_boxes with each row's own source size H, W (integer tensors [n]); for equal sizes the
    same numbers as crop_boxes(u, H, W, ...) (tests/test_folder_tensor.py)."""
    Hf, Wf = H.to(u.dtype).view(-1, 1), W.to(u.dtype).view(-1, 1)
    s = scale[0] + (scale[1] - scale[0]) * u[:, _AREA : _AREA + ATTEMPTS]
    area = (H * W).to(u.dtype).view(-1, 1) * s
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(lr[0] + (lr[1] - lr[0]) * u[:, _RATIO : _RATIO + ATTEMPTS])
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= Wf) & (h > 0) & (h <= Hf)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    Hd, Wd = H.double(), W.double()  # the fallback in Python's float64
    tall, wide = Wd / Hd < ratio[0], Wd / Hd > ratio[1]
    fw = torch.where(wide, torch.round(Hd * ratio[1]), Wd)
    fh = torch.where(tall, torch.round(Wd / ratio[0]), Hd)
    ok = fits.any(1)
    w, h = torch.where(ok, w, fw.to(u.dtype)), torch.where(ok, h, fh.to(u.dtype))
    i = torch.where(
        ok, torch.floor(u[:, _POS] * (Hf[:, 0] - h + 1)), torch.floor((Hd - fh) / 2).to(u.dtype)
    )
    j = torch.where(
        ok, torch.floor(u[:, _POS + 1] * (Wf[:, 0] - w + 1)), torch.floor((Wd - fw) / 2).to(u.dtype)
    )
    return i, j, h, w


def resized_crops(
    images: list,
    k: torch.Tensor,
    i,
    j,
    h,
    w,
    size: int,
    flip: torch.Tensor,
    method: Optional[str] = None,
) -> torch.Tensor:
    """Crop the box (i, j, h, w) of images[k] (uint8 [C, H_k, W_k], sizes may differ), resize it to
    size x size, mirror it where flip -> float [n, C, size, size] in [0, 1], on the images' device.
    method "interp": one antialiased bilinear resize per crop of the uint8 box (torch's version of
    PIL's filter, rounding as PIL does); cost ~ the box's pixels; the CPU default. "matmul": the
    sources zero-padded to a common size, every crop a pair of batched matmuls with interpolation
    matrices that read only its box (resized_crop's arithmetic); cost ~ size x the padded source, in
    a few large kernels; the GPU default. Both within one grey level of PIL
    (tests/test_folder_tensor.py)."""
    dev = images[0].device
    method = method or ("matmul" if dev.type == "cuda" else "interp")
    n, C = len(k), images[0].shape[0]
    if n == 0:
        return torch.empty(0, C, size, size, device=dev)
    if method == "interp":
        out = torch.empty(n, C, size, size, dtype=torch.uint8, device=dev)
        boxes = zip(*(t.long().tolist() for t in (k, i, j, h, w)))
        for c, (kk, ii, jj, hh, ww) in enumerate(boxes):
            box = images[kk][None, :, ii : ii + hh, jj : jj + ww]
            out[c] = F.interpolate(
                box, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )[0]
        out = torch.where(flip.view(-1, 1, 1, 1).to(dev), out.flip(-1), out)
        return out.float().div_(255)
    if method != "matmul":
        raise ValueError(f"method must be 'interp' or 'matmul', not {method!r}")
    Hm, Wm = max(x.shape[1] for x in images), max(x.shape[2] for x in images)
    out = torch.empty(n, C, size, size, device=dev)
    order = torch.argsort(k.to(dev), stable=True)  # crops of one source together
    kk = k.to(dev)[order]
    chunk = max(1, (1 << 28) // ((Hm + size) * C * Wm * 4))  # ~256 MB of float rows per chunk
    for s in range(0, n, chunk):
        sel = order[s : s + chunk]
        used, inv = torch.unique(kk[s : s + chunk], return_inverse=True)
        pad = torch.zeros(len(used), C, Hm, Wm, dtype=torch.uint8, device=dev)
        for r, src_k in enumerate(used.tolist()):
            pad[r, :, : images[src_k].shape[1], : images[src_k].shape[2]] = images[src_k]
        src = source_rows(pad)[inv]  # [chunk, Hm, C Wm]
        box = [t.to(dev)[sel] for t in (i, j, h, w)]
        out[sel] = resized_crop(src, *box, size, C, flip=flip.to(dev)[sel])
    return out


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[n, 3, h, w] -> luminance [n, 1, h, w]."""
    return LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]


def rotate_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Add shift [n] (in turns) to the HSV hue of x [n, 3, h, w] in [0, 1], keeping saturation and value."""
    v, arg = x.max(1)  # the first channel on ties: red, then green
    chroma = v - x.min(1).values
    r, g, b = x.unbind(1)
    d = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    sector = torch.where(
        arg == 0, ((g - b) / d) % 6, torch.where(arg == 1, (b - r) / d + 2, (r - g) / d + 4)
    )
    hue = torch.where(chroma > 0, sector / 6, torch.zeros_like(sector))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    # HSV -> RGB: channel n in (5, 3, 1) is v - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + 6 hue) mod 6
    n531 = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = (n531 + 6 * hue.unsqueeze(1)) % 6
    return v.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def jitter_factors(u: torch.Tensor, strength: tuple) -> torch.Tensor:
    """ColorJitter(b, c, s, h) factors per row -> [n, 4]: 1 +- b, 1 +- c, 1 +- s (multiplicative), +- h (hue turns)."""
    b, c, s, h = strength
    lo = torch.tensor([1 - b, 1 - c, 1 - s, -h], device=u.device)
    hi = torch.tensor([1 + b, 1 + c, 1 + s, h], device=u.device)
    return lo + (hi - lo) * u[:, _FACT : _FACT + 4]


def jitter_order(u: torch.Tensor) -> torch.Tensor:
    """[n, 4]: the operation (0 brightness, 1 contrast, 2 saturation, 3 hue) at each of the four positions, a
    uniform random permutation per row."""
    return u[:, _ORDER : _ORDER + 4].argsort(1)


def color_jitter(x: torch.Tensor, u: torch.Tensor, strength: tuple, p: float) -> torch.Tensor:
    """RandomApply(ColorJitter(*strength), p) per crop: the four operations in the crop's own random order.
    Brightness, contrast and saturation are one blend, clamp(f x + (1 - f) y) with y = 0, the mean luminance, the
    luminance; so each position is one pass over every crop (f = 1 where the crop applies hue there, or no
    jitter at all), plus the hue rotation of the crops that apply it there. x is overwritten."""
    on = u[:, _JIT] < p
    fac, order = jitter_factors(u, strength), jitter_order(u)
    for pos in range(4):
        op = torch.where(on, order[:, pos], -1)  # -1: nothing at this position
        f = torch.where(
            (op >= 0) & (op < 3), fac.gather(1, op.clamp(0, 2)[:, None])[:, 0], 1.0
        ).view(-1, 1, 1, 1)
        lum = grayscale(x)
        sat, con = (op == 2).to(x.dtype).view(-1, 1, 1, 1), (op == 1).to(x.dtype).view(-1, 1, 1, 1)
        y = sat * lum + con * lum.mean((1, 2, 3), keepdim=True)  # brightness: y = 0
        x = x.mul_(f).add_((1 - f) * y).clamp_(0, 1)  # y has one channel
        hue = op == 3
        if hue.any():
            x[hue] = rotate_hue(x[hue], fac[hue, 3])
    return x


def box_radius(sigma: torch.Tensor, passes: int = 3) -> torch.Tensor:
    """PIL's box radius for a Gaussian of sigma made of `passes` extended box blurs (Gwosdek et al.,
    2011, as in Pillow's _gaussian_blur_radius, in float32 as there): integer part l and fractional
    part a of r = l + a, chosen so that the `passes` boxes together have variance sigma^2. sigma [n]
    -> r [n]."""
    s2 = sigma.float() ** 2 / passes
    big = torch.sqrt(12 * s2 + 1)
    lo = torch.floor((big - 1) / 2)
    a = (2 * lo + 1) * (lo * (lo + 1) - 3 * s2) / (6 * (s2 - (lo + 1) ** 2))
    return lo + a


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, passes: int = 3) -> torch.Tensor:
    """PIL's ImageFilter.GaussianBlur(radius=sigma): x [n, C, h, w] in [0, 1], sigma [n] -> each
    image blurred with its sigma, values multiples of 1/255. As PIL computes it: the image rounded
    to 8 bits, then `passes` horizontal and `passes` vertical extended box blurs of radius r = l + a
    (box_radius): each output pixel weighs the 2l+1 nearest pixels by ww = 1/(2r+1) and the next two
    by fw = (1 - (2l+1) ww) / 2 (PIL's 24-bit fixed-point weights), pixels beyond the border are
    copies of the edge pixel (every pass clamps to the edge, so the borders are PIL's too), and
    every pass rounds to a grey level (half up). A blurred impulse therefore has PIL's variance,
    about sigma^2, also for sigma < 0.5, where a sampled Gaussian kernel is nearly a delta. PIL sums
    in integers, this in float32: a sum within float32 rounding of a half may round the other way
    (one grey level). One depthwise convolution per pass, one kernel per image."""
    n, C, h, w = x.shape
    r = box_radius(sigma, passes)  # float32, as PIL
    lo = r.floor().long()
    R = int(lo.max()) + 1  # taps each side
    # UINT32(2^24 / (2r + 1)), float32
    ww = torch.floor(torch.tensor(float(1 << 24)) / (2 * r + 1)).long()
    fw = ((1 << 24) - (2 * lo + 1) * ww) // 2
    t = torch.arange(-R, R + 1).abs().view(1, -1)
    lo1 = lo.view(-1, 1)
    k = torch.where(t <= lo1, ww.view(-1, 1), torch.where(t == lo1 + 1, fw.view(-1, 1), 0))
    # [n C, 1, 2 R + 1]
    k = (k.double() / (1 << 24)).to(x.dtype).repeat_interleave(C, 0).view(n * C, 1, -1)
    y = x.reshape(1, n * C, h, w).mul(255).round_()
    # along rows, then along columns
    for rows in (True,) * passes + (False,) * passes:
        pad, kk = ((R, R, 0, 0), k.unsqueeze(2)) if rows else ((0, 0, R, R), k.unsqueeze(3))
        y = F.conv2d(F.pad(y, pad, mode="replicate"), kk, groups=n * C).add_(0.5).floor_()
    return y.view(n, C, h, w).div_(255)
