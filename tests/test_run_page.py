"""METHOD.md's "The whole run on one page": every line of its pseudocode names, after `#`, the
function that does it as `file.py:name` (`name` may be dotted: `SMoG.forward`), and every named
function exists in that file of this repository. A renamed or removed function, or a line without a
name, fails here, naming the line."""

from __future__ import annotations

import importlib
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADING = "## The whole run on one page"
NAME = re.compile(r"#\s*([\w/]+\.py):([\w.]+)\s*$")


def run_page_lines(text: str) -> list[str]:
    """The lines of the first ```text block after HEADING."""
    assert HEADING in text, f"METHOD.md has no section {HEADING!r}"
    m = re.search(r"```text\n(.*?)```", text[text.index(HEADING) :], re.S)
    assert m, f"no ```text block after {HEADING!r}"
    return m.group(1).splitlines()


def unresolved(lines: list[str], root: str = ROOT) -> list[str]:
    """'line: why' for every line that names no function or names one that does not exist."""
    bad = []
    for ln in lines:
        m = NAME.search(ln)
        if not m:
            bad.append(f"{ln.strip()!r}: names no file.py:function")
            continue
        path, name = m.groups()
        if not os.path.isfile(os.path.join(root, path)):
            bad.append(f"{ln.strip()!r}: no file {path}")
            continue
        obj = importlib.import_module(path[:-3].replace("/", "."))
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if not callable(obj):
            bad.append(f"{ln.strip()!r}: {path} has no function {name}")
    return bad


def test_every_run_page_line_names_an_existing_function():
    with open(os.path.join(ROOT, "METHOD.md"), encoding="utf-8") as fh:
        text = fh.read()
    assert text.index(HEADING) < text.index("\n## ", text.index("\n## ") + 1), (
        "METHOD.md must open with the run page (its first section)"
    )
    lines = run_page_lines(text)
    assert 25 <= len(lines) <= 40, f"the run page has {len(lines)} lines; keep it to about 30"
    bad = unresolved(lines)
    assert not bad, "METHOD.md's run page names functions that do not exist:\n" + "\n".join(bad)


def test_the_check_reports_missing_and_unnamed_functions():
    """The same check on fabricated lines: real names pass, the rest are reported."""
    lines = [
        "EMA        # smog.py:SMoG.momentum_step",
        "regroup    # train.py:regroup",
        "no name here",
        "gone       # smog.py:SMoG.no_such_method",
        "elsewhere  # nowhere.py:f",
    ]
    assert unresolved(lines) == [
        "'no name here': names no file.py:function",
        "'gone       # smog.py:SMoG.no_such_method': smog.py has no function SMoG.no_such_method",
        "'elsewhere  # nowhere.py:f': no file nowhere.py",
    ]
