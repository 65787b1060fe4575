"""The README and docs/ as a reader meets them: a short front page, links that land, commands that plan.

Every Snakemake command the README or a page of docs/ gives to type must at least plan: a dry run
of each. Found the hard way: `snakemake --cores 2 --configfile configs/ablation_demo.yaml ablation`
stopped with a traceback, since `--configfile` takes several values and swallowed the target as a
second config file. Slurm-profile commands are planned in tests/test_slurm.py; `--report` needs
results.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.workflow import REPO

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
# The front page stays a front page; the rest belongs in docs/.
README_MAX_CHARS = 12_000

FENCED_BASH = re.compile(r"```bash\n(.*?)```", re.DOTALL)
FENCED = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#* *$", re.MULTILINE)
URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def name(page: Path) -> str:
    return str(page.relative_to(REPO))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (inline code and link text kept, markup dropped),
    lower-cased, without punctuation other than '-' and '_', spaces turned into '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCED.sub("", page.read_text())):
        slug = github_slug(heading)
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def relative_links(page: Path) -> list[str]:
    """The targets of the page's Markdown links that point inside the repository."""
    prose = INLINE_CODE.sub("", FENCED.sub("", page.read_text()))
    return [target for target in LINK.findall(prose) if not URL_SCHEME.match(target)]


def test_readme_is_a_front_page():
    size = len(README.read_text())
    assert size <= README_MAX_CHARS, f"README.md has {size:,} characters; move detail into docs/ (limit {README_MAX_CHARS:,})"


@pytest.mark.parametrize(("heading", "slug"), [
    ("Pre-train on N GPUs / nodes", "pre-train-on-n-gpus--nodes"),
    ("The ablation: `snakemake ablation`", "the-ablation-snakemake-ablation"),
    ("What `summary.csv` holds, and why it has seeds", "what-summarycsv-holds-and-why-it-has-seeds"),
    ("GPU check (`bench/gpu_check.sh`)", "gpu-check-benchgpu_checksh"),
])
def test_anchors_follow_githubs_slug_rules(heading, slug):
    assert github_slug(heading) == slug


def test_every_page_links_back_to_the_readme_first():
    for page in DOCS:
        first_lines = page.read_text().split("\n\n")[:2]
        assert any("](../README.md)" in part for part in first_lines), f"{name(page)} opens without a link to the README"


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_relative_links_land_on_a_file_and_heading(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(REPO) if file.is_relative_to(REPO) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {name(file)}")
    assert not broken, f"{name(page)} has broken links:\n" + "\n".join(broken)


def snakemake_commands(page: Path) -> list[list[str]]:
    """The arguments of each `snakemake` call in a page's bash blocks (`&&` chains split)."""
    commands = []
    for block in FENCED_BASH.findall(page.read_text()):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words and (words[0] == "snakemake" or words[0].endswith("/snakemake")):
                    commands.append(words[1:])
    return commands


# Each distinct command once, wherever it is given (the README and a page may repeat one).
PLANNED = []
for _page in PAGES:
    for _args in snakemake_commands(_page):
        if ("--report" not in _args and not any(arg.startswith("profiles/slurm") for arg in _args)
                and _args not in PLANNED):
            PLANNED.append(_args)


def test_the_pages_give_the_commands_this_test_plans():
    readme = snakemake_commands(README)
    # a parsing slip shows here: the demo and the full protocol on the front page, the ablation in docs/
    assert ["--cores", "2", "--configfile", "configs/demo.yaml"] in readme
    assert ["--cores", "8", "--resources", "gpu=1"] in readme
    assert ["ablation", "--cores", "2", "--configfile", "configs/ablation_demo.yaml"] in PLANNED


@pytest.mark.parametrize("args", PLANNED, ids=[" ".join(args) for args in PLANNED])
def test_readme_command_plans_its_jobs(args):
    result = subprocess.run([sys.executable, "-m", "snakemake", *args, "--dry-run", "--quiet", "rules"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output[-3000:]
