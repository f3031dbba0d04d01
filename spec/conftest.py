"""pytest wiring for the spec suite.

- `impl`: the implementation under test, from SMOG_IMPL ("module" or "module:attr"; default smog).
  SMOG_IMPL=spec.mutants:* runs every mutant of spec/mutants.py in one session (see test_mutants.py).
- Hypothesis profiles: `ci` (default: deterministic, quick) and `thorough`; pick with
  --hypothesis-profile=thorough. `kill` is `ci` without shrinking, for the mutation check, and
  `verdict-ci` / `verdict-thorough` the same for `python -m spec` (a verdict needs a failure, not the
  smallest one).
- SMOG_XFAIL=path: a file of test names or invariant ids (one a line, # comments) to mark xfail,
  for implementations that knowingly deviate (array-api-tests style); the format is in spec/README.md.
- Every invariant id is also a marker: `pytest spec -m G5`, `pytest spec -m "S2 or L6"`; so are the
  kinds, `-m mathematics` and `-m contract`.
- `@pytest.mark.optional("group_grad")`: a test of an optional mode (harness.Impl turns its
  NotImplementedError into a skip, "not implemented (optional ...)").
- `@pytest.mark.unless_declared("replicated_kmeans")`: a test that does not apply when the
  implementation declares that (SPEC_DECLARES, harness.DECLARABLE); skipped as "n/a (declared ...)".
"""

from __future__ import annotations

import json
import os
import re

import pytest
from hypothesis import HealthCheck, Phase, settings

from spec.harness import (
    ALL_MUTANTS,
    ASSERTS,
    NA_DECLARED,
    Impl,
    cited_ids,
    declarations,
    impl_name,
    invariant_ids,
    invariant_kinds,
    load_namespace,
)

_quiet = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
settings.register_profile(
    "ci",
    max_examples=12,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=False,
    suppress_health_check=_quiet,
)
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=_quiet)
_no_shrink = [
    Phase.explicit,
    Phase.reuse,
    Phase.generate,
]  # a verdict needs a failure, not the smallest one
settings.register_profile("kill", parent=settings.get_profile("ci"), phases=_no_shrink)
settings.register_profile("verdict-ci", parent=settings.get_profile("ci"), phases=_no_shrink)
settings.register_profile(
    "verdict-thorough", parent=settings.get_profile("thorough"), phases=_no_shrink
)


def pytest_configure(config):
    config.addinivalue_line("markers", "invariant(*ids): the spec/*.md invariants this test checks")
    config.addinivalue_line(
        "markers", "optional(mode): a test of an optional mode of the protocol (group_grad)"
    )
    config.addinivalue_line(
        "markers", "unless_declared(name): n/a when the implementation declares `name`"
    )
    config.addinivalue_line(
        "markers",
        "gradient: a gradient claim (needs autograd; the value claims are tests of their own)",
    )
    config.addinivalue_line("markers", "mathematics: tests of invariants on what SMoG computes")
    config.addinivalue_line(
        "markers", "contract: tests of invariants on the protocol's conventions"
    )
    for i, doc in invariant_ids().items():
        config.addinivalue_line("markers", f"{i}: tests of invariant ({i}) of spec/{doc}")
    if not config.getoption("hypothesis_profile", None):
        settings.load_profile("ci")


# -- the implementation under test ------------------------------------------------------------------


def _mutant_names():
    from spec.mutants import MUTANTS

    return list(MUTANTS)


def pytest_generate_tests(metafunc):
    if "impl" in metafunc.fixturenames and impl_name() == ALL_MUTANTS:
        metafunc.parametrize("impl", _mutant_names(), indirect=True, scope="session")


@pytest.fixture(scope="session")
def impl(request):
    if impl_name() == ALL_MUTANTS:
        return Impl(f"spec.mutants:{request.param}")
    return Impl(impl_name())


# -- per-implementation expected failures -----------------------------------------------------------


