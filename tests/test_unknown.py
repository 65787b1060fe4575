"""'None of these' (`predict.unknown`, `mtl-predict --unknown`): a query unlike every support image is
reported as none of the support classes; off by default, where the predictions table is unchanged."""
from __future__ import annotations

import inspect
import re
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from mtl.base_learner import embed
from mtl.cli import predict_main
from mtl.config import check_section, schema_defaults
from mtl.data.user_images import SupportSet
from mtl.errors import ConfigError, DataError
from mtl.model_file import export_model
from mtl.models import build_backbone, save_encoder
from mtl.predict import NONE_OF_THESE, Prediction, SeedEnsemble, load_models, write_predictions
from tests.workflow import REPO

SIZE, STORED, SHOT = 16, 20, 3
NORMALIZE = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
#: one colour per support class; the queries of "far" are flat images of colours no class has
COLOURS = {"blue": (40, 40, 200), "green": (40, 200, 40), "red": (200, 40, 40)}
FAR = np.array([np.full((STORED, STORED, 3), colour, np.uint8) for colour in [(255, 255, 255), (200, 40, 200)]])
#: below the similarity of every fresh image of a support colour on this fixture, above the far images'
THRESHOLD = 0.98
#: the table's columns without the option (what the predictions CSV has always held)
COLUMNS_OFF = ["file", "predicted", "probability", "seeds_agreeing", "seeds", "probability_sd",
               "p_blue", "p_green", "p_red"]


