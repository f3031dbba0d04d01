"""Hand-built references of rules of the authors' released code (src/resnet50.py,
src/SwinTrans_multicrop.py), written from the release, not from the project's code, for the
tests."""

import torch
import torch.nn.functional as F
from torchvision.models import resnet as tv_resnet


def unified_bn(bn, xs):
    """The release's list_bn_forward: [N, C, H, W] per size -> each flattened to [1, C, N*H*W, 1],
    concatenated along the pixels, ONE call of the BN layer, cut back in the same order."""
    # 1, C, BHW, 1
    flat = [x.permute(1, 0, 2, 3).flatten(start_dim=1)[None, :, :, None] for x in xs]
    out = bn(torch.cat(flat, dim=2))
    res, start = [], 0
    for x in xs:
        n, c, h, w = x.shape
        res.append(out[:, :, start : start + n * h * w].reshape(c, n, h, w).permute(1, 0, 2, 3))
        start += n * h * w
    return res


def released_resnet(net, xs):
    """The release's ResNet.forward_backbone + Bottleneck.forward on a list of per-size batches,
    with a torchvision ResNet's layers: stem BN and bn1..bn3 unified; downsample (conv + BN) once
    per size (list_input_forward), in list order; everything else per size. -> pooled features per
    size."""
    xs = [net.maxpool(F.relu(x)) for x in unified_bn(net.bn1, [net.conv1(x) for x in xs])]
    for blk in [*net.layer1, *net.layer2, *net.layer3, *net.layer4]:
        k = 3 if isinstance(blk, tv_resnet.Bottleneck) else 2
        out = xs
        for i in range(1, k + 1):
            out = unified_bn(getattr(blk, f"bn{i}"), [getattr(blk, f"conv{i}")(o) for o in out])
            if i < k:
                out = [F.relu(o) for o in out]
        identity = xs if blk.downsample is None else [blk.downsample(x) for x in xs]
        xs = [F.relu(o + s) for o, s in zip(out, identity)]
    return [torch.flatten(net.avgpool(x), 1) for x in xs]


def released_window_mask(Hp, Wp, window, shift):
    """The release's SwinTransformerBlock.create_attn_mask for a padded map Hp x Wp: region labels
    from the three slices per axis, windows of the padded map, -100 between different regions."""
    img = torch.zeros(1, Hp, Wp, 1)
    cnt = 0
    for h in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for w in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[:, h, w, :] = cnt
            cnt += 1
    win = img.view(1, Hp // window, window, Wp // window, window, 1).permute(0, 1, 3, 2, 4, 5)
    win = win.reshape(-1, window * window)
    m = win.unsqueeze(1) - win.unsqueeze(2)
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


def released_swin_attention(attn, x, window, shift):
    """The release's SwinTransformerBlock.forward attention part (after norm1) and WindowAttention,
    with the weights of a torchvision ShiftedWindowAttention: x [B, H, W, C]; window and shift as
    the block was built with (for the 224-px layout), kept whatever H is."""
    B, H, W, C = x.shape
    pad_r, pad_b = (window - W % window) % window, (window - H % window) % window
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, Hp, Wp, _ = x.shape
    mask = None
    if shift > 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        mask = released_window_mask(Hp, Wp, window, shift)
    win = x.view(B, Hp // window, window, Wp // window, window, C).permute(0, 1, 3, 2, 4, 5)
    win = win.reshape(-1, window * window, C)
    B_, N, _ = win.shape
    heads = attn.num_heads
    qkv = F.linear(win, attn.qkv.weight, attn.qkv.bias).reshape(B_, N, 3, heads, C // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    a = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
    table, index = attn.relative_position_bias_table, attn.relative_position_index
    a = a + table[index.view(-1)].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
        nW = mask.shape[0]
        a = a.view(B_ // nW, nW, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        a = a.view(-1, heads, N, N)
    y = (a.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, C)
    y = F.linear(y, attn.proj.weight, attn.proj.bias)
    y = y.view(B, Hp // window, Wp // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    y = y.reshape(B, Hp, Wp, C)
    if shift > 0:
        y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
    return y[:, :H, :W, :]
