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
from mtl.data.hdf5 import HDF5Split, write_split
from mtl.data.user_images import list_query_folder, read_query_chunks, read_support_folder
from mtl.errors import CheckpointError, ConfigError, DataError
from mtl.evaluate import evaluate
from mtl.io import atomic_torch_save
from mtl.model_file import FORMAT_VERSION, export_model, peek_model_file, read_model_file
from mtl.models import build_backbone, save_encoder
from mtl.predict import Prediction, choose_run, load_model, load_models, predict_with_trained_models

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


def exported(folder, method, seed=1, name=None, *, trained_file=None, trained_on="toy", metrics=None):
    trained_file = trained_file or folder / ("model.pt" if method.startswith("mtl") else "encoder.pt")
    return export_model(method, trained_file, folder / (name or f"{method}_seed{seed}.pt"), trained_on=trained_on,
                        seed=seed, shot=SHOT, way=WAY, data_sha256=FAKE_HASHES, stored_image_size=STORED,
                        config={"protocol": {"way": WAY}}, metrics=metrics, commit="abc123")


def write_episode(split_path, episodes_path, index, root, names=None):
    """Episode ``index`` as support/<class>/ and query/ folders of PNGs (class-major, in order); the
    class at position p is the folder ``names[p]`` (default ``c<p>``), created in position order."""
    split, episodes = HDF5Split(split_path), load_episodes(episodes_path)
    support, query = root / "support", root / "query"
    query.mkdir(parents=True)
    for position, ids in enumerate(np.asarray(episodes.support[index]).reshape(WAY, SHOT)):
        folder = support / (names[position] if names else f"c{position}")
        folder.mkdir(parents=True)
        for k, image in enumerate(split.get_images(ids)):
            Image.fromarray(image).save(folder / f"{k:03d}.png")
    for k, image in enumerate(split.get_images(np.asarray(episodes.query[index]))):
        Image.fromarray(image).save(query / f"q{k:04d}.png")
    truth = np.repeat(np.arange(WAY), QUERY)
    return support, query, truth


