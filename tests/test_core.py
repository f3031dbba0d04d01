"""smog.py's functional core and modules against slow loop oracles written here.

The real multi-process checks live in test_core_dist.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import smog
from smog_train import backbones, checkpoint, probes

# ---------------------------------------------------------------- slow oracles (loops, float64)


def oracle_assign(z, groups):
    out = []
    for zi in z.double():
        zi = zi / zi.norm().clamp_min(1e-12)
        best, arg = -math.inf, 0
        for k, gk in enumerate(groups.double()):
            s = float(zi @ gk)
            if s > best:  # strict: ties keep the lowest index
                best, arg = s, k
        out.append(arg)
    return torch.tensor(out, dtype=torch.long)


def oracle_update(groups, z, assign, beta):
    new = groups.double().clone()
    for k in range(groups.shape[0]):
        members = [
            z[i].double() / z[i].double().norm() for i in range(len(z)) if int(assign[i]) == k
        ]
        if not members:
            continue
        mean = sum(members) / len(members)
        v = beta * groups[k].double() + (1 - beta) * mean
        new[k] = v / v.norm()
    return new


def oracle_kmeans(x, init, iters):
    x = x.double() / x.double().norm(dim=1, keepdim=True)
    c = init.double().clone()
    for _ in range(iters):
        a = oracle_assign(x, c)
        for k in range(len(c)):
            rows = [x[i] for i in range(len(x)) if int(a[i]) == k]
            if rows:
                s = sum(rows)
                c[k] = s / s.norm()
    return c, oracle_assign(x, c)


def unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


# ---------------------------------------------------------------- functional core


@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (5, 9, 3), (40, 6, 4), (64, 128, 8)])
def test_assign_matches_oracle(n, k, d):
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(n), dtype=torch.float64) * 3
    g = unit(k, d, seed=k)
    assert torch.equal(smog.assign_groups(z, g), oracle_assign(z, g))


def test_assign_ties_go_to_lowest_index():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([[2.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    assert smog.assign_groups(z, g).tolist() == [0, 1, 0]


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.99, 1.0])
@pytest.mark.parametrize("n,k,d", [(1, 1, 2), (6, 20, 4), (50, 7, 5)])
def test_update_matches_oracle_including_empty_groups_and_duplicates(n, k, d, beta):
    g = unit(k, d, seed=1)
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 5
    z[n // 2 :] = z[0]  # duplicate rows
    a = smog.assign_groups(z, g)
    g_before, z_before = g.clone(), z.clone()
    new = smog.update_groups(g, z, a, beta)
    assert torch.equal(g, g_before) and torch.equal(z, z_before), "inputs must not be modified"
    torch.testing.assert_close(new, oracle_update(g, z, a, beta), rtol=0, atol=1e-12)
    empty = torch.ones(k, dtype=torch.bool)
    empty[a] = False
    assert torch.equal(new[empty], g[empty]), "groups without members must be returned unchanged"
    assert (new.norm(dim=1) - 1).abs().max() < 1e-12


def test_update_uses_arbitrary_assignment_not_nearest():
    g = unit(4, 3, seed=3)
    z = torch.randn(10, 3, dtype=torch.float64)
    a = torch.tensor([3, 3, 3, 0, 0, 1, 1, 1, 1, 3])
    torch.testing.assert_close(
        smog.update_groups(g, z, a, 0.5), oracle_update(g, z, a, 0.5), rtol=0, atol=1e-12
    )


def test_update_sums_and_counts_through_reduce_function():
    """Two simulated ranks: reduce adds the other shard's statistics -> equals the whole-batch update."""
    g = unit(5, 3, seed=4)
    z = torch.randn(9, 3, dtype=torch.float64)
    a = smog.assign_groups(z, g)
    whole = smog.update_groups(g, z, a, 0.7)
    seen = []
    smog.update_groups(g, z[7:], a[7:], 0.7, all_reduce=lambda t: seen.append(t.clone()) or t)
    other = seen[0]
    half = smog.update_groups(g, z[:7], a[:7], 0.7, all_reduce=lambda t: t + other)
    torch.testing.assert_close(half, whole, rtol=0, atol=1e-12)


