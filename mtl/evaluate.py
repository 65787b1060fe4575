"""Meta-test: score a method on the saved test episodes, embedding each test image once.

The encoder is fixed at meta-test, so the features of an image are the same in every episode
that uses it. We embed the images the episodes touch once (scales folded into the conv weights,
eval-mode BN), then adapt all episodes' base learners together in one batched computation
(:func:`mtl.base_learner.evaluate_episodes`). The per-episode protocol of the reference embeds
support and query of every episode again; both give the same per-episode accuracies.

Methods (entries of :mod:`mtl.methods`, which states each one's test-time adaptation and budget):
- meta-trained (``mtl``, ``mtl_ht`` and the ``mtl_*`` arms): the meta-trained scale/shift encoder
  and the meta-learned learner initialisation, adapted with the meta-train inner loop
  (update_step SGD steps at base_lr).
- ``ft``: the pre-trained encoder with a fresh linear learner (kaiming init, 100 steps, lr 0.01),
  as the reference's pre-train validation does.
- ``lr``: the pre-trained encoder, a multinomial logistic regression fitted to convergence on the
  L2-normalised support features of each episode (Tian et al., ECCV 2020; :mod:`mtl.logistic`,
  one scikit-learn fit per episode). Its settings are written into metrics.json
  (``learner_settings``).
- ``proto``: the pre-trained encoder, nearest class mean (Euclidean) over support features.
- ``ft_last`` / ``ft_all``: ``ft`` with the last residual block / the whole network fine-tuned
  together with the learner on each support set (:mod:`mtl.finetune`; the encoder is not fixed,
  so these embed per episode chunk instead of once).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from mtl.config import check_value
from mtl.data.episodes import load_episodes, relabel
from mtl.data.hdf5 import HDF5Split
from mtl.data.transforms import EvalTransform
from mtl.device import select_device
from mtl.errors import CheckpointError, ConfigError
from mtl.finetune import finetune_accuracies
from mtl.logistic import LOGISTIC_SETTINGS, logistic_accuracies
from mtl.methods import LOGISTIC, PROTOTYPE, get_method
from mtl.models import load_encoder_file
from mtl.models.encoder_io import ENCODER_PRODUCER, MODEL_PRODUCER
from mtl.results.runs import write_episode_results
from mtl.rng import Purpose, torch_stream
from mtl.base_learner import DEFAULT_INFERENCE_BATCH_SIZE, embed_episodes, evaluate_episodes

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
    ft_steps: int | None = None,
    ft_lr: float | None = None,
    inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
    device: str = "auto",
) -> dict:
    """Score ``method`` on the fixed episodes and write ``episodes_out`` (CSV) and ``metrics_out`` (JSON).

    ``inference_batch_size``: images per forward pass of the embedding (mtl.jobs.open_gpu_job resolves it).
    ``protocol`` holds what the episode file does not fix: dataset, backbone, and the training
    ``seed`` of the run (it also seeds the fresh learners' initialisation). ``ft_steps``/``ft_lr``
    replace the registry's budget of a fresh learner (benchmarks); None keeps it, other values are
    held to the bounds of the inner loop they replace (``meta.update_step``, ``meta.base_lr``). They do
    not apply to ``proto`` and ``lr`` (no steps: ``lr`` fits to convergence).
    """
    test_time = get_method(method).test_time
    # checked, not `or`-ed with the default: a 0 must be refused, never silently become 100
    if ft_steps is not None:
        ft_steps = check_value(ft_steps, "meta.update_step", name="ft_steps")
    if ft_lr is not None:
        ft_lr = check_value(ft_lr, "meta.base_lr", name="ft_lr")
    if "seed" not in protocol:
        raise ConfigError("evaluate: protocol must name the training seed of the run ('seed')")
    dev = select_device(device)
    split = HDF5Split(test_h5)
    episodes = load_episodes(episodes_path, expect_num_images=len(split), expect_num_classes=split.num_classes)
    encoder, info, init = _load_for_method(method, model_path, dev)

    transform = EvalTransform(info["image_size"], **info["normalize"])
    way, shot, n_query = episodes.meta["way"], episodes.meta["shot"], episodes.meta["query"]
    if init is not None:  # the inner loop the initialisation was meta-learned for
        steps, lr = info["update_step"], info["base_lr"]
    else:
        steps = test_time.steps if ft_steps is None else ft_steps
        lr = test_time.lr if ft_lr is None else ft_lr
    # The learner's initialisation is part of the training chain: it follows the training seed.
    generator = torch_stream(protocol["seed"], Purpose.TEST_LEARNERS)
    if test_time.finetune is not None:
        accuracies = finetune_accuracies(
            encoder, split, (episodes.support, episodes.query), transform, way, shot, n_query,
            scope=test_time.finetune, steps=steps, lr=lr, encoder_lr=test_time.encoder_lr, generator=generator,
            device=dev, inference_batch_size=inference_batch_size, progress=True,
        )
    else:
        features, support, query = embed_episodes(
            encoder, split, (episodes.support, episodes.query), transform,
            inference_batch_size=inference_batch_size, device=dev, progress=True,
        )
        if test_time.learner == PROTOTYPE:
            accuracies = nearest_mean_accuracies(features, support, query, way, shot, n_query)
        elif test_time.learner == LOGISTIC:
            accuracies = logistic_accuracies(features, support, query, way, shot, n_query, progress=True)
        else:
            accuracies = evaluate_episodes(
                features, (support, query), way, shot, n_query,
                init=init, steps=steps, lr=lr, generator=generator,
            )
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
    }
    if test_time.learner == LOGISTIC:  # an extra key: metrics.json keeps it after the standard ones
        full_protocol["learner_settings"] = dict(LOGISTIC_SETTINGS)
    return write_episode_results(episodes_out, metrics_out, np.asarray(accuracies), full_protocol)


def nearest_mean_accuracies(features: torch.Tensor, support: np.ndarray, query: np.ndarray, way: int, shot: int, n_query: int) -> np.ndarray:
    """Prototype classifier: each query goes to the class whose mean support feature is nearest."""
    support_feats = features[torch.as_tensor(support)]  # (E, way*shot, D), class-major
    query_feats = features[torch.as_tensor(query)]  # (E, way*query, D)
    prototypes = support_feats.reshape(len(support), way, shot, -1).mean(dim=2)
    predicted = torch.cdist(query_feats, prototypes).argmin(dim=2)
    targets = torch.as_tensor(relabel(way, n_query), device=predicted.device)
    return (predicted == targets).float().mean(dim=1).cpu().numpy()


def _load_for_method(method: str, model_path, dev: torch.device):
    """The encoder to embed with (scales folded in), the file's entries, and the learner
    initialisation (None: a fresh learner per episode)."""
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
        info = {**info, **info["inner"]}
    return encoder.to(dev).eval(), info, init
