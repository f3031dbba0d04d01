"""Rules of the authors' released code that the project reproduces, each against a hand-built
reference of the released rule (tests/release_ref.py) or the release's own numbers: BatchNorm across
crop sizes with the shortcut per size, Swin-T's fixed windows on small crops, PIL's Gaussian blur on
the tensor crop path, and the augmentation recipe's values."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image, ImageFilter
from torchvision.models import resnet as tv_resnet

from release_ref import released_resnet, released_swin_attention
from smog_train import backbones
from smog_train import batch_augment as ba

TOL = dict(rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- BN across sizes, shortcut per
# size


def scrambled(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.normal_(generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return net.train()


def tiny_resnet(kind):
    """The first two stages (stage 2 opens with a strided shortcut projection; so does stage 1 of
    the Bottleneck ResNet, stride 1)."""
    torch.manual_seed(0)
    if kind == "bottleneck":  # the released block type
        net = tv_resnet.ResNet(tv_resnet.Bottleneck, [2, 1, 1, 1])
        net.fc = nn.Identity()
    else:
        net, _ = backbones.build_backbone("resnet18", cifar_stem=True)  # the cifar10-r18 preset's
    net.layer3 = net.layer4 = nn.Sequential()
    return scrambled(net)


def two_sizes(B=2, px=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, px, px, generator=g) for _ in range(2)] + [
        torch.randn(B, 3, px // 2, px // 2, generator=g) for _ in range(2)
    ]


@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_resnet_shortcut_bn_per_size_as_released(kind):
    """encode_crops on a ResNet in training mode, two crop sizes = the released forward: outputs,
    gradients, every BN's running statistics and num_batches_tracked (2 for the shortcut BNs)."""
    net = tiny_resnet(kind)
    ref = copy.deepcopy(net)
    crops = two_sizes(px=16 if kind == "bottleneck" else 8)
    got = backbones.encode_crops(net, crops)
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(5))
    (got * w).sum().backward()
    want = torch.cat(released_resnet(ref, [torch.cat(crops[:2]), torch.cat(crops[2:])]))
    (want * w).sum().backward()
    torch.testing.assert_close(got, want, **TOL)
    shortcut = 0
    for (name, a), b in zip(net.named_modules(), ref.modules()):
        if isinstance(a, nn.BatchNorm2d):
            shortcut += "downsample" in name
            calls = 2 if "downsample" in name else 1
            assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == calls
            torch.testing.assert_close(a.running_mean, b.running_mean, **TOL)
            torch.testing.assert_close(a.running_var, b.running_var, **TOL)
    assert shortcut == (2 if kind == "bottleneck" else 1)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


# ---------------------------------------------------------------- Swin-T windows as released


@pytest.fixture(scope="module")
def swin_t():
    torch.manual_seed(3)
    net, _ = backbones.build_backbone("swin_t")
    return net.eval()


def test_swin_windows_fixed_from_the_224_layout(swin_t):
    stages = [swin_t.features[i] for i in (1, 3, 5, 7)]
    assert [[b.attn.shift_size for b in s] for s in stages] == [[[0, 0], [3, 3]]] * 2 + [
        [[0, 0], [3, 3]] * 3
    ] + [[[0, 0], [0, 0]]]
    assert all(b.attn.window_size == [7, 7] for s in stages for b in s)


@pytest.mark.parametrize(
    "side, stage, block", [(6, 5, 1), (12, 3, 1), (3, 7, 1), (14, 5, 1), (7, 7, 0)]
)
def test_swin_attention_follows_the_released_shift_rule(swin_t, side, stage, block):
    """Maps of 96-px crops (stage 3: 6 x 6, padded to 7 x 7; stage 2: 12; stage 4: 3) and of 224-px
    crops (stage 3: 14, stage 4: 7): the block's attention equals the released one with the window
    and shift of the 224-px layout (stage 3's odd blocks shift by 3 also on the 6 x 6 map)."""
    attn = swin_t.features[stage][block].attn
    g = torch.Generator().manual_seed(side)
    x = torch.randn(2, side, side, attn.qkv.in_features, generator=g)
    shift = {5: 3, 3: 3, 7: 0}[stage] if block == 1 else 0
    with torch.no_grad():
        torch.testing.assert_close(attn(x), released_swin_attention(attn, x, 7, shift), **TOL)
        if side == 6:  # the released shift matters here: without it the attention differs
            assert (attn(x) - released_swin_attention(attn, x, 7, 0)).abs().max() > 1e-3


def test_swin_96px_forward_uses_the_shift_in_stage_3(swin_t):
    calls = []
    attn = swin_t.features[5][1].attn
    hooks = [attn.register_forward_hook(lambda m, i, o: calls.append((i[0], o)))]
    with torch.no_grad():
        swin_t.features[:6](torch.randn(1, 3, 96, 96))  # up to stage 3
    for h in hooks:
        h.remove()
    ((x, y),) = calls
    assert x.shape[1:3] == (6, 6)
    torch.testing.assert_close(y, released_swin_attention(attn, x, 7, 3), **TOL)


