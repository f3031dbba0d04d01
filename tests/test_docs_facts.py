"""The recipe facts that README.md and METHOD.md quote (epochs, steps, batch, crops, K, D, heads, the EMA
coefficient m) agree with the presets that train.py runs, and no code file cites an issue tracker.

A page that says "10 epochs" while the preset runs 8 teaches the wrong recipe; this test fails on the
first such drift, naming the page, the preset and the field."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from smog_train import config, data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as fh:
        return fh.read()


def _preset(name: str) -> config.Config:
    return config.parse_config(["--preset", name])


def _table_rows(text: str, header_start: str) -> dict:
    """{first cell: [cells]} of the Markdown table whose header row starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header_start))
    rows = {}
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        rows[cells[0].split()[0].strip("`")] = cells
    return rows


def test_readme_quickstart_states_the_demo_recipe():
    text, cfg = _read("README.md"), _preset("demo")
    m = re.search(
        r"(\d+) epochs = (\d+) steps of (\d+) images, 2 global \+ (\d+) local crops per "
        r"augmentation set, (\d+) heads of K = (\d+) groups",
        text.replace("\n", " "),
    )
    assert m, "README's quickstart no longer states the demo recipe in the form this test reads"
    epochs, steps, batch, n_local, heads, k = map(int, m.groups())
    spe = data.DEMO_TRAIN // cfg.batch_size
    assert (epochs, batch, n_local, heads, k) == (
        cfg.epochs,
        cfg.batch_size,
        cfg.n_local,
        cfg.n_heads,
        cfg.n_groups,
    )
    assert steps == cfg.epochs * spe
    assert f"same {steps} steps" in text, "the supervised row of the table names another step count"


def test_readme_preset_table_matches_the_presets():
    rows = _table_rows(_read("README.md"), "| preset | backbone | recipe |")
    assert set(rows) == set(config.PRESETS)
    for name, cells in rows.items():
        cfg, recipe = _preset(name), cells[2]
        m = re.search(r"(\d+) epochs, batch (\d+)", recipe)
        if m:
            assert (int(m.group(1)), int(m.group(2))) == (cfg.epochs, cfg.batch_size), name


def test_method_recipe_table_matches_the_presets():
    rows = _table_rows(_read("METHOD.md"), "| preset | backbone | data, crops |")
    assert set(rows) == set(config.PRESETS), "METHOD.md's recipe table must list every preset"
    for name, (_, _, crops, run, _, wd, kd, m) in rows.items():
        cfg = _preset(name)
        if not crops.startswith("as "):
            g, n_loc, loc = map(int, re.search(r"2x(\d+) \+ (\d+)x(\d+)", crops).groups())
            assert (g, n_loc, loc) == (cfg.image_size, cfg.n_local, cfg.local_size), name
        if not run.startswith("as "):
            assert tuple(map(int, run.split(","))) == (cfg.epochs, cfg.batch_size), name
        assert tuple(map(int, kd.split(","))) == (cfg.n_groups, cfg.dim), name
        assert float(m) == cfg.ema, name
        assert float(wd) == cfg.weight_decay, name


def test_method_states_m_per_preset():
    """The notation table gives m for the ImageNet presets and for demo/CIFAR separately."""
    line = next(ln for ln in _read("METHOD.md").splitlines() if ln.startswith("| `m` |"))
    big, small = map(
        float, re.search(r"([\d.]+) \(ImageNet presets\), ([\d.]+) \(demo, CIFAR\)", line).groups()
    )
    assert {_preset(n).ema for n in config.PRESETS if n.startswith("imagenet")} == {big}
    assert {_preset(n).ema for n in ("demo", "cifar10-r18")} == {small}


@pytest.mark.parametrize("pattern", [r"\bissue \d+", r"\bissue #\d+"])
def test_no_code_file_cites_an_issue(pattern):
    names = subprocess.run(
        ["git", "-C", ROOT, "ls-files", "*.py", "*.sh", ".ci/run"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    hits = [
        f"{n}:{i}"
        for n in names
        for i, ln in enumerate(_read(n).splitlines(), 1)
        if re.search(pattern, ln, re.I)
    ]
    assert not hits, f"code files cite issues (say what the code does instead): {hits[:10]}"
