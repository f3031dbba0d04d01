"""smog.py is one file that can be copied alone into another code base: it imports torch and the
standard library only, a copy of it trains a toy backbone with the project's packages and
torchvision made unimportable, the default Backbone runs one call per run of same-size crops, and
SMoG's methods never ask which architecture they serve (SwinSMoG overrides them instead)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

import pytest
import torch

import smog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOG_PY = os.path.join(ROOT, "smog.py")


def _tree() -> ast.Module:
    with open(SMOG_PY, encoding="utf-8") as fh:
        return ast.parse(fh.read())


def test_imports_are_torch_and_the_standard_library():
    mods = set()
    for node in ast.walk(_tree()):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"smog.py: relative import at line {node.lineno}"
            mods.add(node.module.split(".")[0])
    assert mods - {"torch"} <= set(sys.stdlib_module_names), mods - {"torch"}


def test_smog_methods_do_not_branch_on_the_architecture():
    cls = next(n for n in _tree().body if isinstance(n, ast.ClassDef) and n.name == "SMoG")
    names = {n.attr for n in ast.walk(cls) if isinstance(n, ast.Attribute)} | {
        n.id for n in ast.walk(cls) if isinstance(n, ast.Name)
    }
    assert not {x for x in names if "swin" in x.lower() or x == "arch"}, names


COPIED = r"""
import sys
for name in ("smog_train", "torchvision", "tools", "train", "spec"):
    sys.modules[name] = None                                  # importing them now fails
import torch
import smog
assert smog.__file__.startswith(sys.argv[1]), smog.__file__


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)).relu().mean(dim=(2, 3))


torch.manual_seed(0)
model = smog.SMoG(smog.Backbone(Net, 8), smog.SMoGConfig(dim=4, hidden_dim=8, n_groups=5))
crops = lambda: [torch.randn(6, 3, 16, 16) for _ in range(2)] + [torch.randn(6, 3, 8, 8)]
loss, stats, bank = model(crops(), crops(), 0.9)
loss.backward()
assert torch.isfinite(loss) and bank.shape == (2, 6, 4) and model.groups.shape == (3, 5, 4)
print("ok")
"""


def test_a_copy_of_smog_py_alone_runs_an_iteration(tmp_path):
    shutil.copy(SMOG_PY, tmp_path / "smog.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", COPIED, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_default_backbone_one_call_per_run_of_one_size_in_crop_order():
    """Oracle: the network on each crop alone, in eval mode (BN per sample: batching is exact)."""
    calls = []
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    ).eval()
    net.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    g = torch.Generator().manual_seed(0)
    sizes = [16, 16, 8, 8, 8, 16]
    crops = [torch.randn(3, 3, s, s, generator=g) for s in sizes]
    side = smog.Backbone(lambda: net, 4)
    with torch.no_grad():
        out = side.encode(net, crops)
        calls_encode, calls[:] = list(calls), []
        want = torch.cat([net(c) for c in crops])
    assert calls_encode == [(6, 3, 16, 16), (9, 3, 8, 8), (3, 3, 16, 16)]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="new module on every call"):  # `make` must build anew
        smog.SMoG(side, smog.SMoGConfig(dim=4, hidden_dim=8, n_groups=5))
