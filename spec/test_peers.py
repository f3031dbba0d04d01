"""Third-party verdicts: the table in spec/README.md is what `python -m spec` prints for Lightly.

Runs only against the default implementation (once per CI run, not in the oracle's or the mutants'
session) and only when the `lightly` version the table was recorded with is installed
(pip install -e ".[peers]"); otherwise it is skipped with the reason.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest

from spec.harness import DEFAULT_IMPL, SPEC_DIR, impl_name

TABLE_ROW = re.compile(
    r"^\|\s*([A-Z])(\d+)(?:–[A-Z](\d+))?\s*\|\s*([^|]+?)\s*\|", re.M
)  # "| G2 |", "| K1–K9 |"
RECORDED = re.compile(r"lightly (\d+\.\d+\.\d+)")
VERDICT_LINE = re.compile(
    r"^([A-Z]\d+)\s+(pass|FAIL \(consequential\)|FAIL|xfail|not implemented \(optional\)|"
    r"not implemented \(no autograd\)|not implemented|n/a \(declared\)|skipped)(?=\s|$)",
    re.M,
)


def _recorded():
    text = (SPEC_DIR / "README.md").read_text()
    section = text[text.index("## Verdict: Lightly") :]
    section = section[: section.find("\n## ", 4)] if "\n## " in section[4:] else section
    table = {
        f"{letter}{n}": verdict
        for letter, first, last, verdict in TABLE_ROW.findall(section)
        for n in range(int(first), int(last or first) + 1)
    }
    return RECORDED.search(section).group(1), table


@pytest.mark.skipif(
    impl_name() != DEFAULT_IMPL, reason="the Lightly verdict is checked in the default run only"
)
def test_lightly_verdict_matches_the_readme_table():
    version, table = _recorded()
    try:
        installed = importlib.metadata.version("lightly")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(
            f'lightly is not installed; pip install -e ".[peers]" (the table is for lightly {version})'
        )
    if installed != version:
        pytest.skip(
            f"spec/README.md holds the verdict for lightly {version}, {installed} is installed; "
            f"rerun python -m spec --impl spec.lightly_adapter and update the table"
        )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SMOG_IMPL", "SMOG_XFAIL", "PYTEST_ADDOPTS")
    }
    proc = subprocess.run(
        [sys.executable, "-m", "spec", "--impl", "spec.lightly_adapter"],
        cwd=SPEC_DIR.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 1, (
        f"expected failing invariants (exit 1):\n{proc.stdout}\n{proc.stderr}"
    )
    got = dict(VERDICT_LINE.findall(proc.stdout))
    assert got == table, f"the verdict changed; update spec/README.md:\n{proc.stdout}"