def query_images(query_folder) -> np.ndarray:
    """The images of a query folder, decoded as a prediction decodes them."""
    return np.concatenate(list(read_query_chunks(list_query_folder(query_folder), STORED, chunk=256)))


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) over the last axis, in numpy float64 (not the library's)."""
    scaled = logits.astype(np.float64) / temperature
    exp = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


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


# ----------------------------------------------------------------------------- against computations by hand
def test_the_table_is_the_ensembles_choice_and_how_the_seeds_agree_on_it():
    """Three models' probabilities (M, Q, C) chosen so the seeds disagree, checked query by query."""
    names = ["zebra", "apple", "mango"]  # not sorted: the columns follow class_names as given
    per_model = np.array([
        [[0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.45, 0.5, 0.05]],
        [[0.1, 0.8, 0.1], [0.5, 0.1, 0.4], [0.3, 0.4, 0.3], [0.4, 0.55, 0.05]],
        [[0.3, 0.6, 0.1], [0.2, 0.3, 0.5], [0.4, 0.3, 0.3], [0.95, 0.0, 0.05]],
    ])  # query 3: two seeds pick apple, the ensemble zebra
    table = Prediction(names, per_model).table()
    assert [c for c in table.columns if c.startswith("p_")] == ["p_zebra", "p_apple", "p_mango"]
    expected_agreeing = []
    for q in range(per_model.shape[1]):
        ensemble = [np.mean([per_model[m, q, c] for m in range(3)]) for c in range(3)]
        best = int(np.argmax(ensemble))
        for c, name in enumerate(names):
            assert table[f"p_{name}"][q] == pytest.approx(ensemble[c], abs=1e-12)
        assert table["predicted"][q] == names[best] and table["probability"][q] == pytest.approx(ensemble[best])
        agreeing = sum(int(np.argmax(per_model[m, q])) == best for m in range(3))
        expected_agreeing.append(agreeing)
        assert table["seeds_agreeing"][q] == agreeing, q
        values = [per_model[m, q, best] for m in range(3)]
        spread = np.sqrt(sum((v - np.mean(values)) ** 2 for v in values) / 2)  # sample sd: n - 1 = 2
        assert table["probability_sd"][q] == pytest.approx(spread, abs=1e-12), q
    assert table["predicted"].tolist() == ["apple", "zebra", "mango", "zebra"]
    assert expected_agreeing == [3, 2, 1, 1] and (table["seeds"] == 3).all()


def test_choose_run_takes_in_domain_rows_of_the_models_dataset_only():
    """Transfer rows (a model of another dataset tested on this one, or this dataset's model tested
    elsewhere) say nothing about this dataset's models: the choice ignores them, however good."""
    summary = pd.DataFrame({
        "trained_on": ["d", "d", "d", "other", "d"],
        "dataset": ["d", "d", "d", "d", "other"],
        "method": ["ft", "proto", "ft", "mtl", "logreg"],
        "shot": [1, 1, 5, 2, 1],
        "accuracy": [40.0, 45.0, 60.0, 99.0, 98.0],
    })
    assert choose_run(summary, "d", [1, 1]) == ("proto", 1)
    assert choose_run(summary, "d", [2, 2]) == ("proto", 1), "shot 2 exists only as a transfer row"
    with pytest.raises(ConfigError, match="no rows of dataset 'other'"):
        choose_run(summary, "other", [1])  # its one row is of d's model: nothing trained on 'other'


def test_the_workflows_prediction_uses_the_models_and_summary_rows_of_its_dataset(trained, tmp_path):
    folder, split, episodes = trained
    support, query, _ = write_episode(split, episodes, 0, tmp_path / "episode")
    files = [exported(folder, "proto", seed=1, name="toy_proto_1.pt"),
             exported(folder, "proto", seed=2, name="toy_proto_2.pt"),
             exported(folder, "ft", seed=1, name="toy_ft_1.pt"),
             exported(folder, "proto", seed=3, name="other_proto_3.pt", trained_on="other")]
    summary = tmp_path / "summary.csv"
    pd.DataFrame({"trained_on": ["toy", "toy", "other", "toy"], "dataset": ["toy", "toy", "toy", "other"],
                  "method": ["proto", "ft", "ft", "ft"], "shot": [SHOT] * 4,
                  "accuracy": [50.0, 40.0, 90.0, 95.0]}).to_csv(summary, index=False)
    for method in (None, "proto"):
        prediction = predict_with_trained_models(files, support, query, tmp_path / "out.csv", trained_on="toy",
                                                 method=method, shot=None if method is None else SHOT,
                                                 summary_csv=summary, inference_batch_size=8)
        assert sorted(prediction.models) == [str(f) for f in files[:2]], method
    with pytest.raises(ConfigError, match="no exported model of other ft"):
        predict_with_trained_models(files, support, query, tmp_path / "out.csv", trained_on="other", method="ft",
                                    shot=SHOT)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_a_meta_learned_init_for_another_number_of_classes_starts_every_class_from_the_mean_row(
        trained, tmp_path, n_classes):
    """With no adaptation step, a model meta-trained 3-way scores every class of a 2- or 4-class
    support set with the mean of its learned rows: ``x @ mean(W) + mean(b)``."""
    folder = trained[0]
    payload = torch.load(folder / "model.pt", weights_only=True)
    atomic_torch_save({**payload, "inner": {"update_step": 0, "base_lr": 0.05}}, tmp_path / "model.pt")
    model = load_model(exported(tmp_path, "mtl", trained_file=tmp_path / "model.pt"))
    rng = np.random.default_rng(n_classes)
    for c in range(n_classes):
        _png(tmp_path / "support" / f"class{c}" / "0.png", 40 * c + 30)
    queries = rng.integers(0, 256, (5, STORED, STORED, 3)).astype(np.uint8)
    logits = model.adapt(read_support_folder(tmp_path / "support", STORED), inference_batch_size=8).logits(queries)

    with torch.no_grad():  # the features by a plain forward pass of the exported network
        features = model.backbone.eval()(model.transform(queries))
    learned = payload["learner"]
    expected = features @ learned["weight"].mean(dim=0) + learned["bias"].mean()
    assert logits.shape == (5, n_classes)
    for c in range(n_classes):
        torch.testing.assert_close(logits[:, c], expected, rtol=1e-4, atol=1e-5)
    assert expected.abs().min() > 1e-2, "not a trivial zero score"


def test_a_format_1_model_predicts_with_its_uncalibrated_scores(trained, tmp_path):
    """Format 1 files had no temperature: their probabilities are the softmax of the scores (T = 1)."""
    folder, split, episodes = trained
    payload = torch.load(exported(folder, "ft"), weights_only=True)
    old = {key: value for key, value in payload.items() if key not in ("temperature", "calibration")}
    atomic_torch_save({**old, "format_version": 1}, tmp_path / "old.pt")
    support, query, _ = write_episode(split, episodes, 0, tmp_path / "episode")
    classifier = load_model(tmp_path / "old.pt").adapt(read_support_folder(support, STORED))
    images = query_images(query)
    np.testing.assert_allclose(classifier.probabilities(images).numpy(), softmax(classifier.logits(images).numpy(), 1),
                               rtol=0, atol=1e-7)


def test_support_labels_and_images_follow_their_class_folders(tmp_path):
    counts = {"zebra": 3, "apple": 1, "mango": 2}  # created in this order; unequal counts
    value = 0
    for name, count in counts.items():
        for k in range(count):
            value += 20
            _png(tmp_path / name / f"{k}.png", value)
    support = read_support_folder(tmp_path, STORED)
    assert support.class_names == ["apple", "mango", "zebra"] and support.counts() == [1, 2, 3]
    for image, label, file in zip(support.images, support.labels, support.files):
        assert support.class_names[label] == file.parent.name
        np.testing.assert_array_equal(image, np.asarray(Image.open(file).convert("RGB")))


def test_query_images_are_read_in_chunks_holding_every_file_in_order(tmp_path):
    """A query folder larger than one chunk (a prediction reads 256 images at a time): every file is
    decoded once, in the folder's sorted order, whatever the chunk size."""
    for k in range(7):
        _png(tmp_path / f"q{k}.png", 30 * k + 10)
    files = list_query_folder(tmp_path)
    by_hand = np.stack([np.asarray(Image.open(tmp_path / f"q{k}.png").convert("RGB")) for k in range(7)])
    for chunk, sizes in [(3, [3, 3, 1]), (7, [7]), (256, [7])]:
        chunks = list(read_query_chunks(files, STORED, chunk=chunk))
        assert [len(c) for c in chunks] == sizes, chunk
        np.testing.assert_array_equal(np.concatenate(chunks), by_hand)


def test_an_exported_model_takes_its_temperature_from_its_own_runs_metrics_only(trained):
    folder = trained[0]
    own = {"method": "ft", "seed": 1, "shot": SHOT, "dataset": "toy", "temperature": 0.25, "ece": 3.0}
    assert read_model_file(exported(folder, "ft", name="own.pt", metrics=own))[1]["temperature"] == 0.25
    for other, wrong in [({"seed": 2}, "seed 2 instead of 1"), ({"method": "proto"}, "method 'proto' instead of 'ft'"),
                         ({"shot": SHOT + 1}, f"shot {SHOT + 1} instead of {SHOT}"),
                         ({"trained_on": "other"}, "trained_on 'other' instead of 'toy'")]:
        with pytest.raises(CheckpointError, match=f"another run's: .*{wrong}"):
            exported(folder, "ft", name="other.pt", metrics={**own, **other})


# ----------------------------------------------------------------------------- the contract
#: every kind of test-time learner (mtl_ht and the other mtl arms share mtl's)
CONTRACT_METHODS = ["ft", "logreg", "proto", "mtl", "ft_last", "ft_all"]
CONTRACT_EPISODES, CALIBRATION_EPISODES, CONTRACT_SEED = 4, 3, 7


def hard_split(path, split, seed):
    """4 classes x 10 images of one grey with a small tint per class (at most 24 levels a channel)
    under +-100 of noise a pixel: hard enough that every method gets queries wrong."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), 10)
    tints = rng.integers(-24, 25, size=(4, 1, 1, 3))
    pixels = 128 + tints[labels] + rng.integers(-100, 100, size=(len(labels), STORED, STORED, 3))
    return write_split(path, np.clip(pixels, 0, 255).astype(np.uint8), labels, [f"class{c}" for c in range(4)],
                       {"dataset": "toy", "split": split})


@pytest.fixture(scope="module")
def contract(trained, tmp_path_factory):
    """Hard test and validation splits, a file of test episodes and every episode written as folders;
    ``run(method)`` evaluates a method once (temperature fitted on validation episodes, every query's
    logits kept) and exports its model with that run's metrics."""
    folder = tmp_path_factory.mktemp("contract")
    trained_folder = trained[0]
    test, val = hard_split(folder / "test.h5", "test", 0), hard_split(folder / "val.h5", "val", 1)
    episodes = write_test_episodes(test, folder / "episodes.npz", way=WAY, shot=SHOT, query=QUERY,
                                   count=CONTRACT_EPISODES, seed=3)
    written = [write_episode(test, episodes, e, folder / f"episode{e}") for e in range(CONTRACT_EPISODES)]
    runs = {}

    def run(method):
        if method not in runs:
            out = folder / method
            trained_file = trained_folder / ("model.pt" if method.startswith("mtl") else "encoder.pt")
            metrics = evaluate(method, trained_file, test, episodes, episodes_out=out / "episodes.csv",
                               metrics_out=out / "metrics.json", queries_out=out / "queries.npz",
                               protocol={"dataset": "toy", "backbone": "resnet12", "seed": CONTRACT_SEED},
                               val_h5=val, calibration_episodes=CALIBRATION_EPISODES, inference_batch_size=1)
            path = exported(out, method, seed=CONTRACT_SEED, trained_file=trained_file, metrics=metrics)
            runs[method] = metrics, dict(np.load(out / "queries.npz")), path
        return runs[method]

    return {"episodes": written, "run": run, "split": test, "episodes_file": episodes}


#: ft_all fine-tunes the whole network for 100 steps on each of 11 episodes (17 s of the quick loop's
#: 60 s on the 2-core VM): it runs in the full suite (CI), and ft_last, the same learner on a smaller
#: part, keeps the fine-tuning contract in the quick loop (`-m "not slow"`).
CONTRACT_CASES = [pytest.param(m, marks=pytest.mark.slow) if m == "ft_all" else m for m in CONTRACT_METHODS]


@pytest.mark.parametrize("method", CONTRACT_CASES)
def test_every_saved_episode_written_as_folders_gets_evaluates_labels_and_probabilities(contract, method):
    metrics, scores, path = contract["run"](method)
    logits, targets, temperature = scores["logits"], scores["targets"], float(scores["temperature"])
    assert logits.shape == (CONTRACT_EPISODES, WAY * QUERY, WAY)
    # labels matter: the method gets some queries right and some wrong
    assert 100 / WAY < metrics["accuracy"] < 100, metrics["accuracy"]
    assert metrics["calibration_episodes"] == CALIBRATION_EPISODES and abs(temperature - 1) > 1e-3
    assert metrics["temperature"] == temperature
    model = load_model(path)
    assert model.info["temperature"] == temperature, "the model predicts with its run's temperature"
    for e, (support, query, truth) in enumerate(contract["episodes"]):
        np.testing.assert_array_equal(targets[e], truth)
        # one image per pass in both: the same kernels, so the same features (see test_workflow_predict)
        classifier = model.adapt(read_support_folder(support, STORED), inference_batch_size=1, episode=e)
        probabilities = classifier.probabilities(query_images(query)).numpy()
        np.testing.assert_array_equal(probabilities.argmax(axis=1), logits[e].argmax(axis=1), err_msg=f"episode {e}")
        np.testing.assert_allclose(probabilities, softmax(logits[e], temperature), rtol=0, atol=1e-6,
                                   err_msg=f"episode {e}")


def test_p_columns_are_the_classes_in_order_and_predicted_names_the_most_probable(contract, tmp_path):
    """Support folders created zebra, apple, mango (class positions 0, 1, 2 of evaluate's episode): the
    classes are the sorted folder names, and each column is its folder's probability."""
    names = ["zebra", "apple", "mango"]
    _, scores, path = contract["run"]("proto")  # no random draw: any class order gives the same scores
    for e in range(CONTRACT_EPISODES):
        support, query, _ = write_episode(contract["split"], contract["episodes_file"], e, tmp_path / f"{e}", names)
        table = load_model(path).predict(support, query, inference_batch_size=1).table()
        expected = softmax(scores["logits"][e], float(scores["temperature"]))  # column p: the class at position p
        assert [c for c in table.columns if c.startswith("p_")] == ["p_apple", "p_mango", "p_zebra"]
        for position, name in enumerate(names):
            np.testing.assert_allclose(table[f"p_{name}"], expected[:, position], rtol=0, atol=1e-6)
        assert table["predicted"].tolist() == [names[p] for p in expected.argmax(axis=1)]
        np.testing.assert_allclose(table["probability"], expected.max(axis=1), rtol=0, atol=1e-6)
    assert len(set(table["predicted"])) > 1
