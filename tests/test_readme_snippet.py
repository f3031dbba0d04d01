"""README.md's snippet "SMoG around your own backbone" runs as written: the Python block under that
heading is taken from README.md and executed unchanged, so an edit that breaks it (a renamed
argument, a wrong feature width) fails here. Then what it printed and built is checked: a finite
loss, one hit fraction per head, unit group rows, a gradient in every trainable parameter and none
in the momentum network, the bank's [2, B, D] unit rows, the online network moved by the
optimiser away from the momentum one."""

from __future__ import annotations

import math
import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADING = "### SMoG around your own backbone"


def readme_snippet() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    assert HEADING in text, f"README.md has no section {HEADING!r}; restore it or update this test"
    m = re.search(r"```python\n(.*?)```", text[text.index(HEADING) :], re.S)
    assert m, f"no ```python block after {HEADING!r} in README.md"
    return m.group(1)


def test_readme_snippet_runs_as_written(capsys):
    code = readme_snippet()
    torch.manual_seed(0)
    ns: dict = {"__name__": "__main__"}
    exec(compile(code, "README.md snippet", "exec"), ns)
    out = capsys.readouterr().out
    m = re.fullmatch(r"loss (\S+), groups hit per head \[(.*)\]\n", out)
    assert m, f"the snippet printed {out!r}"
    loss, model, bank, online = float(m.group(1)), ns["model"], ns["bank"], ns["online"]
    assert math.isfinite(loss) and loss > 0
    assert abs(loss - ns["loss"].item()) < 1e-4
    H, K, D = model.groups.shape
    assert len(m.group(2).split(",")) == H == ns["cfg"].n_heads
    assert (model.groups.norm(dim=-1) - 1).abs().max() < 1e-5
    assert bank.shape == (2, online[0].shape[0], D)
    torch.testing.assert_close(bank.norm(dim=-1), torch.ones(2, online[0].shape[0]))
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad
    )
    assert all(p.grad is None for p in model._momentum_params())
    # the optimiser moved the online network; the momentum one still holds the EMA of before
    pairs = zip(model._online_params(), model._momentum_params())
    assert any(not torch.equal(a, b) for a, b in pairs)
