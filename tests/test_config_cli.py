"""The config check as a user meets it on the command line: a dry run stops at parse time with a
few lines of ours, and `snakemake predict` reruns when the images in its folders change."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.workflow import job_counts, run_snakemake, scenario_config


@pytest.mark.parametrize(("overlay", "message"), [
    ({"protocl": {"way": 3}}, "`protocl` is not a config key at the top level: did you mean `protocol`?"),
    ({"data": {"digits": {"source": "digits", "enabled": False}}},  # `data` replaces the scenario's datasets
     "no dataset is enabled (data.<name>.enabled is false for digits): set data.<name>.enabled: true for the "
     "dataset(s) to run"),
    ({"predict": {"shot": 3}}, "predict.shot is 3, not one of protocol.shots [1, 5] (models are trained per shot): "
                               "pick one of them, add it to protocol.shots, or null for the shot closest to your "
                               "support set"),
])
def test_a_config_mistake_stops_the_dry_run_with_one_short_message(tmp_path, overlay, message):
    """Before the check, a misspelt key printed the whole schema and config (879 lines); an
    unused dataset or shot failed only when a job ran, or trained new models."""
    result = run_snakemake(tmp_path, scenario_config("tiny", overlay), "-n", check=False)
    lines = (result.stdout + result.stderr).splitlines()
    assert result.returncode != 0
    header = next(i for i, line in enumerate(lines) if line.startswith("ConfigError in file"))
    assert lines[header + 1] == message  # ours, right under Snakemake's header
    assert all(line.startswith("  File ") for line in lines[header + 2:])  # then only the traceback's frames
    assert len(lines) < 15, "\n".join(lines)


# ----------------------------------------------------------------------------- predict's folders
PREDICT = {"name": "mine", "support": "support", "query": "query", "method": "ft", "shot": 1}
MODEL = "results/models/digits/resnet12/ft/1shot/seed1.pt"


#: older than any predictions the test writes, however long it takes
LONG_AGO = time.time() - 86400


def set_back(path: Path) -> None:
    os.utime(path, (LONG_AGO, LONG_AGO))


def planned_jobs(workdir: Path, config: dict) -> dict[str, int]:
    """The jobs a dry run of `snakemake predict` plans. The model file is a stand-in (a dry run reads
    none), so rule predict alone is allowed: Snakemake takes its inputs as given files instead of
    planning their training."""
    result = run_snakemake(workdir, config, "predict", "-n", "--allowed-rules", "predict")
    return job_counts(result.stdout)


def replace_an_image(workdir: Path) -> None:
    (workdir / "support/cat/1.png").write_bytes(b"another cat")


def add_an_old_image(workdir: Path) -> None:
    """As `cp -p` or `mv` do: the new file keeps its old mtime; the folder holding it changes."""
    shutil.copy2(workdir / "support/cat/1.png", workdir / "support/dog/2.png")


def remove_an_image(workdir: Path) -> None:
    (workdir / "support/cat/2.png").unlink()


def replace_a_query_image(workdir: Path) -> None:
    (workdir / "query/b.png").write_bytes(b"another query")


@pytest.mark.slow  # six Snakemake dry runs (13 s): out of the quick loop, in CI
def test_predict_reruns_when_the_images_in_its_folders_change(tmp_path):
    """Snakemake dated each folder by its own mtime, which a change inside a class folder (or a
    file replaced in place) leaves alone: "Nothing to be done", and the old predictions stayed.
    One scratch folder for every change (dry runs take seconds): after each, the folders are set
    back in time, so the predictions are up to date again and the next change is seen alone."""
    for name in ("support/cat/1.png", "support/cat/2.png", "support/dog/1.png", "query/a.png", "query/b.png", MODEL):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"image " + name.encode())
    for path in tmp_path.rglob("*"):
        set_back(path)
    (tmp_path / "results/predictions").mkdir()
    (tmp_path / "results/predictions/mine.csv").write_text("file,prediction\n")
    config = scenario_config("tiny", {"methods": ["ft"], "predict": PREDICT})
    assert planned_jobs(tmp_path, config) == {}, "the predictions should start up to date"

    # predict skips hidden files (a desktop's .DS_Store), so they do not date the predictions
    (tmp_path / "support/cat/.DS_Store").write_bytes(b"")
    set_back(tmp_path / "support/cat")
    assert planned_jobs(tmp_path, config) == {}, "a hidden file"

    for change in (replace_an_image, add_an_old_image, remove_an_image, replace_a_query_image):
        change(tmp_path)
        assert planned_jobs(tmp_path, config) == {"predict": 1, "total": 1}, change.__name__
        for folder in ("support", "query"):
            for path in [tmp_path / folder, *(tmp_path / folder).rglob("*")]:
                set_back(path)
