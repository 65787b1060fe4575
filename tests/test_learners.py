"""The test-time learners (mtl.learners): one learner per kind of method, chosen from a run's
settings, scoring whole episode files in chunks that change nothing, and calibrated by a
temperature that is fitted without test labels and changes no prediction."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtl.data.episodes import relabel
from mtl.errors import ConfigError
from mtl.learners import learner_for, score_episodes, learner_settings
from mtl.learners.calibration import (
    ECE_BINS,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    pool_reliability,
    probabilities,
    reliability,
)
from mtl.learners.finetune import FinetuneLearner
from mtl.learners.linear import LinearLearner
from mtl.learners.logistic import LogisticLearner
from mtl.learners.prototype import PrototypeLearner
from mtl.methods import NAMES, get_method
from mtl.rng import Purpose, torch_stream
from mtl.base_learner import fresh_init

INNER = {"inner": {"update_step": 7, "base_lr": 0.3}}


class Identity(torch.nn.Module):
    """An 'encoder' whose features are the (flattened) input: learners on known features."""

    out_dim = 6

    def forward(self, x):
        return x.flatten(1)


def features(seed=0, classes=4, per_class=6, dim=6, separation=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * separation
    labels = np.repeat(np.arange(classes), per_class)
    return torch.from_numpy(centres[labels] + rng.normal(size=(len(labels), dim))).float(), labels


def episodes(labels, count, way, shot, query, seed=1):
    """(support, query) index arrays, class-major, classes drawn per episode."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]
    support, queries = [], []
    for _ in range(count):
        picks = [rng.choice(by_class[c], shot + query, replace=False)
                 for c in rng.choice(len(by_class), way, replace=False)]
        support.append(np.concatenate([p[:shot] for p in picks]))
        queries.append(np.concatenate([p[shot:] for p in picks]))
    return np.stack(support), np.stack(queries)


def as_images(feats):
    """Features as the 'images' score_episodes reads (rows indexed by image id; 1x1 'pixels')."""
    return feats.reshape(*feats.shape, 1, 1).numpy()


def identity_transform(batch, device=None):
    return torch.as_tensor(np.asarray(batch), device=device)


# ----------------------------------------------------------------------------- choosing a learner
def test_every_method_gets_the_learner_of_its_registry_entry():
    backbone = Identity()
    kinds = {}
    for name in NAMES:
        settings = learner_settings(name, INNER)
        init = (torch.zeros(3, 6), torch.zeros(3)) if settings["learner"] == "meta" else None
        kinds[name] = type(learner_for(settings, backbone, seed=1, meta_init=init)).__name__
    assert kinds["ft"] == "LinearLearner" and kinds["logreg"] == "LogisticLearner"
    assert kinds["proto"] == "PrototypeLearner"
    assert kinds["ft_last"] == kinds["ft_all"] == "FinetuneLearner"
    assert {kinds[n] for n in NAMES if get_method(n).meta_trained} == {"LinearLearner"}


def test_settings_resolve_the_budget_of_each_learner():
    assert learner_settings("ft", INNER) == {"learner": "fresh", "finetune": None, "steps": 100, "lr": 0.01,
                                               "encoder_lr": None}
    # a meta-learned learner adapts with the inner loop it was meta-trained for, not ft's budget
    assert learner_settings("mtl", INNER, steps=3, lr=0.5)["steps"] == 7
    assert learner_settings("mtl_ht", INNER)["lr"] == 0.3
    assert learner_settings("ft", INNER, steps=3, lr=0.5)["steps"] == 3
    assert learner_settings("ft_all", INNER)["encoder_lr"] == 0.01
    assert learner_settings("logreg", INNER)["logistic"]["C"] == 1.0


def test_a_meta_learned_init_is_required_exactly_where_it_is_used():
    with pytest.raises(ConfigError, match="needs"):
        learner_for(learner_settings("mtl", INNER), Identity(), seed=1)
    with pytest.raises(ConfigError, match="takes no"):
        learner_for(learner_settings("ft", INNER), Identity(), seed=1, meta_init=(torch.zeros(3, 6), torch.zeros(3)))
    with pytest.raises(ConfigError, match="unknown test-time learner 'svm'"):
        learner_for({"learner": "svm", "finetune": None}, Identity(), seed=1)


