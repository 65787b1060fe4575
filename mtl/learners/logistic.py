"""Method ``logreg``: logistic regression fitted to convergence on L2-normalised frozen features.

The strong linear baseline of Tian et al., "Rethinking few-shot image classification: a good
embedding is all you need?" (ECCV 2020): the pre-trained encoder's features of an episode's support
and query images are scaled to unit L2 norm, and a multinomial logistic regression with an L2
penalty is fitted on the support set to convergence, per episode. Their code (github.com/WangYueFt/rfs,
``eval/meta_eval.py``) fits scikit-learn's ``LogisticRegression(random_state=0, solver='lbfgs',
max_iter=1000, multi_class='multinomial')``, that is with the defaults ``C=1.0``, L2 penalty and
``tol=1e-4``; so do we (a well-kept library rather than a hand-written solver).

The objective, in scikit-learn's scaling of ``C`` (the intercept is not penalised)::

    C * sum_i cross_entropy(W x_i + b, y_i) + 0.5 * ||W||^2,   x_i = f_i / ||f_i||

scikit-learn fits the binary model (one weight vector, sigmoid) when there are two classes. The
multinomial optimum of two classes has ``W = [w/2, -w/2]``, whose penalty is ``||w||^2 / 4``, so it
equals the binary fit with ``2 * C``; :func:`logistic_probabilities` fits that and returns the same
probabilities as the multinomial model (tests/test_logistic.py checks both cases against an
independent solver of the objective above).

Deterministic: no random draw (lbfgs starts from zero weights), so it needs no generator, and BLAS
runs on one thread during the fits (the problems are tiny: threads cost more than they save, and
the numbers cannot depend on the machine's thread count).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
import warnings
from functools import lru_cache

import numpy as np
import torch

from mtl.learners.base import Classifier, Learner

log = logging.getLogger(__name__)

#: The fit, stated once: evaluate writes it into metrics.json (``learner_settings``), and
#: :func:`_model` builds the estimator from it. ``C``: inverse L2 strength, scikit-learn's scaling;
#: ``tol``: lbfgs stops when the largest gradient component of scikit-learn's (mean-loss-scaled)
#: objective is below it (scikit-learn's default, which Tian et al. kept). Fits stop well before
#: ``max_iter``; a fit that reaches it is logged as a warning.
LOGISTIC_SETTINGS: dict = {
    "model": "multinomial logistic regression (scikit-learn LogisticRegression)",
    "features": "L2-normalised (support and query)",
    "penalty": "l2",
    "C": 1.0,
    "fit_intercept": True,
    "solver": "lbfgs",
    "max_iter": 1000,
    "tol": 1e-4,
}
_EPS = 1e-12


def l2_normalize(feats: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit L2 norm; a zero row stays zero (the norm is clamped at 1e-12).

    Floating dtypes are kept; integer input becomes float32.
    """
    feats = feats if feats.is_floating_point() else feats.float()
    return feats / feats.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def _model(n_classes: int):
    """The estimator of :data:`LOGISTIC_SETTINGS` (C doubled for two classes: see the module docstring).

    Only scikit-learn's defaults for the penalty (L2) and the multiclass model (multinomial with
    lbfgs) are relied on, so the same call works from scikit-learn 1.3 (``multi_class``) to 1.8+
    (``penalty`` deprecated in favour of ``l1_ratio``).
    """
    from sklearn.linear_model import LogisticRegression

    settings = LOGISTIC_SETTINGS
    c = settings["C"] * (2.0 if n_classes == 2 else 1.0)
    return LogisticRegression(C=c, solver=settings["solver"], max_iter=settings["max_iter"], tol=settings["tol"],
                              fit_intercept=settings["fit_intercept"])


@lru_cache(maxsize=1)
def _blas_controller():
    """The BLAS libraries loaded by now (numpy's, scipy's), found once: a fresh ``threadpool_limits``
    scans them again on every call, which costs more than a whole fit."""
    import sklearn.linear_model  # noqa: F401  (loads scipy's BLAS before the scan)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _as_numpy64(feats: torch.Tensor) -> np.ndarray:
    return l2_normalize(feats.detach().to("cpu", torch.float64)).numpy()


