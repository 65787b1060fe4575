"""Method ``logreg`` (mtl.learners.logistic): the probabilities are the optimum of the L2-regularised multinomial
loss on L2-normalised features, found here by an independent solver (torch L-BFGS in float64);
feature scale does not matter; the per-episode accuracies follow the class-major episode layout."""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtl.data.episodes import relabel
from mtl.learners.logistic import LOGISTIC_SETTINGS, LogisticLearner, l2_normalize, logistic_probabilities

#: Tian et al.'s regularisation strength (scikit-learn's default C), stated here rather than read
#: from LOGISTIC_SETTINGS: a reference that took the code's own C would follow any change of it.
PAPER_C = 1.0
#: How far the fit may be from the reference optimum (scikit-learn stops at tol=1e-4: 3.4e-4 seen),
#: and how far the optimum of a C 20% off must be (1.7e-2 to 3.7e-2 seen in these cases).
OPTIMUM_TOLERANCE, OTHER_C_DISTANCE = 1e-3, 1e-2


def logistic_accuracies(features, support, query, way, shot, n_query):
    """Per-episode accuracies of the ``logreg`` learner on precomputed features (class-major episodes)."""
    support, query = np.asarray(support), np.asarray(query)
    logits = LogisticLearner(None).fit(features[torch.as_tensor(support)], relabel(way, shot), way)(
        features[torch.as_tensor(query)])
    return (logits.argmax(dim=-1).numpy() == relabel(way, n_query)).mean(axis=1)


def reference_probabilities(support, labels, query, n_classes, C=1.0):
    """argmin over (W, b) of C * sum_i CE(W x_i + b, y_i) + 0.5 * ||W||^2 (b unpenalised), x = f / ||f||,
    by full-batch L-BFGS in float64; returns the query softmax and the largest gradient entry left."""
    x = torch.as_tensor(support, dtype=torch.float64)
    q = torch.as_tensor(query, dtype=torch.float64)
    x = x / torch.sqrt((x * x).sum(dim=1, keepdim=True))
    q = q / torch.sqrt((q * q).sum(dim=1, keepdim=True))
    y = torch.as_tensor(labels, dtype=torch.long)
    weight = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=5000, history_size=50, tolerance_grad=1e-12,
                                  tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = C * F.cross_entropy(x @ weight.T + bias, y, reduction="sum") + 0.5 * (weight * weight).sum()
        loss.backward()
        return loss

    for _ in range(20):
        optimizer.step(objective)
        objective()
        gradient = max(weight.grad.abs().max().item(), bias.grad.abs().max().item())
        if gradient < 1e-9:
            break
    with torch.no_grad():
        return torch.softmax(q @ weight.T + bias, dim=1), gradient


def relu_features(rng, labels, n_classes, dim, separation=1.5):
    """Non-negative features (as after a ReLU) around one random centre per class."""
    centres = rng.normal(size=(n_classes, dim)) * separation
    return torch.from_numpy(np.maximum(centres[labels] + rng.normal(size=(len(labels), dim)), 0.0)).float()


@pytest.mark.parametrize("counts, dim", [
    ([1, 3, 5, 2, 4], 64),   # 5 classes, unequal support counts
    ([5, 5, 5, 5, 5], 512),  # 5-way 5-shot at resnet12's width
    ([15, 2, 7], 32),        # more examples than the usual support set
    ([1, 4], 32),            # two classes: scikit-learn fits the binary model (with 2C, see mtl.learners.logistic)
], ids=["5cls-unequal", "5way5shot-512d", "3cls-unequal", "2cls-unequal"])
def test_probabilities_are_the_optimum_of_the_regularised_multinomial_loss(counts, dim):
    rng = np.random.default_rng(sum(counts) + dim)
    n_classes = len(counts)
    labels = np.repeat(np.arange(n_classes), counts)
    rng.shuffle(labels)  # any order, not only class-major
    query_labels = rng.integers(0, n_classes, size=30)
    support, query = relu_features(rng, np.concatenate([labels, query_labels]), n_classes, dim).split(
        [len(labels), len(query_labels)])

    probabilities = logistic_probabilities(support, torch.as_tensor(labels), query, n_classes)
    expected, gradient = reference_probabilities(support, labels, query, n_classes, C=PAPER_C)

    assert gradient < 1e-7, "the reference solver did not reach the optimum"
    assert probabilities.shape == (30, n_classes) and probabilities.dtype == torch.float64
    assert probabilities.device.type == "cpu"
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(30, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (probabilities.double() - expected).abs().max().item() < OPTIMUM_TOLERANCE
    # the tolerance tells C apart: the optima of C 20% lower or higher are farther than it, by 10x
    for other_c in (0.8 * PAPER_C, 1.2 * PAPER_C):
        other, _ = reference_probabilities(support, labels, query, n_classes, C=other_c)
        assert (probabilities.double() - other).abs().max().item() > OTHER_C_DISTANCE, other_c
    # not a trivial case: the regularised optimum is far from certain about the queries
    assert expected.max(dim=1).values.min().item() < 0.9


def test_the_regularisation_strength_is_c_one_not_another():
    """Two classes (the binary fit with 2C): the optimum of C=1, not of a C 20% to 100% off either way."""
    rng = np.random.default_rng(5)
    labels = np.repeat([0, 1], [2, 3])
    support, query = relu_features(rng, np.concatenate([labels, [0, 1, 1, 0]]), 2, 16).split([5, 4])
    probabilities = logistic_probabilities(support, labels, query, 2).double()
    assert LOGISTIC_SETTINGS["C"] == PAPER_C
    paper, _ = reference_probabilities(support, labels, query, 2, C=PAPER_C)
    assert (probabilities - paper).abs().max().item() < OPTIMUM_TOLERANCE
    for other_c in (0.5, 0.8, 1.2, 1.5, 2.0):
        other, _ = reference_probabilities(support, labels, query, 2, C=other_c)
        assert (probabilities - other).abs().max().item() > OTHER_C_DISTANCE, other_c


def test_l2_normalize_gives_unit_rows_and_keeps_a_zero_row_finite():
    feats = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1e-8, 0.0]])
    normalised = l2_normalize(feats)
    torch.testing.assert_close(normalised, torch.tensor([[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]]))
    assert l2_normalize(torch.tensor([[1, 0]])).dtype == torch.float32
    assert l2_normalize(feats.double()).dtype == torch.float64


