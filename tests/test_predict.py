"""Prediction on a user's own images: exported models, the seed ensemble, and the contract that a
saved test episode written out as folders gets exactly `evaluate`'s predictions."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mtl.cli import predict_main
from mtl.data.episodes import load_episodes, write_test_episodes
from mtl.data.hdf5 import HDF5Split
from mtl.data.user_images import read_support_folder
from mtl.errors import CheckpointError, DataError
from mtl.evaluate import evaluate
from mtl.io import atomic_torch_save
from mtl.model_file import FORMAT_VERSION, export_model, peek_model_file, read_model_file
from mtl.models import build_backbone, save_encoder
from mtl.predict import choose_run, load_model, load_models

WAY, SHOT, QUERY, EPISODES, SIZE, STORED = 3, 2, 4, 6, 16, 20
NORMALIZE = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
FAKE_HASHES = {"train": "a" * 64, "val": "b" * 64}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_split):
    """A test split with its episode file, a pre-trained encoder and a meta-trained model file."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("predict")
    # class-dependent colours, so the classifiers have something to learn
    split = tiny_split(folder / "test.h5", classes=4, per_class=10, size=STORED)
    episodes = write_test_episodes(split, folder / "episodes.npz", way=WAY, shot=SHOT, query=QUERY,
                                   count=EPISODES, seed=3)
    encoder = build_backbone("resnet12", width=0.125)
    save_encoder(encoder, folder / "encoder.pt", image_size=SIZE, normalize=NORMALIZE, epoch=3, val_acc=0.5)
    ss = build_backbone("resnet12", width=0.125, ss=True)
    ss.load_state_dict(encoder.state_dict(), strict=False)
    with torch.no_grad():
        for name, param in ss.named_parameters():
            if name.endswith("scale"):
                param.uniform_(0.5, 1.5)
    atomic_torch_save({"backbone": ss.config, "state_dict": ss.state_dict(),
                       "learner": {"weight": torch.randn(WAY, ss.out_dim) * 0.1, "bias": torch.randn(WAY) * 0.1},
                       "image_size": SIZE, "normalize": NORMALIZE, "inner": {"update_step": 20, "base_lr": 0.05},
                       "epoch": 1, "val_acc": 0.6}, folder / "model.pt")
    return folder, split, episodes


def exported(folder, method, seed=1, name=None):
    trained_file = folder / ("model.pt" if method.startswith("mtl") else "encoder.pt")
    return export_model(method, trained_file, folder / (name or f"{method}_seed{seed}.pt"), trained_on="toy",
                        seed=seed, shot=SHOT, way=WAY, data_sha256=FAKE_HASHES, stored_image_size=STORED,
                        config={"protocol": {"way": WAY}}, commit="abc123")


def write_episode(split_path, episodes_path, index, root):
    """Episode ``index`` as support/<position>_<class>/ and query/ folders of PNGs (class-major, in order)."""
    split, episodes = HDF5Split(split_path), load_episodes(episodes_path)
    support, query = root / "support", root / "query"
    query.mkdir(parents=True)
    for position, ids in enumerate(np.asarray(episodes.support[index]).reshape(WAY, SHOT)):
        folder = support / f"c{position}"
        folder.mkdir(parents=True)
        for k, image in enumerate(split.get_images(ids)):
            Image.fromarray(image).save(folder / f"{k:03d}.png")
    for k, image in enumerate(split.get_images(np.asarray(episodes.query[index]))):
        Image.fromarray(image).save(query / f"q{k:04d}.png")
    truth = np.repeat(np.arange(WAY), QUERY)
    return support, query, truth


