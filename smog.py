"""SMoG: Synchronous Momentum Grouping (Pang et al., ECCV 2022) in one module.

Each image is contrasted against H heads of K momentum-updated *group features* (unit vectors)
instead of against other instances. Every iteration:
  1. targets t_j = argmax_k <z'_j, c_k> from the momentum network, with the groups *before* the update
  2. synchronous update: c_k <- normalise(beta c_k + (1 - beta) mean_{i: a_i = k} z_i), sums and counts
     reduced over all ranks before dividing, so every rank holds identical groups
  3. loss: cross-entropy of <p, c_k>/tau (updated groups) against every target, every online crop.
Every epoch the groups are re-clustered with spherical k-means over a memory bank.

Layout: a pure functional core (plain tensors in, tensors out, any device, optional reduce
function; no process group needed), then the modules that compose it. Equation ids in comments,
e.g. (G2), point into spec/*.md. Shapes: B batch, C online crops, J momentum crops (targets),
H heads, K groups, D embedding dim.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
from dataclasses import asdict, dataclass, fields
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet as tv_resnet
from torchvision.models import swin_transformer as tv_swin

Reduce = Callable[[torch.Tensor], torch.Tensor]  # returns the SUM over ranks (use the return value)


# ----------------------------------------------------------------------------------------------
# collectives: no-ops without a process group, so the same code runs in a test, a laptop, 64 GPUs


def dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _dist_sum(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad:  # group_grad=True: differentiable all-reduce (backward all-reduces grads)
        import torch.distributed.nn.functional as dnn
        return dnn.all_reduce(t)
    dist.all_reduce(t)
    return t


def _dist_bcast(t: torch.Tensor) -> torch.Tensor:
    dist.broadcast(t, src=0)
    return t


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _resolve(fn: Optional[Reduce], dist_fn: Reduce) -> Reduce:
    if fn is not None:
        return fn
    return dist_fn if dist_ready() else _identity


def exit_process(rc: int) -> None:
    """sys.exit(rc); under torchrun, skip interpreter finalisation instead: gloo's worker threads may still
    be releasing the tensors of the last collectives, need the GIL of a finalising interpreter and abort
    the process (exit -6 after a finished run; seen ~1 run in 10 on a busy 2-core machine). Callers have
    written and flushed everything and destroyed the process group by now."""
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate [n_r, ...] tensors of all ranks in rank order; n_r may differ between ranks."""
    if not dist_ready():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    pad = x.new_zeros((m - x.shape[0], *x.shape[1:]))
    out = [x.new_empty((m, *x.shape[1:])) for _ in sizes]
    dist.all_gather(out, torch.cat([x, pad]))
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


# ----------------------------------------------------------------------------------------------
# functional core (spec/grouping.md, spec/loss.md, spec/kmeans.md, spec/step.md, spec/momentum.md)


def _fp(t: torch.Tensor) -> torch.dtype:
    """Compute dtype: at least fp32 (bf16/fp16 inputs are promoted), fp64 stays fp64."""
    return torch.promote_types(t.dtype, torch.float32)


