"""SMoG: Synchronous Momentum Grouping (Pang et al., ECCV 2022), the method in one module.

Each image is contrasted against H heads of K momentum-updated *group features* (unit vectors)
instead of against other images. Every iteration, for every head:
  1. targets t = argmax_k <z', c_k> from the momentum network, with the groups *before* the update
  2. synchronous update: c_k <- normalise(beta c_k + (1 - beta) mean_{i: a_i = k} z_i), sums and
     counts reduced over all ranks before dividing, so every rank holds identical groups
  3. loss: cross-entropy of <p, c_k> / tau (the updated groups) against every target, every crop.
Every epoch the groups are re-clustered with spherical k-means over a memory bank of embeddings.

Read top to bottom: the reduction the update needs -> assignment, update, logits, the loss ->
one iteration of one head, of all heads -> the regroup (spherical k-means), EMA, beta schedule ->
projector and predictor -> SMoGConfig -> Backbone (the backbone, handed in) -> SMoG, SwinSMoG.
It imports torch and the standard library only: copy it alone into another code base. The
functions take plain tensors and an optional `all_reduce`; with no process group they run in one
process. Ids such as (G2) point into spec/*.md; METHOD.md explains
the method and the recipe. Shapes: B batch, C online crops, J momentum crops that give targets,
H heads, K groups, D embedding dimension.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from dataclasses import dataclass, fields
from typing import Callable, ContextManager, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

Reduce = Callable[[torch.Tensor], torch.Tensor]  # returns the SUM over ranks (use the return value)


# ------------------------------------------------------------------------------------------------
# the reduction: a no-op without a process group, so the same code runs in a test, on a laptop and
# on 64 GPUs


def dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _functional_all_reduce_has_autograd() -> bool:
    """Whether torch's functional all_reduce is differentiable (an Autograd kernel registered for
    `_c10d_functional::all_reduce`); where it is, torch.distributed.nn.functional.all_reduce is
    deprecated."""
    try:
        import torch.distributed._functional_collectives  # noqa: F401  (registers the kernels)

        return torch._C._dispatch_has_kernel_for_dispatch_key(
            "_c10d_functional::all_reduce", "Autograd"
        )
    except (ImportError, AttributeError, RuntimeError):
        return False


# the current API where the installed torch has it (no deprecation warning), the older one otherwise
# (torch >= 2.4); set once at import, tests flip it to run the other branch
FUNCTIONAL_ALL_REDUCE = _functional_all_reduce_has_autograd()


def differentiable_all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over the ranks of the default group, as a new tensor; its backward sums the
    gradient over ranks. The same reduction (gloo / NCCL all-reduce) on either branch."""
    if FUNCTIONAL_ALL_REDUCE:
        import torch.distributed._functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_reduce(t, "sum", dist.group.WORLD))
    import torch.distributed.nn.functional as dnn

    return dnn.all_reduce(t)