def noisy(colours, rng) -> np.ndarray:
    """One image per colour: the colour plus uniform noise in [-40, 40) per pixel."""
    pixels = np.asarray(colours)[:, None, None, :] + rng.integers(-40, 40, (len(colours), STORED, STORED, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Exported ``proto`` models of two seeds (two random encoders) and an ``ft_last`` model of the first."""
    folder = tmp_path_factory.mktemp("unknown")
    files = {}
    for seed in (1, 2):
        torch.manual_seed(seed)
        save_encoder(build_backbone("resnet12", width=0.125), folder / f"encoder{seed}.pt", image_size=SIZE,
                     normalize=NORMALIZE)
        for method in ("proto", "ft_last") if seed == 1 else ("proto",):
            files[method, seed] = export_model(method, folder / f"encoder{seed}.pt", folder / method / f"seed{seed}.pt",
                                               trained_on="toy", seed=seed, shot=SHOT, way=3, data_sha256={},
                                               stored_image_size=STORED, config={}, commit="abc123")
    return files


@pytest.fixture(scope="module")
def images():
    """A support set of three colours (3 images each), and queries: 4 fresh images of each colour."""
    rng = np.random.default_rng(0)
    colours = list(COLOURS.values())
    support = SupportSet(noisy(np.repeat(colours, SHOT, axis=0), rng), np.repeat(np.arange(3), SHOT), list(COLOURS),
                         [])
    return support, noisy(np.repeat(colours, 4, axis=0), rng)


def ensemble(models, method="proto") -> SeedEnsemble:
    return load_models([path for (m, _), path in models.items() if m == method])


def test_off_by_default_the_table_is_the_one_without_the_option(models, images):
    support, known = images
    assert inspect.signature(SeedEnsemble.predict).parameters["unknown"].default is None
    assert schema_defaults("predict")["unknown"] is None
    assert yaml.safe_load((REPO / "config.yaml").read_text())["predict"]["unknown"] is None
    queries = np.concatenate([known, FAR])
    off = ensemble(models).predict(support, queries, inference_batch_size=8)
    assert off.similarity is None and not off.none_of_these.any()
    table = off.table()
    assert list(table.columns) == COLUMNS_OFF
    assert table["predicted"].tolist() == [list(COLOURS)[i] for i in off.probabilities.argmax(axis=1)]
    # on, at a threshold no similarity is below: only the two added columns differ
    on = ensemble(models).predict(support, queries, inference_batch_size=8, unknown=-1.0).table()
    assert list(on.columns) == COLUMNS_OFF[:2] + ["most_probable", "similarity"] + COLUMNS_OFF[2:]
    pd.testing.assert_frame_equal(on.drop(columns=["most_probable", "similarity"]), table)


def cosine_to_nearest_support(model, support, queries) -> np.ndarray:
    """By hand: every query's largest cosine similarity to a support image, on the encoder's features."""
    feats = embed(model.backbone, np.concatenate([support.images, queries]), model.transform).double().numpy()
    support_feats, query_feats = feats[:len(support.images)], feats[len(support.images):]
    best = []
    for q in query_feats:
        best.append(max(float(q @ s) / (np.linalg.norm(q) * np.linalg.norm(s)) for s in support_feats))
    return np.array(best)


@pytest.mark.parametrize("method", ["proto", "ft_last"])
def test_the_similarity_is_the_seed_mean_cosine_to_the_nearest_support_image(models, images, method):
    """Fine-tuning learners read a trunk's output, not the encoder's features: the score must not change."""
    support, known = images
    queries = np.concatenate([known, FAR])
    models_of_method = ensemble(models, method)
    prediction = models_of_method.predict(support, queries, inference_batch_size=8, unknown=0.5)
    by_hand = [cosine_to_nearest_support(model, support, queries) for model in models_of_method.models]
    assert prediction.per_model_similarity.shape == (len(by_hand), len(queries))
    np.testing.assert_allclose(prediction.similarity, np.mean(by_hand, axis=0), rtol=0, atol=1e-6)
    if method == "proto":
        assert not np.allclose(by_hand[0], by_hand[1]), "the seeds' encoders differ, so the mean is tested"


def test_a_query_identical_to_a_support_image_is_kept(models, images):
    support, _ = images
    prediction = ensemble(models).predict(support, support.images, inference_batch_size=8, unknown=0.999)
    np.testing.assert_allclose(prediction.similarity, 1.0, atol=1e-6)
    assert not prediction.none_of_these.any()
    table = prediction.table()
    assert (table["predicted"] == table["most_probable"]).all() and NONE_OF_THESE not in set(table["predicted"])


def test_a_query_far_from_every_class_is_flagged_and_its_most_probable_class_kept(models, images, tmp_path):
    support, known = images
    out = tmp_path / "predictions.csv"
    prediction = write_predictions(ensemble(models), support, np.concatenate([known, FAR]), out,
                                   inference_batch_size=8, unknown=THRESHOLD)
    assert prediction.similarity[len(known):].max() < THRESHOLD < prediction.similarity[:len(known)].min()
    table = pd.read_csv(out)
    expected = [list(COLOURS)[c] for c in np.repeat(np.arange(3), 4)]
    assert table["predicted"].tolist() == expected + [NONE_OF_THESE] * len(FAR)
    assert table["most_probable"].tolist()[:len(known)] == expected
    assert set(table["most_probable"][len(known):]) <= set(COLOURS), "the far images' best class is still there"
    # why the score is not the top probability: the classifier is sure of a class for a far image
    assert table["probability"][len(known):].max() > 0.99


def hand_made(similarity, unknown) -> Prediction:
    """Two models' probabilities of 4 queries over classes a and b, and their similarities."""
    probs = np.array([[[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]] * 2)
    return Prediction(["a", "b"], probs, unknown=unknown, per_model_similarity=np.array(similarity))


def test_the_threshold_boundary_a_similarity_equal_to_it_is_kept():
    similarity = [[0.75, 0.5, 1.0, -1.0], [0.875, 0.5, 1.0, -1.0]]  # seed means 0.8125, 0.5, 1, -1 (exact in binary)
    flags = lambda threshold: hand_made(similarity, threshold).none_of_these.tolist()  # noqa: E731
    assert flags(0.8125) == [False, True, False, True]
    assert flags(np.nextafter(0.8125, 1.0)) == [True, True, False, True]
    assert flags(0.5) == [False, False, False, True]
    assert flags(-1.0) == [False, False, False, False], "-1 flags nothing"
    assert flags(1.0) == [True, True, False, True], "1 keeps only the queries with similarity 1"
    table = hand_made(similarity, 0.8125).table()
    assert table["predicted"].tolist() == ["a", NONE_OF_THESE, "a", NONE_OF_THESE]
    assert table["most_probable"].tolist() == ["a", "b", "a", "b"]


@pytest.mark.parametrize("threshold", [1.5, -1.01, float("nan")])
def test_a_threshold_outside_the_cosine_range_is_refused(threshold):
    with pytest.raises(ConfigError, match=r"predict\.unknown.*>= -1 and <= 1"):
        hand_made([[0.5] * 4] * 2, threshold)
    with pytest.raises(ConfigError, match="must be a number or null >= -1 and <= 1"):
        check_section({"unknown": threshold}, "predict")


@pytest.mark.parametrize("name", [NONE_OF_THESE, "None Of These"])
def test_a_support_class_named_like_the_marker_is_refused_while_the_option_is_on(models, images, name):
    support, known = images
    clashing = SupportSet(support.images, support.labels, ["blue", "green", name], [])
    with pytest.raises(DataError, match="rename that folder"):
        ensemble(models).predict(clashing, known, inference_batch_size=8, unknown=0.5)
    assert ensemble(models).predict(clashing, known, inference_batch_size=8).table()["predicted"].notna().all()


def write_folders(root, support, queries):
    """The support set as support/<class>/<k>.png, the queries as query/q<k>.png (in order)."""
    for k, (image, label) in enumerate(zip(support.images, support.labels)):
        folder = root / "support" / support.class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{k}.png")
    (root / "query").mkdir()
    for k, image in enumerate(queries):
        Image.fromarray(image).save(root / "query" / f"q{k:02d}.png")
    return root / "support", root / "query"


def test_the_console_flag_reaches_the_library(models, images, tmp_path, capsys):
    support, known = images
    support_dir, query_dir = write_folders(tmp_path, support, np.concatenate([known, FAR]))
    arguments = ["--model", str(models["proto", 1].parent), "--support", str(support_dir), "--query", str(query_dir),
                 "--batch-size", "8", "--device", "cpu"]
    assert predict_main([*arguments, "--out", str(tmp_path / "off.csv")]) == 0
    assert predict_main([*arguments, "--out", str(tmp_path / "on.csv"), "--unknown", str(THRESHOLD)]) == 0
    off, on = pd.read_csv(tmp_path / "off.csv"), pd.read_csv(tmp_path / "on.csv")
    assert list(off.columns) == COLUMNS_OFF
    assert on["predicted"].tolist()[-len(FAR):] == [NONE_OF_THESE] * len(FAR)
    assert (on["predicted"][:len(known)] == off["predicted"][:len(known)]).all()
    assert predict_main([*arguments, "--out", str(tmp_path / "bad.csv"), "--unknown", "2"]) == 2
    assert "predict.unknown" in capsys.readouterr().err and not (tmp_path / "bad.csv").exists()


def rule_params(rule: str, config_predict: dict) -> dict:
    """The ``params:`` of ``rule`` in rules/predict.smk that read ``PREDICT``, evaluated with the
    config's ``predict`` section (the other params need a running workflow)."""
    text = (REPO / "rules" / "predict.smk").read_text()
    block = re.search(rf"\nrule {rule}:\n(.*?)(?=\n\S|\Z)", text, re.S).group(1)
    params = re.search(r"\n    params:\n(.*?)(?=\n    \w+:)", block, re.S).group(1)
    return {name: eval(expression, {"PREDICT": config_predict})  # noqa: S307  (our own rule file)
            for name, expression in re.findall(r"^\s+(\w+)=(.*PREDICT.*),$", params, re.M)}


def test_the_config_key_reaches_the_library_through_the_rule_and_its_script(models, images, tmp_path):
    """config predict.unknown -> rule predict's params -> workflow_scripts/predict.py -> the CSV."""
    support, known = images
    support_dir, query_dir = write_folders(tmp_path, support, np.concatenate([known, FAR]))
    config = {**schema_defaults("predict"),
              **check_section({"method": "proto", "shot": SHOT, "unknown": THRESHOLD}, "predict")}
    params = rule_params("predict", config)
    assert params == {"method": "proto", "shot": SHOT, "unknown": THRESHOLD}
    out = tmp_path / "predictions.csv"
    driver = textwrap.dedent(f"""
        import runpy, types

        class Files(types.SimpleNamespace):
            def get(self, key, default=None):
                return getattr(self, key, default)

        snakemake = types.SimpleNamespace(
            input=Files(models=[{str(models["proto", 1])!r}], support={str(support_dir)!r}, query={str(query_dir)!r}),
            output=Files(csv={str(out)!r}), log=[{str(tmp_path / "predict.log")!r}],
            params=Files(trained_on="toy", **{params!r},
                         gpu_job=dict(threads=1, device="cpu", inference_batch=8, cache_dir=None,
                                      backbone=dict(name="resnet12", width=0.125, image_size={SIZE}))))
        runpy.run_path("workflow_scripts/predict.py", init_globals={{"snakemake": snakemake}})
    """)
    subprocess.run([sys.executable, "-c", driver], cwd=REPO, check=True, timeout=300)
    table = pd.read_csv(out)
    assert table["predicted"].tolist()[-len(FAR):] == [NONE_OF_THESE] * len(FAR)
    assert NONE_OF_THESE not in set(table["predicted"][:len(known)])
    assert "reported as 'none of these'" in (tmp_path / "predict.log").read_text()
