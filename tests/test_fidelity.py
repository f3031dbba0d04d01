"""The released training recipe: LARS over every parameter, one BatchNorm across crop sizes,
momentum local crops, ResNet / ResNet-50w2 / Swin-T as released, checkpoint format. Each test compares
against a hand computation written here, never against the code under test."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import smog
import train
from smog_train import backbones, checkpoint, config

# ---------------------------------------------------------------- LARS (released apex LARC rule)


def lars_reference(params, grads_per_step, lrs, mu, wd, trust, eps=1e-8):
    """Per tensor, plain Python: the released rule, then torch.optim.SGD's momentum (buf = mu buf + g)."""
    params = [p.clone() for p in params]
    bufs = [None] * len(params)
    for grads, lr in zip(grads_per_step, lrs):
        for i, (p, g) in enumerate(zip(params, grads)):
            pn, gn = float(p.norm()), float(g.norm())
            if pn > 0 and gn > 0:
                g = (g + wd * p) * (trust * pn / (gn + wd * pn + eps))
            bufs[i] = g.clone() if bufs[i] is None else mu * bufs[i] + g
            params[i] = p - lr * bufs[i]
    return params


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)  # weight + bias
        self.bn = nn.BatchNorm1d(4)  # BN weight + bias
        self.zero = nn.Parameter(torch.zeros(3))  # ||p|| = 0: no adaptation, no weight decay

    def forward(self, x):
        return self.bn(self.lin(x)) * (1 + self.zero.sum())


def test_lars_matches_per_tensor_reference():
    torch.manual_seed(0)
    net = _Tiny().double()
    with torch.no_grad():
        net.bn.weight.add_(0.3 * torch.randn(4, dtype=torch.float64))
    p0 = [p.detach().clone() for p in net.parameters()]
    opt = train.LARS(net.parameters(), lr=0.0, momentum=0.9, weight_decay=0.01, trust_coef=0.02)
    grads, lrs = [], [0.5, 1.5, 0.7, 2.0]
    for step, lr in enumerate(lrs):
        x = torch.randn(8, 5, dtype=torch.float64)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        (net(x) ** 3).mean().backward()
        if step == 1:
            net.lin.bias.grad.zero_()  # ||g|| = 0 on a non-zero tensor
        grads.append([p.grad.clone() for p in net.parameters()])
        opt.step()
    ref = lars_reference(p0, grads, lrs, 0.9, 0.01, 0.02)
    for (name, p), r in zip(net.named_parameters(), ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14, msg=name)
    assert (
        float(p0[0].norm()) == 0 and float(grads[0][0].norm()) > 0
    )  # `zero` starts at 0, has a gradient


def test_lars_preset_puts_every_online_parameter_in_lars_with_weight_decay():
    model = backbones.build_smog(
        smog.SMoGConfig(arch="smallcnn", width=8, dim=16, hidden_dim=32, n_groups=8, n_heads=1)
    )
    online = [p for p in model.parameters() if p.requires_grad]
    cfg = config.parse_config(["--preset", "imagenet-r50", "--weight-decay", "1e-6"])
    opt = train.build_optimizer(cfg, model)
    assert isinstance(opt, train.LARS)
    got = [p for g in opt.param_groups for p in g["params"]]
    assert len(got) == len(online) and {id(p) for p in got} == {id(p) for p in online}
    assert all(g["weight_decay"] == 1e-6 for g in opt.param_groups)
    assert any(p.ndim == 1 for p in got)  # biases and BN weights included
    sgd = train.build_optimizer(
        config.parse_config(["--preset", "demo"]), model
    )  # SGD keeps its exclusions
    no_decay = [p for g in sgd.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert no_decay and all(p.ndim <= 1 for p in no_decay)


# ---------------------------------------------------------------- one BatchNorm across crop sizes


def _collect(module, store, what="out"):
    return module.register_forward_hook(lambda m, i, o: store.append(i[0] if what == "in" else o))


def _hand_bn(acts, bn):
    """acts: per-resolution [N, C, H, W] -> per resolution, normalised with one mean/var over all pixels;
    also (mean, unbiased var) for the running statistics."""
    flat = torch.cat(
        [a.permute(1, 0, 2, 3).reshape(a.shape[1], -1) for a in acts], 1
    )  # (C, sum NHW)
    mean, var = flat.mean(1), flat.var(1, unbiased=False)
    sh = (1, -1, 1, 1)
    out = [
        (a - mean.view(sh)) / (var.view(sh) + bn.eps).sqrt() * bn.weight.view(sh) + bn.bias.view(sh)
        for a in acts
    ]
    return out, mean, flat.var(1, unbiased=True)


def _two_sizes(B=3, seed=0, px=32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, px, px, generator=g) for _ in range(2)] + [
        torch.randn(B, 3, px // 2, px // 2, generator=g) for _ in range(3)
    ]


def _scramble_bn_(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))


