"""`snakemake predict` and `mtl-predict` on the tiny workflow: a saved test episode written out as
folders gets exactly evaluate's predictions; bad input stops it with nothing written.

They predict in a copy of the session's one-seed run (tests/conftest.py, tiny_seed_two_alone: seed 2,
one image per forward pass, as the exact-equality contract needs)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mtl.data.episodes import load_episodes
from mtl.data.hdf5 import HDF5Split
from mtl.model_file import read_model_file
from tests.workflow import run_snakemake

pytestmark = pytest.mark.slow
WAY, SHOT, QUERY = 3, 5, 5  # the tiny scenario's 5-shot episodes
SEED = 2  # the run's one training seed


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_seed_two_alone):
    """A copy of the shared run (predictions are written into the workflow's folder)."""
    run = tiny_seed_two_alone.copy_to(tmp_path_factory.mktemp("predict_workflow") / "run")
    return run.workdir, run.config


def write_test_episode(workdir, root, index=0):
    """Episode ``index`` of the saved 5-shot test episodes as support/c<position>/ and query/ PNGs."""
    split = HDF5Split(workdir / "data/digits/test.h5")
    episodes = load_episodes(workdir / f"results/digits/episodes/{WAY}way{SHOT}shot.npz")
    for position, ids in enumerate(np.asarray(episodes.support[index]).reshape(WAY, SHOT)):
        (root / "support" / f"c{position}").mkdir(parents=True)
        for k, image in enumerate(split.get_images(ids)):
            Image.fromarray(image).save(root / "support" / f"c{position}" / f"{k}.png")
    (root / "query").mkdir()
    for k, image in enumerate(split.get_images(np.asarray(episodes.query[index]))):
        Image.fromarray(image).save(root / "query" / f"q{k:03d}.png")
    return root / "support", root / "query", np.repeat([f"c{p}" for p in range(WAY)], QUERY)


def evaluated_correct(workdir, method, seed=SEED, index=0) -> int:
    table = pd.read_csv(workdir / f"results/digits/resnet12/seed{seed}/{method}/{SHOT}shot/episodes.csv")
    return round(float(table.loc[table["episode"] == index, "accuracy"].iloc[0]) * WAY * QUERY)


def test_every_trained_run_is_exported_as_a_file_that_stands_alone(tiny_run):
    workdir, config = tiny_run
    for method in config["methods"]:
        for shot in (1, 5):
            model = workdir / f"results/models/digits/resnet12/{method}/{shot}shot/seed{SEED}.pt"
            backbone, info = read_model_file(model)
            assert (info["method"], info["shot"], info["seed"], info["trained_on"]) == (method, shot, SEED, "digits")
            assert info["stored_image_size"] == 16 and len(info["data_sha256"]["train"]) == 64
            assert info["config"]["protocol"]["way"] == WAY and info["commit"]


def test_snakemake_predict_on_a_saved_episode_equals_evaluate(tiny_run, tmp_path):
    workdir, config = tiny_run
    support, query, truth = write_test_episode(workdir, tmp_path)
    run_snakemake(workdir, config, "predict", "--config",
                  f"predict={{support: {support}, query: {query}, method: mtl, shot: 5, name: episode0}}")
    table = pd.read_csv(workdir / "results/predictions/episode0.csv")
    assert table["file"].tolist() == [f"q{k:03d}.png" for k in range(WAY * QUERY)]
    assert list(table.columns[-WAY:]) == ["p_c0", "p_c1", "p_c2"] and (table["seeds"] == 1).all()
    assert (table["predicted"].to_numpy() == truth).sum() == evaluated_correct(workdir, "mtl")


def test_the_console_command_predicts_with_a_model_file(tiny_run, tmp_path):
    workdir, _ = tiny_run
    support, query, truth = write_test_episode(workdir, tmp_path)
    out = tmp_path / "ft.csv"
    subprocess.run([sys.executable, "-m", "mtl.cli", "--model", str(workdir / "results/models/digits/resnet12/ft/5shot"),
                    "--support", str(support), "--query", str(query), "--out", str(out), "--device", "cpu",
                    "--threads", "1", "--batch-size", "1"], check=True, capture_output=True, text=True, timeout=300)
    table = pd.read_csv(out)
    assert (table["predicted"].to_numpy() == truth).sum() == evaluated_correct(workdir, "ft")


def test_predict_picks_the_best_method_and_refuses_an_empty_class(tiny_run, tmp_path):
    workdir, config = tiny_run
    support, query, _ = write_test_episode(workdir, tmp_path)
    run_snakemake(workdir, config, "predict", "--config", f"predict={{support: {support}, query: {query}}}")
    summary = pd.read_csv(workdir / "results/summary.csv")
    best = summary[summary["shot"] == 5].sort_values("accuracy", ascending=False, kind="stable").iloc[0]["method"]
    log = (workdir / "logs/predict/predictions.log").read_text()
    assert f"predicting with {best} 5-shot" in log
    assert len(pd.read_csv(workdir / "results/predictions/predictions.csv")) == WAY * QUERY

    (support / "c9_empty").mkdir()
    result = run_snakemake(workdir, config, "predict", "--config",
                           f"predict={{support: {support}, query: {query}, name: broken}}", check=False)
    assert result.returncode != 0
    assert "c9_empty: empty class folder" in (workdir / "logs/predict/broken.log").read_text()
    assert not (workdir / "results/predictions/broken.csv").exists()
