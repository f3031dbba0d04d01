"""Meta-tests: every invariant in spec/*.md is cited by a test and every citation exists; the
harness reports a missing function by name."""

from __future__ import annotations

import importlib
import re

import pytest

from spec.harness import DEPENDS, DOCS, PROTOCOL, Impl
from spec.harness import SPEC_DIR as SPEC
from spec.harness import invariant_ids as defined

REFERENCE = re.compile(r"\(([GLKSMHR]\d+)\)")
TEST_MODULES = (
    "test_grouping",
    "test_loss",
    "test_kmeans",
    "test_step",
    "test_momentum",
    "test_heads",
    "test_run",
)


def cited():
    out = {}
    for name in TEST_MODULES:
        mod = importlib.import_module(f"spec.{name}")
        for attr, fn in vars(mod).items():
            if attr.startswith("test_") and callable(fn):
                marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "invariant"]
                out[f"{name}.{attr}"] = {i for m in marks for i in m.args}
    return out


def test_every_invariant_is_cited_by_a_test():
    all_cited = set().union(*cited().values())
    missing = sorted(set(defined()) - all_cited, key=lambda i: (i[0], int(i[1:])))
    assert not missing, f"invariants with no test: {missing}"


def test_every_cited_invariant_exists():
    ids = defined()
    bad = {t: sorted(c - set(ids)) for t, c in cited().items() if c - set(ids)}
    assert not bad, f"tests cite undefined invariants: {bad}"


def test_every_spec_test_cites_an_invariant():
    bare = [t for t, c in cited().items() if not c]
    assert not bare, f"tests without @pytest.mark.invariant: {bare}"


def test_ids_are_numbered_consecutively_and_references_resolve():
    ids = defined()
    for letter in DOCS.values():
        nums = sorted(int(i[1:]) for i in ids if i[0] == letter)
        assert nums == list(range(1, len(nums) + 1)), f"{letter} ids are not 1..n: {nums}"
    for doc in [*DOCS, "README.md"]:
        dangling = set(REFERENCE.findall((SPEC / doc).read_text())) - set(ids)
        assert not dangling, f"{doc} refers to undefined invariants {sorted(dangling)}"


def test_missing_function_fails_by_name():
    lacking = Impl("spec.strategies")  # a module without the protocol
    with pytest.raises(
        pytest.fail.Exception, match="assign_groups is not defined in spec.strategies"
    ):
        _ = lacking.assign_groups
    assert "assign_groups" in PROTOCOL


def test_dependencies_name_defined_invariants():
    ids = defined()
    bad = {k: v for k, v in DEPENDS.items() if k not in ids or set(v) - set(ids) or k in v}
    assert not bad, f"DEPENDS names undefined invariants or a self-dependency: {bad}"


def test_every_invariant_is_a_marker(pytestconfig):
    registered = {line.split(":")[0] for line in pytestconfig.getini("markers")}
    assert set(defined()) <= registered