@pytest.mark.parametrize("method", ["ft", "proto", "logreg", "mtl", "ft_last"])
def test_a_saved_episode_written_as_folders_gets_evaluates_predictions(trained, tmp_path, method):
    folder, split, episodes = trained
    seed = 7
    metrics = evaluate(method, folder / ("model.pt" if method == "mtl" else "encoder.pt"), split, episodes,
                       episodes_out=tmp_path / "episodes.csv", metrics_out=tmp_path / "metrics.json",
                       protocol={"dataset": "toy", "backbone": "resnet12", "seed": seed},
                       inference_batch_size=1)
    assert metrics["episodes"] == EPISODES
    per_episode = pd.read_csv(tmp_path / "episodes.csv")["accuracy"].to_numpy()
    model = load_model(exported(folder, method, seed=seed))
    # a fresh learner's initialisation is drawn per episode in order: episode 0's is the first draw
    checked = range(EPISODES) if method in ("proto", "logreg", "mtl") else [0]
    for index in checked:
        support, query, truth = write_episode(split, episodes, index, tmp_path / f"episode{index}")
        # one image per pass in both: the same kernels, so the same features (see test_workflow_predict)
        prediction = model.predict(support, query, inference_batch_size=1)
        assert prediction.class_names == [f"c{p}" for p in range(WAY)]
        # evaluate stores float32 fractions of the WAY * QUERY queries: compare counts of correct ones
        assert (prediction.predicted == truth).sum() == round(per_episode[index] * WAY * QUERY), (method, index)


def test_exported_file_stands_alone(trained):
    folder, _, _ = trained
    path = exported(folder, "mtl", seed=2)
    backbone, info = read_model_file(path)
    assert info["format_version"] == FORMAT_VERSION and info["method"] == "mtl" and info["seed"] == 2
    assert info["test_time"] == {"learner": "meta", "finetune": None, "steps": 20, "lr": 0.05, "encoder_lr": None}
    assert info["trained_on"] == "toy" and info["way"] == WAY and info["shot"] == SHOT
    assert info["image_size"] == SIZE and info["stored_image_size"] == STORED and info["normalize"] == NORMALIZE
    assert info["data_sha256"] == FAKE_HASHES and info["commit"] == "abc123" and info["val_acc"] == 0.6
    assert info["version"] and info["config"] == {"protocol": {"way": WAY}}
    assert info["learner"]["weight"].shape == (WAY, backbone.out_dim)
    assert not backbone.ss, "scales are folded into plain weights"
    assert {k: v for k, v in peek_model_file(path).items() if k != "learner"} == {
        k: v for k, v in info.items() if k != "learner"}
    logistic = read_model_file(exported(folder, "logreg"))[1]["test_time"]
    assert logistic["learner"] == "logistic" and logistic["logistic"], "the regression's settings are recorded"


def test_loading_refuses_other_backbones_newer_formats_and_training_files(trained, tmp_path):
    folder, _, _ = trained
    path = exported(folder, "ft")
    with pytest.raises(CheckpointError, match="resnet25"):
        read_model_file(path, expected_backbone={"name": "resnet25", "width": 0.125})
    payload = torch.load(path, weights_only=True)
    atomic_torch_save({**payload, "format_version": FORMAT_VERSION + 1}, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="newer than the version .* upgrade mtl-fewshot"):
        read_model_file(tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="not an exported model"):
        read_model_file(folder / "encoder.pt")


def test_the_ensemble_is_the_mean_of_the_seeds_probabilities(trained, tmp_path):
    folder, split, episodes = trained
    support, query, _ = write_episode(split, episodes, 1, tmp_path)
    paths = [exported(folder, "ft", seed=s) for s in (1, 2, 3)]
    ensemble = load_models(paths).predict(support, query, inference_batch_size=8)
    singles = [load_model(p).predict(support, query, inference_batch_size=8).probabilities for p in paths]
    assert ensemble.per_model.shape == (3, WAY * QUERY, WAY)
    np.testing.assert_allclose(ensemble.probabilities, np.mean(singles, axis=0), rtol=0, atol=1e-12)
    assert not np.allclose(singles[0], singles[1]), "seeds start their learners differently"
    table = ensemble.table()
    assert list(table.columns) == ["file", "predicted", "probability", "seeds_agreeing", "seeds", "probability_sd",
                                   "p_c0", "p_c1", "p_c2"]
    assert (table["seeds"] == 3).all() and table["seeds_agreeing"].between(0, 3).all()
    np.testing.assert_allclose(table[["p_c0", "p_c1", "p_c2"]].sum(axis=1), 1.0, atol=1e-9)
    chosen = np.stack(singles)[:, np.arange(len(table)), ensemble.predicted]
    np.testing.assert_allclose(table["probability_sd"], chosen.std(axis=0, ddof=1), atol=1e-12)