def assign_groups(z: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(G1) a_i = argmax_k <z_i/||z_i||, c_k>; z [N, D], groups [K, D] unit rows -> [N] long.
    Ties between exactly equal scores go to the lowest index (torch.argmax returns the first maximum);
    two identical group rows may still score a last-bit apart in a matmul (spec/grouping.md)."""
    dt = _fp(groups)
    return (F.normalize(z.to(dt), dim=-1) @ groups.to(dt).T).argmax(dim=-1)


def update_groups(groups: torch.Tensor, z: torch.Tensor, assign: torch.Tensor, beta,
                  *, all_reduce: Optional[Reduce] = None) -> torch.Tensor:
    """(G2) synchronous momentum update; groups [K, D], z [N, D], assign [N] -> new groups [K, D].

    For every group with n_k > 0 members over all ranks:
        c_k <- normalise(beta * c_k + (1 - beta) * (1/n_k) sum_{i: a_i = k} z_i / ||z_i||)
    Groups without members are returned unchanged. Per-group sums and counts travel in one
    [K, D+1] tensor through `all_reduce` (SUM) *before* dividing (G5): averaging per-rank means
    would weight ranks instead of samples. Inputs are not modified. No host-device sync.
    """
    reduce = _resolve(all_reduce, _dist_sum)
    K, D = groups.shape
    dt = _fp(groups)
    zn = F.normalize(z.to(dt), dim=-1)                                       # (N, D)
    ones = torch.ones(zn.shape[0], 1, dtype=dt, device=zn.device)
    stats = torch.zeros(K, D + 1, dtype=dt, device=zn.device)
    stats = reduce(stats.index_add(0, assign, torch.cat([zn, ones], 1)))     # (K, D+1) sums|counts
    sums, counts = stats[:, :D], stats[:, D:]
    mean = sums / counts.clamp_min(1)
    g = groups.to(dt)
    new = F.normalize(beta * g + (1 - beta) * mean, dim=-1)
    return torch.where(counts > 0, new, g).to(groups.dtype)


def group_logits(p: torch.Tensor, groups: torch.Tensor, tau: float) -> torch.Tensor:
    """(L1) logits_ik = <p_i/||p_i||, c_k> / tau; p [N, D], groups [K, D] -> [N, K]."""
    dt = _fp(groups)
    return F.normalize(p.to(dt), dim=-1) @ groups.to(dt).T / tau


def smog_loss(p: torch.Tensor, groups: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """(L1) mean cross-entropy of group_logits(p) against integer targets [N]."""
    return F.cross_entropy(group_logits(p, groups, tau), targets)


def smog_step(groups: torch.Tensor, z_update: torch.Tensor, z_target: torch.Tensor, p: torch.Tensor,
              beta, tau: float, *, all_reduce: Optional[Reduce] = None, group_grad: bool = False):
    """One head's iteration as a pure function (spec/step.md).

    groups [K, D]; z_update [B, D] online projector embedding of one online global crop;
    z_target [J, B, D] momentum embeddings; p [C, B, D] online predictions.
    Returns (loss [], new_groups [K, D], targets [J, B]).
      (S1) targets and the update's assignment use the groups *before* the update
      (S2) the loss uses the groups *after* it, averaged over (c, j, b)
    group_grad=False: new_groups is detached (released code); True: gradient reaches z_update
    through the (1 - beta) mean term (authors' README); assignments never carry gradient.
    """
    J, B, D = z_target.shape
    g0 = groups.detach()
    targets = assign_groups(z_target.reshape(J * B, D), g0).view(J, B)
    a = assign_groups(z_update.detach(), g0)
    new = update_groups(g0, z_update if group_grad else z_update.detach(), a, beta, all_reduce=all_reduce)
    if not group_grad:
        new = new.detach()
    return multi_target_loss(p, new, targets, tau), new, targets


def smog_multihead_step(groups: torch.Tensor, z: torch.Tensor, z_target: torch.Tensor, p: torch.Tensor,
                        beta, tau: float, *, all_reduce: Optional[Reduce] = None, group_grad: bool = False):
    """One iteration of all H heads (spec/heads.md): groups [H, K, D]; z [C, B, D] online projector
    embeddings of every online crop (C >= 2); z_target [J, B, D]; p [C, B, D].
    Returns (loss [], new_groups [H, K, D], targets [H, J, B]).
      (H1) loss = mean over heads of the per-head smog_step losses
      (H2) head h updates from the online global crop h mod 2, z[h % 2]
      (H3) head h's targets come from its own groups, before its update
      (H4) the incoming groups never receive gradient (each head detaches them)
    The caller copies new_groups into its buffer after all heads are done (H5, S7)."""
    H, C = groups.shape[0], z.shape[0]
    if C < 2:
        raise ValueError(f"smog_multihead_step: z holds {C} online crop(s); head h updates from global crop "
                         f"h mod 2, so pass at least the 2 global crops")
    losses, new_groups, targets = [], [], []
    for h in range(H):
        loss, g, t = smog_step(groups[h], z[h % 2], z_target, p, beta, tau, all_reduce=all_reduce,
                               group_grad=group_grad)
        losses.append(loss)
        new_groups.append(g)
        targets.append(t)
    return torch.stack(losses).mean(), torch.stack(new_groups), torch.stack(targets)


def multi_target_loss(p: torch.Tensor, groups: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """(S2) every online prediction against every target: p [C, B, D], groups [K, D], targets [J, B]
    -> mean over (c, j, b) of cross-entropy(group_logits(p[c]), targets[j])."""
    C, B, D = p.shape
    J = targets.shape[0]
    logp = group_logits(p.reshape(C * B, D), groups, tau).log_softmax(-1).view(C, B, -1)  # (C, B, K)
    return -logp.gather(2, targets.T.unsqueeze(0).expand(C, B, J)).mean()                 # (C, B, J)


@torch.no_grad()
def target_stats(targets: Sequence[torch.Tensor], K: int, *, all_reduce: Optional[Reduce] = None) -> dict:
    """Collapse monitor from the targets of all heads (targets[h] integer [J, B]), no host sync:
    nonempty [H] fraction of groups hit, entropy [H] of the global target histogram (nats; ln K is uniform).
    The per-group counts are summed over ranks before anything is derived from them."""
    hits = torch.stack([torch.zeros(K, device=t.device).index_add_(0, t.flatten(), torch.ones(t.numel(), device=t.device))
                        for t in targets])
    counts = _resolve(all_reduce, _dist_sum)(hits)                                   # (H, K)
    prob = counts / counts.sum(1, keepdim=True)
    return {"nonempty": (counts > 0).float().mean(1), "entropy": -(prob * prob.clamp_min(1e-12).log()).sum(1)}


def _nearest(x: torch.Tensor, c: torch.Tensor, chunk_elems: Optional[int] = None) -> torch.Tensor:
    """argmax_k <x_i, c_k> in row chunks so the [N, K] score matrix never exists whole.
    Default chunk: 2M scores (8 MB fp32) on the CPU, under glibc's mmap threshold, so the buffer is reused
    instead of page-faulted in afresh for every chunk (-30% k-means time, bench.py); 64M on a GPU."""
    if chunk_elems is None:
        chunk_elems = 1 << 21 if x.device.type == "cpu" else 1 << 26
    step = max(1, chunk_elems // max(1, c.shape[0]))
    return torch.cat([(xc @ c.T).argmax(1) for xc in x.split(step)]) if len(x) else \
        torch.zeros(0, dtype=torch.long, device=x.device)


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 10, *, generator: Optional[torch.Generator] = None,
                     all_reduce: Optional[Reduce] = None, broadcast: Optional[Reduce] = None,
                     init: Optional[torch.Tensor] = None):
    """Distributed spherical k-means (spec/kmeans.md); x [N, D] (this rank's rows) -> (centres [k, D], assign [N]).

    (K1) init: k distinct rows of rank 0, randperm(N_0, generator)[:k], broadcast to all ranks
         (or `init` [k, D] if given, normalised). (K2) E-step: argmax of dot product.
    (K3) M-step: normalised mean of members with sums and counts reduced over ranks; empty clusters
         keep their centre. iters=0 returns the initial centres.
    """
    reduce = _resolve(all_reduce, _dist_sum)
    bcast = _resolve(broadcast, _dist_bcast)
    dt = _fp(x)
    x = F.normalize(x.to(dt), dim=-1)
    N, D = x.shape
    n_total = int(reduce(torch.tensor([float(N)], dtype=torch.float64, device=x.device)).item())
    if n_total < k:
        raise ValueError(f"spherical_kmeans: {n_total} rows across all ranks but k={k} clusters; "
                         f"use fewer groups or more data")
    if init is not None:
        c = F.normalize(init.to(device=x.device, dtype=dt), dim=-1)
    else:
        n0 = int(bcast(torch.tensor([float(N)], dtype=torch.float64, device=x.device)).item())
        if n0 < k:
            raise ValueError(f"spherical_kmeans: rank 0 holds {n0} rows but k={k}; initial centres are "
                             f"drawn from rank 0's rows, give it at least k rows")
        c = torch.zeros(k, D, dtype=dt, device=x.device)
        if N >= k:
            idx = torch.randperm(N, generator=generator, device=generator.device if generator else "cpu")[:k]
            c = x[idx.to(x.device)]
        c = bcast(c.contiguous())
    ones = torch.ones(N, 1, dtype=dt, device=x.device)
    for _ in range(iters):
        a = _nearest(x, c)                                                         # (K2)
        stats = reduce(torch.zeros(k, D + 1, dtype=dt, device=x.device).index_add(0, a, torch.cat([x, ones], 1)))
        c = torch.where(stats[:, D:] > 0, F.normalize(stats[:, :D], dim=-1), c)   # (K3)
    return c, _nearest(x, c)


@torch.no_grad()
def momentum_update_(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], m: float) -> None:
    """(M1) theta_k <- m theta_k + (1 - m) theta_q, in place, one foreach kernel over all tensors."""
    target, online = list(target), list(online)
    torch._foreach_mul_(target, m)
    torch._foreach_add_(target, online, alpha=1 - m)


def beta_schedule(beta_start: float, beta_end: float, total_steps: int) -> torch.Tensor:
    """(M3) linear per-iteration schedule, float64 [total_steps], exact at both ends."""
    s = torch.linspace(beta_start, beta_end, total_steps, dtype=torch.float64)
    if total_steps > 1:
        s[0], s[-1] = beta_start, beta_end
    return s


@torch.no_grad()
def knn_predict(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, n_classes: int,
                ks: Sequence[int] = (20,), T: float = 0.07, chunk: int = 256) -> dict:
    """Weighted kNN (DINO protocol): cosine similarity, top-k neighbours, votes exp(sim/T).
    Features [N, D] / [M, D] are L2-normalised here; returns {k: predictions [M]}; k is capped at N.
    Test rows are processed in chunks of `chunk` so memory stays O(chunk * N)."""
    tr = F.normalize(train_f.float(), dim=1)
    kmax = min(max(ks), tr.shape[0])
    preds = {k: [] for k in ks}
    for te in F.normalize(test_f.float(), dim=1).split(max(1, chunk)):
        sim, idx = (te @ tr.T).topk(kmax, dim=1)                              # (m, kmax)
        w, lab = (sim / T).exp(), train_y[idx]
        for k in ks:
            kk = min(k, kmax)
            votes = torch.zeros(te.shape[0], n_classes, device=te.device)
            votes.scatter_add_(1, lab[:, :kk], w[:, :kk])
            preds[k].append(votes.argmax(1))
    return {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for k, v in preds.items()}


# ----------------------------------------------------------------------------------------------
# networks


class SmallCNN(nn.Module):
    """The demo backbone: four 3x3 conv-BN-ReLU stages, global average pool. Fast on 2 CPU cores."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
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
    for mod in m.modules():                          # torchvision's initialisation, no zero-init residual
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
    return m


class SwinBlockBN(tv_swin.SwinTransformerBlock):
    """The released Swin-T block: LayerNorm before the attention, BatchNorm1d over channels before the MLP
    (every token of every image is one sample of the BN). As released, the MLP's residual adds to the
    *normalised* stream: x <- BN(x); x <- x + MLP(x). x: [B, H, W, C]."""

    def __init__(self, dim: int, *args, **kw):
        super().__init__(dim, *args, **kw)
        self.norm2 = nn.BatchNorm1d(dim)

    def forward(self, x):
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        x = self.norm2(x.reshape(-1, x.shape[-1])).view_as(x)                       # (B*H*W, C) tokens as batch
        return x + self.stochastic_depth(self.mlp(x))


ARCHS = ("smallcnn", "resnet18", "resnet34", "resnet50", "resnet50w2", "wide_resnet50_2", "swin_t")


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
        m = resnet50w2() if name == "resnet50w2" else getattr(tvm, name)(weights=None, zero_init_residual=False)
        if cifar_stem:
            m.conv1 = nn.Conv2d(3, m.conv1.out_channels, 3, 1, 1, bias=False)
            nn.init.kaiming_normal_(m.conv1.weight, mode="fan_out", nonlinearity="relu")
            m.maxpool = nn.Identity()
        dim, m.fc = m.fc.in_features, nn.Identity()
        return m, dim
    if name == "swin_t":   # torchvision's SwinTransformer: Linear weights trunc-normal(0.02), biases 0
        m = tv_swin.SwinTransformer(patch_size=[4, 4], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                                    window_size=[7, 7], stochastic_depth_prob=drop_path, block=SwinBlockBN)
        dim, m.head = m.head.in_features, nn.Identity()
        return m, dim
    raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHS)}")


def build_mlp(d_in: int, d_hidden: int, d_out: int, *, last_bn: bool, act=nn.ReLU) -> nn.Sequential:
    """Linear -> BN -> act -> Linear (-> BN without affine, for the projector); every Linear with a bias."""
    layers = [nn.Linear(d_in, d_hidden), nn.BatchNorm1d(d_hidden), act(), nn.Linear(d_hidden, d_out)]
    if last_bn:
        layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


@dataclass
class SMoGConfig:
    """Model hyperparameters; defaults are the released ResNet-50 ImageNet recipe."""
    arch: str = "resnet50"        # one of ARCHS
    cifar_stem: bool = False      # 3x3 stem, no max-pool (small images)
    width: int = 32               # smallcnn base width
    dim: int = 128                # D (256 for Swin-T)
    hidden_dim: int = 2048        # projector / predictor hidden width
    n_groups: int = 3000          # K
    n_heads: int = 3              # H
    tau: float = 0.1
    group_grad: bool = False      # gradient through the (1-beta) mean term of the update
    drop_path: float = 0.0        # stochastic depth, online Swin only

    @classmethod
    def from_dict(cls, d: dict) -> "SMoGConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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
    rows = all(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() for x in xs)
    sizes = [x.shape[0] * x.shape[2] * x.shape[3] for x in xs]
    if rows:                                                                       # pixels as rows: free views
        y = bn(torch.cat([x.permute(0, 2, 3, 1).reshape(-1, C) for x in xs]).view(-1, C, 1, 1))
    else:                                                                          # (C, sum NHW)
        y = bn(torch.cat([x.transpose(0, 1).flatten(1) for x in xs], 1).view(1, C, -1, 1))
    if act is not None:
        y = act(y)          # on the BN output itself, not a view of it: an in-place ReLU costs no copy in backward
    # split, not slicing: its backward concatenates the gradients instead of zero-filling one tensor per piece
    if rows:                                                                       # (N, C, H, W) channels_last
        return [p.view(x.shape[0], x.shape[2], x.shape[3], C).permute(0, 3, 1, 2)
                for p, x in zip(y.view(-1, C).split(sizes), xs)]
    return [p.view(C, x.shape[0], x.shape[2], x.shape[3]).transpose(0, 1)
            for p, x in zip(y.view(C, -1).split(sizes, 1), xs)]


def forward_joint_bn(net: nn.Module, xs: list) -> list:
    """The backbone on a list of per-resolution batches: convolutions, pooling and activations per
    resolution, every BatchNorm joint over all of them (joint_bn, with the ReLU that follows it).
    torchvision ResNets and SmallCNN; -> pooled features [N_r, F] per resolution. Same layers and
    parameters as net(x)."""
    if isinstance(net, SmallCNN):                                                  # (conv, BN, ReLU) x 4
        layers = list(net.features)
        for conv, bn, relu in zip(layers[0::3], layers[1::3], layers[2::3]):
            xs = joint_bn(bn, _each(conv, xs), relu)
        return [x.mean(dim=(2, 3)) for x in xs]
    xs = _each(net.maxpool, joint_bn(net.bn1, _each(net.conv1, xs), net.relu))    # stem
    for block in [*net.layer1, *net.layer2, *net.layer3, *net.layer4]:
        convs = ["1", "2", "3"] if isinstance(block, tv_resnet.Bottleneck) else ["1", "2"]
        out = xs
        for i, k in enumerate(convs):                                              # last BN: no ReLU before +
            out = joint_bn(getattr(block, "bn" + k), _each(getattr(block, "conv" + k), out),
                           block.relu if i < len(convs) - 1 else None)
        skip = xs if block.downsample is None else joint_bn(block.downsample[1], _each(block.downsample[0], xs))
        xs = [block.relu(o + s) for o, s in zip(out, skip)]
    return [net.fc(torch.flatten(net.avgpool(x), 1)) for x in xs]


def joint_bn_capable(net: nn.Module) -> bool:
    """Backbones whose BatchNorms encode_crops runs jointly over crop sizes (Swin-T: per size, as released)."""
    return isinstance(net, (SmallCNN, tv_resnet.ResNet))


def encode_crops(net: nn.Module, crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """`net` on all crops -> outputs in crop order [sum B_c, F]; crops of one resolution are concatenated.
    One resolution, eval mode, or a backbone without joint BN (Swin-T): one net() call per resolution.
    Otherwise (training a ResNet / SmallCNN on several sizes) forward_joint_bn: one BN over all sizes."""
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


class SMoG(nn.Module):
    """Online backbone+projector+predictor, momentum backbone+projector, groups buffer [H, K, D]."""

    def __init__(self, cfg: SMoGConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone, feat = build_backbone(cfg.arch, cifar_stem=cfg.cifar_stem, drop_path=cfg.drop_path,
                                             width=cfg.width)
        self.feat_dim = feat
        swin = cfg.arch == "swin_t"
        self.projector = build_mlp(feat, cfg.hidden_dim, cfg.dim, last_bn=True, act=nn.GELU if swin else nn.ReLU)
        self.predictor = build_mlp(cfg.dim, cfg.hidden_dim, cfg.dim, last_bn=False)
        # released Swin path: heads run once per crop size, update/bank embeddings re-computed without
        # drop-path; Linear weights trunc-normal(0.02), biases 0, as in its backbone
        self.per_size_heads = swin
        if swin:
            for m in [*self.projector, *self.predictor]:
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
        # momentum copy: no drop-path, no predictor, no gradient
        self.momentum_backbone, _ = build_backbone(cfg.arch, cifar_stem=cfg.cifar_stem, width=cfg.width)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self._momentum_params():
            p.requires_grad_(False)
        self.reset_momentum()
        self.register_buffer("groups", F.normalize(torch.randn(cfg.n_heads, cfg.n_groups, cfg.dim), dim=-1))

    def _momentum_params(self):
        return [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]

    def _online_params(self):
        return [*self.backbone.parameters(), *self.projector.parameters()]

    @torch.no_grad()
    def momentum_step(self, m: float) -> None:
        """(M1) EMA of the momentum backbone+projector towards the online ones."""
        momentum_update_(self._momentum_params(), self._online_params(), m)

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """(M2) copy the online backbone+projector (parameters and BN buffers) into the momentum ones."""
        self.momentum_backbone.load_state_dict(self.backbone.state_dict())
        self.momentum_projector.load_state_dict(self.projector.state_dict())

    def _heads(self, mlp: nn.Module, x: torch.Tensor, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """mlp over [sum B_c, *] rows in crop order: at once (its BNs see all crops), or for Swin-T, as
        released, once per run of consecutive crops of one size (separate BN statistics per size)."""
        if not self.per_size_heads:
            return mlp(x)
        runs: list = []
        for c in crops:
            if runs and runs[-1][0] == c.shape[-2:]:
                runs[-1][1] += c.shape[0]
            else:
                runs.append([c.shape[-2:], c.shape[0]])
        return torch.cat([mlp(r) for r in x.split([n for _, n in runs])])

    def online_forward(self, crops: Sequence[torch.Tensor]) -> tuple:
        """-> (projector outputs z, predictor outputs p), both [sum B_c, D] in crop order, unnormalised."""
        z = self._heads(self.projector, encode_crops(self.backbone, crops), crops)
        return z, self._heads(self.predictor, z, crops)

    @torch.no_grad()
    def momentum_embed(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Momentum backbone+projector on every momentum crop (global first) -> [sum B_c, D], unnormalised.
        The local crops take part in the BN statistics (joint BN, projector BNs) but give no target.
        Swin-T runs each crop size on its own, so there the local crops could not change the targets and
        are skipped (they would only move the momentum network's running statistics, which nothing reads)."""
        if self.per_size_heads:
            crops = [c for c in crops if c.shape[-2:] == crops[0].shape[-2:]]
        return self._heads(self.momentum_projector, encode_crops(self.momentum_backbone, crops), crops)

    @torch.no_grad()
    def update_embed(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Online projector embeddings [2*B, D] of the two global crops (first in `crops`) for the group
        update and the memory bank, unnormalised, no gradient. ResNets: all crops forwarded (the BNs see
        them all, as in the loss forward). Swin-T, as released: the global crops re-embedded with drop-path
        off (BN batch statistics as in the loss forward, where the global crops form their own pass)."""
        if not self.per_size_heads:   # no predictor: its BN statistics move only in the loss forward
            return self.projector(encode_crops(self.backbone, crops))[:2 * crops[0].shape[0]]
        with drop_path_off(self.backbone):
            glob = list(crops[:2])
            return self._heads(self.projector, encode_crops(self.backbone, glob), glob)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised online projector embeddings [B, D] (fp32) of one batch, drop-path off: the memory bank."""
        with drop_path_off(self.backbone):
            return F.normalize(self.projector(self.backbone(x)).float(), dim=-1)

    @torch.no_grad()
    def regroup(self, bank: torch.Tensor, iters: int = 10, *, generator: Optional[torch.Generator] = None,
                all_reduce: Optional[Reduce] = None, broadcast: Optional[Reduce] = None) -> None:
        """bank [n_global, N, D] (this rank's shard): head h <- spherical k-means over bank[h mod n_global]."""
        for h in range(self.cfg.n_heads):
            c, _ = spherical_kmeans(bank[h % bank.shape[0]], self.cfg.n_groups, iters, generator=generator,
                                    all_reduce=all_reduce, broadcast=broadcast)
            self.groups[h].copy_(c)

    def backbone_state_dict(self) -> dict:
        """The online backbone in torchvision key names, without the classifier (see `export`)."""
        return {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}

    def forward(self, online_crops: Sequence[torch.Tensor], momentum_crops: Sequence[torch.Tensor], beta,
                *, all_reduce: Optional[Reduce] = None):
        """online_crops: C tensors [B, 3, h, w], the first two the global crops; momentum_crops: all crops
        of the other augmentation set, global first (targets from the J=2 global ones; the local crops
        take part in the momentum network's BN statistics, as released). Updates self.groups in place
        (all heads) and returns (loss, stats); stats tensors (no host sync): nonempty [H] fraction of groups
        hit by the targets, entropy [H] of the target assignment histogram (nats; ln K is uniform)."""
        C, J, B = len(online_crops), 2, online_crops[0].shape[0]
        zt = self.momentum_embed(momentum_crops)[:J * B]                   # (J*B, D) global crops only
        z, p = self.online_forward(online_crops)                            # (C*B, D) each
        if self.per_size_heads:   # released Swin: group update + bank from the drop-path-free re-embedding
            z = torch.cat([self.update_embed(online_crops), z[2 * B:].detach()])
        dev = z.device.type
        with torch.autocast(dev, enabled=False):                            # grouping and logits in fp32
            zt = F.normalize(zt.float(), dim=-1).view(J, B, -1)
            z = F.normalize(z.float(), dim=-1).view(C, B, -1)
            p = p.float().view(C, B, -1)
            loss, new_groups, targets = smog_multihead_step(self.groups, z, zt, p, beta, self.cfg.tau,
                                                            all_reduce=all_reduce, group_grad=self.cfg.group_grad)
            with torch.no_grad():
                self.groups.copy_(new_groups)
                stats = target_stats(targets, self.cfg.n_groups, all_reduce=all_reduce)
        return loss, stats


# ----------------------------------------------------------------------------------------------
# checkpoints: one file, all state, written atomically, loaded with weights_only=True


def save_atomic(obj, path: str) -> None:
    """torch.save to `path.tmp-<pid>`, fsync, then rename: at every instant `path` is complete or absent."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """torch.load(weights_only=True); a file that is not a torch checkpoint, or carries arbitrary
    pickled objects, raises ValueError with a one-line reason (nothing from the file is executed)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist; pass the path of a .pth file written by train.py "
                         f"or by `python -m smog export`")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError for truncated/non-zip files, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load {path!r} as a weights-only checkpoint ({first[:200]}); it is not a "
                         f"checkpoint of this project, is truncated, or holds objects that are refused for "
                         f"safety") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def export_backbone(checkpoint: str, out: str) -> dict:
    """Write the online backbone of a train.py checkpoint as a plain torchvision-style state_dict."""
    ck = load_checkpoint(checkpoint)
    if "model" not in ck:
        raise ValueError(f"{checkpoint!r} is not a train.py checkpoint (no 'model' entry)")
    sd = {k[len("backbone."):]: v for k, v in ck["model"].items() if k.startswith("backbone.")}
    save_atomic(sd, out)
    return sd


def _main(argv: Sequence[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m smog", description="SMoG utilities.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write the online backbone of a train.py checkpoint as a plain state_dict: "
                                       "resnet18/34/50 and wide_resnet50_2 load into torchvision's model "
                                       "(strict=False; only the classifier is missing), resnet50w2 and "
                                       "swin_t into smog.build_backbone(name)[0] (strict=True)")
    ex.add_argument("checkpoint")
    ex.add_argument("out")
    args = ap.parse_args(argv)
    try:
        sd = export_backbone(args.checkpoint, args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(sd)} tensors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
