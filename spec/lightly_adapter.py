"""Lightly's SMoG in the spec protocol: a translation, not a fix.

Run with:  pip install -e ".[peers]"  &&  python -m spec --impl spec.lightly_adapter

What is translated (lightly 1.6.0):
- `lightly.models.modules.heads.SMoGPrototypes`: `assign_groups`, `get_updated_group_features`,
  `forward` (the logits) and `set_group_features`;
- `lightly.models.utils.update_momentum`, the EMA of the momentum network;
- the way Lightly's own SMoG example composes them in one training step (examples/pytorch/smog.py in
  the lightly repository, also shipped as examples/notebooks/pytorch/smog.ipynb):

      assignments = model.smog.assign_groups(x1_encoded)               # momentum embeddings -> targets
      group_features = model.smog.get_updated_group_features(x0_encoded)   # online projector embeddings
      logits = model.smog(x0_predicted, group_features, temperature=0.1)
      model.smog.set_group_features(group_features)
      loss = criterion(logits, assignments)                             # nn.CrossEntropyLoss()

Only the interface is adapted: the protocol passes the groups in and wants them back (the example keeps
them in the module), `update_groups` receives the assignment from the caller (Lightly's method
computes it from the same groups with its own `assign_groups`, so the instance's `assign_groups` is
pointed at the given assignment), and the step averages the example's one (crop, target) loss over
the protocol's C x J pairs. Nothing Lightly computes is changed: no normalisation added, nothing
detached that Lightly keeps attached, no reduction over ranks (Lightly's prototypes have none, so
`all_reduce` is accepted and unused), and `group_grad` has no counterpart (the example never detaches
`x0_encoded`, so gradient always flows through the update).

Not provided, so reported as "not implemented": `spherical_kmeans` (the example re-clusters its memory
bank with scikit-learn's Euclidean `KMeans`, which is not part of lightly), `beta_schedule` (the
example keeps beta = 0.99 constant) and `smog_multihead_step` (the example trains one head).
"""

from __future__ import annotations

import torch
from lightly.models import utils
from lightly.models.modules.heads import SMoGPrototypes
from torch import nn


def _prototypes(groups, beta=0.0):
    """The example's `model.smog`, holding `groups` as its group features."""
    return SMoGPrototypes(group_features=groups.detach(), beta=beta)


def assign_groups(z, groups):
    return _prototypes(groups).assign_groups(z)


def update_groups(groups, z, assign, beta, *, all_reduce=None):
    smog = _prototypes(groups, beta)
    smog.assign_groups = lambda x: (
        assign
    )  # the caller's assignment instead of the one Lightly would compute
    return smog.get_updated_group_features(z)


def group_logits(p, groups, tau):
    return _prototypes(groups)(p, groups, temperature=tau)


def smog_loss(p, groups, targets, tau):
    return nn.CrossEntropyLoss()(group_logits(p, groups, tau), targets)


def smog_step(groups, z_update, z_target, p, beta, tau, *, all_reduce=None, group_grad=False):
    smog = _prototypes(groups, beta)
    criterion = nn.CrossEntropyLoss()
    targets = torch.stack([smog.assign_groups(z_target[j]) for j in range(z_target.shape[0])])
    group_features = smog.get_updated_group_features(z_update)
    losses = [
        criterion(smog(p[c], group_features, temperature=tau), targets[j])
        for c in range(p.shape[0])
        for j in range(z_target.shape[0])
    ]
    smog.set_group_features(group_features)
    return torch.stack(losses).mean(), smog.group_features.detach(), targets


def _module(tensors):
    """A module whose parameters are exactly these tensor objects (update_momentum walks .parameters())."""
    m = nn.Module()
    for i, t in enumerate(tensors):
        m.register_parameter(f"p{i}", t)
    return m


def momentum_update_(target, online, m):
    utils.update_momentum(_module(online), _module(target), m)