# ----------------------------------------------------------------------------- the learners
def test_fresh_learners_start_episode_e_from_the_seeds_draw_e_however_asked():
    learner = LinearLearner(Identity(), steps=0, lr=0.1, seed=5)
    stream = torch_stream(5, Purpose.TEST_LEARNERS)
    expected, _ = fresh_init(6, 3, 6, generator=stream)
    together, _ = learner.initial(0, 6, 3, 6, "cpu")
    later, _ = learner.initial(4, 2, 3, 6, "cpu")  # forward: continues the stream
    again, _ = learner.initial(1, 1, 3, 6, "cpu")  # backward: replays it
    torch.testing.assert_close(together, expected, rtol=0, atol=0)
    torch.testing.assert_close(later, expected[4:], rtol=0, atol=0)
    torch.testing.assert_close(again, expected[1:2], rtol=0, atol=0)
    other, _ = LinearLearner(Identity(), steps=0, lr=0.1, seed=5, purpose=Purpose.CALIBRATION_LEARNERS).initial(
        0, 1, 3, 6, "cpu")
    assert not torch.equal(other[0], expected[0]), "calibration episodes draw from a stream of their own"


def test_a_meta_init_for_another_number_of_classes_starts_every_class_from_the_mean_row():
    weight, bias = torch.arange(18.0).reshape(3, 6), torch.tensor([1.0, 2.0, 6.0])
    learner = LinearLearner(Identity(), steps=0, lr=0.1, init=(weight, bias), seed=1)
    start_w, start_b = learner.initial(0, 2, 5, 6, "cpu")
    assert start_w.shape == (2, 5, 6)
    torch.testing.assert_close(start_w[1, 4], torch.tensor([6.0, 7, 8, 9, 10, 11]))
    torch.testing.assert_close(start_b, torch.full((2, 5), 3.0))
    same_w, same_b = learner.initial(0, 1, 3, 6, "cpu")
    torch.testing.assert_close(same_w[0], weight)
    torch.testing.assert_close(same_b[0], bias)


def test_the_linear_learner_is_sgd_on_the_support_cross_entropy():
    feats, labels = features()
    support, query = torch.tensor([[0, 6, 12, 1, 7, 13]]), torch.tensor([[2, 8, 14]])
    support_y = torch.tensor([0, 1, 2, 0, 1, 2])
    init = (torch.randn(3, 6, generator=torch.Generator().manual_seed(0)), torch.zeros(3))
    logits = LinearLearner(Identity(), steps=5, lr=0.2, init=init, seed=1).fit(feats[support], support_y, 3)(
        feats[query])
    weight, bias = (t.clone().requires_grad_() for t in init)
    for _ in range(5):
        grads = torch.autograd.grad(F.cross_entropy(feats[support[0]] @ weight.T + bias, support_y), (weight, bias))
        weight, bias = weight - 0.2 * grads[0], bias - 0.2 * grads[1]
    torch.testing.assert_close(logits[0], (feats[query[0]] @ weight.T + bias).detach(), rtol=1e-5, atol=1e-5)


def test_prototypes_score_minus_the_squared_distance_to_each_class_mean_for_any_counts():
    feats, _ = features(classes=3)
    support = feats[[0, 1, 2, 6, 12, 13]].unsqueeze(0)  # 3, 1 and 2 images of classes 0, 1, 2
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    query = feats[[3, 9, 15]].unsqueeze(0)
    logits = PrototypeLearner(Identity()).fit(support, labels, 3)(query)[0]
    means = torch.stack([feats[[0, 1, 2]].mean(0), feats[6], feats[[12, 13]].mean(0)])
    expected = -((query[0, :, None, :] - means[None]) ** 2).sum(-1)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="classes \\[1\\] have none"):
        PrototypeLearner(Identity()).fit(support, torch.tensor([0, 0, 0, 2, 2, 2]), 3)


def test_logistic_scores_are_the_log_of_its_probabilities():
    feats, labels = features(classes=3)
    support = feats[[0, 1, 6, 7, 12, 13]].unsqueeze(0)
    logits = LogisticLearner(Identity()).fit(support, relabel(3, 2), 3)(feats[[2, 8, 14]].unsqueeze(0))[0]
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.exp().sum(dim=1), torch.ones(3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["ft", "proto", "logreg", "mtl"])
def test_scoring_an_episode_file_in_chunks_equals_each_episode_alone(method):
    feats, labels = features(classes=5, per_class=8, separation=3.0)
    support, query = episodes(labels, 9, way=3, shot=2, query=3)
    settings = learner_settings(method, INNER)
    init = (torch.randn(3, 6, generator=torch.Generator().manual_seed(2)), torch.zeros(3)) if method == "mtl" else None
    learner = learner_for(settings, Identity(), seed=3, meta_init=init)
    learner.episodes_per_chunk = lambda *_: 4
    chunked = score_episodes(learner, as_images(feats), (support, query), identity_transform, 3, 2, 3)
    assert chunked.shape == (9, 9, 3) and chunked.dtype == torch.float32
    for e in range(9):
        alone = learner_for(settings, Identity(), seed=3, meta_init=init).fit(
            feats[support[e]].unsqueeze(0), torch.as_tensor(relabel(3, 2)), 3, first_episode=e)(
            feats[query[e]].unsqueeze(0))[0]
        torch.testing.assert_close(chunked[e], alone, rtol=1e-5, atol=1e-5)
    # and the queries are scored against their own episode's classes: accuracy is above chance
    accuracy = (chunked.argmax(-1).numpy() == relabel(3, 3)).mean()
    assert accuracy > 0.6, accuracy