def test_joint_bn_first_and_late_layer_resnet18():
    torch.manual_seed(0)
    net, _ = backbones.build_backbone("resnet18", cifar_stem=True)
    _scramble_bn_(net)
    net.train()
    crops = _two_sizes(px=16)
    conv1_out, l1_in, late_conv_out, late_block_in = [], [], [], []
    hooks = [
        _collect(net.conv1, conv1_out),
        _collect(net.layer1[0].conv1, l1_in, "in"),
        _collect(net.layer4[1].conv2, late_conv_out),
        _collect(net.layer4[1].conv1, late_block_in, "in"),
    ]
    bn_calls = []
    hooks.append(net.bn1.register_forward_hook(lambda m, i, o: bn_calls.append(1)))
    out = backbones.encode_crops(net, crops)
    for h in hooks:
        h.remove()
    assert len(conv1_out) == 2 and len(bn_calls) == 1  # convs per resolution, the BN once for both
    # first BN: stem conv -> joint BN -> ReLU -> (max-pool: Identity with the cifar stem) -> layer1
    with torch.no_grad():
        want, mean, var_u = _hand_bn([c.detach() for c in conv1_out], net.bn1)
        for got, w in zip(l1_in, want):
            torch.testing.assert_close(got, F.relu(w), rtol=1e-4, atol=1e-5)
        # running statistics: updated once, with the joint statistics (unbiased variance, n = all pixels)
        torch.testing.assert_close(net.bn1.running_mean, 0.1 * mean, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(net.bn1.running_var, 0.9 + 0.1 * var_u, rtol=1e-4, atol=1e-6)
        assert int(net.bn1.num_batches_tracked) == 1
        # a late BN: layer4[1].bn2 -> + identity -> ReLU -> average pool = the backbone's output
        want, _, _ = _hand_bn([c.detach() for c in late_conv_out], net.layer4[1].bn2)
        ref = torch.cat(
            [F.relu(w + x).mean(dim=(2, 3)) for w, x in zip(want, late_block_in)]
        )  # crop order
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        # and it is not what separate passes per size give (the test can tell the two apart)
        net.bn1.reset_running_stats()
        sep = torch.cat([net(torch.cat(crops[:2])), net(torch.cat(crops[2:]))])
        assert (sep - out).abs().max() > 1e-3


@pytest.mark.parametrize("channels_last", [False, True])
def test_joint_bn_smallcnn_all_layers_against_hand_chain(channels_last):
    """The demo network end to end: every conv by hand, every BN by _hand_bn (both memory layouts)."""
    torch.manual_seed(1)
    net = backbones.SmallCNN(8)
    _scramble_bn_(net)
    crops = _two_sizes(B=2, seed=3)
    with torch.no_grad():
        acts = [torch.cat(crops[:2]), torch.cat(crops[2:])]
        layers = list(net.features)
        for conv, bn in zip(layers[0::3], layers[1::3]):
            acts, _, _ = _hand_bn([conv(a) for a in acts], bn)
            acts = [F.relu(a) for a in acts]
        ref = [a.mean(dim=(2, 3)) for a in acts]
        ref = torch.cat([ref[0], ref[1]])
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
            crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
        out = backbones.encode_crops(net.train(), crops)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["smallcnn", "resnet18"])
def test_one_resolution_and_eval_mode_are_the_plain_forward(arch):
    net, _ = backbones.build_backbone(arch, cifar_stem=True, width=8)
    _scramble_bn_(net)
    crops = _two_sizes(B=2, px=16)
    ref = copy.deepcopy(net)
    with torch.no_grad():
        assert torch.equal(
            backbones.encode_crops(net.train(), crops[:2]), ref.train()(torch.cat(crops[:2]))
        )
        for m in (net, ref):
            m.eval()
        want = torch.cat([ref(torch.cat(crops[:2])), ref(torch.cat(crops[2:]))])
        assert torch.equal(backbones.encode_crops(net, crops), want)


