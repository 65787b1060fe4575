"""Calibrated probabilities: one temperature per run, fitted on validation episodes, and how well
the probabilities then match the frequencies (expected calibration error, negative log-likelihood).

A learner's scores (:mod:`mtl.learners`) become probabilities through ``softmax(logits / T)``.
``T`` changes no prediction (the order of a query's scores is kept), only how sure each one
claims to be. Every run fits its ``T`` once (Guo et al., "On calibration of modern neural
networks", ICML 2017: temperature scaling) by minimising the mean negative log-likelihood of the
query labels of *validation* episodes: episodes of the validation classes, drawn like the test
episodes, scored by the same learner. No test label is seen, so the test episodes then measure
the calibration honestly; an exported model carries its ``T`` into every prediction.

Expected calibration error (ECE, Naeini et al. 2015; Guo et al. 2017): the queries are grouped into
:data:`ECE_BINS` equal-width bins of confidence (the probability of the predicted class); ECE is the
mean over queries of ``|accuracy(bin) - mean confidence(bin)|``, in points (0-100). Negative
log-likelihood (NLL): the mean over queries of ``-log p(true class)``, in nats.
"""
from __future__ import annotations

import math

import torch

# the tables' arithmetic is NumPy only, so the summarize step pools tables without loading torch;
# pool_reliability is imported to be used from here as before
from mtl.stats import expected_calibration_error, pool_reliability  # noqa: F401

#: Equal-width confidence bins of the expected calibration error.
ECE_BINS = 15
#: The temperature search interval, in units of the spread of the scores (their standard deviation
#: about each query's mean score): beyond it a run's scores are degenerate (all queries alike).
TEMPERATURE_RANGE = (1e-3, 1e3)


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``softmax(logits / temperature)`` over the last axis, in float64."""
    return torch.softmax(logits.double() / float(temperature), dim=-1)


def negative_log_likelihood(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean ``-log p(target)`` of ``logits`` (N, C) at ``temperature``, in nats."""
    log_p = torch.log_softmax(logits.double() / float(temperature), dim=-1)
    return float(-log_p.gather(-1, targets.long().reshape(-1, 1)).mean())


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature minimising the mean NLL of ``targets`` (N,) under ``logits`` (N, C).

    The NLL is convex in 1/T, so a bounded search over log T finds its single minimum (to a
    relative 1e-6). Scores that are all equal give every T the same NLL; then T = 1. The NLL depends
    on ``logits / T`` alone, so the search interval follows the scale of the scores
    (:data:`TEMPERATURE_RANGE` times their spread) and ``c * logits`` gets ``c`` times the
    temperature: a prototype learner's minus squared distances can spread over 1e4 where a linear
    head's spread over 1, and an interval fixed at 1e3 stopped its temperature at the edge.
    """
    from scipy.optimize import minimize_scalar

    logits, targets = logits.double().reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if logits.shape[0] == 0:
        raise ValueError("no queries to fit a temperature on")
    if torch.all(logits == logits[:, :1]):
        return 1.0
    spread = float((logits - logits.mean(dim=-1, keepdim=True)).std())
    low, high = (math.log(t * spread) for t in TEMPERATURE_RANGE)
    result = minimize_scalar(lambda log_t: negative_log_likelihood(logits, targets, math.exp(log_t)),
                             bounds=(low, high), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


def reliability(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> dict:
    """Per confidence bin: ``count`` of queries, ``confidence`` (sum of their confidences) and
    ``correct`` (how many are right), as lists; sums, so runs pool by adding them."""
    probs, targets = probs.reshape(-1, probs.shape[-1]), targets.reshape(-1).long()
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == targets).double()
    # bin b holds confidences in (b/bins, (b+1)/bins]; the lowest bin also holds its lower edge
    index = torch.clamp(torch.ceil(confidence * bins).long() - 1, 0, bins - 1)
    return {
        "bins": bins,
        "count": torch.bincount(index, minlength=bins).tolist(),
        "confidence": torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence.double()).tolist(),
        "correct": torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct).tolist(),
    }


def calibration_report(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> dict:
    """What a run records about its test queries: ECE and NLL at ``temperature`` and at 1 (the
    learner's own scores), and the reliability table at ``temperature``."""
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    table = reliability(probabilities(logits, temperature), targets)
    return {
        "temperature": float(temperature),
        "ece": expected_calibration_error(table),
        "nll": negative_log_likelihood(logits, targets, temperature),
        "ece_uncalibrated": expected_calibration_error(reliability(probabilities(logits), targets)),
        "nll_uncalibrated": negative_log_likelihood(logits, targets),
        "reliability": table,
    }
