"""What a stranger's `pip install` relies on: the Python floor, one version, the license, the
citation and the Slurm plugin floor, stated consistently (no network, no install)."""
from __future__ import annotations

import re
import tomllib

import yaml

import mtl
from tests.workflow import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
#: The first snakemake-executor-plugin-slurm with `slurm-status-command` that imports without Slurm.
SLURM_PLUGIN_FLOOR = (2, 0, 3)


def _floor(requirement: str) -> tuple[int, ...]:
    found = re.search(r">=\s*([0-9.]+)", requirement)
    assert found, f"no >= floor in {requirement!r}"
    return tuple(int(part) for part in found.group(1).split("."))


def test_python_floor_is_what_snakemake_8_20_needs_and_the_conda_env_agrees():
    assert _floor(PROJECT["requires-python"]) >= (3, 11)
    conda = yaml.safe_load((REPO / "envs/mtl.yaml").read_text())
    python = next(dep for dep in conda["dependencies"] if isinstance(dep, str) and dep.startswith("python"))
    assert _floor(python) == _floor(PROJECT["requires-python"]), (python, PROJECT["requires-python"])


def test_the_version_has_one_source():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mtl.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", mtl.__version__)
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert "version" not in citation, "a second copy of the version would drift"


def test_the_declared_license_ships():
    text = (REPO / "LICENSE").read_text()
    assert PROJECT["license"] == "MIT" and text.startswith("MIT License")
    assert "Permission is hereby granted, free of charge" in text


def test_citation_cites_this_software_and_the_paper():
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    for key in ("cff-version", "message", "title", "authors", "type"):
        assert citation.get(key), key
    paper = citation["references"][0]
    assert paper["title"] == "Meta-Transfer Learning for Few-Shot Learning" and paper["year"] == 2019
    assert [a["family-names"] for a in paper["authors"]] == ["Sun", "Liu", "Chua", "Schiele"]


def test_both_extras_ask_for_the_slurm_plugin_the_profile_needs():
    extras = PROJECT["optional-dependencies"]
    floors = [_floor(req) for name in ("slurm", "test") for req in extras[name]
              if req.startswith("snakemake-executor-plugin-slurm")]
    assert len(floors) == 2 and floors[0] == floors[1] and floors[0] >= SLURM_PLUGIN_FLOOR
    profile = (REPO / "profiles/slurm/config.yaml").read_text()
    assert "slurm-status-command" in profile, "the option that sets the floor; revisit it if the profile drops it"


def test_console_commands_point_at_functions_that_exist():
    import importlib

    for name, target in PROJECT.get("scripts", {}).items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_a_plain_install_ships_the_config_schema(tmp_path):
    """The trainers take their defaults from the schema at import: a wheel (what a non-editable
    `pip install .` installs) must carry it inside the package, where mtl.config reads it."""
    import subprocess
    import sys
    import zipfile

    from mtl.config import SCHEMA_PATH

    assert SCHEMA_PATH.parent == REPO / "mtl"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    assert "mtl/config.schema.yaml" in zipfile.ZipFile(wheel).namelist()
