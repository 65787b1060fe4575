"""Meta-test: the batched evaluator (embed once, adapt all episodes together) against the
straightforward per-episode computation, and the fixed episode files every method shares."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtl.data.episodes import load_episodes, write_test_episodes
from mtl.data.hdf5 import HDF5Split
from mtl.data.transforms import EvalTransform
from mtl.errors import ConfigError, DataError
from mtl.evaluate import evaluate
from mtl.io import atomic_torch_save
from mtl.learners.logistic import LOGISTIC_SETTINGS
from mtl.models import build_backbone, save_encoder
from mtl.rng import Purpose, torch_stream
from mtl.base_learner import fresh_init

WAY, SHOT, QUERY, EPISODES, SIZE = 3, 2, 4, 12, 16
NORMALIZE = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.fixture(scope="module")
def test_split(tmp_path_factory, tiny_split):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("evaluate")
    path = tiny_split(folder / "test.h5", classes=4, per_class=10)
    episodes = write_test_episodes(path, folder / "episodes.npz", way=WAY, shot=SHOT, query=QUERY, count=EPISODES, seed=3)
    return folder, path, episodes


def plain_encoder(folder):
    encoder = build_backbone("resnet12", width=0.125)
    path = folder / "encoder.pt"
    save_encoder(encoder, path, image_size=SIZE, normalize=NORMALIZE)
    return encoder, path


def meta_model(folder):
    """An SS encoder with non-trivial scales and a learner init, saved as meta_train does."""
    encoder = build_backbone("resnet12", width=0.125, ss=True)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if name.endswith("scale"):
                param.uniform_(0.5, 1.5)
    weight, bias = torch.randn(WAY, encoder.out_dim) * 0.1, torch.randn(WAY) * 0.1
    path = folder / "model.pt"
    atomic_torch_save(
        {
            "backbone": encoder.config,
            "state_dict": encoder.state_dict(),
            "learner": {"weight": weight, "bias": bias},
            "image_size": SIZE,
            "normalize": NORMALIZE,
            "inner": {"update_step": 30, "base_lr": 0.02},
        },
        path,
    )
    return encoder, (weight, bias), path


def per_episode_accuracies(encoder, split_path, episodes_path, init, steps, lr, seed):
    """The reference protocol: per episode, embed its images, adapt one learner with autograd SGD."""
    split, episodes = HDF5Split(split_path), load_episodes(episodes_path)
    transform = EvalTransform(SIZE, **NORMALIZE)
    generator = torch_stream(seed, Purpose.TEST_LEARNERS)  # the fresh learners' stream of the training seed
    support_targets = torch.arange(WAY).repeat_interleave(SHOT)
    query_targets = torch.arange(WAY).repeat_interleave(QUERY)
    encoder.eval()
    accuracies = []
    for support, query in zip(episodes.support, episodes.query):
        with torch.no_grad():
            support_feats = encoder(transform(split.get_images(support)))
            query_feats = encoder(transform(split.get_images(query)))
        if init is None:
            weight, bias = (t[0] for t in fresh_init(1, WAY, support_feats.shape[1], generator=generator))
        else:
            weight, bias = init
        weight, bias = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        for _ in range(steps):
            loss = F.cross_entropy(F.linear(support_feats, weight, bias), support_targets)
            grad_w, grad_b = torch.autograd.grad(loss, (weight, bias))
            weight, bias = weight - lr * grad_w, bias - lr * grad_b
        predicted = F.linear(query_feats, weight, bias).argmax(dim=1)
        accuracies.append((predicted == query_targets).float().mean().item())
    return np.array(accuracies)


TRAINING_SEED = 7  # seeds the ft learner's initialisation; the episodes were drawn with seed 3


def run_evaluate(folder, method, model, split_path, episodes_path, **kwargs):
    return evaluate(
        method, model, split_path, episodes_path,
        episodes_out=folder / f"{method}.csv", metrics_out=folder / f"{method}.json",
        protocol={"dataset": "toy", "backbone": "resnet12", "seed": TRAINING_SEED}, device="cpu", **kwargs,
    )


def episode_column(folder, method):
    import pandas as pd

    return pd.read_csv(folder / f"{method}.csv")["accuracy"].to_numpy()


def test_ft_equals_the_per_episode_protocol(test_split):
    folder, split_path, episodes_path = test_split
    encoder, model = plain_encoder(folder)
    run_evaluate(folder, "ft", model, split_path, episodes_path)
    expected = per_episode_accuracies(encoder, split_path, episodes_path, None, steps=100, lr=0.01, seed=TRAINING_SEED)
    np.testing.assert_allclose(episode_column(folder, "ft"), expected, atol=1e-5)


def test_a_fresh_learner_budget_replaced_is_used_and_held_to_the_inner_loop_bounds(test_split, tmp_path):
    """ft_steps/ft_lr replace the registry's 100 steps at 0.01; a 0 is refused, never read as "keep 100"."""
    folder, split_path, episodes_path = test_split
    encoder, model = plain_encoder(folder)
    run_evaluate(tmp_path, "ft", model, split_path, episodes_path, ft_steps=20, ft_lr=0.05)
    expected = per_episode_accuracies(encoder, split_path, episodes_path, None, steps=20, lr=0.05, seed=TRAINING_SEED)
    np.testing.assert_allclose(episode_column(tmp_path, "ft"), expected, atol=1e-5)
    for bad, message in (({"ft_steps": 0}, "ft_steps must be an integer >= 1, got 0"),
                         ({"ft_lr": 0.0}, "ft_lr must be a number > 0, got 0.0")):
        with pytest.raises(ConfigError, match=message):
            run_evaluate(tmp_path / "bad", "ft", model, split_path, episodes_path, **bad)
    assert not (tmp_path / "bad").exists()