def test_scaling_a_feature_row_does_not_change_the_probabilities():
    """Features are L2-normalised first, so each image's feature scale is irrelevant (the fit on raw
    features would differ: scale changes the effective regularisation and the logits)."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 3)
    support, query = relu_features(rng, np.concatenate([labels, np.arange(4).repeat(5)]), 4, 40).split([12, 20])
    base = logistic_probabilities(support, labels, query, 4)
    support_scale = torch.from_numpy(rng.uniform(0.01, 100.0, size=(12, 1))).float()
    query_scale = torch.from_numpy(rng.uniform(0.01, 100.0, size=(20, 1))).float()
    scaled = logistic_probabilities(support * support_scale, labels, query * query_scale, 4)
    torch.testing.assert_close(scaled, base, atol=1e-5, rtol=0)
    assert torch.equal(logistic_probabilities(support, labels, query, 4), base)  # deterministic

    from sklearn.linear_model import LogisticRegression  # the same fit without the normalisation

    raw = LogisticRegression(C=1.0, max_iter=1000).fit((support * support_scale).numpy(), labels)
    unnormalised = raw.predict_proba((query * query_scale).numpy())
    assert np.abs(unnormalised - base.numpy()).max() > 0.05


def test_refuses_a_class_without_support_examples_and_labels_out_of_range():
    support, query = torch.rand(4, 8), torch.rand(3, 8)
    with pytest.raises(ValueError, match=r"classes \[2\] have none"):
        logistic_probabilities(support, [0, 1, 1, 0], query, 3)
    with pytest.raises(ValueError, match="0..1"):
        logistic_probabilities(support, [0, 1, 2, 0], query, 2)
    with pytest.raises(ValueError, match="shape"):
        logistic_probabilities(support, [0, 1, 1], query, 2)


def test_warns_when_the_fit_stops_at_max_iter(monkeypatch, caplog):
    monkeypatch.setitem(LOGISTIC_SETTINGS, "max_iter", 1)
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), 4)
    support, query = relu_features(rng, np.concatenate([labels, labels]), 3, 32).split([12, 12])
    with caplog.at_level(logging.WARNING, logger="mtl.learners.logistic"), warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn's own ConvergenceWarning is replaced by the log line
        logistic_probabilities(support, labels, query, 3)
    assert "max_iter=1" in caplog.text


def class_major_episodes(rng, labels, episodes, way, shot, query):
    """(support (E, way*shot), query (E, way*query)) image indices, class-major, classes drawn per episode."""
    by_class = [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]
    support, queries = [], []
    for _ in range(episodes):
        classes = rng.choice(len(by_class), way, replace=False)
        picks = [rng.choice(by_class[c], shot + query, replace=False) for c in classes]
        support.append(np.concatenate([p[:shot] for p in picks]))
        queries.append(np.concatenate([p[shot:] for p in picks]))
    return np.stack(support), np.stack(queries)


def test_accuracies_equal_a_per_episode_loop_of_probabilities():
    rng = np.random.default_rng(3)
    way, shot, n_query = 3, 2, 4
    labels = np.repeat(np.arange(6), 10)
    features = relu_features(rng, labels, 6, 24, separation=0.4)  # hard enough that accuracies vary
    support, query = class_major_episodes(rng, labels, 8, way, shot, n_query)

    accuracies = logistic_accuracies(features, support, query, way, shot, n_query)

    expected = []
    for s, q in zip(support, query):
        probabilities = logistic_probabilities(features[s], np.repeat(np.arange(way), shot), features[q], way)
        expected.append(np.mean(probabilities.argmax(dim=1).numpy() == np.repeat(np.arange(way), n_query)))
    assert accuracies.dtype == np.float64 and accuracies.shape == (8,)
    np.testing.assert_array_equal(accuracies, expected)
    assert len(set(accuracies.tolist())) > 1


def test_well_separated_clusters_are_classified_perfectly():
    rng = np.random.default_rng(4)
    way, shot, n_query = 5, 1, 6
    labels = np.repeat(np.arange(8), 12)
    features = relu_features(rng, labels, 8, 64, separation=8.0)
    support, query = class_major_episodes(rng, labels, 10, way, shot, n_query)
    np.testing.assert_array_equal(logistic_accuracies(features, support, query, way, shot, n_query), np.ones(10))
    # the class-major layout matters: query targets shifted by one class get none right
    shifted = np.roll(query.reshape(10, way, n_query), 1, axis=1).reshape(10, -1)
    np.testing.assert_array_equal(logistic_accuracies(features, support, shifted, way, shot, n_query), np.zeros(10))