@pytest.mark.parametrize("method", ["ft", "proto", "logreg", "mtl", "ft_all"])
def test_any_number_of_classes_and_unequal_counts(trained, tmp_path, method):
    folder, _, _ = trained
    rng = np.random.default_rng(1)
    counts = {"a": 1, "b": 4, "c": 2, "d": 3}  # four classes: another number than the model's 3-way
    for c, (name, count) in enumerate(counts.items()):
        (tmp_path / "support" / name).mkdir(parents=True)
        for k in range(count):
            pixels = (rng.integers(0, 60, (STORED, STORED, 3)) + 60 * c).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "support" / name / f"{k}.png")
    queries = (rng.integers(0, 250, (7, 30, 30, 3))).astype(np.uint8)  # any size: resized as the data was
    model = load_model(exported(folder, method))
    prediction = model.predict(tmp_path / "support", queries, inference_batch_size=8)
    assert prediction.probabilities.shape == (7, 4)
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, atol=1e-6)


def test_greyscale_rgba_and_16_bit_images_are_converted(tmp_path):
    for name, image in {
        "grey": Image.fromarray(np.full((9, 9), 200, np.uint8), mode="L"),
        "rgba": Image.fromarray(np.full((9, 9, 4), 100, np.uint8), mode="RGBA"),
        "sixteen": Image.fromarray(np.full((9, 9), 65535, np.uint16)),
    }.items():
        (tmp_path / name).mkdir()
        image.save(tmp_path / name / "x.png")
    support = read_support_folder(tmp_path, 5)
    assert support.images.shape == (3, 5, 5, 3) and support.class_names == ["grey", "rgba", "sixteen"]
    assert support.images[2].min() == 255, "16-bit white stays white (scaled, not clipped)"


def bad_input_error(tmp_path, build_support, build_query, model_path) -> str:
    support, query = tmp_path / "support", tmp_path / "query"
    support.mkdir()
    query.mkdir()
    build_support(support)
    build_query(query)
    with pytest.raises(DataError) as error:
        load_model(model_path).predict(support, query)
    return str(error.value)


def _png(path, value=100, size=STORED):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def _two_classes(support):
    _png(support / "a" / "1.png")
    _png(support / "b" / "1.png", 200)


def _one_query(query):
    _png(query / "q.png")


def test_every_support_problem_is_listed_at_once(trained, tmp_path):
    def support(folder):
        _png(folder / "a" / "1.png")
        (folder / "empty").mkdir()
        (folder / "a" / "notes.txt").write_text("not an image")
        (folder / "a" / "broken.png").write_bytes(b"not a png")
        (folder / "stray.png").write_bytes(b"")

    message = bad_input_error(tmp_path, support, _one_query, exported(trained[0], "ft"))
    for expected in ("empty: empty class folder", "notes.txt: not an image file", "broken.png: cannot decode",
                     "stray.png: a file directly in the support folder", "4 problem(s)"):
        assert expected in message, message


def test_one_class_is_refused(trained, tmp_path):
    message = bad_input_error(tmp_path, lambda s: _png(s / "only" / "1.png"), _one_query, exported(trained[0], "ft"))
    assert "at least 2 classes" in message


def test_query_problems_nested_folders_non_images_and_no_images(trained, tmp_path):
    def query(folder):
        _png(folder / "inner" / "x.png")
        (folder / "readme.md").write_text("hi")

    message = bad_input_error(tmp_path, _two_classes, query, exported(trained[0], "ft"))
    assert "inner: a folder inside the query folder" in message and "readme.md: not an image file" in message
    assert "no .jpg" in message, "no image directly in the folder is said too"