def test_score_episodes_refuses_episodes_of_another_shape():
    feats, _ = features()
    learner = PrototypeLearner(Identity())
    with pytest.raises(ValueError, match="expected 3x1 / 3x3"):
        score_episodes(learner, as_images(feats), (np.zeros((2, 6), int), np.zeros((2, 9), int)),
                       identity_transform, 3, 1, 3)


def test_fine_tuning_refuses_an_unknown_scope():
    with pytest.raises(ValueError, match="scope must be"):
        FinetuneLearner(Identity(), "middle", steps=1, lr=0.1, encoder_lr=0.1, seed=1)


# ----------------------------------------------------------------------------- calibration
def calibrated_sample(temperature, n=20000, classes=4, seed=0):
    """Logits and labels drawn so that softmax(logits / temperature) is exactly the label distribution."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator) * 3.0
    labels = torch.multinomial(probabilities(logits, temperature).float(), 1, generator=generator).ravel()
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.25, 1.0, 3.0])
def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with(true_temperature):
    logits, labels = calibrated_sample(true_temperature)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.06)
    # it is the minimum of the NLL
    nll = negative_log_likelihood(logits, labels, fitted)
    assert nll <= min(negative_log_likelihood(logits, labels, fitted * f) for f in (0.9, 1.1))


@pytest.mark.parametrize("scale", [1e-4, 1e5])
def test_the_fitted_temperature_follows_the_scale_of_the_scores(scale):
    """Scores c times larger need a temperature c times larger: a prototype learner's minus squared
    distances spread over ~1e4 on the tiny workflow, and a search fixed at T <= 1e3 stopped there
    (ECE 49 points where T 6e4 gives 3)."""
    logits, labels = calibrated_sample(2.0)
    assert fit_temperature(logits * scale, labels) == pytest.approx(scale * fit_temperature(logits, labels), rel=1e-4)


def test_a_temperature_changes_no_prediction():
    logits, _ = calibrated_sample(1.0, n=500)
    for temperature in (0.05, 0.7, 20.0):
        assert torch.equal(probabilities(logits, temperature).argmax(-1), logits.argmax(-1))


def test_ece_is_the_count_weighted_gap_between_accuracy_and_confidence_in_15_bins():
    rng = np.random.default_rng(0)
    probs = torch.from_numpy(rng.dirichlet([0.5, 0.5, 0.5], size=3000))
    labels = torch.from_numpy(rng.integers(0, 3, size=3000))
    table = reliability(probs, labels)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).numpy()
    edges = np.linspace(0, 1, ECE_BINS + 1)
    expected = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence.numpy() > low) & (confidence.numpy() <= high)
        if inside.any():
            expected += inside.mean() * abs(correct[inside].mean() - confidence.numpy()[inside].mean())
    assert table["bins"] == 15 and sum(table["count"]) == 3000
    assert expected_calibration_error(table) == pytest.approx(100 * expected, abs=1e-9)
    # random labels: the model is overconfident by a lot; a perfectly calibrated sample is not
    assert expected_calibration_error(table) > 10
    logits, labels = calibrated_sample(1.0)
    assert expected_calibration_error(reliability(probabilities(logits), labels)) < 1.5


def test_reliability_tables_pool_by_adding_their_counts():
    logits, labels = calibrated_sample(0.5, n=3000)
    first, second = reliability(probabilities(logits[:1000]), labels[:1000]), reliability(probabilities(logits[1000:]),
                                                                                        labels[1000:])
    pooled = pool_reliability([first, second])
    whole = reliability(probabilities(logits), labels)
    assert pooled["count"] == whole["count"]
    np.testing.assert_allclose(pooled["confidence"], whole["confidence"], rtol=1e-12)
    assert expected_calibration_error(pooled) == pytest.approx(expected_calibration_error(whole))


def test_a_run_reports_calibrated_and_uncalibrated_errors():
    logits, labels = calibrated_sample(0.3)  # scores 1/0.3 times too flat
    report = calibration_report(logits, labels, fit_temperature(logits, labels))
    assert report["ece"] < 1.5 < report["ece_uncalibrated"]
    assert report["nll"] < report["nll_uncalibrated"]
    assert math.isclose(report["temperature"], 0.3, rel_tol=0.06)
    assert report["nll"] == pytest.approx(float(F.cross_entropy(logits.double() / report["temperature"], labels)))
