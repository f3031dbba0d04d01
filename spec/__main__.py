"""python -m spec --impl MODULE[:ATTR] [--xfail FILE] [--profile ci|thorough] [-m EXPR]

Runs the spec suite against an implementation and prints one line per invariant of spec/*.md:
pass, FAIL (with the first failing test and its message), xfail (listed in --xfail), not implemented
(every failure is a protocol function the implementation lacks), skipped or not run. A failure whose
invariant depends (harness.DEPENDS) on another failing invariant is marked as probably following
from it, so root causes stand out from cascades. Exit status 0 only if no required invariant fails
(required: everything not listed in --xfail); 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys

from spec.harness import DEPENDS, DOCS, IMPL_ENV, SPEC_DIR, cited_ids, invariant_ids, load_namespace

NOT_DEFINED = " is not defined in "
TITLE = re.compile(r"^#{2,4}\s+\(([A-Z]\d+)\)\s*(.*)$", re.M)


class Collector:
    """A pytest plugin: which invariants each test cites, and how each test ended."""

    def __init__(self):
        self.cites: dict = {}
        self.outcome: dict = {}
        self.message: dict = {}

    def pytest_collection_modifyitems(self, items):
        self.cites = {item.nodeid: cited_ids(item) for item in items}

    def pytest_runtest_logreport(self, report):
        if hasattr(report, "wasxfail"):
            outcome = "xfail" if report.skipped else "xpass"
        else:
            outcome = report.outcome
        if outcome == "failed" or report.when == "call" or (outcome != "passed" and report.when == "setup"):
            if self.outcome.get(report.nodeid) != "failed":
                self.outcome[report.nodeid] = outcome
        if outcome == "failed" and report.nodeid not in self.message:
            crash = getattr(report.longrepr, "reprcrash", None)
            text = crash.message if crash is not None else str(report.longrepr)
            text = text.split("Falsifying example")[0]          # hypothesis appends the example
            text = re.split(r"\n\s*assert ", text)[0]           # keep the message, not pytest's rewrite
            self.message[report.nodeid] = " ".join(text.replace("Failed: ", "").split())


def verdicts(col: Collector) -> dict:
    """{invariant id: (status, detail)} in document order."""
    out = {}
    for inv in invariant_ids():
        tests = [t for t, ids in col.cites.items() if inv in ids]
        ran = [t for t in tests if t in col.outcome]
        failed = [t for t in ran if col.outcome[t] == "failed"]
        if not ran:
            out[inv] = ("not run", "")
        elif failed:
            msgs = [col.message.get(t, "") for t in failed]
            if all(NOT_DEFINED in m for m in msgs):
                out[inv] = ("not implemented", msgs[0][:100])
            else:
                first = next(t for t, m in zip(failed, msgs) if NOT_DEFINED not in m)
                name = first.split("::")[-1]
                msg = col.message.get(first, "")
                out[inv] = ("FAIL", f"{len(failed)}/{len(ran)} tests fail; first {name}: {msg[:90]}")
        elif any(col.outcome[t] == "xfail" for t in ran):
            out[inv] = ("xfail", "")
        elif all(col.outcome[t] == "skipped" for t in ran):
            out[inv] = ("skipped", "")
        else:
            out[inv] = ("pass", f"{len(ran)} tests")
    return out


def _ancestors(inv: str) -> list:
    seen, todo = [], list(DEPENDS.get(inv, []))
    while todo:
        d = todo.pop(0)
        if d not in seen:
            seen.append(d)
            todo += DEPENDS.get(d, [])
    return seen


def report(verdict: dict, impl: str, profile: str, out=sys.stdout) -> int:
    titles = {}
    for doc in DOCS:
        titles.update(dict(TITLE.findall((SPEC_DIR / doc).read_text())))
    bad = {"FAIL", "not implemented"}
    print(f"spec verdict for {impl} (profile {profile}): one line per invariant of spec/*.md", file=out)
    for inv, (status, detail) in verdict.items():
        if status == "not run":   # deselected with -m
            continue
        roots = [d for d in _ancestors(inv) if verdict.get(d, ("",))[0] in bad]
        shown = "FAIL (consequential)" if status == "FAIL" and roots else status
        extra = f"probably follows from {', '.join(roots)}; " if status == "FAIL" and roots else ""
        title = titles.get(inv, "")
        title = title if len(title) <= 46 else title[:45] + "…"
        print(f"{inv:4s} {shown:21s} {title:47s} {extra}{detail}".rstrip(), file=out)
    counts = {}
    for status, _ in verdict.values():
        counts[status] = counts.get(status, 0) + 1
    failing = [i for i, (s, _) in verdict.items() if s in bad]
    print(f"{len(verdict)} invariants: " + ", ".join(f"{n} {s}" for s, n in counts.items())
          + (f"; required and failing: {', '.join(failing)}" if failing else "; every required invariant holds"),
          file=out)
    return 1 if failing else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spec", description=__doc__.splitlines()[0])
    ap.add_argument("--impl", default=os.environ.get(IMPL_ENV) or "smog", help="MODULE or MODULE:ATTR (default smog)")
    ap.add_argument("--xfail", help="file of test names or invariant ids (one a line, # comments) expected to fail")
    ap.add_argument("--profile", choices=("ci", "thorough"), default="ci",
                    help="ci: 12 derandomized examples per test (default); thorough: 400 random ones")
    ap.add_argument("-m", dest="select", help='pytest marker expression over invariant ids, e.g. "G5 or S6"')
    args = ap.parse_args(argv)
    if args.xfail and not os.path.isfile(args.xfail):
        print(f"error: --xfail file {args.xfail!r} does not exist; pass a text file with one test name or "
              f"invariant id a line", file=sys.stderr)
        return 2
    try:
        load_namespace(args.impl)
    except Exception as e:  # noqa: BLE001 - any import failure of the module under test is reported in one line
        print(f"error: cannot import the implementation {args.impl!r} ({type(e).__name__}: {e}); pass "
              f"--impl MODULE or MODULE:ATTR importable from the current directory or PYTHONPATH", file=sys.stderr)
        return 2
    os.environ[IMPL_ENV] = args.impl
    if args.xfail:
        os.environ["SMOG_XFAIL"] = os.path.abspath(args.xfail)
    else:
        os.environ.pop("SMOG_XFAIL", None)
    import pytest
    col = Collector()
    cmd = [str(SPEC_DIR), "-qq", "--tb=no", "-p", "no:cacheprovider", "-p", "no:warnings", "-o", "addopts=",
           f"--hypothesis-profile=verdict-{args.profile}", f"--ignore={SPEC_DIR / 'test_meta.py'}",
           f"--ignore={SPEC_DIR / 'test_mutants.py'}", f"--ignore={SPEC_DIR / 'test_peers.py'}",
           f"--rootdir={SPEC_DIR.parent}"]
    if args.select:
        cmd += ["-m", args.select]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = pytest.main(cmd, plugins=[col])
    if rc not in (0, 1):   # an internal or usage error, or nothing collected: show pytest's own words
        print(buf.getvalue()[-3000:], file=sys.stderr)
        print(f"error: pytest exited with {int(rc)} before judging {args.impl!r}", file=sys.stderr)
        return 2
    return report(verdicts(col), args.impl, args.profile)


if __name__ == "__main__":
    sys.exit(main())
