"""A reader of the repository can open every document it cites.

Comments, docstrings and configs cite Markdown files for the facts behind a default or a format;
a cited file that is not in the repository (a planning note kept elsewhere, a page never written)
leaves the reader with nothing to check. Only git-tracked files count: they are what a clone gets.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.workflow import REPO

#: Notes that were never part of the repository; citing them points a reader at nothing.
NEVER_CITED = re.compile(r"\b(?:DESIGN|REFERENCE)\.md\b")
#: ``docs/<name>.md`` anywhere (not as the tail of a longer path such as ``x/docs/...``).
DOCS_PAGE = re.compile(r"(?<![\w./-])docs/[\w.-]+\.md\b")
#: An upper-case Markdown name (README.md, RESULTS.md, ...), alone or at the end of a path.
UPPER_NAME = re.compile(r"(?<![\w.-])((?:[\w.-]+/)*)([A-Z][A-Z0-9_-]*\.md)\b")


@functools.cache
def _tracked_files() -> tuple[str, ...] | None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    return tuple(name for name in out.stdout.decode().split("\0") if name)


def tracked() -> tuple[str, ...]:
    files = _tracked_files()
    if files is None:
        pytest.skip("needs a git checkout: the tracked files are what a clone gets")
    return files


def texts():
    """(path, text) of every tracked text file that exists in the working tree."""
    for name in tracked():
        path = REPO / name
        if not path.is_file():
            continue  # deleted but not yet staged
        try:
            yield name, path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (images, archives): cites nothing


def hits(pattern: re.Pattern, group: int = 0) -> dict[str, list[str]]:
    """Cited name -> the ``file:line`` places citing it."""
    found: dict[str, list[str]] = {}
    for name, text in texts():
        for number, line in enumerate(text.splitlines(), 1):
            for match in pattern.finditer(line):
                found.setdefault(match.group(group), []).append(f"{name}:{number}")
    return found


def test_no_tracked_file_cites_the_notes_outside_the_repository():
    cited = hits(NEVER_CITED)
    assert not cited, f"cite a docs/ page or the paper (arXiv:1812.02391) instead: {cited}"


def test_every_cited_docs_page_exists():
    files = set(tracked())
    missing = {page: places for page, places in hits(DOCS_PAGE).items() if page not in files}
    assert not missing, f"cited docs pages that are not tracked files: {missing}"


def test_every_cited_upper_case_markdown_file_is_in_the_repository():
    """README.md, RESULTS.md and the like: the name (with its path where one is given) is a tracked file."""
    files = set(tracked())
    basenames = {Path(name).name for name in files}
    missing = {}
    for name, text in texts():
        for number, line in enumerate(text.splitlines(), 1):
            for match in UPPER_NAME.finditer(line):
                folder, base = match.group(1), match.group(2)
                # with a path: that file, from the repository root or from the citing file's
                # folder; a bare name: a file of that name somewhere
                known = base in basenames if not folder else (folder + base) in files or \
                    os.path.normpath(os.path.join(os.path.dirname(name), folder + base)) in files
                if not known:
                    missing.setdefault(match.group(0), []).append(f"{name}:{number}")
    assert not missing, f"cited Markdown files that are not in the repository: {missing}"


def test_the_patterns_catch_what_they_are_for():
    """Guards the three tests above against a pattern that silently matches nothing."""
    assert NEVER_CITED.search("see ../notes/" + "DESIGN" + ".md section 2")
    assert DOCS_PAGE.findall("(docs/data-format.md) and results/docs/x.md") == ["docs/data-format.md"]
    assert [m.group(0) for m in UPPER_NAME.finditer("bench/RESULTS.md, README.md, summary.md")] == \
        ["bench/RESULTS.md", "README.md"]