def _check_labels(labels: np.ndarray, n_support: int, n_classes: int) -> None:
    if n_classes < 2:
        raise ValueError(f"logistic regression needs at least 2 classes, got n_classes={n_classes}")
    if labels.shape != (n_support,):
        raise ValueError(f"support_labels has shape {labels.shape}, expected ({n_support},) like support_feats")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"support_labels must lie in 0..{n_classes - 1}, got {labels.min()}..{labels.max()}")
    missing = np.setdiff1d(np.arange(n_classes), labels)
    if missing.size:
        raise ValueError(f"every class needs at least one support example; classes {missing.tolist()} have none")


def fit_logistic(support_feats: torch.Tensor, support_labels, n_classes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fit :data:`LOGISTIC_SETTINGS` on the L2-normalised ``support_feats`` (S, D) with
    ``support_labels`` (S,) in 0..n_classes-1 (any number per class, at least one each); return
    the fitted classifier: query features (Q, D) (L2-normalised inside) -> (Q, n_classes) float64
    log-probabilities on the CPU, column c being class c. Fit once, score any number of query batches.
    """
    if support_feats.ndim != 2:
        raise ValueError(f"expected support features (S, D), got {tuple(support_feats.shape)}")
    labels = np.asarray(torch.as_tensor(support_labels).cpu(), dtype=np.int64).reshape(-1)
    _check_labels(labels, support_feats.shape[0], n_classes)
    from sklearn.exceptions import ConvergenceWarning

    model = _model(n_classes)
    with _blas_controller().limit(limits=1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported below, through the log
        model.fit(_as_numpy64(support_feats), labels)
    if int(np.max(model.n_iter_)) >= LOGISTIC_SETTINGS["max_iter"]:
        log.warning("logistic regression stopped at max_iter=%d before converging (tol %g); the "
                    "probabilities are those of the last iterate", LOGISTIC_SETTINGS["max_iter"],
                    LOGISTIC_SETTINGS["tol"])

    def log_probabilities(query_feats: torch.Tensor) -> torch.Tensor:
        if query_feats.ndim != 2 or query_feats.shape[1] != support_feats.shape[1]:
            raise ValueError(f"expected query features (Q, {support_feats.shape[1]}), got {tuple(query_feats.shape)}")
        with _blas_controller().limit(limits=1, user_api="blas"):
            # classes_ is 0..n_classes-1 in order: every class is present (checked above)
            return torch.from_numpy(model.predict_log_proba(_as_numpy64(query_feats)))

    return log_probabilities


def logistic_probabilities(support_feats: torch.Tensor, support_labels, query_feats: torch.Tensor,
                           n_classes: int) -> torch.Tensor:
    """Class probabilities of the queries, (Q, n_classes) float64 on the CPU, rows summing to 1:
    :func:`fit_logistic` on the support set, then the queries scored."""
    if support_feats.ndim != 2 or query_feats.ndim != 2 or support_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(f"expected support (S, D) and query (Q, D) features, got {tuple(support_feats.shape)} "
                         f"and {tuple(query_feats.shape)}")
    return fit_logistic(support_feats, support_labels, n_classes)(query_feats).exp()


class LogisticLearner(Learner):
    """Method ``logreg``: one :func:`fit_logistic` per episode; its scores are log-probabilities.

    Cost (``bench/logistic.py``, bench/RESULTS.md): 600 episodes of 5-way 5-shot 15-query on
    512-d features take about 2.7-2.8 s on one core of a shared 2-core AMD EPYC VM, 4.5-4.7 ms a
    fit (mostly scikit-learn's per-call overhead: lbfgs stops after 6-7 iterations), plus 1-2 s
    for the first call (importing scikit-learn). ``ft``'s batched 100 SGD steps took 1.7-2.8 s on
    the same features; both are small next to embedding the episodes' images on a CPU.
    """

    def fit(self, support: torch.Tensor, labels, n_classes: int, *, first_episode: int = 0) -> Classifier:
        fitted = [fit_logistic(episode, labels, n_classes) for episode in support.detach().cpu()]

        def log_probabilities(query: torch.Tensor) -> torch.Tensor:
            return torch.stack([scores(episode) for scores, episode in zip(fitted, query.cpu())]).float()

        return log_probabilities
