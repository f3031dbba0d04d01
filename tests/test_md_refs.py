"""Every Markdown page that a project file mentions exists in the repository.

A mention is a path-like token ending in `.md` (`METHOD.md`, `spec/step.md`, `../README.md`, a glob such
as `spec/*.md`) in a tracked text file: *.py, *.md, *.toml and the CI script. It resolves if it names a
file inside the repository relative to the mentioning file's folder or to the repository root (a glob:
if it matches at least one). URLs are skipped. A path that leaves the repository (design notes kept
next to it, say) does not resolve, even when the file exists on this machine.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED_SUFFIXES = (".py", ".md", ".toml")
SCANNED_NAMES = (".ci/run",)
SKIP_DIRS = {".git", "runs", "data", "__pycache__", ".pytest_cache", ".hypothesis"}

URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
MENTION = re.compile(r"(?<![\w.*/-])([\w.*/-]*[\w*]\.md)(?![\w-])")


def project_files(root: str) -> list[str]:
    """Paths (relative to root, '/'-separated) of the text files to scan: tracked and not-ignored files of
    a git checkout, else a walk of the tree without .git, runs, data and caches."""
    try:
        out = subprocess.run(
            ["git", "-C", root, "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = []
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
            names += [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for f in files]
    return sorted(
        n
        for n in set(names)
        if (n.endswith(SCANNED_SUFFIXES) or n in SCANNED_NAMES)
        and os.path.isfile(os.path.join(root, n))
    )


def mentions(text: str) -> list[tuple[int, str]]:
    """(line number, mentioned path) for every .md mention outside URLs."""
    found = []
    for no, line in enumerate(text.splitlines(), 1):
        for m in MENTION.finditer(URL.sub(" ", line)):
            found.append((no, m.group(1)))
    return found


def resolves(root: str, mentioning_file: str, ref: str) -> bool:
    """True if `ref` names a file inside `root`, relative to the mentioning file's folder or to root."""
    root = os.path.realpath(root)
    for base in (os.path.dirname(os.path.join(root, mentioning_file)), root):
        pattern = os.path.realpath(os.path.join(base, ref.lstrip("/") if base == root else ref))
        if os.path.commonpath([root, pattern]) != root:
            continue  # outside the repository
        if any(os.path.isfile(p) for p in glob.glob(pattern)):
            return True
    return False


def missing_md_refs(root: str, files: list[str] | None = None) -> list[str]:
    """'file:line: path' for every mention of a .md path that does not resolve inside the repository."""
    bad = []
    for rel in project_files(root) if files is None else files:
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        for no, ref in mentions(text):
            if not resolves(root, rel, ref):
                bad.append(f"{rel}:{no}: {ref}")
    return bad


def test_every_md_mention_in_the_project_resolves():
    files = project_files(ROOT)
    assert "README.md" in files and "smog.py" in files, f"scanned the wrong tree: {files[:5]}"
    bad = missing_md_refs(ROOT, files)
    assert not bad, (
        "these project files mention Markdown files that are not in the repository "
        "(point at METHOD.md or a file under spec/ instead):\n" + "\n".join(bad)
    )


def test_the_check_reports_a_fabricated_missing_page(tmp_path):
    """The same function, on a small tree: resolvable mentions pass, the missing ones are reported.
    Names are assembled from MD so that this file's own text mentions none of them."""
    MD = ".md"
    (tmp_path / "doc").mkdir()
    (tmp_path / f"GUIDE{MD}").write_text("root page\n")
    (tmp_path / "doc" / f"part{MD}").write_text(
        f"see ../GUIDE{MD} and GUIDE{MD} and part{MD} and doc/*{MD}\n"
    )
    (tmp_path.parent / f"outside-note{MD}").write_text("exists, but not in the repository\n")
    (tmp_path / "mod.py").write_text(
        f'"""See doc/part{MD}, [guide](GUIDE{MD}#idea), https://example.org/x/no-such-page{MD} and no-such-page{MD}.\n'
        f'Also ../outside-note{MD} and doc/nothing*{MD}."""\n'
    )
    bad = missing_md_refs(str(tmp_path), [f"GUIDE{MD}", f"doc/part{MD}", "mod.py"])
    assert bad == [
        f"mod.py:1: no-such-page{MD}",
        f"mod.py:2: ../outside-note{MD}",
        f"mod.py:2: doc/nothing*{MD}",
    ], bad


def test_project_files_without_git_walks_the_tree(tmp_path):
    """Outside a git checkout the scan walks the tree, skipping .git, runs and data."""
    MD = ".md"
    for rel in (
        "a.py",
        f"b{MD}",
        "pyproject.toml",
        ".ci/run",
        f"runs/x{MD}",
        f"data/y{MD}",
        f".git/z{MD}",
        "c.txt",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x\n")
    assert project_files(str(tmp_path)) == [".ci/run", "a.py", f"b{MD}", "pyproject.toml"]