# ---------------------------------------------------------------- the blur is PIL's


def pil_blur(img, sigma):
    """uint8 [3, h, w] -> PIL.ImageFilter.GaussianBlur(radius=sigma) of it, float [3, h, w]."""
    out = Image.fromarray(img.permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(sigma))
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).float()


def test_gaussian_blur_equals_pils_everywhere_including_borders():
    """Random uint8 images (the worst case for rounding), sigma over [0.05, 3]: at most 2 grey
    levels and on average under 0.05 from PIL, on every pixel, borders included (both clamp to the
    edge)."""
    g = torch.Generator().manual_seed(0)
    sig = torch.linspace(0.05, 3.0, 40)
    imgs = torch.randint(0, 256, (40, 3, 24, 20), generator=g, dtype=torch.uint8)
    got = ba.gaussian_blur(imgs.float() / 255, sig) * 255
    want = torch.stack([pil_blur(imgs[b], float(sig[b])) for b in range(40)])
    d = (got - want).abs()
    assert d.max() <= 2 and d.mean() < 0.05, (float(d.max()), float(d.mean()))
    edge = torch.ones(24, 20, dtype=torch.bool)
    edge[4:-4, 4:-4] = False
    assert d[..., edge].mean() < 0.05  # the borders are PIL's too


@pytest.mark.parametrize("sigma", [0.2, 0.3, 0.5, 1.0, 2.0, 3.0])
def test_blurred_impulse_has_pils_variance(sigma):
    img = torch.zeros(3, 41, 41, dtype=torch.uint8)
    img[:, 20, 20] = 255
    got = ba.gaussian_blur(img[None].float() / 255, torch.tensor([sigma]))[0, 0] * 255
    want = pil_blur(img, sigma)[0]
    c = (torch.arange(41) - 20.0) ** 2

    def var(a):
        return float((a.sum(0) * c).sum() / a.sum())

    assert abs(var(got) - var(want)) <= 0.1 * var(want), (var(got), var(want))
    assert var(got) > 0.5 * sigma**2  # not a delta at small sigma


# ---------------------------------------------------------------- the recipe's numbers are the
# release's


def test_augmentation_recipe_is_the_releases():
    """src/multicropdataset.py (byolAug): blur p 1.0 / 0.1, radius U(0.1, 2.0); solarise p 0 / 0.2;
    jitter 0.4, 0.4, 0.2, 0.1 with p 0.8; grey p 0.2; flip p 0.5; RandomResizedCrop ratio 3/4-4/3;
    main_SMoG.py defaults: scales 0.2-1.0 (global) and 0.05-0.2 (local). blur_scale multiplies the
    radius range (1.0 = the release)."""
    from smog_train import config, data

    for kind, blur_p, sol_p in (("A", 1.0, 0.0), ("B", 0.1, 0.2)):
        b = ba.BatchAugment(kind, 24, (0.2, 1.0), blur_scale=0.15)
        assert (b.blur_p, b.sol_p, b.jitter_p, b.gray_p) == (blur_p, sol_p, 0.8, 0.2)
        assert b.jitter == (0.4, 0.4, 0.2, 0.1)
        assert b.sigma == pytest.approx((0.1 * 0.15, 2.0 * 0.15))
        assert b.ratio == pytest.approx((3 / 4, 4 / 3))
        aug = data.Augmentation(kind, 24, (0.2, 1.0), blur_scale=0.15)
        pil = {type(o).__name__: o for o in aug.pil.transforms}
        assert (pil["GaussianBlur"].lo, pil["GaussianBlur"].hi) == pytest.approx((0.015, 0.3))
        assert pil["RandomHorizontalFlip"].p == 0.5
    c = config.parse_config(["--preset", "imagenet-r50"])
    scales = (c.global_scale_min, c.global_scale_max, c.local_scale_min, c.local_scale_max)
    assert scales == (0.2, 1.0, 0.05, 0.2)
    assert (c.blur_scale, c.image_size, c.local_size, c.n_local) == (1.0, 224, 96, 4)


# ---------------------------------------------------------------- online set parity


@pytest.mark.parametrize("accum", [1, 2])
def test_online_set_parity_restarts_every_epoch(accum):
    """main_SMoG.py: `if it % 2 == 0: q = inputs` with `it` the loader index, from 0 every epoch;
    with an odd number of steps per epoch the parity of the global step would differ from it. Under
    --accum every micro-batch of a step has the step's set."""
    from smog_train import batches

    s = batches.StepBatches(n=30 * accum, rank=0, world=1, micro=2, accum=accum, seed=0)
    assert s.steps == 15
    for epoch in (0, 1, 2):
        s.set_epoch(epoch)
        sets = [mb[0][1] for mb in s]
        assert sets == ["A" if k // accum % 2 == 0 else "B" for k in range(15 * accum)]
        assert all(len({it[1] for it in mb}) == 1 for mb in s)
