"""python -m spec --impl MODULE[:ATTR] [--xfail FILE] [--profile ci|thorough] [-m EXPR] [--judge all|mathematics]

Runs the spec suite against an implementation and prints one line per invariant of spec/*.md, the
*mathematics* (what SMoG computes) and the *contract* (the protocol's conventions: error types, exact
end points, returned dtypes and shapes) in two blocks. Each line gives a status and the partial
results of the invariant's tests ("3/4 pass, 1 xfail"):

  pass                        every test that applies passes (some may be n/a or optional, see the counts)
  FAIL                        a test fails; the first failing test and its message follow
  FAIL (consequential)        ... and an invariant it builds on (harness.DEPENDS) fails too
  not implemented             every failure is a protocol function that is missing or raises NotImplementedError
  not implemented (no autograd)  every failure is a gradient claim whose inputs require grad and whose result
                              carries no graph (a port without a gradient bridge); its value claims still count
  not implemented (optional)  every test is of an optional mode (group_grad=True) the implementation does not have
  n/a (declared)              every test is moot by a declaration of the implementation (SPEC_DECLARES)
  xfail                       a failure listed in --xfail
  skipped

A FAIL prints the whole message of its first failing test (tolerance and dtype it judged by included)
and the command that reruns that invariant's tests with pytest's full output.

Writing an adapter for an implementation (the protocol, declarations, the gradient bridge for a port in
another framework): spec/README.md, sections "The protocol" and "Writing an adapter".

Exit status 0 only if no judged invariant (--judge all: both kinds, the default; --judge mathematics:
the mathematics alone) outside the xfail file is FAIL or not implemented; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys

from spec.harness import (
    DECLARABLE,
    DEPENDS,
    DOCS,
    IMPL_ENV,
    NA_DECLARED,
    NO_AUTOGRAD,
    NOT_DEFINED,
    NOT_IMPLEMENTED,
    OPTIONAL_NOT_IMPLEMENTED,
    SPEC_DIR,
    cited_ids,
    declarations,
    invariant_ids,
    invariant_kinds,
    load_namespace,
)

TITLE = re.compile(r"^#{2,4}\s+\(([A-Z]\d+)\)\s*(.*)$", re.M)
KIND_HEADINGS = {
    "mathematics": "mathematics: what SMoG computes",
    "contract": "contract: the protocol's conventions (error types, exact end points, dtypes and shapes)",
}
NO_GRAPH = "not implemented (no autograd)"
BAD = {
    "FAIL",
    "not implemented",
    NO_GRAPH,
}  # statuses that fail a judged invariant (unless listed in --xfail)
README_ADAPTER = "spec/README.md, \"Writing an adapter\" and \"The gradient bridge\""


def plain(title: str) -> str:
    """A title of spec/*.md as plain text for a terminal: no $...$, no backticks, no LaTeX commands."""
    for tex, txt in (
        (r"\bmod", "mod"),
        (r"\ge", ">="),
        (r"\le", "<="),
        (r"\ne", "!="),
        (r"\beta", "beta"),
        (r"\tau", "tau"),
        (r"\ln", "ln"),
        (r"\to", "->"),
        (r"\dots", "..."),
        (r"\text", ""),
    ):
        title = title.replace(tex, txt)
    return re.sub(
        r"\s+",
        " ",
        title.replace("$", "").replace("`", "").replace("*", "").replace("{", "").replace("}", ""),
    ).strip()


class Collector:
    """A pytest plugin: which invariants each test cites, and how each test ended."""

    def __init__(self):
        self.cites: dict = {}
        self.outcome: dict = {}
        self.message: dict = {}
        self.reason: dict = {}

    def pytest_collection_modifyitems(self, items):
        self.cites = {item.nodeid: cited_ids(item) for item in items}

    def pytest_runtest_logreport(self, report):
        if hasattr(report, "wasxfail"):
            outcome = "xfail" if report.skipped else "xpass"
        else:
            outcome = report.outcome
        if (
            outcome == "failed"
            or report.when == "call"
            or (outcome != "passed" and report.when == "setup")
        ):
            if self.outcome.get(report.nodeid) != "failed":
                self.outcome[report.nodeid] = outcome
        if outcome == "skipped" and isinstance(report.longrepr, tuple):
            self.reason[report.nodeid] = str(report.longrepr[2]).replace("Skipped: ", "", 1)
        if outcome == "failed" and report.nodeid not in self.message:
            crash = getattr(report.longrepr, "reprcrash", None)
            text = crash.message if crash is not None else str(report.longrepr)
            text = text.split("Falsifying example")[0]  # hypothesis appends the example
            text = re.split(r"\n\s*assert ", text)[0]  # keep the message, not pytest's rewrite
            text = text.replace("Failed: ", "", 1).strip()
            self.message[report.nodeid] = re.sub(r"^(AssertionError: )+", "", text)


def _category(col: Collector, test: str) -> str:
    """pass, fail, missing, xfail, optional, n/a or skipped."""
    outcome = col.outcome[test]
    if outcome in ("passed", "xpass"):
        return "pass"
    if outcome == "failed":
        msg = col.message.get(test, "")
        if msg.startswith(NO_AUTOGRAD):
            return "no graph"
        return "missing" if NOT_DEFINED in msg or NOT_IMPLEMENTED in msg else "fail"
    if outcome == "xfail":
        return "xfail"
    reason = col.reason.get(test, "")
    if reason.startswith(OPTIONAL_NOT_IMPLEMENTED):
        return "optional"
    if reason.startswith(NA_DECLARED):
        return "n/a"
    return "skipped"


def _counts(cats: list) -> str:
    """'3/4 pass, 1 xfail': the partial results of one invariant's tests."""
    n = len(cats)
    words = [f"{cats.count('pass')}/{n} pass"]
    for cat, word in (
        ("fail", "FAIL"),
        ("missing", "not implemented"),
        ("no graph", NO_GRAPH),
        ("xfail", "xfail"),
        ("optional", "not implemented (optional)"),
        ("n/a", "n/a (declared)"),
        ("skipped", "skipped"),
    ):
        if cats.count(cat):
            words.append(f"{cats.count(cat)} {word}")
    return ", ".join(words)


def verdicts(col: Collector) -> dict:
    """{invariant id: (status, detail)} in document order."""
    out = {}
    for inv in invariant_ids():
        tests = [t for t, ids in col.cites.items() if inv in ids]
        ran = [t for t in tests if t in col.outcome]
        if not ran:
            out[inv] = ("not run", "")
            continue
        cats = [_category(col, t) for t in ran]
        detail = _counts(cats)
        if "fail" in cats:
            first = ran[cats.index("fail")]
            out[inv] = (
                "FAIL",
                f"{detail}; first {first.split('::')[-1]}:",
                col.message.get(first, ""),
            )
        elif "missing" in cats:
            first = ran[cats.index("missing")]
            out[inv] = (
                "not implemented",
                f"{detail}; {_one_line(col.message.get(first, ''))[:100]}",
            )
        elif "no graph" in cats:
            out[inv] = (NO_GRAPH, detail)
        elif "xfail" in cats:
            out[inv] = ("xfail", detail)
        elif "pass" in cats:
            out[inv] = ("pass", detail)
        elif "optional" in cats:
            out[inv] = ("not implemented (optional)", detail)
        elif "n/a" in cats:
            out[inv] = ("n/a (declared)", detail)
        else:
            out[inv] = ("skipped", detail)
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())


def no_autograd(col: Collector) -> list:
    """The invariants with a test that failed as "no autograd" (harness.NO_AUTOGRAD)."""
    ids = set()
    for test, outcome in col.outcome.items():
        if outcome == "failed" and col.message.get(test, "").startswith(NO_AUTOGRAD):
            ids |= col.cites.get(test, set())
    return sorted(ids, key=lambda i: ("GLKSMHR".index(i[0]), int(i[1:])))


def skipped_as(col: Collector, prefix: str) -> dict:
    """{what: sorted invariant ids} of the tests skipped with a reason `prefix` + what + ')'; for the
    optional modes not implemented and the declarations that made tests n/a."""
    out: dict = {}
    for test, reason in col.reason.items():
        if col.outcome.get(test) == "skipped" and reason.startswith(prefix):
            what = reason[len(prefix) :].split(")")[0]
            out.setdefault(what, set()).update(col.cites.get(test, ()))
    return {
        m: sorted(ids, key=lambda i: ("GLKSMHR".index(i[0]), int(i[1:]))) for m, ids in out.items()
    }


def _ancestors(inv: str) -> list:
    seen, todo = [], list(DEPENDS.get(inv, []))
    while todo:
        d = todo.pop(0)
        if d not in seen:
            seen.append(d)
            todo += DEPENDS.get(d, [])
    return seen


def _roots(inv: str, verdict: dict) -> list:
    """The invariants `inv` builds on (harness.DEPENDS, transitively) that fail or are not implemented."""
    return [d for d in _ancestors(inv) if verdict.get(d, ("",))[0] in BAD]


def report(
    verdict: dict,
    impl: str,
    profile: str,
    out=sys.stdout,
    declared=None,
    optional=None,
    moot=None,
    judge: str = "all",
    gradless=None,
) -> int:
    titles = {}
    for doc in DOCS:
        titles.update({i: plain(t) for i, t in TITLE.findall((SPEC_DIR / doc).read_text())})
    kinds = invariant_kinds()
    print(
        f"spec verdict for {impl} (profile {profile}): one line per invariant of spec/*.md",
        file=out,
    )
    if declared:
        print("declared by the implementation (SPEC_DECLARES):", file=out)
    for name, words in (declared or {}).items():
        ids = (moot or {}).get(name)
        print(
            f"  {name}"
            + (f' ("{words}")' if words else "")
            + f": {DECLARABLE[name]}; "
            + (
                f"n/a (declared): its tests of {', '.join(ids)}"
                if ids
                else "no test ran that it concerns"
            ),
            file=out,
        )
    if optional:
        print(
            "optional modes the implementation does not implement (NotImplementedError):", file=out
        )
    for mode, ids in (optional or {}).items():
        print(f"  {mode}: not implemented (optional): its tests of {', '.join(ids)}", file=out)
    if gradless:
        print(
            f"common cause: no autograd. The gradient claims of {', '.join(gradless)} read \"{NO_GRAPH}\": their "
            f"inputs require grad and the results carried no graph (or the functions refused such inputs); "
            f"every value claim is judged on its own. To certify the gradients, expose the implementation's "
            f"own derivatives to torch.autograd ({README_ADAPTER}).",
            file=out,
        )
    failing = {}
    shown_rows = [(i, v) for i, v in verdict.items() if v[0] != "not run"]
    width = min(64, max([len(titles.get(i, "")) for i, _ in shown_rows] + [10]))
    for kind in ("mathematics", "contract"):
        rows = [(i, v) for i, v in shown_rows if kinds.get(i) == kind]
        if not rows:
            continue
        print(f"\n{KIND_HEADINGS[kind]}", file=out)
        for inv, (status, detail, *message) in rows:
            roots = _roots(inv, verdict)
            shown = "FAIL (consequential)" if status == "FAIL" and roots else status
            extra = (
                f"probably follows from {', '.join(roots)}; " if status == "FAIL" and roots else ""
            )
            print(
                f"{inv:4s} {shown:29s} {titles.get(inv, ''):{width}s}  {extra}{detail}".rstrip(),
                file=out,
            )
            if message:
                text = message[0] if len(message[0]) <= 3000 else message[0][:3000] + " [...]"
                for line in text.splitlines():
                    if line.strip():
                        print(f"       | {line.rstrip()}", file=out)
                print(
                    f"       | the whole output: SMOG_IMPL={impl} python -m pytest spec -m {inv} -x",
                    file=out,
                )
        failing[kind] = [i for i, (s, *_) in rows if s in BAD]
    print("", file=out)
    for kind in ("mathematics", "contract"):
        rows = [(i, v) for i, v in shown_rows if kinds.get(i) == kind]
        if not rows:
            continue
        counts: dict = {}
        for _, (status, *_) in rows:
            counts[status] = counts.get(status, 0) + 1
        roots = [i for i, (s, *_) in rows if s == "FAIL" and not _roots(i, verdict)]
        words = [
            f"{n} {s}"
            + (
                f" ({len(roots)} not consequential: {', '.join(roots)})"
                if s == "FAIL" and len(roots) < n
                else ""
            )
            for s, n in counts.items()
        ]
        print(
            f"{kind}: {len(rows)} invariant{'s' if len(rows) > 1 else ''}: "
            + ", ".join(words)
            + ("" if failing[kind] else "; every one holds"),
            file=out,
        )
    judged = ["mathematics"] if judge == "mathematics" else ["mathematics", "contract"]
    bad = [i for k in judged for i in failing.get(k, [])]
    print(
        f"judged: {' and '.join(judged)}; "
        + (f"{len(bad)} FAIL or not implemented, exit status 1" if bad else "exit status 0"),
        file=out,
    )
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m spec",
        description=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Adapter instructions: {README_ADAPTER} ({SPEC_DIR / 'README.md'}).",
    )
    ap.add_argument(
        "--impl",
        default=os.environ.get(IMPL_ENV) or "smog",
        help="MODULE or MODULE:ATTR (default smog)",
    )
    ap.add_argument(
        "--xfail",
        help="file of test names or invariant ids (one a line, # comments) expected to fail",
    )
    ap.add_argument(
        "--profile",
        choices=("ci", "thorough"),
        default="ci",
        help="ci: 12 derandomized examples per test (default); thorough: 400 random ones",
    )
    ap.add_argument(
        "-m",
        dest="select",
        help='pytest marker expression over invariant ids and kinds, e.g. "G5 or S6", '
        '"mathematics"',
    )
    ap.add_argument(
        "--judge",
        choices=("all", "mathematics"),
        default="all",
        help="what the exit status judges: every invariant (default) or the mathematics alone",
    )
    args = ap.parse_args(argv)
    if args.xfail and not os.path.isfile(args.xfail):
        print(
            f"error: --xfail file {args.xfail!r} does not exist; pass a text file with one test name or "
            f"invariant id a line",
            file=sys.stderr,
        )
        return 2
    try:
        ns = load_namespace(args.impl)
    except Exception as e:  # noqa: BLE001 - any import failure of the module under test is reported in one line
        print(
            f"error: cannot import the implementation {args.impl!r} ({type(e).__name__}: {e}); pass "
            f"--impl MODULE or MODULE:ATTR importable from the current directory or PYTHONPATH",
            file=sys.stderr,
        )
        return 2
    try:
        declared = declarations(ns)
    except ValueError as e:
        print(f"error: {args.impl}: {e}", file=sys.stderr)
        return 2
    os.environ[IMPL_ENV] = args.impl
    if args.xfail:
        os.environ["SMOG_XFAIL"] = os.path.abspath(args.xfail)
    else:
        os.environ.pop("SMOG_XFAIL", None)
    import pytest

    col = Collector()
    cmd = [
        str(SPEC_DIR),
        "-qq",
        "--tb=no",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:warnings",
        "-o",
        "addopts=",
        f"--hypothesis-profile=verdict-{args.profile}",
        f"--ignore={SPEC_DIR / 'test_meta.py'}",
        f"--ignore={SPEC_DIR / 'test_mutants.py'}",
        f"--ignore={SPEC_DIR / 'test_peers.py'}",
        f"--rootdir={SPEC_DIR.parent}",
    ]
    if args.select:
        cmd += ["-m", args.select]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = pytest.main(cmd, plugins=[col])
    if rc not in (
        0,
        1,
    ):  # an internal or usage error, or nothing collected: show pytest's own words
        print(buf.getvalue()[-3000:], file=sys.stderr)
        print(f"error: pytest exited with {int(rc)} before judging {args.impl!r}", file=sys.stderr)
        return 2
    return report(
        verdicts(col),
        args.impl,
        args.profile,
        declared=declared,
        judge=args.judge,
        gradless=no_autograd(col),
        optional=skipped_as(col, OPTIONAL_NOT_IMPLEMENTED),
        moot=skipped_as(col, NA_DECLARED),
    )


if __name__ == "__main__":
    sys.exit(main())
