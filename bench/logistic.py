"""Cost of method `logreg` at meta-test: the `mtl.learners.logistic.LogisticLearner` on precomputed features.

    OMP_NUM_THREADS=1 .venv/bin/python bench/logistic.py                 # 600 episodes, 5-way 5-shot, 512-d
    OMP_NUM_THREADS=1 .venv/bin/python bench/logistic.py --shot 1 --repeats 5

Synthetic features, as `embed_episodes` would hand them over: 20 classes x 600 images (miniImageNet's
test split shape), each a ReLU of a class centre (scaled by ``--separation``) plus unit Gaussian
noise, ``--dim`` wide (512: resnet12). ``--episodes`` episodes of ``--way``-way ``--shot``-shot
``--query``-query drawn class-major with a seeded numpy generator. The embedding itself is not
timed (`bench/evaluate.py` does that); this is the part `lr` adds after it: one scikit-learn
lbfgs fit per episode (`mtl.learners.logistic.LOGISTIC_SETTINGS`). The first call (importing scikit-learn,
finding the BLAS libraries) is timed apart from the ``--repeats`` timed passes. For scale, the
batched fresh learner of `ft` (`evaluate_episodes`, 100 SGD steps at lr 0.01) runs on the same
features and episodes.
"""
from __future__ import annotations

import argparse
import statistics
import time

import context  # first: this checkout's mtl, and the machine beside every figure
import numpy as np
import torch

from mtl.data.episodes import relabel
from mtl.learners.logistic import LOGISTIC_SETTINGS, LogisticLearner, logistic_probabilities
from mtl.base_learner import evaluate_episodes

CLASSES, PER_CLASS = 20, 600


def synthetic(dim: int, separation: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, dim, generator=generator) * separation
    noise = torch.randn(CLASSES * PER_CLASS, dim, generator=generator)
    return torch.relu(centres.repeat_interleave(PER_CLASS, 0) + noise)


def draw_episodes(count: int, way: int, shot: int, query: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    support, queries = [], []
    for _ in range(count):
        s, q = [], []
        for c in rng.choice(CLASSES, way, replace=False):
            idx = c * PER_CLASS + rng.choice(PER_CLASS, shot + query, replace=False)
            s.extend(idx[:shot])
            q.extend(idx[shot:])
        support.append(s)
        queries.append(q)
    return np.array(support), np.array(queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shot", type=int, default=5)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--separation", type=float, default=0.15, help="class centre scale (accuracy ~40-60%%)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(context.machine_line())
    print(f"settings: {LOGISTIC_SETTINGS}")

    feats = synthetic(args.dim, args.separation, args.seed)
    support, query = draw_episodes(args.episodes, args.way, args.shot, args.query, args.seed)
    start = time.perf_counter()
    logistic_probabilities(feats[support[0]], np.repeat(np.arange(args.way), args.shot), feats[query[0]], args.way)
    context.figure(f"first call (imports scikit-learn, finds BLAS, one fit): {time.perf_counter() - start:.2f} s")

    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        logits = LogisticLearner(None).fit(feats[support], relabel(args.way, args.shot), args.way)(feats[query])
        accuracies = (logits.argmax(dim=-1).numpy() == relabel(args.way, args.query)).mean(axis=1)
        seconds.append(time.perf_counter() - start)
        context.figure(f"logreg: {args.episodes} episodes {args.way}-way {args.shot}-shot {args.query}-query, "
                       f"{args.dim}-d: {seconds[-1]:.2f} s ({seconds[-1] / args.episodes * 1e3:.1f} ms/episode), "
                       f"mean accuracy {accuracies.mean() * 100:.2f}%")
    median = statistics.median(seconds)
    context.figure(f"logreg median of {args.repeats}: {median:.2f} s ({median / args.episodes * 1e3:.1f} ms/episode)")

    start = time.perf_counter()
    ft = evaluate_episodes(feats, (support, query), args.way, args.shot, args.query,
                           generator=torch.Generator().manual_seed(args.seed))
    context.figure(f"ft (batched, 100 SGD steps): {time.perf_counter() - start:.2f} s, "
                   f"mean accuracy {ft.mean() * 100:.2f}%")


if __name__ == "__main__":
    main()
