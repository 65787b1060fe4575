"""Every Snakemake command the README gives to type must at least plan: a dry run of each.

Found the hard way: `snakemake --cores 2 --configfile configs/ablation_demo.yaml ablation` stopped
with a traceback, since `--configfile` takes several values and swallowed the target as a second
config file. Slurm-profile commands are planned in tests/test_slurm.py; `--report` needs results.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from tests.workflow import REPO

FENCED_BASH = re.compile(r"```bash\n(.*?)```", re.DOTALL)


def readme_snakemake_commands() -> list[list[str]]:
    """The arguments of each `snakemake` call in the README's bash blocks (`&&` chains split)."""
    commands = []
    for block in FENCED_BASH.findall((REPO / "README.md").read_text()):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words and (words[0] == "snakemake" or words[0].endswith("/snakemake")):
                    commands.append(words[1:])
    return commands


PLANNED = [args for args in readme_snakemake_commands()
           if "--report" not in args and not any(arg.startswith("profiles/slurm") for arg in args)]


def test_the_readme_gives_the_commands_this_test_plans():
    assert len(PLANNED) >= 4  # demo, full protocol, ablation demo, several GPUs: a parsing slip shows here
    assert ["ablation", "--cores", "2", "--configfile", "configs/ablation_demo.yaml"] in PLANNED


@pytest.mark.parametrize("args", PLANNED, ids=[" ".join(args) for args in PLANNED])
def test_readme_command_plans_its_jobs(args):
    result = subprocess.run([sys.executable, "-m", "snakemake", *args, "--dry-run", "--quiet", "rules"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output[-3000:]
