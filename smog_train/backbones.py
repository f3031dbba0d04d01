"""Backbones for SMoG and how several crop sizes go through one: the released networks, and joint BN.

SMoG feeds each network crops of two sizes (global and local). The released ResNet normalises the
crops of all sizes with ONE BatchNorm ("unified bn on different input size"): convolutions run per
size, and the stem BN and every block's bn1-bn3 see all pixels of all sizes at once. The shortcut
projection of a block (downsample: 1x1 conv + BN) runs once per size instead (global size first, as
the crops come), so its BN normalises and updates its running statistics per size. `encode_crops`
does that for ResNets and SmallCNN in training mode; Swin-T runs each size on its own, as released.

Networks: SmallCNN (the demo's), torchvision's ResNets, the released ResNet-50w2 and Swin-T
(`build_backbone`). `ReleasedBackbone` is smog.Backbone for these networks (joint BN, drop-path) and
`build_smog(cfg)` the SMoG model that train.py and the tools train: smog.SwinSMoG for Swin-T,
smog.SMoG for the others. smog.py imports nothing of the project; this module imports smog.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet as tv_resnet
from torchvision.models import swin_transformer as tv_swin

import smog


class SmallCNN(nn.Module):
    """The demo backbone: four 3x3 conv-BN-ReLU stages, global average pool. Fast on 2 CPU cores."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        layers = []
        for i in range(4):
            layers += [
                nn.Conv2d(
                    chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False
                ),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.out_dim = chans[-1]

    def forward(self, x):
        return self.features(x).mean(dim=(2, 3))


def resnet50w2() -> tv_resnet.ResNet:
    """The released ResNet-50w2 (SwAV's, SimCLR-style 2x): *every* width of ResNet-50 doubled -- stem 128
    channels, stage widths 128/256/512/1024, bottleneck expansion 4 -> 4096-d pooled features. torchvision
    key names and forward. (torchvision's wide_resnet50_2 only doubles the bottleneck's inner width: 2048-d.)"""
    m = tv_resnet.ResNet(tv_resnet.Bottleneck, [3, 4, 6, 3])
    m.inplanes = 128
    m.conv1, m.bn1 = nn.Conv2d(3, 128, 7, 2, 3, bias=False), nn.BatchNorm2d(128)
    m.layer1 = m._make_layer(tv_resnet.Bottleneck, 128, 3)
    m.layer2 = m._make_layer(tv_resnet.Bottleneck, 256, 4, stride=2)
    m.layer3 = m._make_layer(tv_resnet.Bottleneck, 512, 6, stride=2)
    m.layer4 = m._make_layer(tv_resnet.Bottleneck, 1024, 3, stride=2)
    m.fc = nn.Linear(4096, 1000)
    for mod in m.modules():  # torchvision's initialisation, no zero-init residual
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
    return m


def released_window_attention(x, attn: "tv_swin.ShiftedWindowAttention") -> torch.Tensor:
    """The released Swin window attention (SwinTrans_multicrop.py: SwinTransformerBlock.forward)
    with the layer's weights: x [B, H, W, C] padded at the bottom and right to a multiple of the
    window, cyclically shifted by attn.shift_size, whatever the map's size (torchvision drops the
    shift when the window covers the padded map; the release keeps it), attention within windows
    with the relative position bias and, when shifted, the mask that separates the regions of the
    *padded* map (-100 between regions), then shifted back and unpadded."""
    B, H, W, C = x.shape
    wh, ww = attn.window_size
    sh, sw = attn.shift_size
    x = F.pad(x, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
    Hp, Wp = x.shape[1:3]
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    nw, n, heads = (Hp // wh) * (Wp // ww), wh * ww, attn.num_heads
    win = x.view(B, Hp // wh, wh, Wp // ww, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B * nw, n, C)
    q, k, v = (
        F.linear(win, attn.qkv.weight, attn.qkv.bias)
        .view(B * nw, n, 3, heads, C // heads)
        .permute(2, 0, 3, 1, 4)
    )
    a = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1) + attn.get_relative_position_bias()
    if sh or sw:
        region = x.new_zeros(Hp, Wp)
        bands = [
            [slice(0, -w), slice(-w, -s), slice(-s, None)] if s else [slice(None)]
            for w, s in ((wh, sh), (ww, sw))
        ]
        for i, hs in enumerate(bands[0]):
            for j, ws in enumerate(bands[1]):
                region[hs, ws] = 3 * i + j
        region = region.view(Hp // wh, wh, Wp // ww, ww).permute(0, 2, 1, 3).reshape(nw, n)
        mask = (region.unsqueeze(1) != region.unsqueeze(2)).to(a.dtype) * -100.0
        a = (a.view(B, nw, heads, n, n) + mask.unsqueeze(1)).view(B * nw, heads, n, n)
    a = F.dropout(a.softmax(-1), attn.attention_dropout, attn.training)
    y = F.linear((a @ v).transpose(1, 2).reshape(B * nw, n, C), attn.proj.weight, attn.proj.bias)
    y = F.dropout(y, attn.dropout, attn.training)
    y = y.view(B, Hp // wh, Wp // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    if sh or sw:
        y = torch.roll(y, shifts=(sh, sw), dims=(1, 2))
    return y[:, :H, :W].contiguous()


class ReleasedWindowAttention(tv_swin.ShiftedWindowAttention):
    """torchvision's layer (same parameters and names) computing released_window_attention: window
    and shift as set at construction, kept on every map size."""

    def forward(self, x):
        return released_window_attention(x, self)


class SwinBlockBN(tv_swin.SwinTransformerBlock):
    """The released Swin-T block: LayerNorm before the attention, BatchNorm1d over channels before the MLP
    (every token of every image is one sample of the BN). As released, the MLP's residual adds to the
    *normalised* stream: x <- BN(x); x <- x + MLP(x). x: [B, H, W, C]. The attention is the released
    one (ReleasedWindowAttention)."""

    def __init__(self, dim: int, *args, **kw):
        super().__init__(dim, *args, attn_layer=ReleasedWindowAttention, **kw)
        self.norm2 = nn.BatchNorm1d(dim)

    def forward(self, x):
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        x = self.norm2(x.reshape(-1, x.shape[-1])).view_as(x)  # (B*H*W, C) tokens as batch
        return x + self.stochastic_depth(self.mlp(x))


def fix_windows_for(net: "tv_swin.SwinTransformer", image_size: int = 224) -> None:
    """The released rule for every block's window and shift, fixed at construction from the layout
    of `image_size` crops: a stage whose map (image_size / 4 / 2^stage) is no larger than the window
    gets no shift (the window stays 7 at 224 px, where stage 4's map is 7 x 7). Other crop sizes
    keep these."""
    stages = [
        m
        for m in net.features
        if isinstance(m, nn.Sequential) and isinstance(m[0], tv_swin.SwinTransformerBlock)
    ]
    for i, stage in enumerate(stages):
        side = image_size // 4 // 2**i
        for blk in stage:
            if side <= min(blk.attn.window_size):
                if side != min(blk.attn.window_size):
                    raise ValueError(
                        f"a {side} px map under a {blk.attn.window_size} window: the "
                        f"released rule shrinks the window, which is not built here"
                    )
                blk.attn.shift_size = [0, 0]


ARCHS = ("smallcnn", "resnet18", "resnet34", "resnet50", "resnet50w2", "wide_resnet50_2", "swin_t")
FEAT_DIMS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet50w2": 4096,
    "wide_resnet50_2": 2048,
    "swin_t": 768,
}  # pooled feature width; smallcnn: 8 x width


def build_backbone(name: str, *, cifar_stem: bool = False, drop_path: float = 0.0, width: int = 32):
    """-> (module mapping [B, 3, h, w] to pooled features [B, feat_dim], feat_dim).
    ResNets as released: no zero-init of the residual branches' last BN. They keep torchvision's stem
    padding 3 (released: 2) and torchvision key names, so an exported backbone loads into torchvision
    unchanged (the classifier is replaced by Identity, so absent). resnet50w2 is the released 2x network,
    wide_resnet50_2 torchvision's (another network). swin_t is the released Swin-T (SwinBlockBN blocks).
    cifar_stem: 3x3 stride-1 first conv and no max-pool, for 32-96 px images (ResNets only)."""
    import torchvision.models as tvm

    if name == "smallcnn":
        m = SmallCNN(width)
        return m, m.out_dim
    if name in ("resnet18", "resnet34", "resnet50", "resnet50w2", "wide_resnet50_2"):
        m = (
            resnet50w2()
            if name == "resnet50w2"
            else getattr(tvm, name)(weights=None, zero_init_residual=False)
        )
        if cifar_stem:
            m.conv1 = nn.Conv2d(3, m.conv1.out_channels, 3, 1, 1, bias=False)
            nn.init.kaiming_normal_(m.conv1.weight, mode="fan_out", nonlinearity="relu")
            m.maxpool = nn.Identity()
        dim, m.fc = m.fc.in_features, nn.Identity()
        return m, dim
    if (
        name == "swin_t"
    ):  # torchvision's SwinTransformer: Linear weights trunc-normal(0.02), biases 0
        m = tv_swin.SwinTransformer(
            patch_size=[4, 4],
            embed_dim=96,
            depths=[2, 2, 6, 2],
            num_heads=[3, 6, 12, 24],
            window_size=[7, 7],
            stochastic_depth_prob=drop_path,
            block=SwinBlockBN,
        )
        fix_windows_for(m, 224)
        dim, m.head = m.head.in_features, nn.Identity()
        return m, dim
    raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHS)}")


# ----------------------------------------------------------------------------------------------
# several crop sizes through one network: joint BatchNorm


def _each(layer: nn.Module, xs: list) -> list:
    return [layer(x) for x in xs]


def joint_bn(bn: nn.Module, xs: list, act: Optional[nn.Module] = None) -> list:
    """One BatchNorm over the activations of all crop sizes (released ResNet, "unified bn on different
    input size"): xs [N_r, C, H_r, W_r] per resolution -> act(BN(x)) in the same shapes, normalised with
    ONE mean and variance over all sum_r N_r*H_r*W_r pixels. The layer itself is called once on all
    pixels ([1, C, L, 1], or [L, C, 1, 1] for channels_last inputs, where that view is free), so its
    running statistics are updated once with the joint statistics (unbiased variance, n = all pixels)
    and a SyncBatchNorm reduces its sums and counts over all ranks exactly as for one tensor.
    The outputs are views of one tensor: `act` (in place or not) runs on the whole before it is cut up;
    callers must not modify the outputs in place."""
    C = xs[0].shape[1]
    channels_last = all(
        x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() for x in xs
    )
    sizes = [x.shape[0] * x.shape[2] * x.shape[3] for x in xs]
    if channels_last:  # pixels as rows: free views
        y = bn(torch.cat([x.permute(0, 2, 3, 1).reshape(-1, C) for x in xs]).view(-1, C, 1, 1))
    else:  # (C, sum NHW)
        y = bn(torch.cat([x.transpose(0, 1).flatten(1) for x in xs], 1).view(1, C, -1, 1))
    if act is not None:
        y = act(
            y
        )  # on the BN output itself, not a view of it: an in-place ReLU costs no copy in backward
    # split, not slicing: its backward concatenates the gradients instead of zero-filling one tensor per piece
    if channels_last:  # (N, C, H, W) channels_last
        return [
            p.view(x.shape[0], x.shape[2], x.shape[3], C).permute(0, 3, 1, 2)
            for p, x in zip(y.view(-1, C).split(sizes), xs)
        ]
    return [
        p.view(C, x.shape[0], x.shape[2], x.shape[3]).transpose(0, 1)
        for p, x in zip(y.view(C, -1).split(sizes, 1), xs)
    ]


def forward_joint_bn(net: nn.Module, xs: list) -> list:
    """The backbone on a list of per-resolution batches, in crop order (global first):
    convolutions, pooling and activations per resolution; the stem BN and each block's bn1, bn2
    (bn3) joint over all of them (joint_bn, with the ReLU that follows it); each block's shortcut
    projection (downsample, 1x1 conv + BN) once per resolution, as the release's list_input_forward
    runs it, so that BN normalises each size with its own statistics and updates its running
    statistics once per size, in list order. torchvision ResNets and SmallCNN; -> pooled features
    [N_r, F] per resolution. Same layers and parameters as net(x)."""
    if isinstance(net, SmallCNN):  # (conv, BN, ReLU) x 4
        layers = list(net.features)
        for conv, bn, relu in zip(layers[0::3], layers[1::3], layers[2::3]):
            xs = joint_bn(bn, _each(conv, xs), relu)
        return [x.mean(dim=(2, 3)) for x in xs]
    xs = _each(net.maxpool, joint_bn(net.bn1, _each(net.conv1, xs), net.relu))  # stem
    for block in [*net.layer1, *net.layer2, *net.layer3, *net.layer4]:
        convs = ["1", "2", "3"] if isinstance(block, tv_resnet.Bottleneck) else ["1", "2"]
        out = xs
        for i, k in enumerate(convs):  # last BN: no ReLU before +
            out = joint_bn(
                getattr(block, "bn" + k),
                _each(getattr(block, "conv" + k), out),
                block.relu if i < len(convs) - 1 else None,
            )
        # per size, as released
        skip = xs if block.downsample is None else _each(block.downsample, xs)
        xs = [block.relu(o + s) for o, s in zip(out, skip)]
    return [net.fc(torch.flatten(net.avgpool(x), 1)) for x in xs]


def joint_bn_capable(net: nn.Module) -> bool:
    """Backbones whose BatchNorms encode_crops runs jointly over crop sizes (all but the shortcut
    projections' BNs, which run per size; Swin-T: everything per size, as released)."""
    return isinstance(net, (SmallCNN, tv_resnet.ResNet))


def encode_crops(net: nn.Module, crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """`net` on all crops -> outputs in crop order [sum B_c, F]; crops of one resolution are concatenated.
    One resolution, eval mode, or a backbone without joint BN (Swin-T): one net() call per resolution.
    Otherwise (training a ResNet / SmallCNN on several sizes) forward_joint_bn: one BN over all
    sizes (the shortcut projections' BNs per size). Sizes go in the order of their first crop."""
    by_res: dict = {}
    for i, c in enumerate(crops):
        by_res.setdefault(tuple(c.shape[-2:]), []).append(i)
    xs = [torch.cat([crops[i] for i in idx]) for idx in by_res.values()]
    if len(xs) > 1 and net.training and joint_bn_capable(net):
        ys = forward_joint_bn(net, xs)
    else:
        ys = [net(x) for x in xs]
    out: list = [None] * len(crops)
    for idx, y in zip(by_res.values(), ys):
        for i, yi in zip(idx, y.split([crops[i].shape[0] for i in idx])):
            out[i] = yi
    return torch.cat(out)


@contextlib.contextmanager
def drop_path_off(net: nn.Module):
    """Context: stochastic depth of `net` switched off; everything else (BN batch statistics) unchanged."""
    sd = [m for m in net.modules() if isinstance(m, tv_swin.StochasticDepth) and m.training]
    for m in sd:
        m.training = False
    try:
        yield
    finally:
        for m in sd:
            m.training = True


# ----------------------------------------------------------------------------------------------
# the SMoG model around these networks


class ReleasedBackbone(smog.Backbone):
    """smog.Backbone for the networks of build_backbone: the online backbone with `drop_path`, the
    momentum one without (both built fresh, in that order); several crop sizes through encode_crops
    (one BatchNorm across sizes for the ResNets and SmallCNN in training mode, per size otherwise);
    drop-path switched off by drop_path_off."""

    def __init__(
        self, arch: str, *, cifar_stem: bool = False, drop_path: float = 0.0, width: int = 32
    ):
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
        self.arch, self.cifar_stem, self.drop_path, self.width = arch, cifar_stem, drop_path, width
        self.feat_dim = (
            8 * width if arch == "smallcnn" else FEAT_DIMS[arch]
        )  # build() is overridden

    def build(self, momentum: bool) -> nn.Module:
        net, dim = build_backbone(
            self.arch,
            cifar_stem=self.cifar_stem,
            width=self.width,
            drop_path=0.0 if momentum else self.drop_path,
        )
        assert dim == self.feat_dim, (self.arch, dim, self.feat_dim)
        return net

    def encode(self, net: nn.Module, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        return encode_crops(net, crops)

    def drop_path_off(self, net: nn.Module):
        return drop_path_off(net)


def build_smog(cfg: "smog.SMoGConfig") -> "smog.SMoG":
    """The SMoG model of a config, as train.py builds it: smog.SwinSMoG for swin_t, else smog.SMoG,
    around ReleasedBackbone(cfg.arch, ...)."""
    side = ReleasedBackbone(
        cfg.arch, cifar_stem=cfg.cifar_stem, drop_path=cfg.drop_path, width=cfg.width
    )
    return (smog.SwinSMoG if cfg.arch == "swin_t" else smog.SMoG)(side, cfg)
