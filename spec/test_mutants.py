"""The mutation check: the suite must fail on every mutant in spec/mutants.py, and every invariant
must be the one that catches some mutant.

All mutants run in one pytest session in a subprocess (SMOG_IMPL=spec.mutants:*, one torch import),
grouped by mutant; once a mutant has failed a test, only its tests of expected invariants not yet
failed still run. A kill counts only when a test *asserts* (AssertionError or pytest's Failed), not
when the mutant crashes. An invariant is covered when a test citing it kills some mutant.
It runs in the oracle's run of the suite (the mutants are the oracle with one mistake each), or
anywhere with SMOG_SPEC_MUTANTS=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spec.harness import ALL_MUTANTS, ASSERTS, impl_name, invariant_ids
from spec.mutants import MUTANTS

ROOT = Path(__file__).resolve().parents[1]


def test_there_are_at_least_ten_mutants():
    assert len(MUTANTS) >= 10


@pytest.mark.skipif(
    impl_name() != "spec.oracle" and not os.environ.get("SMOG_SPEC_MUTANTS"),
    reason="the mutation check runs with SMOG_IMPL=spec.oracle or SMOG_SPEC_MUTANTS=1",
)
def test_every_mutant_is_killed(tmp_path, capsys):
    report = tmp_path / "kills.json"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SMOG_XFAIL", "SMOG_SPEC_MUTANTS", "PYTEST_ADDOPTS")
    }
    env.update(SMOG_IMPL=ALL_MUTANTS, SMOG_MUTANT_REPORT=str(report))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "spec",
        "-q",
        "-p",
        "no:cacheprovider",
        "--hypothesis-profile=kill",
        "--ignore=spec/test_meta.py",
        "--ignore=spec/test_mutants.py",
        "--ignore=spec/test_peers.py",
        "-W",
        "ignore::DeprecationWarning",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert report.exists(), (
        f"the mutant session wrote no report:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    kills = json.loads(report.read_text())
    assert set(kills) == set(MUTANTS)
    lines = []
    for name, kill in kills.items():
        what = (
            "SURVIVED"
            if kill is None
            else f"killed by {kill['test']} ({', '.join(kill['invariants'])})"
        )
        lines.append(f"  {name:32s} {what}   [{MUTANTS[name][0]}; expected: {MUTANTS[name][1]}]")
    killed = [n for n, k in kills.items() if k is not None and k["reason"] in ASSERTS]
    covered = set().union(*(k["invariants"] for k in kills.values() if k is not None))
    uncovered = sorted(set(invariant_ids()) - covered, key=lambda i: (i[0], int(i[1:])))
    summary = (
        f"mutation check: {len(killed)}/{len(kills)} mutants killed; "
        f"{len(invariant_ids()) - len(uncovered)}/{len(invariant_ids())} invariants kill a mutant"
        + (f" (not: {', '.join(uncovered)})" if uncovered else "")
        + "\n"
        + "\n".join(lines)
    )
    with capsys.disabled():  # the kill rate shows in every log, not only on failure
        print(f"\n{summary.splitlines()[0]}")
    print(summary)
    assert len(killed) == len(kills), summary
    assert not uncovered, summary