def test_mtl_with_folded_scales_equals_the_per_episode_protocol(test_split):
    folder, split_path, episodes_path = test_split
    encoder, init, model = meta_model(folder)
    run_evaluate(folder, "mtl", model, split_path, episodes_path)
    expected = per_episode_accuracies(encoder, split_path, episodes_path, init, steps=30, lr=0.02, seed=TRAINING_SEED)
    np.testing.assert_allclose(episode_column(folder, "mtl"), expected, atol=1e-5)


def test_proto_assigns_queries_to_the_nearest_class_mean(test_split):
    folder, split_path, episodes_path = test_split
    encoder, model = plain_encoder(folder)
    run_evaluate(folder, "proto", model, split_path, episodes_path)
    split, episodes = HDF5Split(split_path), load_episodes(episodes_path)
    transform = EvalTransform(SIZE, **NORMALIZE)
    encoder.eval()
    expected = []
    with torch.no_grad():
        for support, query in zip(episodes.support, episodes.query):
            means = encoder(transform(split.get_images(support))).reshape(WAY, SHOT, -1).mean(1)
            distances = torch.cdist(encoder(transform(split.get_images(query))), means)
            expected.append((distances.argmin(1) == torch.arange(WAY).repeat_interleave(QUERY)).float().mean().item())
    np.testing.assert_allclose(episode_column(folder, "proto"), expected, atol=1e-6)


def test_logreg_fits_a_logistic_regression_per_episode_on_normalised_features(test_split):
    """evaluate("logreg") end to end against the per-episode protocol: embed the episode's images,
    L2-normalise, fit scikit-learn's multinomial logistic regression (C=1) on the support set."""
    from sklearn.linear_model import LogisticRegression

    folder, split_path, episodes_path = test_split
    encoder, model = plain_encoder(folder)
    metrics = run_evaluate(folder, "logreg", model, split_path, episodes_path)
    split, episodes = HDF5Split(split_path), load_episodes(episodes_path)
    transform = EvalTransform(SIZE, **NORMALIZE)
    encoder.eval()
    expected = []
    for support, query in zip(episodes.support, episodes.query):
        with torch.no_grad():
            support_feats, query_feats = (F.normalize(encoder(transform(split.get_images(i))).double(), dim=1).numpy()
                                          for i in (support, query))
        fit = LogisticRegression(C=1.0, max_iter=1000).fit(support_feats, np.repeat(np.arange(WAY), SHOT))
        expected.append(np.mean(fit.predict(query_feats) == np.repeat(np.arange(WAY), QUERY)))
    np.testing.assert_allclose(episode_column(folder, "logreg"), expected, atol=1e-6)

    written = json.loads((folder / "logreg.json").read_text())
    assert written == metrics and written["method"] == "logreg" and written["episodes"] == EPISODES
    assert written["learner_settings"] == LOGISTIC_SETTINGS and written["learner_settings"]["C"] == 1.0


def test_metrics_record_protocol_and_the_episode_file(test_split):
    folder, split_path, episodes_path = test_split
    _, model = plain_encoder(folder)
    run_evaluate(folder, "ft", model, split_path, episodes_path)
    metrics = json.loads((folder / "ft.json").read_text())
    assert (metrics["way"], metrics["shot"], metrics["query"], metrics["episodes"]) == (WAY, SHOT, QUERY, EPISODES)
    assert (metrics["seed"], metrics["episode_seed"]) == (TRAINING_SEED, 3)
    assert metrics["episodes_sha256"] == load_episodes(episodes_path).sha256
    accuracies = episode_column(folder, "ft")
    assert metrics["accuracy"] == pytest.approx(100 * accuracies.mean())
    assert metrics["ci95"] == pytest.approx(100 * 1.96 * accuracies.std() / np.sqrt(EPISODES))


def test_episode_files_repeat_with_a_seed_and_change_with_another(test_split, tmp_path):
    _, split_path, episodes_path = test_split
    again = write_test_episodes(split_path, tmp_path / "again.npz", way=WAY, shot=SHOT, query=QUERY, count=EPISODES, seed=3)
    other = write_test_episodes(split_path, tmp_path / "other.npz", way=WAY, shot=SHOT, query=QUERY, count=EPISODES, seed=4)
    assert load_episodes(again).sha256 == load_episodes(episodes_path).sha256
    assert not np.array_equal(load_episodes(other).support, load_episodes(episodes_path).support)


def test_episodes_from_another_split_are_refused_with_the_fix(test_split, tmp_path, tiny_split):
    folder, _, episodes_path = test_split
    _, model = plain_encoder(folder)
    small = tiny_split(tmp_path / "small.h5", classes=3, per_class=5)  # smaller than the episodes' split
    with pytest.raises(DataError, match="Delete .*episodes.npz"):
        run_evaluate(tmp_path, "ft", model, small, episodes_path)


def test_an_episode_file_of_older_random_streams_stops_evaluation(test_split, tmp_path):
    """Scoring a new model on episodes drawn by older streams would pair its numbers with runs on
    another draw of the same seed: evaluate refuses the file and writes nothing."""
    folder, split_path, episodes_path = test_split
    _, model = plain_encoder(folder)
    with np.load(episodes_path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    del meta["stream_version"]  # as written before the file recorded its streams
    np.savez(tmp_path / "old.npz", **{**arrays, "meta": np.array(json.dumps(meta))})
    with pytest.raises(DataError, match="random streams version 1"):
        run_evaluate(tmp_path, "ft", model, split_path, tmp_path / "old.npz")
    assert not (tmp_path / "ft.csv").exists() and not (tmp_path / "ft.json").exists()
