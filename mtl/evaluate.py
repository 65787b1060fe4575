"""Meta-test: score a method on the saved test episodes, embedding each test image once.

The encoder is fixed at meta-test, so the features of an image are the same in every episode
that uses it. We embed the images the episodes touch once (scales folded into the conv weights,
eval-mode BN), then adapt all episodes' base learners together in one batched computation
(:func:`mtl.learners.score_episodes`). The per-episode protocol of the reference embeds
support and query of every episode again; both give the same per-episode accuracies.

Before the test episodes, a run fits its temperature on validation episodes (``val_h5``; see
:mod:`mtl.learners.calibration`): its test probabilities are then calibrated without any test
label, and metrics.json records the temperature, the expected calibration error and the negative
log-likelihood of the test queries, with and without it.

Methods (entries of :mod:`mtl.methods`, which states each one's test-time adaptation and budget):
- meta-trained (``mtl``, ``mtl_ht`` and the ``mtl_*`` arms): the meta-trained scale/shift encoder
  and the meta-learned learner initialisation, adapted with the meta-train inner loop
  (update_step SGD steps at base_lr).
- ``ft``: the pre-trained encoder with a fresh linear learner (kaiming init, 100 steps, lr 0.01),
  as the reference's pre-train validation does.
- ``logreg``: the pre-trained encoder, a multinomial logistic regression fitted to convergence on the
  L2-normalised support features of each episode (Tian et al., ECCV 2020; :mod:`mtl.learners.logistic`,
  one scikit-learn fit per episode). Its settings are written into metrics.json
  (``learner_settings``).
- ``proto``: the pre-trained encoder, nearest class mean (Euclidean) over support features.
- ``ft_last`` / ``ft_all``: ``ft`` with the last residual block / the whole network fine-tuned
  together with the learner on each support set (:mod:`mtl.learners.finetune`; the encoder is not fixed,
  so these embed per episode chunk instead of once).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from mtl.config import check_value
from mtl.data.episodes import EpisodeSampler, EpisodeSet, load_episodes, relabel
from mtl.data.hdf5 import HDF5Split
from mtl.data.transforms import EvalTransform
from mtl.device import select_device
from mtl.errors import CheckpointError, ConfigError
from mtl.learners import learner_for, score_episodes, learner_settings
from mtl.learners.calibration import calibration_report, fit_temperature
from mtl.methods import get_method
from mtl.models import load_encoder_file
from mtl.models.encoder_io import ENCODER_PRODUCER, MODEL_PRODUCER
from mtl.results.runs import write_episode_results
from mtl.rng import Purpose
from mtl.base_learner import DEFAULT_INFERENCE_BATCH_SIZE

log = logging.getLogger(__name__)


def evaluate(
    method: str,
    model_path: str | Path,
    test_h5: str | Path,
    episodes_path: str | Path,
    *,
    episodes_out: str | Path,
    metrics_out: str | Path,
    protocol: dict,
    val_h5: str | Path | None = None,
    calibration_episodes: int = 0,
    queries_out: str | Path | None = None,
    ft_steps: int | None = None,
    ft_lr: float | None = None,
    inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
    device: str = "auto",
) -> dict:
    """Score ``method`` on the fixed episodes and write ``episodes_out`` (CSV) and ``metrics_out`` (JSON).

    ``inference_batch_size``: images per forward pass of the embedding (mtl.jobs.open_gpu_job resolves it).
    ``protocol`` holds what the episode file does not fix: dataset, backbone, and the training
    ``seed`` of the run (it also seeds the fresh learners' initialisation). ``val_h5`` and
    ``calibration_episodes``: the validation split of the dataset the model was trained on and how
    many episodes of it the temperature is fitted on (0: no calibration, temperature 1).
    ``queries_out``: also write every query's logits (E, Q, way), its true class and the
    temperature to this ``.npz`` (what a prediction on that episode must reproduce).
    ``ft_steps``/``ft_lr`` replace the registry's budget of a fresh learner (benchmarks); None keeps it, other
    values are held to the bounds of the inner loop they replace (``meta.update_step``, ``meta.base_lr``).
    They do not apply to ``proto`` and ``logreg`` (no steps: ``logreg`` fits to convergence).
    """
    # checked, not `or`-ed with the default: a 0 must be refused, never silently become 100
    if ft_steps is not None:
        ft_steps = check_value(ft_steps, "meta.update_step", name="ft_steps")
    if ft_lr is not None:
        ft_lr = check_value(ft_lr, "meta.base_lr", name="ft_lr")
    if "seed" not in protocol:
        raise ConfigError("evaluate: protocol must name the training seed of the run ('seed')")
    if calibration_episodes and val_h5 is None:
        raise ConfigError("evaluate: calibration_episodes > 0 needs the validation split (val_h5)")
    dev = select_device(device)
    split = HDF5Split(test_h5)
    episodes = load_episodes(episodes_path, expect_num_images=len(split), expect_num_classes=split.num_classes)
    backbone, info, meta_init = load_for_method(method, model_path, dev)
    settings = learner_settings(method, info, steps=ft_steps, lr=ft_lr)
    scoring = {"transform": EvalTransform(info["image_size"], **info["normalize"]),
               "inference_batch_size": inference_batch_size, "device": dev}
    way, shot, n_query = episodes.meta["way"], episodes.meta["shot"], episodes.meta["query"]

    temperature, calibration = 1.0, {"calibration_episodes": 0}
    if calibration_episodes:
        val = HDF5Split(val_h5)
        calibration_set = calibration_episode_set(val, way, shot, n_query, calibration_episodes,
                                                  episodes.meta["seed"])
        # fresh learners of the calibration episodes draw from a stream of their own: the test
        # episodes' learners are the same with or without calibration
        learner = learner_for(settings, backbone, seed=protocol["seed"], meta_init=meta_init,
                              purpose=Purpose.CALIBRATION_LEARNERS)
        logits = score_episodes(learner, val, (calibration_set.support, calibration_set.query),
                                way=way, shot=shot, query=n_query, progress=True, **scoring)
        temperature = fit_temperature(logits, query_targets(len(calibration_set), way, n_query))
        calibration = {"calibration_episodes": len(calibration_set), "calibration_split": str(val_h5)}
        log.info("temperature %.4g, fitted on %d validation episodes", temperature, len(calibration_set))

    learner = learner_for(settings, backbone, seed=protocol["seed"], meta_init=meta_init)
    logits = score_episodes(learner, split, (episodes.support, episodes.query), way=way, shot=shot, query=n_query,
                            progress=True, **scoring)
    targets = query_targets(len(logits), way, n_query)
    accuracies = (logits.argmax(dim=-1) == targets).double().mean(dim=1).numpy()
    if queries_out is not None:
        write_query_scores(queries_out, logits, targets, temperature)
    full_protocol = {
        **protocol,
        "method": method,
        "way": way,
        "shot": shot,
        "query": n_query,
        "episodes": len(accuracies),
        "episode_seed": episodes.meta["seed"],
        "episodes_file": str(episodes_path),
        "episodes_sha256": episodes.sha256,
        # extra keys: metrics.json keeps them after the standard ones
        **calibration,
        **calibration_report(logits, targets, temperature),
    }
    if "logistic" in settings:
        full_protocol["learner_settings"] = settings["logistic"]
    return write_episode_results(episodes_out, metrics_out, accuracies, full_protocol)


def query_targets(episodes: int, way: int, query: int) -> torch.Tensor:
    """(E, way*query) true classes of the queries: class-major in every episode file."""
    return torch.as_tensor(relabel(way, query)).expand(episodes, -1)


def calibration_episode_set(val: HDF5Split, way: int, shot: int, query: int, count: int, seed: int) -> EpisodeSet:
    """The validation episodes a run's temperature is fitted on: drawn like the test episodes (the
    same episode seed, another stream), so every method and seed of a dataset/shot shares them."""
    sampler = EpisodeSampler(val.labels, way, shot, query, seed, count=count, class_names=val.class_names,
                             purpose=Purpose.CALIBRATION_EPISODES)
    return EpisodeSet.from_episodes(sampler.sample(count), sampler.meta())


def write_query_scores(path, logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    from mtl.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, logits=logits.numpy(), targets=targets.numpy(), temperature=np.float64(temperature))


def load_for_method(method: str, model_path, dev: torch.device):
    """The encoder to embed with (scales folded in, eval mode, on ``dev``), the file's entries (with
    the inner loop of a meta-trained model), and the meta-learned learner initialisation (None for
    the other methods)."""
    meta_trained = get_method(method).meta_trained
    encoder, info = load_encoder_file(model_path, producer=MODEL_PRODUCER if meta_trained else ENCODER_PRODUCER)
    init = None
    if meta_trained:
        if "learner" not in info:
            raise CheckpointError(
                f"{model_path} is not a meta-trained model (no learner initialisation); "
                "the meta_train rule writes results/<dataset>/<backbone>/seed<N>/<method>/<shot>shot/model.pt."
            )
        init = (info["learner"]["weight"].float(), info["learner"]["bias"].float())
    return encoder.to(dev).eval(), info, init
