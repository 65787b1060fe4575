"""Test-time learners: what adapts to a support set, and how the queries are then scored.

Every way this project classifies the queries of a few-shot task is one learner here, written once
and used by everything that scores or predicts: :mod:`mtl.evaluate` (the saved test episodes and the
calibration episodes), :mod:`mtl.predict` (your own folders) and :mod:`mtl.model_file` (which
settings an exported model records). :func:`learner_settings` turns a method of the registry
(:mod:`mtl.methods`) and its trained file into the settings an exported model stores, and
:func:`learner_for` turns those settings into a learner:

====================  ==========================================================================
learner               what adapts, and the scores it gives (``logits``: a softmax turns them into
                      probabilities, see :mod:`mtl.learners.calibration`)
====================  ==========================================================================
linear, fresh (ft)    a linear head from a kaiming draw, ``steps`` SGD steps; ``W x + b``
linear, meta (mtl*)   the same head from the meta-learned initialisation; ``W x + b``
prototype (proto)     class means of the support features; minus squared Euclidean distance
logistic (logreg)     a logistic regression fitted to convergence; log-probabilities
fine-tuning (ft_*)    a network part and a fresh head together; ``W x + b`` of the adapted network
====================  ==========================================================================

A learner adapts E episodes at once: ``learner.fit(support, labels, n_classes, first_episode=e0)``
takes the support inputs of episodes e0..e0+E-1 (``(E, S, ...)``: the features of
``learner.embedder()``, or the trunk's output for fine-tuning) and returns a classifier: query
inputs ``(E, Q, ...)`` -> logits ``(E, Q, n_classes)``. ``first_episode`` matters to fresh learners
only: episode e starts from the e-th initialisation the run's seed draws, so an episode scored
alone, in a chunk, or as a folder of your images (:meth:`mtl.predict.FewShotModel.adapt`) starts
from the same weights. :func:`score_episodes` runs a learner over a whole episode file.
"""
from __future__ import annotations

from collections.abc import Mapping

from mtl.errors import ConfigError
from mtl.learners.base import Classifier, Learner, score_episodes
from mtl.methods import FRESH, LOGISTIC, META_LEARNED, PROTOTYPE, get_method
from mtl.rng import Purpose

__all__ = ["Classifier", "Learner", "learner_for", "score_episodes", "learner_settings"]


def learner_settings(method: str, trained_info: Mapping, *, steps: int | None = None,
                       lr: float | None = None) -> dict:
    """What adapts on a support set and with which budget, for ``method`` with its trained file's
    entries ``trained_info``: the registry's entry with its defaults resolved. A meta-trained
    learner adapts with the inner loop it was meta-trained for (``trained_info["inner"]``);
    ``steps``/``lr`` replace a fresh learner's budget (benchmarks). This is what an exported model
    records as ``test_time``; :func:`learner_for` builds the learner from it.
    """
    test_time = get_method(method).test_time
    if test_time.learner == META_LEARNED:
        budget = (int(trained_info["inner"]["update_step"]), float(trained_info["inner"]["base_lr"]))
    else:
        budget = (test_time.steps if steps is None else steps, test_time.lr if lr is None else lr)
    settings = {"learner": test_time.learner, "finetune": test_time.finetune, "steps": budget[0],
                "lr": budget[1], "encoder_lr": test_time.encoder_lr}
    if test_time.learner == LOGISTIC:
        from mtl.learners.logistic import LOGISTIC_SETTINGS

        settings["logistic"] = dict(LOGISTIC_SETTINGS)
    return settings


def learner_for(settings: Mapping, backbone, *, seed: int, meta_init=None,
                purpose: Purpose = Purpose.TEST_LEARNERS) -> Learner:
    """The learner of ``settings`` (:func:`learner_settings`, or an exported model's ``test_time``)
    over ``backbone`` (the plain encoder: scales folded, eval mode).

    ``seed``: the run's training seed; fresh learners draw their initialisations from its
    ``purpose`` stream (the test stream for the saved test episodes and for prediction, another
    for calibration episodes). ``meta_init``: (weight (way, D), bias (way,)) of a meta-learned
    learner, required for that learner and refused for the others.
    """
    kind, scope = settings["learner"], settings.get("finetune")
    if (kind == META_LEARNED) != (meta_init is not None):
        raise ConfigError(f"the {kind!r} learner {'needs' if kind == META_LEARNED else 'takes no'} "
                          "meta-learned initialisation")
    if scope is not None:
        from mtl.learners.finetune import FinetuneLearner

        if kind != FRESH:
            raise ConfigError(f"fine-tuning ({scope}) adapts a fresh linear head, not a {kind!r} learner")
        return FinetuneLearner(backbone, scope, steps=int(settings["steps"]), lr=float(settings["lr"]),
                               encoder_lr=float(settings["encoder_lr"]), seed=seed, purpose=purpose)
    if kind in (FRESH, META_LEARNED):
        from mtl.learners.linear import LinearLearner

        return LinearLearner(backbone, steps=int(settings["steps"]), lr=float(settings["lr"]), init=meta_init,
                             seed=seed, purpose=purpose)
    if kind == PROTOTYPE:
        from mtl.learners.prototype import PrototypeLearner

        return PrototypeLearner(backbone)
    if kind == LOGISTIC:
        from mtl.learners.logistic import LogisticLearner

        return LogisticLearner(backbone)
    raise ConfigError(f"unknown test-time learner {kind!r} (known: {FRESH}, {META_LEARNED}, {PROTOTYPE}, "
                      f"{LOGISTIC}); a model file from a newer mtl-fewshot? upgrade it")
