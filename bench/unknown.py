"""Queries of a class the support set lacks: how many does "none of these" (`predict.unknown`) catch?

    .venv/bin/python bench/unknown.py                                # after the demo (configs/demo.yaml)
    .venv/bin/python bench/unknown.py --models results/models/digits/resnet12 --test data/digits/test.h5 \\
        --episodes 200 --query 15 --thresholds 0.85 0.90 0.93 0.94 0.95 0.97

The offline demo trains on digits 0-3 and tests on 7-9. For every exported seed ensemble under
``--models`` (``<method>/<shot>shot/seed*.pt``) and every choice of the held-out test digit, each
episode's support set holds ``shot`` images of each of the two other digits and its queries
``--query`` images of all three (the held-out digit's included, none of them in the support set);
``--episodes`` episodes per held-out digit, drawn with ``--seed``. Every model adapts to every
support set as `mtl.predict` adapts it (its learner, from the run's fresh-learner draws 0..E-1; its
temperature), on encoder features embedded once per model; the probabilities are averaged over the
seeds, and the "none of these" decision is the library's (:class:`mtl.predict.Prediction`).

Per method, shot and threshold, pooled over the three held-out digits: ``held-out flagged``, the
share of the held-out digit's queries reported as none of these (higher is better); ``known
flagged``, the share of the support digits' queries reported so (lower is better); ``kept known
accuracy``, the accuracy on the support digits' queries that are kept (without the option: the
``off`` row). How well each candidate score separates held-out from known queries at every
threshold at once (AUROC, 0.5 = chance): the library's ``similarity`` (:func:`mtl.predict.support_similarity`,
averaged over the seeds), the ensemble's top probability (max-softmax), and the distance to the
nearest class mean relative to the distance between the class means (averaged over the seeds). The
last two are computed here only, as the alternatives the library's score was chosen against. Last,
the similarity below which 10% of the known queries fall (the threshold that keeps 90% of them)
and the share of held-out queries below it.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import context  # first: this checkout's mtl, and the machine beside every figure
import numpy as np
import torch

from mtl.base_learner import embed
from mtl.data.episodes import relabel
from mtl.data.hdf5 import HDF5Split
from mtl.learners import learner_for
from mtl.learners.calibration import probabilities
from mtl.predict import Prediction, SeedEnsemble, load_models, support_similarity

KNOWN = 2  # classes in each support set: the test digits but the held-out one


@dataclasses.dataclass
class HeldOut:
    """The episodes of one held-out class: support (E, KNOWN*shot) and query (E, 3*query) image
    indices, class-major, and the query targets (3*query,): 0..KNOWN-1 for the support's classes,
    -1 for the held-out class."""

    held_out: int
    known: list[int]
    support: np.ndarray
    query: np.ndarray
    targets: np.ndarray


def draw_episodes(by_class: list[np.ndarray], held_out: int, shot: int, query: int, episodes: int,
                  seed: int) -> HeldOut:
    rng = np.random.default_rng([seed, held_out, shot])
    known = [c for c in range(len(by_class)) if c != held_out]
    support, queries = [], []
    for _ in range(episodes):
        picks = [rng.choice(by_class[c], shot + query, replace=False) for c in known]
        support.append(np.concatenate([p[:shot] for p in picks]))
        queries.append(np.concatenate([p[shot:] for p in picks] + [rng.choice(by_class[held_out], query,
                                                                              replace=False)]))
    targets = np.concatenate([relabel(KNOWN, query), np.full(query, -1)])
    return HeldOut(held_out, known, np.stack(support), np.stack(queries), targets)


def features(model, split: HDF5Split) -> tuple[torch.Tensor, object]:
    """The model's learner and its encoder features (N, D) of every image of ``split``."""
    learned = model.info.get("learner")
    learner = learner_for(model.info["test_time"], model.backbone, seed=model.seed,
                          meta_init=None if learned is None else (learned["weight"], learned["bias"]))
    if not learner.frozen_features:
        raise SystemExit(f"{model.method}: a fine-tuning learner; this bench scores frozen-feature learners only")
    return embed(learner.embedder(), split, model.transform, indices=np.arange(len(split)), device="cpu"), learner