def test_update_stays_unit_norm_in_fp32_over_many_steps():
    g = unit(30, 16, seed=5, dtype=torch.float32)
    gen = torch.Generator().manual_seed(6)
    for _ in range(2000):
        z = torch.randn(64, 16, generator=gen) * 10
        g = smog.update_groups(g, z, smog.assign_groups(z, g), 0.9)
    assert (g.norm(dim=1) - 1).abs().max() < 1e-5


def test_loss_matches_explicit_cross_entropy_and_bounds():
    g = unit(7, 4, seed=7)
    p = torch.randn(5, 4, dtype=torch.float64) * 4
    t = torch.tensor([0, 6, 3, 3, 1])
    logits = smog.group_logits(p, g, 0.2)
    pn = p / p.norm(dim=1, keepdim=True)
    for i in range(5):
        for k in range(7):
            assert abs(float(logits[i, k]) - float(pn[i] @ g[k]) / 0.2) < 1e-12
    manual = sum(-(logits[i, t[i]] - logits[i].logsumexp(0)) for i in range(5)) / 5
    assert abs(float(smog.smog_loss(p, g, t, 0.2)) - float(manual)) < 1e-12
    # all logits equal -> ln K
    same = torch.ones(3, 4, dtype=torch.float64) / 2
    assert abs(float(smog.smog_loss(p[:2], same, torch.tensor([0, 2]), 0.1)) - math.log(3)) < 1e-12


def test_smog_step_targets_before_loss_after_update():
    K, D, B, C, J = 6, 4, 5, 3, 2
    g = unit(K, D, seed=8)
    gen = torch.Generator().manual_seed(9)
    zu, zt, p = (
        torch.randn(*s, generator=gen, dtype=torch.float64) for s in [(B, D), (J, B, D), (C, B, D)]
    )
    loss, new, targets = smog.smog_step(g, zu, zt, p, 0.6, 0.1)
    exp_t = torch.stack([oracle_assign(zt[j], g) for j in range(J)])
    assert torch.equal(targets, exp_t)
    exp_new = oracle_update(g, zu, oracle_assign(zu, g), 0.6)
    torch.testing.assert_close(new, exp_new, rtol=0, atol=1e-12)
    exp_loss = sum(
        smog.smog_loss(p[c], exp_new, exp_t[j], 0.1) for c in range(C) for j in range(J)
    ) / (C * J)
    assert abs(float(loss) - float(exp_loss)) < 1e-12


@pytest.mark.parametrize(
    "n,k,d,iters", [(12, 12, 3, 5), (50, 4, 2, 10), (80, 10, 6, 0), (30, 1, 1, 3)]
)
def test_kmeans_matches_oracle_from_same_start(n, k, d, iters):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n + k), dtype=torch.float64)
    x[-3:] = x[0]  # duplicates
    c, a = smog.spherical_kmeans(x, k, iters, generator=torch.Generator().manual_seed(0))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k]
    oc, oa = oracle_kmeans(x, x[idx] / x[idx].norm(dim=1, keepdim=True), iters)
    torch.testing.assert_close(c, oc, rtol=0, atol=1e-12)
    assert torch.equal(a, oa)
    assert (c.norm(dim=1) - 1).abs().max() < 1e-12


def test_kmeans_keeps_empty_cluster_and_rejects_too_few_rows():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=torch.float64)
    init = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    c, a = smog.spherical_kmeans(x, 3, 4, init=init)
    assert torch.equal(c[2], init[2]) and 2 not in a.tolist()
    with pytest.raises(ValueError, match="k=4"):
        smog.spherical_kmeans(x, 4, 1)


def test_momentum_update_closed_form():
    theta0 = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    q = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    t = [x.clone() for x in theta0]
    for _ in range(50):
        smog.momentum_update_(t, q, 0.9)
    for ti, t0, qi in zip(t, theta0, q):
        torch.testing.assert_close(ti, 0.9**50 * t0 + (1 - 0.9**50) * qi, rtol=0, atol=1e-12)