def pytest_collection_modifyitems(config, items):
    kinds = invariant_kinds()
    for item in items:  # each cited id, and its kind, as a marker of its own, for -m selection
        for i in sorted(cited_ids(item)):
            item.add_marker(getattr(pytest.mark, i))
        for kind in sorted({kinds[i] for i in cited_ids(item) if i in kinds}):
            item.add_marker(getattr(pytest.mark, kind))
    if impl_name() == ALL_MUTANTS:
        _order_for_mutants(items)
    path = os.environ.get("SMOG_XFAIL")
    if not path:
        return
    with open(path) as f:
        entries = {line.split("#")[0].strip() for line in f} - {""}
    for item in items:
        ids = cited_ids(item)
        hit = sorted(
            e
            for e in entries
            if e in ids
            or e == item.originalname
            or (re.search(r"::|\[|\.py", e) and e in item.nodeid)
        )  # see spec/README.md, the xfail file
        if hit:
            item.add_marker(
                pytest.mark.xfail(reason=f"listed in {path}: {', '.join(hit)}", strict=False)
            )


# -- mutation check bookkeeping (SMOG_IMPL=spec.mutants:*) ------------------------------------------

_killed: dict = {}  # mutant -> its first assertion failure
_hit: dict = {}  # mutant -> the invariant ids cited by every test it failed with an assertion


def _expected(name) -> set:
    from spec.mutants import MUTANTS

    return {s.strip() for s in MUTANTS[name][1].split(",")}


def _order_for_mutants(items):
    """Group the items by mutant and run first the tests citing the invariants that the mutant is
    expected to break (MUTANTS[name][1]): the kill rate is the same, the session much shorter."""
    names = _mutant_names()

    def key(pair):
        pos, item = pair
        name = _mutant_of(item)
        if name is None:
            return (-1, 0, pos)
        return (names.index(name), 0 if cited_ids(item) & _expected(name) else 1, pos)

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


def _mutant_of(item):
    cs = getattr(item, "callspec", None)
    return cs.params.get("impl") if cs is not None else None


_declared: dict = {}


def _declarations() -> dict:
    """What the implementation under test declares (SPEC_DECLARES); the mutants declare nothing."""
    name = impl_name()
    if name == ALL_MUTANTS:
        return {}
    if name not in _declared:
        try:
            _declared[name] = declarations(load_namespace(name))
        except ValueError:
            raise
        except Exception:  # noqa: BLE001 - an unimportable implementation fails every test (harness.Impl)
            _declared[name] = {}
    return _declared[name]


def pytest_runtest_setup(item):
    """A test that a declaration makes moot is skipped as n/a. Once a mutant is killed, run only its
    tests of expected invariants that no test has failed yet."""
    for mark in item.iter_markers("unless_declared"):
        for what in mark.args:
            if what in _declarations():
                words = _declarations()[what]
                pytest.skip(f"{NA_DECLARED}{what}){': ' + words if words else ''}")
    name = _mutant_of(item)
    if (
        name is not None
        and name in _killed
        and not cited_ids(item) & (_expected(name) - _hit.get(name, set()))
    ):
        pytest.skip(f"mutant {name} already killed by {_killed[name]['test']}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    name = _mutant_of(item)
    if name is None or not rep.failed:
        return
    reason = call.excinfo.typename if call.excinfo is not None else "failed"
    if reason not in ASSERTS:
        return
    _hit.setdefault(name, set()).update(cited_ids(item))
    _killed.setdefault(
        name, {"test": item.nodeid.split("[")[0], "when": rep.when, "reason": reason}
    )


def pytest_sessionfinish(session):
    out = os.environ.get("SMOG_MUTANT_REPORT")
    if out and impl_name() == ALL_MUTANTS:
        report = {
            name: None
            if name not in _killed
            else {**_killed[name], "invariants": sorted(_hit[name])}
            for name in _mutant_names()
        }
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