def score_ensemble(ensemble: SeedEnsemble, feats: list[torch.Tensor], learners: list, episodes: HeldOut,
                   class_names: list[str]) -> tuple[Prediction, np.ndarray]:
    """The ensemble's :class:`Prediction` over every query of every episode (E*Q rows), with the
    similarity (ready for any threshold), and the alternative distance score (E*Q,)."""
    labels = torch.as_tensor(relabel(KNOWN, episodes.support.shape[1] // KNOWN))
    per_model, similarity, distance = [], [], []
    for model, f, learner in zip(ensemble.models, feats, learners):
        support, query = f[episodes.support], f[episodes.query]  # (E, S, D), (E, Q, D)
        logits = learner.fit(support, labels, KNOWN, first_episode=0)(query)
        per_model.append(probabilities(logits, model.info["temperature"]).reshape(-1, KNOWN).numpy())
        similarity.append(support_similarity(query, support).reshape(-1).numpy())
        means = torch.stack([support[:, labels == c].mean(dim=1) for c in range(KNOWN)], dim=1)  # (E, KNOWN, D)
        between = torch.cdist(means, means).sum(dim=(1, 2)) / (KNOWN * (KNOWN - 1))  # mean over pairs, (E,)
        distance.append((torch.cdist(query, means).amin(dim=-1) / between[:, None]).reshape(-1).numpy())
    prediction = Prediction([class_names[c] for c in episodes.known], np.stack(per_model),
                            per_model_similarity=np.stack(similarity))
    return prediction, np.mean(distance, axis=0)


def auroc(held_out: np.ndarray, score: np.ndarray) -> float:
    """Probability that a held-out query scores above a known one (ties count half)."""
    from scipy.stats import rankdata

    ranks = rankdata(score)
    positives, negatives = int(held_out.sum()), int((~held_out).sum())
    return float((ranks[held_out].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def rates(predictions: list[Prediction], targets: list[np.ndarray], threshold: float | None) -> tuple:
    """(held-out flagged %, known flagged %, kept known accuracy %) pooled over the held-out classes."""
    flagged, held, correct = [], [], []
    for prediction, target in zip(predictions, targets):
        flagged.append(dataclasses.replace(prediction, unknown=threshold).none_of_these)
        held.append(target < 0)
        correct.append(prediction.predicted == target)
    flagged, held, correct = map(np.concatenate, (flagged, held, correct))
    kept_known = ~held & ~flagged
    return (100 * flagged[held].mean(), 100 * flagged[~held].mean(),
            100 * correct[kept_known].mean() if kept_known.any() else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path("results/models/digits/resnet12"),
                        help="folder of <method>/<shot>shot/seed*.pt")
    parser.add_argument("--test", type=Path, default=Path("data/digits/test.h5"), help="test split (3 classes)")
    parser.add_argument("--episodes", type=int, default=200, help="episodes per held-out class")
    parser.add_argument("--query", type=int, default=15, help="query images per class and episode")
    parser.add_argument("--seed", type=int, default=0, help="seed of the episode draws")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.85, 0.90, 0.93, 0.94, 0.95, 0.97])
    parser.add_argument("--methods", nargs="*", help="only these methods (default: every folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(context.machine_line())
    split = HDF5Split(args.test, in_memory=True)
    by_class = split.indices_by_class()
    if len(by_class) != KNOWN + 1:
        raise SystemExit(f"{args.test}: {len(by_class)} classes; this bench holds one of 3 test classes out")
    print(f"{args.test}: classes {split.class_names} ({', '.join(str(len(c)) for c in by_class)} images); "
          f"support {KNOWN} classes x shot, query {args.query} per class x 3, {args.episodes} episodes per "
          f"held-out class (episode seed {args.seed}); thresholds on the seed-mean similarity")
    runs = sorted(path for path in args.models.glob("*/*shot") if not args.methods or path.parent.name in args.methods)
    if not runs:
        raise SystemExit(f"no <method>/<shot>shot folders under {args.models}; run the demo first")
    separation, table = [], []
    for run in runs:
        ensemble = load_models(run)
        shot = ensemble.models[0].shot
        embedded = [features(model, split) for model in ensemble.models]
        feats, learners = [f for f, _ in embedded], [lr for _, lr in embedded]
        predictions, distances, targets = [], [], []
        for held_out in range(KNOWN + 1):
            episodes = draw_episodes(by_class, held_out, shot, args.query, args.episodes, args.seed)
            prediction, distance = score_ensemble(ensemble, feats, learners, episodes, split.class_names)
            predictions.append(prediction)
            distances.append(distance)
            targets.append(np.tile(episodes.targets, args.episodes))
        held = np.concatenate(targets) < 0
        similarity = np.concatenate([p.similarity for p in predictions])
        method = ensemble.models[0].method
        # the threshold a user who keeps 90% of their own classes' queries would pick, and what it catches
        tenth = float(np.quantile(similarity[~held], 0.1))
        separation.append([method, shot, len(ensemble.models), f"{auroc(held, -similarity):.3f}",
                           f"{auroc(held, -np.concatenate([p.probabilities.max(axis=1) for p in predictions])):.3f}",
                           f"{auroc(held, np.concatenate(distances)):.3f}", f"{tenth:.3f}",
                           f"{100 * (similarity[held] < tenth).mean():.1f}"])
        for threshold in [None, *args.thresholds]:
            flagged_held, flagged_known, accuracy = rates(predictions, targets, threshold)
            table.append([method, shot, "off" if threshold is None else f"{threshold:.2f}", f"{flagged_held:.1f}",
                          f"{flagged_known:.1f}", f"{accuracy:.1f}"])
        context.figure(f"{method} {shot}-shot: {len(ensemble.models)} seeds scored")
    print("\nSeparation of held-out from known queries (AUROC; 0.5 = chance, 1 = every held-out query scores "
          "below every known one):\n")
    print(context.markdown_table(["method", "shot", "seeds", "similarity (library)", "top probability",
                                  "nearest-mean distance / between-means distance",
                                  "similarity flagging 10% of known", "held-out flagged there %"], separation))
    print("\nPer threshold (similarity below it: none of these), pooled over the three held-out digits:\n")
    print(context.markdown_table(["method", "shot", "threshold", "held-out flagged %", "known flagged %",
                                  "kept known accuracy %"], table))


if __name__ == "__main__":
    main()
