"""`python -m smog_train.export` round trip: a train.py checkpoint's online backbone becomes a plain
state_dict that torchvision.models.<arch>() loads with strict=False, missing exactly the classification
head (the released resnet50w2 and Swin-T are not torchvision networks: a fresh backbones.build_backbone takes
it with strict=True), and that computes the same features as the SMoG backbone."""

import subprocess
import sys

import pytest
import torch
import torchvision.models as tvm

import smog
from smog_train import backbones, export

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
HEADS = {"resnet18": "fc", "resnet50": "fc", "wide_resnet50_2": "fc"}  # torchvision's own networks
RELEASED = (
    "resnet50w2",
    "swin_t",
)  # the released networks (not in torchvision): load into backbones.build_backbone


def _scramble_(module: torch.nn.Module, seed: int) -> None:
    """Make every tensor distinctive: fresh BN weights are all 1 and fresh BN statistics are 0/1, so
    an untouched model could not tell swapped or dropped weights apart."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            else:
                t.add_(0.05 * torch.randn(t.shape, generator=g))
                if t.dim() == 1 and name.endswith("weight"):  # norm-layer scales away from 0
                    t.add_(0.5)


def _train_checkpoint(arch: str, path) -> smog.SMoG:
    """A checkpoint in train.py's real format: the SMoG module's full state_dict plus its config."""
    cfg = smog.SMoGConfig(arch=arch, dim=16, hidden_dim=32, n_groups=8, n_heads=1)
    model = backbones.build_smog(cfg)
    _scramble_(model.backbone, seed=1)
    from dataclasses import asdict

    torch.save(
        {
            "format": "smog-train-v2",
            "model": model.state_dict(),
            "config": {"model": asdict(cfg), "data": "demo", "image_size": 32},
        },
        path,
    )
    return model


@pytest.mark.parametrize(
    "arch", ["resnet18", "resnet50", "wide_resnet50_2", "resnet50w2", "swin_t"]
)
def test_export_roundtrip_torchvision(arch, tmp_path):
    ck, out = tmp_path / "checkpoint.pth", tmp_path / "backbone.pth"
    model = _train_checkpoint(arch, ck)
    assert export.main([str(ck), str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    if arch in RELEASED:  # a fresh network of the same build takes every tensor, nothing missing
        tv, head = backbones.build_backbone(arch)[0], "no-head"
        res = tv.load_state_dict(sd, strict=True)
        assert res.missing_keys == [] and res.unexpected_keys == []
    else:
        tv = getattr(tvm, arch)()
        res = tv.load_state_dict(sd, strict=False)
        head = HEADS[arch]
        assert sorted(res.missing_keys) == [f"{head}.bias", f"{head}.weight"]
        assert res.unexpected_keys == []
    # every non-head tensor came from the online backbone (not the momentum copy, not a fresh init)
    for k, v in tv.state_dict().items():
        if not k.startswith(head + "."):
            assert torch.equal(v, model.backbone.state_dict()[k]), k
    tv.eval()
    model.backbone.eval()
    x = torch.randn(
        2, 3, 32, 32, generator=torch.Generator().manual_seed(0)
    )  # small input: CI time
    with torch.no_grad():
        feats = model.backbone(x)  # (2, F) pooled
        if arch not in RELEASED:
            setattr(tv, head, torch.nn.Identity())  # torchvision's pooled features
        got = tv(x)
    assert feats.abs().mean() > 1e-3 and (feats[0] - feats[1]).abs().mean() > 1e-4  # not degenerate
    torch.testing.assert_close(got, feats, rtol=1e-4, atol=1e-5)


def test_export_cli_errors(tmp_path):
    """The documented command; a file that is not a train.py checkpoint gets one line and exit code 2."""
    bad = tmp_path / "notes.txt"
    bad.write_text("not a checkpoint")
    out = tmp_path / "out.pth"
    r = subprocess.run(
        [sys.executable, "-m", "smog_train.export", str(bad), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr and not out.exists()
    flat = tmp_path / "flat.pth"
    torch.save(
        {"conv1.weight": torch.zeros(1)}, flat
    )  # an exported backbone, not a train checkpoint
    r = subprocess.run(
        [sys.executable, "-m", "smog_train.export", str(flat), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "not a train.py checkpoint" in r.stderr and not out.exists()