def test_beta_schedule_ends_and_linearity():
    s = smog.beta_schedule(1.0, 0.99, 1001)
    assert s[0] == 1.0 and s[-1] == 0.99 and len(s) == 1001
    torch.testing.assert_close(
        s[1:] - s[:-1], torch.full((1000,), -1e-5, dtype=torch.float64), rtol=0, atol=1e-12
    )
    assert smog.beta_schedule(0.5, 0.1, 1).tolist() == [0.5]


# ---------------------------------------------------------------- modules


def tiny_cfg(**kw):
    base = dict(arch="smallcnn", width=8, dim=16, hidden_dim=32, n_groups=12, n_heads=3)
    base.update(kw)
    return smog.SMoGConfig(**base)


def crops(B=4, seed=0, local=2):
    g = torch.Generator().manual_seed(seed)
    on = [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(B, 3, 16, 16, generator=g) for _ in range(local)
    ]
    mo = [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(B, 3, 16, 16, generator=g) for _ in range(local)
    ]  # momentum set: its local crops too
    return on, mo


@pytest.mark.parametrize(
    "arch,size,stem",
    [
        ("smallcnn", 32, False),
        ("resnet18", 32, True),
        ("resnet50", 32, True),
        ("resnet50w2", 32, True),
        ("swin_t", 64, False),
        ("resnet18", 64, False),
    ],
)
def test_every_backbone_forward_backward(arch, size, stem):
    torch.manual_seed(0)
    cfg = tiny_cfg(arch=arch, cifar_stem=stem, n_heads=2)
    m = backbones.build_smog(cfg)
    on = [torch.randn(2, 3, size, size) for _ in range(2)] + [
        torch.randn(2, 3, size // 2, size // 2)
    ]
    mo = [torch.randn(2, 3, size, size) for _ in range(2)] + [
        torch.randn(2, 3, size // 2, size // 2)
    ]
    loss, stats, _ = m(on, mo, 0.99)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in m.backbone.parameters() if p.requires_grad)
    assert all(p.grad is None for p in m._momentum_params())
    assert stats["nonempty"].shape == (2,) and stats["entropy"].shape == (2,)


def test_forward_equals_per_head_smog_step_and_updates_buffer():
    torch.manual_seed(1)
    m = backbones.build_smog(tiny_cfg())
    on, mo = crops()
    g0 = m.groups.clone()
    loss, _, _ = m(on, mo, 0.8)
    # recompute the embeddings (train mode: outputs use batch statistics, the parameters are unchanged)
    m2 = backbones.build_smog(tiny_cfg())
    m2.load_state_dict({**m.state_dict(), "groups": g0})
    with torch.no_grad():
        zt = m2.momentum_projector(backbones.encode_crops(m2.momentum_backbone, mo))[
            :8
        ]  # targets: global crops
        zt = F.normalize(zt, dim=-1).view(2, 4, -1)
        z = m2.projector(backbones.encode_crops(m2.backbone, on))
        p = m2.predictor(z).view(4, 4, -1)
        z = F.normalize(z, dim=-1).view(4, 4, -1)
    exp_loss = 0
    for h in range(3):
        loss_h, g, _ = smog.smog_step(g0[h], z[h % 2], zt, p, 0.8, 0.1)
        exp_loss += loss_h / 3
        torch.testing.assert_close(m.groups[h], g, rtol=0, atol=1e-6)
    assert abs(loss.item() - exp_loss.item()) < 1e-5


def test_local_crops_batched_per_resolution():
    calls = []
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    net.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    on, _ = crops(B=3, local=3)
    out = backbones.encode_crops(net, on)
    assert calls == [(6, 3, 32, 32), (9, 3, 16, 16)]
    # order of outputs follows the crop order
    assert torch.equal(out[:3], net(on[0])) and torch.equal(out[3:6], net(on[1]))
    assert torch.equal(out[6:9], net(on[2])) and torch.equal(out[12:], net(on[4]))


def test_bf16_autocast_stays_finite_and_grouping_in_fp32():
    torch.manual_seed(3)
    m = backbones.build_smog(tiny_cfg())
    on, mo = crops()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats, _ = m(on, mo, 0.9)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert m.groups.dtype == torch.float32
    assert (m.groups.norm(dim=-1) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("group_grad", [False, True])
def test_group_grad_path_through_update(group_grad):
    """p is detached, so the only path from the loss into the projector is the group update."""
    torch.manual_seed(4)
    proj = torch.nn.Linear(5, 4, dtype=torch.float64)
    x = torch.randn(6, 5, dtype=torch.float64)
    g = unit(3, 4, seed=10)
    zt = torch.randn(2, 6, 4, dtype=torch.float64)
    p = torch.randn(2, 6, 4, dtype=torch.float64)
    loss, _, _ = smog.smog_step(
        g, F.normalize(proj(x), dim=-1), zt, p, 0.5, 0.1, group_grad=group_grad
    )
    if not loss.requires_grad:
        assert not group_grad
        return
    loss.backward()
    gnorm = proj.weight.grad.abs().sum()
    assert (gnorm > 0) if group_grad else (gnorm == 0)


@pytest.mark.parametrize("group_grad", [False, True])
def test_module_group_grad_reaches_projector_only_when_enabled(group_grad):
    torch.manual_seed(5)
    m = backbones.build_smog(tiny_cfg(group_grad=group_grad))
    on, mo = crops()
    # cut the prediction path: a predictor that ignores its input keeps only the group-update path
    m.predictor = torch.nn.Sequential(torch.nn.Flatten(), _Const(16))
    loss, _, _ = m(on, mo, 0.5)
    if loss.requires_grad:
        loss.backward()
    grads = [p.grad for p in m.projector.parameters()]
    total = sum(float(g.abs().sum()) for g in grads if g is not None)
    assert (total > 0) if group_grad else (total == 0)


class _Const(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.v = torch.nn.Parameter(torch.randn(d))

    def forward(self, z):
        return self.v.expand(z.shape[0], -1) + 0 * z.detach()


def test_momentum_step_reset_and_regroup():
    torch.manual_seed(6)
    m = backbones.build_smog(tiny_cfg())
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m._momentum_params()]
    m.momentum_step(0.9)
    for b, t, q in zip(before, m._momentum_params(), m._online_params()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * q, rtol=1e-6, atol=1e-6)
    m.reset_momentum()
    for t, q in zip(m._momentum_params(), m._online_params()):
        assert torch.equal(t, q)
    bank = F.normalize(torch.randn(2, 40, 16), dim=-1)
    groups = smog.regroup(
        bank, torch.arange(40), 40, 3, 12, iters=3, generator=torch.Generator().manual_seed(0)
    )
    # every head: k-means over bank[h % 2], one generator carried from head to head (each head's
    # initial draw sees the state the previous heads left), written out step by step here
    gen = torch.Generator().manual_seed(0)
    for h in range(3):
        x = bank[h % 2]
        c = x[torch.randperm(40, generator=gen)[:12]]
        for _ in range(3):
            a = (x @ c.T).argmax(1)
            s = torch.zeros_like(c).index_add_(0, a, x)
            n = torch.bincount(a, minlength=12)
            c = torch.where(n[:, None] > 0, F.normalize(s, dim=-1), c)
        torch.testing.assert_close(groups[h], c, rtol=1e-5, atol=1e-5, msg=f"head {h}")
    assert not torch.allclose(m.groups[0], m.groups[2])  # same row, different starts
    assert (m.groups.norm(dim=-1) - 1).abs().max() < 1e-5


def test_backbone_state_dict_has_no_classifier_and_loads_in_torchvision():
    import torchvision

    m = backbones.build_smog(tiny_cfg(arch="resnet18"))
    sd = m.backbone.state_dict()  # what smog_train.export writes
    missing, unexpected = torchvision.models.resnet18().load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


def test_knn_predict_small_example():
    tr = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    y = torch.tensor([0, 0, 1, 1])
    te = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    out = probes.knn_predict(tr, y, te, 2, ks=(1, 3, 200), chunk=1)
    assert all(v.tolist() == [0, 1] for v in out.values())


def test_save_atomic_and_safe_load(tmp_path):
    path = str(tmp_path / "ck.pth")
    checkpoint.save_atomic({"a": torch.ones(3), "cfg": {"x": 1}}, path)
    assert torch.equal(checkpoint.load_checkpoint(path)["a"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pth"]
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load"):
        checkpoint.load_checkpoint(str(tmp_path / "junk.pth"))