def test_joint_bn_backward_gradcheck():
    xs = [
        torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True),
        torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True),
    ]
    w = (1 + torch.rand(3, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(a, b, w, bias):
        return tuple(
            backbones.joint_bn(
                lambda t: F.batch_norm(t, None, None, w, bias, training=True), [a, b]
            )
        )

    assert torch.autograd.gradcheck(f, (*xs, w, bias), fast_mode=True)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _forward_ops(K, B):
    torch.manual_seed(0)
    m = backbones.build_smog(
        smog.SMoGConfig(arch="smallcnn", width=8, dim=16, hidden_dim=32, n_groups=K, n_heads=3)
    )
    on, mo = _two_sizes(B, 1)[:4], _two_sizes(B, 2)[:4]
    with _OpLog() as log:
        loss, _, _ = m(on, mo, 0.9)
        loss.backward()
    return log.ops


def test_forward_has_no_host_sync_and_no_loop_over_groups_or_samples():
    small, big = _forward_ops(12, 4), _forward_ops(48, 8)
    assert "aten._local_scalar_dense" not in small  # .item() / bool(tensor): a host sync
    assert small == big  # same op sequence whatever K and B


# ---------------------------------------------------------------- momentum crops


def _cfg(**kw):
    base = dict(arch="smallcnn", width=8, dim=16, hidden_dim=32, n_groups=12, n_heads=3)
    base.update(kw)
    return smog.SMoGConfig(**base)


def test_momentum_local_crops_shape_the_targets_through_bn():
    torch.manual_seed(2)
    m = backbones.build_smog(_cfg())
    on, mo = _two_sizes(4, 5)[:4], _two_sizes(4, 6)[:4]  # momentum: 2 global + 2 local
    g0 = m.groups.clone()
    ref = copy.deepcopy(m)
    loss, _, _ = m(on, mo, 0.8)
    with (
        torch.no_grad()
    ):  # hand: one momentum forward over all its crops (joint BN), targets from rows [:2B]
        x = [torch.cat(mo[:2]), torch.cat(mo[2:])]
        feats = torch.cat(backbones.forward_joint_bn(ref.momentum_backbone, x))
        zt = F.normalize(ref.momentum_projector(feats)[:8], dim=-1).view(2, 4, -1)
        z, p = ref.online_forward(on)
        z = F.normalize(z, dim=-1).view(4, 4, -1)
        exp = 0
        for h in range(3):
            lh, gh, _ = smog.smog_step(g0[h], z[h % 2], zt, p.view(4, 4, -1), 0.8, 0.1)
            exp += lh / 3
            torch.testing.assert_close(m.groups[h], gh, rtol=0, atol=1e-6)
    assert abs(loss.item() - exp.item()) < 1e-5
    # other local crops -> other BN statistics -> other momentum embeddings of the *global* crops
    a = ref.momentum_embed(mo)[:8]
    b = ref.momentum_embed(mo[:2] + [torch.randn_like(mo[2]), torch.randn_like(mo[3])])[:8]
    assert (a - b).abs().max() > 1e-4


def test_views_give_the_momentum_set_its_local_crops():
    from PIL import Image

    from smog_train import data

    v = data.MultiCropViews(32, 16, 3, blur_scale=0.15)
    img = Image.new("RGB", (40, 40), (120, 30, 200))
    on, mo = v(img, "A")
    assert [tuple(c.shape[-2:]) for c in on] == [(32, 32)] * 2 + [(16, 16)] * 3
    assert [tuple(c.shape[-2:]) for c in mo] == [(32, 32)] * 2 + [(16, 16)] * 3


# ---------------------------------------------------------------- ResNet details, ResNet-50w2


def test_resnet_as_released():
    m = backbones.build_smog(_cfg(arch="resnet50", n_heads=1))
    last_bns = [b.bn3.weight for b in m.backbone.modules() if hasattr(b, "bn3")]
    assert last_bns and all(
        torch.equal(w, torch.ones_like(w)) for w in last_bns
    )  # no zero-init residual
    assert m.projector[0].bias is not None and m.predictor[0].bias is not None
    assert m.backbone.conv1.padding == (
        3,
        3,
    )  # torchvision's stem (released: pad 1 + padding 2, the same)


def test_resnet50w2_doubles_every_width():
    import torchvision.models as tvm

    net, dim = backbones.build_backbone("resnet50w2")
    assert dim == 4096 and net.conv1.out_channels == 128
    assert [
        net.layer1[0].conv1.out_channels,
        net.layer2[0].conv1.out_channels,
        net.layer3[0].conv1.out_channels,
        net.layer4[0].conv1.out_channels,
    ] == [128, 256, 512, 1024]
    assert [net.layer1[-1].conv3.out_channels, net.layer4[-1].conv3.out_channels] == [512, 4096]
    assert [len(net.layer1), len(net.layer2), len(net.layer3), len(net.layer4)] == [3, 4, 6, 3]
    assert 93e6 < sum(p.numel() for p in net.parameters()) < 95e6  # SwAV's R50w2: 94M
    tv, tv_dim = backbones.build_backbone("wide_resnet50_2")  # torchvision's, true name
    assert tv_dim == 2048 and type(tv) is tvm.ResNet and tv.conv1.out_channels == 64
    assert config.parse_config(["--preset", "imagenet-r50w2"]).arch == "resnet50w2"


# ---------------------------------------------------------------- Swin-T as released


@pytest.fixture(scope="module")
def swin():
    torch.manual_seed(3)
    return backbones.build_smog(
        _cfg(arch="swin_t", dim=16, hidden_dim=32, n_heads=2, drop_path=0.5)
    )


def test_swin_blocks_heads_and_init(swin):
    blocks = [
        b for b in swin.backbone.modules() if isinstance(b, backbones.tv_swin.SwinTransformerBlock)
    ]
    assert len(blocks) == 12
    assert all(
        isinstance(b.norm1, nn.LayerNorm) and type(b.norm2) is nn.BatchNorm1d for b in blocks
    )
    assert isinstance(swin.projector[2], nn.GELU) and isinstance(swin.predictor[2], nn.ReLU)
    lin = [m for m in [*swin.projector, *swin.predictor] if isinstance(m, nn.Linear)]
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in lin)
    assert all(
        abs(float(m.weight.detach().std()) - 0.02) < 0.004 for m in lin
    )  # trunc_normal_(std=0.02)
    sd_on = [
        m.p for m in swin.backbone.modules() if isinstance(m, backbones.tv_swin.StochasticDepth)
    ]
    sd_mo = [
        m.p
        for m in swin.momentum_backbone.modules()
        if isinstance(m, backbones.tv_swin.StochasticDepth)
    ]
    assert max(sd_on) == 0.5 and max(sd_mo) == 0.0  # drop-path on the online net only


def test_swin_bn_block_forward_by_hand(swin):
    blk = [
        b for b in swin.backbone.modules() if isinstance(b, backbones.tv_swin.SwinTransformerBlock)
    ][0]
    blk = copy.deepcopy(blk).eval()
    with torch.no_grad():
        blk.norm2.running_mean.normal_()
        blk.norm2.running_var.uniform_(0.5, 2)
        x = torch.randn(2, 8, 8, 96)
        y = x + blk.attn(blk.norm1(x))
        y = (y - blk.norm2.running_mean) / (
            blk.norm2.running_var + blk.norm2.eps
        ).sqrt() * blk.norm2.weight + blk.norm2.bias
        torch.testing.assert_close(blk(x), y + blk.mlp(y), rtol=1e-4, atol=1e-5)


def test_swin_update_uses_drop_path_free_reembedding_and_per_size_heads(swin):
    m = swin
    g = torch.Generator().manual_seed(4)
    on = [torch.randn(3, 3, 64, 64, generator=g) for _ in range(2)] + [
        torch.randn(3, 3, 32, 32, generator=g)
    ]
    mo = [torch.randn(3, 3, 64, 64, generator=g) for _ in range(2)] + [
        torch.randn(3, 3, 32, 32, generator=g)
    ]
    ref = copy.deepcopy(m)
    g0 = m.groups.clone()
    m(on, mo, 0.5)
    with torch.no_grad():
        for (
            mod
        ) in ref.backbone.modules():  # the update's embedding: drop-path off, BN in train mode
            if isinstance(mod, backbones.tv_swin.StochasticDepth):
                mod.p = 0.0
        z = F.normalize(ref.projector(ref.backbone(torch.cat(on[:2]))), dim=-1).view(2, 3, -1)
        for h in range(2):
            a = smog.assign_groups(z[h % 2], g0[h])
            torch.testing.assert_close(
                m.groups[h], smog.update_groups(g0[h], z[h % 2], a, 0.5), rtol=0, atol=1e-5
            )
            assert not torch.equal(m.groups[h], g0[h])


def test_swin_group_grad_flows_through_the_reembedding(swin):
    """--group-grad on Swin-T: the update's features are the drop-path-free re-embedding, so the
    gradient through the update must reach the network through it (without the option it does
    not)."""
    import dataclasses

    g = torch.Generator().manual_seed(5)
    on, mo = ([torch.randn(2, 3, px, px, generator=g) for px in (32, 32, 16)] for _ in range(2))
    grads = {}
    for gg in (False, True):
        m = copy.deepcopy(swin)
        m.cfg = dataclasses.replace(m.cfg, group_grad=gg)
        torch.manual_seed(7)  # the same drop-path masks
        loss, _, _ = m(on, mo, 0.5)
        loss.backward()
        grads[gg] = m.projector[0].weight.grad.clone()
    # the gradient through the update (1 - beta) mean term adds to the loss's own
    assert (grads[True] - grads[False]).abs().max() > 1e-6 * grads[False].abs().max()


# ---------------------------------------------------------------- checkpoint format


def test_old_checkpoint_refused_in_one_line():
    cfg = config.parse_config(["--preset", "demo"])
    for old in ("smog-train-v1", "smog-train-v2"):
        with pytest.raises(config.UsageError) as e:
            checkpoint.check_resume(
                {"format": old, "world_size": 1, "config": {}},
                cfg,
                config.RUNTIME_FIELDS,
                "old.pth",
            )
        msg = str(e.value)
        assert "older train.py" in msg and old in msg and "use a new --out-dir" in msg
        assert "\n" not in msg
    assert checkpoint.FORMAT == "smog-train-v3"
