"""batch_augment.py (the batched tensor crops) against independent per-image oracles: torchvision's
RandomResizedCrop rule written out as a scalar loop, PIL's resized crop, torchvision's functional
colour and solarise ops, PIL's GaussianBlur, and data.augmentation's PIL pipeline for the
distribution of whole crops."""

import math

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode

from smog_train import batch_augment as ba
from smog_train import config, data

STRENGTH = (0.4, 0.4, 0.2, 0.1)


def demo_images(n=48, seed=3):
    imgs, _ = data.make_demo(n, seed)
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()


def box_oracle(r, H, W, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, scalar, reading its draws from the row r."""
    for t in range(ba.ATTEMPTS):
        target = H * W * (scale[0] + (scale[1] - scale[0]) * float(r[t]))
        lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
        aspect = math.exp(lr0 + (lr1 - lr0) * float(r[ba.ATTEMPTS + t]))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return (
                int(float(r[2 * ba.ATTEMPTS]) * (H - h + 1)),
                int(float(r[2 * ba.ATTEMPTS + 1]) * (W - w + 1)),
                h,
                w,
            )
    if W / H < ratio[0]:
        w, h = W, int(round(W / ratio[0]))
    elif W / H > ratio[1]:
        h, w = H, int(round(H * ratio[1]))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


@pytest.mark.parametrize(
    "H,W,scale",
    [(32, 32, (0.1, 0.35)), (32, 32, (0.35, 1.0)), (24, 40, (0.9, 1.0)), (40, 24, (0.95, 1.0))],
)
def test_crop_boxes_follow_torchvision_rule(H, W, scale):
    u = torch.rand(400, ba.N_UNIFORM, generator=torch.Generator().manual_seed(H * W))
    i, j, h, w = ba.crop_boxes(u, H, W, scale, (3 / 4, 4 / 3))
    got = [(int(a), int(b), int(c), int(d)) for a, b, c, d in zip(i, j, h, w)]
    want = [box_oracle(r, H, W, scale) for r in u]
    assert got == want
    if scale[0] >= 0.9:  # the fallback branch was exercised
        assert any(g == box_oracle(torch.ones(ba.N_UNIFORM) * 0.999, H, W, scale) for g in got)


@pytest.mark.parametrize("size,scale", [(32, (0.35, 1.0)), (16, (0.1, 0.35)), (8, (0.5, 1.0))])
def test_resized_crop_matches_pil_bilinear(size, scale):
    """Upscaling, mild and 4x shrinking (antialiased): within PIL's own uint8 rounding of each pass."""
    imgs = demo_images()
    u = torch.rand(len(imgs), ba.N_UNIFORM, generator=torch.Generator().manual_seed(size))
    i, j, h, w = ba.crop_boxes(u, 32, 32, scale, (3 / 4, 4 / 3))
    flip = u[:, ba._FLIP] < 0.5
    x = ba.resized_crop(ba.source_rows(imgs), i, j, h, w, size, 3, flip)
    assert flip.any() and not flip.all()
    for b in range(len(imgs)):
        pil = Image.fromarray(imgs[b].permute(1, 2, 0).numpy())
        o = TF.resized_crop(
            pil,
            int(i[b]),
            int(j[b]),
            int(h[b]),
            int(w[b]),
            [size, size],
            InterpolationMode.BILINEAR,
        )
        o = TF.pil_to_tensor(TF.hflip(o) if flip[b] else o).float() / 255
        assert (o - x[b]).abs().max() <= 1.0001 / 255, b


def test_color_jitter_matches_torchvision_ops_in_drawn_order():
    x = torch.rand(300, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    x[:20] = x[:20, :1]  # grey crops (zero chroma) too
    u = torch.rand(300, ba.N_UNIFORM, generator=torch.Generator().manual_seed(2))
    got = ba.color_jitter(x.clone(), u, STRENGTH, 0.8)
    fac, order = ba.jitter_factors(u, STRENGTH), ba.jitter_order(u)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    orders = set()
    for b in range(len(x)):
        o = x[b]
        if u[b, ba._JIT] < 0.8:
            orders.add(tuple(order[b].tolist()))
            for op in order[b].tolist():
                o = ops[op](o, float(fac[b, op]))
        else:
            assert torch.equal(got[b], x[b])
        assert (o - got[b]).abs().max() < 1e-5, b
    assert len(orders) == 24  # every order occurs
    assert (fac[:, :3] >= torch.tensor([0.6, 0.6, 0.8])).all() and (
        fac[:, :3] <= torch.tensor([1.4, 1.4, 1.2])
    ).all()
    assert fac[:, 3].abs().max() <= 0.1 and fac[:, 3].min() < -0.08 and fac[:, 3].max() > 0.08


@pytest.mark.parametrize("kind", ["A", "B"])
def test_whole_crop_is_the_composition(kind):
    """BatchAugment = resized crop, then jitter, grayscale, blur, uint8 rounding, solarise, each per its draw."""
    imgs = demo_images(200)
    aug = ba.BatchAugment(kind, 16, (0.2, 1.0), blur_scale=0.5)
    u = torch.rand(len(imgs), ba.N_UNIFORM, generator=torch.Generator().manual_seed(7))
    got = aug(imgs, u)
    assert got.dtype == torch.uint8 and got.shape == (200, 3, 16, 16)
    i, j, h, w = ba.crop_boxes(u, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3))
    crops = ba.resized_crop(ba.source_rows(imgs), i, j, h, w, 16, 3, u[:, ba._FLIP] < 0.5)
    fac, order = ba.jitter_factors(u, STRENGTH), ba.jitter_order(u)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    close = total = 0
    for b in range(len(imgs)):
        o = crops[b]
        if u[b, ba._JIT] < 0.8:
            for op in order[b].tolist():
                o = ops[op](o, float(fac[b, op]))
        if u[b, ba._GRAY] < 0.2:
            o = TF.rgb_to_grayscale(o, 3)
        o = (o * 255).round().clamp(0, 255).to(torch.uint8)
        # PIL's blur on the 8-bit image
        if u[b, ba._BLUR] < aug.blur_p:
            s = 0.05 + (1.0 - 0.05) * float(u[b, ba._SIGMA])
            pil = Image.fromarray(o.permute(1, 2, 0).numpy())
            blurred = pil.filter(ImageFilter.GaussianBlur(s))
            o = TF.pil_to_tensor(blurred)
        if u[b, ba._SOL] < aug.sol_p:
            o = TF.solarize(o, 128)
        d = (o.int() - got[b].int()).abs()
        close += int((d <= 1).sum())
        total += d.numel()
    assert close / total > 0.9995  # rounding ties and a solarise boundary at most


def test_same_distribution_parameters_as_the_pil_pipeline():
    """The batched and the PIL implementation of a set read the same parameters (crop scale and ratio, jitter,
    every probability, blur range)."""
    for kind in "AB":
        a = data.Augmentation(kind, 24, (0.3, 0.9), blur_scale=0.25)
        t = {type(o).__name__: o for o in a.pil.transforms}
        rrc, b = t["RandomResizedCrop"], a.batch
        assert (rrc.size, tuple(rrc.scale), tuple(rrc.ratio)) == (
            (b.size, b.size),
            b.scale,
            b.ratio,
        )
        assert rrc.interpolation == InterpolationMode.BILINEAR
        cj = t["RandomApply"].transforms[0]
        assert (t["RandomApply"].p, t["RandomGrayscale"].p) == (b.jitter_p, b.gray_p)
        assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == (
            (0.6, 1.4),
            (0.6, 1.4),
            (0.8, 1.2),
            (-0.1, 0.1),
        )
        assert b.jitter == STRENGTH
        assert t["RandomHorizontalFlip"].p == 0.5
        blur = t["GaussianBlur"]
        assert (blur.p, blur.lo, blur.hi) == (b.blur_p, *b.sigma)
        assert t.get("Solarize", type("none", (), {"p": 0.0})).p == b.sol_p


def test_item_crops_do_not_depend_on_the_batch():
    raw = data.build_dataset("demo:200", "train")
    ds = data.ViewsDataset(
        raw, data.MultiCropViews(32, 16, 2, (0.35, 1.0), (0.1, 0.35), 0.15), batched=True
    )
    keys = [(i, "A" if i % 3 else "B", 1000 + i) for i in range(64)]
    batch = ds.__getitems__(keys)
    for b in (0, 1, 5, 63):
        alone = ds[keys[b]]
        assert all(
            torch.equal(x, y) for x, y in zip(alone[0] + alone[1], batch[b][0] + batch[b][1])
        )
        assert alone[2] == keys[b][0]
    other = ds.__getitems__([(5, "A", 1005)])[0]  # a different seed -> different crops
    assert not torch.equal(other[0][0], ds.__getitems__([(5, "A", 999)])[0][0][0])
    # the online crops: 2 global, then the local ones
    assert [c.shape for c in batch[0][0]] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2


def test_in_memory_arrays_and_supervised_items():
    raw = data.build_dataset("demo:100", "train")
    x, y = data.in_memory_arrays(raw)
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.uint8
    img, label = raw[7]
    assert torch.equal(x[7], TF.pil_to_tensor(img)) and y[7] == label
    assert (
        data.in_memory_arrays(data.build_dataset("demo:100", "train", data.eval_transform(32)))
        is None
    )
    aug = data.Augmentation("A", 24, (0.3, 1.0))
    ds = data.AugmentedDataset(raw, aug, batched=True)
    items = ds.__getitems__([(3, "A", 11), (7, "B", 12)])
    assert (
        items[1][1] == label
        and items[0][0].shape == (3, 24, 24)
        and items[0][0].dtype == torch.uint8
    )
    assert torch.equal(ds[(7, "B", 12)][0], items[1][0])
    assert torch.equal(items[1][0], aug.batch(x[7:8], data.item_uniforms(12, 1))[0])


def stat_sources(n, seed=0):
    """32-px uint8 sources, n of each kind, made so that each operation leaves a clear trace: a grey
    horizontal ramp 10..60 (crop box, flip, brightness, contrast; never solarised), a 1-px grey
    checkerboard 40/90 (blur, crop scale), a uniform saturated colour of random hue (saturation,
    hue, greyscale, solarisation)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(10, 60, 32).round().view(1, 1, 1, 32).expand(n, 3, 32, 32)
    cells = (torch.arange(32).view(-1, 1) + torch.arange(32)) % 2
    chk = (40 + 50 * cells).view(1, 1, 32, 32).expand(n, 3, 32, 32)
    base = torch.tensor([0.85, 0.3, 0.15]).view(1, 3, 1, 1).expand(n, 3, 1, 1).clone()
    col = (ba.rotate_hue(base, torch.rand(n, generator=g)) * 255).round().expand(n, 3, 32, 32)
    kinds = (("ramp", ramp), ("checker", chk), ("colour", col))
    return {k: v.to(torch.uint8).contiguous() for k, v in kinds}


def crop_stats(kind, x, src):
    """Per-crop statistics [n, k] of uint8 crops x [n, 3, s, s] made from the sources src."""
    x, src = x.float(), src.float()
    lum = x.mean(1)
    out = [lum.mean((1, 2)), lum.std((1, 2))]
    if kind == "ramp":  # slope of the column means
        t = torch.arange(x.shape[-1], dtype=torch.float32) - (x.shape[-1] - 1) / 2
        slope = (lum.mean(1) * t).sum(1) / (t * t).sum()
        out += [slope.abs(), (slope > 0).float()]
    if kind == "checker":
        out += [
            (lum[:, :, 1:] - lum[:, :, :-1]).abs().mean((1, 2)),
            (lum[:, 1:] - lum[:, :-1]).abs().mean((1, 2)),
        ]
    # chroma and hue turn against the source
    if kind == "colour":

        def vec(y):
            r, g, b = y.mean((2, 3)).unbind(1)
            return torch.complex(r - (g + b) / 2, 0.866 * (g - b))

        v, v0 = vec(x), vec(src)
        grey = (x.amax(1) == x.amin(1)).all(-1).all(-1)
        turn = torch.where(grey, 0.0, torch.angle(v / v0))
        out += [
            grey.float(),
            torch.where(grey, 0.0, v.abs() / v0.abs()),
            turn,
            (x.amax((1, 2, 3)) < 128).float(),
        ]
    return torch.stack(out, 1)


def worst_z(a, b):
    """max over the statistics, and their squared deviations from a's mean (the spread), of
    |difference of means| / standard error; a: the reference sample."""
    worst, centre = 0.0, a.mean(0)
    for f in (lambda z: z, lambda z: (z - centre) ** 2):
        za, zb = f(a), f(b)
        se = (za.var(0) / len(za) + zb.var(0) / len(zb)).sqrt()
        diff = (za.mean(0) - zb.mean(0)).abs()
        z = torch.where(se > 0, diff / se.clamp(min=1e-12), diff * 1e9)
        worst = max(worst, float(z.max()))
    return worst


@pytest.fixture(scope="module")
def pil_reference():
    """The PIL pipeline's crops of the stat_sources: sets A and B, global (32 px) and local (16 px)
    crops with the demo's scales and blur_scale 0.15."""
    src, ref = stat_sources(240), {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: threads only contend on a shared machine
    for kind in "AB":
        for size, scale in ((32, (0.35, 1.0)), (16, (0.1, 0.35))):
            aug = data.Augmentation(kind, size, scale, blur_scale=0.15)
            torch.manual_seed(1)
            for sk, imgs in src.items():
                pil = torch.stack(
                    [aug.pil(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in imgs]
                )
                ref[kind, size, sk] = (aug.batch, imgs, crop_stats(sk, pil, imgs))
    yield ref
    torch.set_num_threads(threads)


def tensor_worst_z(ref, mutate=None):
    worst = 0.0
    for (_, _, sk), (batch, imgs, pil_stats) in ref.items():
        b = __import__("copy").copy(batch)
        if mutate:
            mutate(b)
        u = torch.rand(len(imgs), ba.N_UNIFORM, generator=torch.Generator().manual_seed(2))
        worst = max(worst, worst_z(pil_stats, crop_stats(sk, b(imgs, u), imgs)))
    return worst


def test_crop_statistics_match_the_pil_pipeline(pil_reference):
    """The two implementations draw the same distribution of crops: per-crop statistics of sources
    made for it (stat_sources) agree within 4 standard errors, sets A and B, global and local
    crops."""
    assert tensor_worst_z(pil_reference) < 4


def _jit(i, f):
    return lambda b: setattr(
        b, "jitter", tuple(v * f if k == i else v for k, v in enumerate(b.jitter))
    )


MUTATIONS = {  # one operation's strength off by 2x, each noticed at over 5 standard errors
    "jitter p /2": lambda b: setattr(b, "jitter_p", b.jitter_p / 2),
    "brightness x2": _jit(0, 2),
    "brightness /2": _jit(0, 0.5),
    "contrast x2": _jit(1, 2),
    "hue x2": _jit(3, 2),
    "hue /2": _jit(3, 0.5),
    "grey p x2": lambda b: setattr(b, "gray_p", b.gray_p * 2),
    "blur sigma x2": lambda b: setattr(b, "sigma", (2 * b.sigma[0], 2 * b.sigma[1])),
}
# Not noticed at this sample size (z < 4; the recipe's numbers are pinned against the release in
# tests/test_release_rules.py instead): crop scale min x2 or /2, contrast /2, saturation x2 or /2,
# grey p /2, blur p /2, blur sigma /2, solarise p x2 or /2.


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_crop_statistics_notice_one_operation_off_by_2x(pil_reference, name):
    assert tensor_worst_z(pil_reference, MUTATIONS[name]) > 5


def test_resume_refuses_a_checkpoint_made_before_a_recipe_field_existed():
    """A v2 checkpoint written before --augment existed made its crops with PIL; resuming it with tensor crops
    would silently change the run, so a config without a (non-runtime) field is refused in one line."""
    from smog_train import checkpoint

    cfg = config.parse_config(["--data", "demo:100"])
    old = dict(__import__("dataclasses").asdict(cfg))
    checkpoint.check_resume(
        {"format": checkpoint.FORMAT, "world_size": 1, "config": old},
        cfg,
        config.RUNTIME_FIELDS,
        "ck.pth",
    )  # the same config resumes
    del old["augment"]
    with pytest.raises(config.UsageError) as e:
        checkpoint.check_resume(
            {"format": checkpoint.FORMAT, "world_size": 1, "config": old},
            cfg,
            config.RUNTIME_FIELDS,
            "ck.pth",
        )
    assert "no field 'augment'" in str(e.value) and "\n" not in str(e.value)