def test_undecodable_queries_are_listed_and_nothing_is_written(trained, tmp_path):
    def query(folder):
        _png(folder / "good.png")
        (folder / "bad1.jpg").write_bytes(b"\xff\xd8 truncated")
        (folder / "bad2.png").write_bytes(b"")

    support, query_dir, out = tmp_path / "support", tmp_path / "query", tmp_path / "out.csv"
    _two_classes(support)
    query_dir.mkdir()
    query(query_dir)
    code = predict_main(["--model", str(exported(trained[0], "ft")), "--support", str(support), "--query",
                         str(query_dir), "--out", str(out), "--batch-size", "4", "--device", "cpu"])
    assert code == 2 and not out.exists() and not list(tmp_path.glob(".out.csv*"))


def test_console_predicts_a_folder_with_the_seeds_of_a_folder(trained, tmp_path, capsys):
    folder, split, episodes = trained
    support, query, truth = write_episode(split, episodes, 2, tmp_path / "episode")
    models = tmp_path / "models"
    for seed in (1, 2):
        exported(folder, "proto", seed=seed, name=str(models / f"seed{seed}.pt"))
    out = tmp_path / "pred.csv"
    assert predict_main(["--model", str(models), "--support", str(support), "--query", str(query), "--out",
                         str(out), "--batch-size", "8", "--device", "cpu"]) == 0
    table = pd.read_csv(out)
    assert len(table) == WAY * QUERY and table["file"].tolist() == sorted(p.name for p in query.iterdir())
    assert (table["seeds"] == 2).all()
    assert "wrote" in capsys.readouterr().out


def test_a_model_file_of_another_backbone_is_a_clear_console_error(trained, tmp_path, capsys):
    encoder = build_backbone("resnet25", width=0.125)
    save_encoder(encoder, tmp_path / "enc.pt", image_size=SIZE, normalize=NORMALIZE)
    path = export_model("ft", tmp_path / "enc.pt", tmp_path / "seed1.pt", trained_on="toy", seed=1, shot=1, way=3,
                        data_sha256=FAKE_HASHES, stored_image_size=STORED, config={})
    with pytest.raises(CheckpointError, match=r"holds backbone \{'name': 'resnet25'"):
        load_model(path, expected_backbone={"name": "resnet12", "width": 0.125})


def test_the_default_choice_is_the_best_method_at_the_closest_shot():
    summary = pd.DataFrame({
        "dataset": ["d"] * 6 + ["other"],
        "method": ["ft", "logreg", "mtl", "ft", "logreg", "mtl", "mtl"],
        "shot": [1, 1, 1, 5, 5, 5, 5],
        "accuracy": [40.0, 45.0, 44.0, 60.0, 58.0, 63.0, 99.0],
    })
    assert choose_run(summary, "d", [1, 2, 1]) == ("logreg", 1)
    assert choose_run(summary, "d", [4, 6, 5]) == ("mtl", 5)
    assert choose_run(summary, "d", [3, 3]) == ("logreg", 1), "a tie goes to the smaller shot"
    assert choose_run(summary, "d", [5], method="ft") == ("ft", 5)
    with pytest.raises(Exception, match="no rows of dataset 'x'"):
        choose_run(summary, "x", [1])


def test_mtl_load_model_is_there_and_import_mtl_stays_free_of_torch():
    import subprocess
    import sys

    code = ("import sys, mtl; assert 'torch' not in sys.modules, 'import mtl pulled in torch'; "
            "from mtl.predict import load_model; assert mtl.load_model is load_model")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_an_ensemble_refuses_models_of_different_kinds(trained, tmp_path):
    folder, _, _ = trained
    with pytest.raises(Exception, match="must share method"):
        load_models([exported(folder, "ft"), exported(folder, "proto")])


def test_support_and_query_are_embedded_in_batches(trained, tmp_path, monkeypatch):
    """A support set larger than one pass goes through in batches of the given size."""
    import mtl.predict

    folder, split, episodes = trained
    support, query, _ = write_episode(split, episodes, 0, tmp_path)  # 6 support, 12 query images
    sizes = []
    real = mtl.predict.embed_batch
    monkeypatch.setattr(mtl.predict, "embed_batch", lambda model, images, *a, **k: (sizes.append(len(images)),
                                                                                   real(model, images, *a, **k))[1])
    load_model(exported(folder, "ft")).predict(support, query, inference_batch_size=4)
    assert sizes == [4, 2, 4, 4, 4], sizes