def _dist_sum(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad:  # group_grad=True: differentiable all-reduce (backward all-reduces grads)
        return differentiable_all_reduce(t)
    dist.all_reduce(t)
    return t


def _dist_broadcast(t: torch.Tensor) -> torch.Tensor:
    dist.broadcast(t, src=0)
    return t


def _resolve(fn: Optional[Reduce], dist_fn: Reduce) -> Reduce:
    if fn is not None:
        return fn
    return dist_fn if dist_ready() else (lambda t: t)  # one process: nothing to reduce


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """At least float32 (bf16/fp16 inputs are promoted), float64 stays float64 (G11, L8)."""
    return torch.promote_types(t.dtype, torch.float32)


# ------------------------------------------------------------------------------------------------
# assignment, synchronous update, logits, loss (spec/grouping.md, spec/loss.md)


def assign_groups(z: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(G1) a_i = argmax_k <z_i/||z_i||, c_k>; z [N, D], groups [K, D] unit rows -> [N] long.
    Ties between exactly equal scores go to the lowest index (torch.argmax returns the first
    maximum); two identical group rows may still score a last-bit apart in a matmul."""
    dt = compute_dtype(groups)
    return (F.normalize(z.to(dt), dim=-1) @ groups.to(dt).T).argmax(dim=-1)


def update_groups(
    groups: torch.Tensor,
    z: torch.Tensor,
    assign: torch.Tensor,
    beta,
    *,
    all_reduce: Optional[Reduce] = None,
) -> torch.Tensor:
    """(G2) synchronous momentum update; groups [K, D], z [N, D], assign [N] -> new groups [K, D].

    For every group with n_k > 0 members over all ranks:
        c_k <- normalise(beta * c_k + (1 - beta) * (1/n_k) sum_{i: a_i = k} z_i / ||z_i||)
    Groups without members are returned unchanged. Per-group sums and counts travel in one
    [K, D+1] tensor through `all_reduce` (SUM) *before* dividing (G5): averaging per-rank means
    would weight ranks instead of samples. Inputs are not modified. No host-device sync.
    """
    reduce = _resolve(all_reduce, _dist_sum)
    K, D = groups.shape
    dt = compute_dtype(groups)
    zn = F.normalize(z.to(dt), dim=-1)  # (N, D)
    ones = torch.ones(zn.shape[0], 1, dtype=dt, device=zn.device)
    stats = torch.zeros(K, D + 1, dtype=dt, device=zn.device)
    stats = reduce(stats.index_add(0, assign, torch.cat([zn, ones], 1)))  # (K, D+1) sums|counts
    sums, counts = stats[:, :D], stats[:, D:]
    mean = sums / counts.clamp_min(1)
    g = groups.to(dt)
    new = F.normalize(beta * g + (1 - beta) * mean, dim=-1)
    return torch.where(counts > 0, new, g).to(groups.dtype)


def group_logits(p: torch.Tensor, groups: torch.Tensor, tau: float) -> torch.Tensor:
    """(L1) logits_ik = <p_i/||p_i||, c_k> / tau; p [N, D], groups [K, D] -> [N, K]."""
    dt = compute_dtype(groups)
    return F.normalize(p.to(dt), dim=-1) @ groups.to(dt).T / tau


def smog_loss(
    p: torch.Tensor, groups: torch.Tensor, targets: torch.Tensor, tau: float
) -> torch.Tensor:
    """(L1) mean cross-entropy of group_logits(p) against integer targets [N]: the single-target
    form spec/loss.md states. Training uses multi_target_loss, its mean over crops and targets."""
    return F.cross_entropy(group_logits(p, groups, tau), targets)


def multi_target_loss(
    p: torch.Tensor, groups: torch.Tensor, targets: torch.Tensor, tau: float
) -> torch.Tensor:
    """(S2) the loss that trains: every online prediction against every target; p [C, B, D],
    groups [K, D], targets [J, B] -> mean over (c, j, b) of CE(group_logits(p[c]), targets[j])."""
    C, B, D = p.shape
    J = targets.shape[0]
    logp = group_logits(p.reshape(C * B, D), groups, tau).log_softmax(-1).view(C, B, -1)  # (C,B,K)
    return -logp.gather(2, targets.T.unsqueeze(0).expand(C, B, J)).mean()  # (C,B,J)


# ------------------------------------------------------------------------------------------------
# one iteration: targets, then the update, then the loss; of one head, of all heads


def targets_and_update(
    groups: torch.Tensor,
    z: torch.Tensor,
    z_target: torch.Tensor,
    beta,
    *,
    all_reduce: Optional[Reduce] = None,
    group_grad: bool = False,
) -> tuple:
    """Targets, then the update, for all H heads: groups [H, K, D]; z [C, B, D] online projector
    embeddings (the two global crops first); z_target [J, B, D] momentum embeddings
    -> (new groups [H, K, D], targets [H, J, B]).
      (S1, H3) head h's targets and its update's assignment use its groups *before* the update
      (H2) head h updates from the global crop h mod 2, z[h % 2]
      (H4) the incoming groups never receive gradient; assignments carry none
    group_grad=False: the new groups are detached (released code); True: gradient reaches z
    through the (1 - beta) mean term. SMoG.forward (via smog_multihead_step) and train.py's
    gradient accumulation both call this, so the order of the steps is written once."""
    J, B, D = z_target.shape
    g0 = groups.detach()
    new, targets = [], []
    for h in range(groups.shape[0]):
        targets.append(assign_groups(z_target.reshape(J * B, D), g0[h]).view(J, B))
        z_update = z[h % 2] if group_grad else z[h % 2].detach()
        a = assign_groups(z_update.detach(), g0[h])
        g = update_groups(g0[h], z_update, a, beta, all_reduce=all_reduce)
        new.append(g if group_grad else g.detach())
    return torch.stack(new), torch.stack(targets)


def smog_step(
    groups: torch.Tensor,
    z_update: torch.Tensor,
    z_target: torch.Tensor,
    p: torch.Tensor,
    beta,
    tau: float,
    *,
    all_reduce: Optional[Reduce] = None,
    group_grad: bool = False,
):
    """One head's iteration (spec/step.md): groups [K, D]; z_update [B, D] online projector
    embedding of one global crop; z_target [J, B, D]; p [C, B, D] online predictions.
    -> (loss [], new_groups [K, D], targets [J, B]). (S2) The loss uses the updated groups."""
    new, targets = targets_and_update(
        groups[None], z_update[None], z_target, beta, all_reduce=all_reduce, group_grad=group_grad
    )
    return multi_target_loss(p, new[0], targets[0], tau), new[0], targets[0]


def smog_multihead_step(
    groups: torch.Tensor,
    z: torch.Tensor,
    z_target: torch.Tensor,
    p: torch.Tensor,
    beta,
    tau: float,
    *,
    all_reduce: Optional[Reduce] = None,
    group_grad: bool = False,
):
    """One iteration of all H heads (spec/heads.md): targets_and_update, then (H1) the loss, the
    mean over heads of each head's multi_target_loss with its new groups. z [C, B, D] with C >= 2,
    p [C, B, D]. -> (loss [], new_groups [H, K, D], targets [H, J, B]). The caller copies
    new_groups into its buffer after all heads are done (H5, S7)."""
    if z.shape[0] < 2:
        raise ValueError(
            f"smog_multihead_step: z holds {z.shape[0]} online crop(s); head h "
            f"updates from global crop h mod 2, so pass at least the 2 global crops"
        )
    new, targets = targets_and_update(
        groups, z, z_target, beta, all_reduce=all_reduce, group_grad=group_grad
    )
    losses = [multi_target_loss(p, new[h], targets[h], tau) for h in range(new.shape[0])]
    return torch.stack(losses).mean(), new, targets


@torch.no_grad()
def target_stats(
    targets: Sequence[torch.Tensor], K: int, *, all_reduce: Optional[Reduce] = None
) -> dict:
    """Collapse monitor from the targets of all heads (targets[h] integer [J, B]), no host sync:
    nonempty [H] fraction of groups hit, entropy [H] of the global target histogram (nats; ln K is
    uniform). The per-group counts are summed over ranks before anything is derived from them."""
    hits = torch.stack(
        [
            torch.zeros(K, device=t.device).index_add_(
                0, t.flatten(), torch.ones(t.numel(), device=t.device)
            )
            for t in targets
        ]
    )
    counts = _resolve(all_reduce, _dist_sum)(hits)  # (H, K)
    prob = counts / counts.sum(1, keepdim=True)
    return {
        "nonempty": (counts > 0).float().mean(1),
        "entropy": -(prob * prob.clamp_min(1e-12).log()).sum(1),
    }


# ------------------------------------------------------------------------------------------------
# regrouping, EMA, schedule (spec/kmeans.md, spec/run.md, spec/momentum.md)


def _nearest(x: torch.Tensor, c: torch.Tensor, chunk_elems: Optional[int] = None) -> torch.Tensor:
    """argmax_k <x_i, c_k> in row chunks so the [N, K] score matrix never exists whole. Default
    chunk: 2M scores (8 MB fp32) on the CPU, under glibc's mmap threshold, so the buffer is reused
    instead of page-faulted in afresh for every chunk (-30% k-means time); 64M on a GPU."""
    if chunk_elems is None:
        chunk_elems = 1 << 21 if x.device.type == "cpu" else 1 << 26
    step = max(1, chunk_elems // max(1, c.shape[0]))
    if not len(x):
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.cat([(xc @ c.T).argmax(1) for xc in x.split(step)])


def spherical_kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 10,
    *,
    generator: Optional[torch.Generator] = None,
    all_reduce: Optional[Reduce] = None,
    broadcast: Optional[Reduce] = None,
    init: Optional[torch.Tensor] = None,
):
    """Distributed spherical k-means; x [N, D] (this rank's rows) -> (centres [k, D], assign [N]).

    (K1, K11) init: k distinct rows of rank 0, randperm(N_0, generator)[:k], broadcast to all ranks
         (or `init` [k, D] if given, normalised). (K2) E-step: argmax of the dot product.
    (K3) M-step: normalised mean of members with sums and counts reduced over ranks; empty
         clusters keep their centre. iters=0 returns the initial centres.
    """
    reduce = _resolve(all_reduce, _dist_sum)
    bcast = _resolve(broadcast, _dist_broadcast)
    dt = compute_dtype(x)
    x = F.normalize(x.to(dt), dim=-1)
    N, D = x.shape
    n_total = int(reduce(torch.tensor([float(N)], dtype=torch.float64, device=x.device)).item())
    if n_total < k:
        raise ValueError(
            f"spherical_kmeans: {n_total} rows across all ranks but k={k} clusters; "
            f"use fewer groups or more data"
        )
    if init is not None:
        c = F.normalize(init.to(device=x.device, dtype=dt), dim=-1)
    else:
        n0 = int(bcast(torch.tensor([float(N)], dtype=torch.float64, device=x.device)).item())
        if n0 < k:
            raise ValueError(
                f"spherical_kmeans: rank 0 holds {n0} rows but k={k}; initial centres "
                f"are drawn from rank 0's rows, give it at least k rows"
            )
        c = torch.zeros(k, D, dtype=dt, device=x.device)
        if N >= k:
            gen_device = generator.device if generator else "cpu"
            idx = torch.randperm(N, generator=generator, device=gen_device)[:k]
            c = x[idx.to(x.device)]
        c = bcast(c.contiguous())
    ones = torch.ones(N, 1, dtype=dt, device=x.device)
    for _ in range(iters):
        a = _nearest(x, c)  # (K2)
        stats = torch.zeros(k, D + 1, dtype=dt, device=x.device)
        stats = reduce(stats.index_add(0, a, torch.cat([x, ones], 1)))
        c = torch.where(stats[:, D:] > 0, F.normalize(stats[:, :D], dim=-1), c)  # (K3)
    return c, _nearest(x, c)


def initial_indices(
    n: int, n_heads: int, k: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """(R3, R5) the dataset indices whose bank rows start each head's k-means -> [H, k] long: for
    h = 0, 1, ... in turn, randperm(n, generator)[:k] from the one generator, so every head starts
    from its own k distinct rows (heads 0 and 2 cluster the same bank row from different starts).
    A function of the generator and n only, not of how the bank is sharded over ranks."""
    return torch.stack([torch.randperm(n, generator=generator)[:k] for _ in range(n_heads)])


@torch.no_grad()
def regroup(
    bank: torch.Tensor,
    index: torch.Tensor,
    n: int,
    n_heads: int,
    k: int,
    iters: int = 10,
    *,
    generator: Optional[torch.Generator] = None,
    init_index: Optional[torch.Tensor] = None,
    all_reduce: Optional[Reduce] = None,
) -> torch.Tensor:
    """The regroup at the start of an epoch, all heads, from a memory bank sharded over ranks.
    bank [2, N_r, D]: this rank's rows (row j: embeddings of online global crop j); index [N_r]:
    their dataset indices (the ranks together hold 0 .. n-1 once each) -> groups [H, k, D].
      (R1) head h <- spherical_kmeans over bank row h mod 2
      (R2) from the bank rows of init_index[h] (R3: default initial_indices(n, H, k, generator))
      (R4) each initial row is gathered from the one rank that holds it (summed with zeros: exact),
           so every rank gets the groups that one process holding the whole bank would."""
    reduce = _resolve(all_reduce, _dist_sum)
    if init_index is None:
        init_index = initial_indices(n, n_heads, k, generator)
    row_of = torch.full((n,), -1, dtype=torch.long)  # dataset index -> local row
    row_of[index.cpu()] = torch.arange(len(index))
    groups = []
    for h in range(n_heads):
        x = bank[h % 2]  # (N_r, D)
        pos = row_of[init_index[h].cpu()].to(x.device)  # (k,) -1: another rank's
        init = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
        init[pos >= 0] = x[pos[pos >= 0]]
        c, _ = spherical_kmeans(x, k, iters, all_reduce=all_reduce, init=reduce(init))
        groups.append(c)
    return torch.stack(groups)


@torch.no_grad()
def momentum_update_(
    target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], m: float
) -> None:
    """(M1) theta_k <- m theta_k + (1 - m) theta_q, in place, foreach kernels over all tensors."""
    target, online = list(target), list(online)
    torch._foreach_mul_(target, m)
    torch._foreach_add_(target, online, alpha=1 - m)


def beta_schedule(beta_start: float, beta_end: float, total_steps: int) -> torch.Tensor:
    """(M3) linear per-iteration schedule, float64 [total_steps], exact at both ends."""
    s = torch.linspace(beta_start, beta_end, total_steps, dtype=torch.float64)
    if total_steps > 1:
        s[0], s[-1] = beta_start, beta_end
    return s


# ------------------------------------------------------------------------------------------------
# the model


def build_mlp(d_in: int, d_hidden: int, d_out: int, *, last_bn: bool, act=nn.ReLU) -> nn.Sequential:
    """Projector / predictor: Linear -> BN -> act -> Linear (-> BN without affine, for the
    projector); every Linear with a bias."""
    layers = [
        nn.Linear(d_in, d_hidden),
        nn.BatchNorm1d(d_hidden),
        act(),
        nn.Linear(d_hidden, d_out),
    ]
    if last_bn:
        layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


@dataclass
class SMoGConfig:
    """Model hyperparameters; defaults: the released ResNet-50 ImageNet recipe. SMoG never reads
    arch, cifar_stem, width, drop_path: train.py's builder does (smog_train/backbones.py)."""

    arch: str = "resnet50"  # smallcnn, resnet18/34/50, resnet50w2, wide_resnet50_2, swin_t
    cifar_stem: bool = False  # 3x3 stem, no max-pool (small images)
    width: int = 32  # smallcnn base width
    dim: int = 128  # D (256 for Swin-T)
    hidden_dim: int = 2048  # projector / predictor hidden width
    n_groups: int = 3000  # K
    n_heads: int = 3  # H
    tau: float = 0.1
    group_grad: bool = False  # gradient through the (1-beta) mean term of the update
    drop_path: float = 0.0  # stochastic depth, online Swin only

    @classmethod
    def from_dict(cls, d: dict) -> "SMoGConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def size_runs(crops: Sequence[torch.Tensor]) -> list:
    """The crops cut into runs of consecutive crops of one size: [[crop, ...], ...], in order."""
    return [list(run) for _, run in itertools.groupby(crops, key=lambda c: c.shape[-2:])]


class Backbone:
    """The backbone side of SMoG: builds the two backbones, runs crops through them. This default
    serves any torchvision-style module mapping images [B, 3, h, w] to features [B, feat_dim] (a
    torchvision ResNet with fc = nn.Identity(), say): `make()` is called twice, as MoCo v3 calls
    its base_encoder (the online backbone, then the momentum one, whose weights SMoG copies from
    the online one); crops go in one call per run of consecutive crops of one size; no drop-path.
    smog_train/backbones.py subclasses it for the released networks (one BatchNorm across crop
    sizes for the ResNets, as released; drop-path for Swin-T)."""

    def __init__(self, make: Callable[[], nn.Module], feat_dim: int):
        self.make, self.feat_dim = make, feat_dim

    def build(self, momentum: bool) -> nn.Module:
        """A new backbone; momentum=True: the momentum one, which must have no drop-path."""
        return self.make()

    def encode(self, net: nn.Module, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """`net` on every crop -> features [sum B_c, feat_dim] in crop order."""
        return torch.cat([net(torch.cat(run)) for run in size_runs(crops)])

    def drop_path_off(self, net: nn.Module) -> ContextManager:
        """A context in which `net` runs without drop-path (stochastic depth), all else as is."""
        return contextlib.nullcontext()


class SMoG(nn.Module):
    """Online backbone + projector + predictor, momentum backbone + projector, groups [H, K, D].
    `backbone` (a Backbone) builds both backbones and runs crops of several sizes through them.
    This class is the ResNet recipe; SwinSMoG overrides where the released Swin-T differs."""

    def __init__(self, backbone: Backbone, cfg: SMoGConfig):
        super().__init__()
        self.cfg, self.backbone_side, self.feat_dim = cfg, backbone, backbone.feat_dim
        self.backbone = backbone.build(momentum=False)
        self.projector, self.predictor = self.build_heads(backbone.feat_dim)
        # momentum copy: no drop-path, no predictor, no gradient; its weights reset to the online
        self.momentum_backbone = backbone.build(momentum=True)
        if self.momentum_backbone is self.backbone:
            raise ValueError(
                "SMoG: Backbone.build returned the online backbone again; let make() "
                "build a new module on every call"
            )
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self._momentum_params():
            p.requires_grad_(False)
        self.reset_momentum()
        groups = F.normalize(torch.randn(cfg.n_heads, cfg.n_groups, cfg.dim), dim=-1)
        self.register_buffer("groups", groups)

    def build_heads(self, feat_dim: int, act=nn.ReLU) -> tuple:
        """-> (projector with `act`, predictor with ReLU), PyTorch's default initialisation."""
        cfg = self.cfg
        return (
            build_mlp(feat_dim, cfg.hidden_dim, cfg.dim, last_bn=True, act=act),
            build_mlp(cfg.dim, cfg.hidden_dim, cfg.dim, last_bn=False),
        )

    def _momentum_params(self):
        return [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]

    def _online_params(self):
        return [*self.backbone.parameters(), *self.projector.parameters()]

    @torch.no_grad()
    def momentum_step(self, m: float) -> None:
        """(M1) EMA of the momentum backbone + projector towards the online ones."""
        momentum_update_(self._momentum_params(), self._online_params(), m)

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """(M2) copy the online backbone + projector (parameters, BN buffers) to the momentum."""
        self.momentum_backbone.load_state_dict(self.backbone.state_dict())
        self.momentum_projector.load_state_dict(self.projector.state_dict())

    def _mlp(self, mlp: nn.Module, x: torch.Tensor, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """mlp on rows [sum B_c, *] in crop order, all at once: its BNs see all crops."""
        return mlp(x)

    def online_forward(self, crops: Sequence[torch.Tensor]) -> tuple:
        """-> (projector outputs z, predictor outputs p), both [sum B_c, D] in crop order."""
        z = self._mlp(self.projector, self.backbone_side.encode(self.backbone, crops), crops)
        return z, self._mlp(self.predictor, z, crops)

    @torch.no_grad()
    def momentum_embed(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """Momentum backbone + projector on every momentum crop (global first) -> [sum B_c, D].
        The local crops take part in the BN statistics (joint BN, projector BNs) but give no
        target."""
        feats = self.backbone_side.encode(self.momentum_backbone, crops)
        return self._mlp(self.momentum_projector, feats, crops)

    def update_embed(self, crops: Sequence[torch.Tensor], grad: bool = False) -> torch.Tensor:
        """Online projector embeddings [2*B, D] of the two global crops (first in `crops`), without
        gradient unless `grad`: the update and the bank under gradient accumulation. All crops are
        forwarded (the BNs see them all, as in the loss forward); no predictor: its BN statistics
        move only in the loss forward."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            feats = self.backbone_side.encode(self.backbone, crops)
            return self.projector(feats)[: 2 * crops[0].shape[0]]

    def update_features(self, crops: Sequence[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """The embeddings [sum B_c, D] that update the groups and fill the bank: z of the loss."""
        return z

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised online projector embeddings [B, D] (fp32) of one batch, drop-path off: what
        fills the memory bank at the start of a run."""
        with self.backbone_side.drop_path_off(self.backbone):
            return F.normalize(self.projector(self.backbone(x)).float(), dim=-1)

    def forward(
        self,
        online_crops: Sequence[torch.Tensor],
        momentum_crops: Sequence[torch.Tensor],
        beta,
        *,
        all_reduce: Optional[Reduce] = None,
    ):
        """One SMoG iteration. online_crops: C tensors [B, 3, h, w], the two global crops first;
        momentum_crops: the crops of the other augmentation set, global first (targets from its
        J = 2 global crops; its local crops only take part in BN statistics, as released).
        Updates self.groups in place (all heads) and returns
          loss [], stats {nonempty [H], entropy [H]} (tensors, no host sync),
          bank [2, B, D]: the normalised, detached embeddings of the two global crops that the
                          update used, for the memory bank."""
        C, J, B = len(online_crops), 2, online_crops[0].shape[0]
        zt = self.momentum_embed(momentum_crops)[: J * B]  # (J*B, D) global only
        z, p = self.online_forward(online_crops)  # (C*B, D) each
        z = self.update_features(online_crops, z)
        with torch.autocast(z.device.type, enabled=False):  # grouping in fp32
            bank = F.normalize(z[: 2 * B].detach().float(), dim=-1).view(2, B, -1)
            zt = F.normalize(zt.float(), dim=-1).view(J, B, -1)
            z = F.normalize(z.float(), dim=-1).view(C, B, -1)
            p = p.float().view(C, B, -1)
            loss, new_groups, targets = smog_multihead_step(
                self.groups,
                z,
                zt,
                p,
                beta,
                self.cfg.tau,
                all_reduce=all_reduce,
                group_grad=self.cfg.group_grad,
            )
            with torch.no_grad():
                self.groups.copy_(new_groups)
                stats = target_stats(targets, self.cfg.n_groups, all_reduce=all_reduce)
        return loss, stats, bank


class SwinSMoG(SMoG):
    """SMoG as released for Swin-T: the projector with GELU, every projector and predictor Linear
    trunc-normal(0.02) with zero bias; projector and predictor once per crop size (BN statistics
    per size, as the backbone runs); the momentum network on the global crops only; the update
    and the bank from the online global crops re-embedded with drop-path off."""

    def build_heads(self, feat_dim: int, act=nn.GELU) -> tuple:
        heads = super().build_heads(feat_dim, act)
        for m in [*heads[0], *heads[1]]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        return heads

    def _mlp(self, mlp: nn.Module, x: torch.Tensor, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """mlp once per run of consecutive crops of one size, as released."""
        rows = [sum(c.shape[0] for c in run) for run in size_runs(crops)]
        return torch.cat([mlp(r) for r in x.split(rows)])

    @torch.no_grad()
    def momentum_embed(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """The global momentum crops only: each size runs on its own here, so the local crops
        could not change the targets (they would only move running statistics nothing reads)."""
        return super().momentum_embed([c for c in crops if c.shape[-2:] == crops[0].shape[-2:]])

    def update_embed(self, crops: Sequence[torch.Tensor], grad: bool = False) -> torch.Tensor:
        """The two online global crops re-embedded with drop-path off (BNs in training mode)."""
        glob = list(crops[:2])
        with (
            torch.set_grad_enabled(grad and torch.is_grad_enabled()),
            self.backbone_side.drop_path_off(self.backbone),
        ):
            return self._mlp(self.projector, self.backbone_side.encode(self.backbone, glob), glob)

    def update_features(self, crops: Sequence[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """The global crops' rows from update_embed (with gradient under group_grad: then the only
        place the update's features come from), the local crops' rows detached."""
        zu = self.update_embed(crops, grad=self.cfg.group_grad)
        return torch.cat([zu, z[2 * crops[0].shape[0] :].detach()])
