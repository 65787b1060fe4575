"""Named random streams: every draw that follows a run's seed comes from here.

``stream(seed, purpose, *index)`` is the numpy generator and ``torch_stream(...)`` the torch one of
one purpose (a member of :class:`Purpose`) at one index (an epoch, an episode, a round, ...).

Why one place: numpy pads a short seed list with zeros, so ``default_rng([seed, e])`` and
``default_rng([seed, e, 0])`` are the same generator, and it splits a large integer into 32-bit
words, so ``[2**32 + 1]`` is ``[1, 1]``. With each site inventing its own key, pre-training's
shuffle of epoch e was validation episode e's generator and meta-training's train and validation
episodes were the same draws. Here the key is the stream version, the purpose's name, the seed and
the index, written out as JSON (unambiguous: lengths and signs show) and hashed with SHA-256 into a
fixed-size seed; a purpose is an Enum member with a distinct name, so two sites cannot share a
stream by accident, and a site can only use a purpose that is listed here.

``STREAM_VERSION`` names this scheme: it is recorded with what is saved from a stream (episode
files), so something drawn under an older scheme is recognised instead of being mixed with new draws.
"""
from __future__ import annotations

import enum
import hashlib
import json
import operator

import numpy as np

# 1: the per-site keys before this module (``default_rng([seed, i])`` and the like); 2: this module.
STREAM_VERSION = 2


@enum.unique
class Purpose(enum.Enum):
    """What a stream is drawn for; the value is the name hashed into the key (never change one)."""

    TEST_EPISODES = "test_episodes"  # the saved test episodes every method is scored on
    VALIDATION_EPISODES = "validation_episodes"  # pre-training's and meta-training's model selection
    TRAIN_EPISODES = "train_episodes"  # meta-training's ordinary tasks
    HARD_TASKS = "hard_tasks"  # the hard tasks of one HT round
    PRETRAIN_SHUFFLE = "pretrain_shuffle"  # the order of one pre-training epoch
    PRETRAIN_AUGMENT = "pretrain_augment"  # crops and flips of one pre-training epoch
    META_AUGMENT = "meta_augment"  # crops and flips of one meta-training epoch
    MODEL_INIT = "model_init"  # the backbone's initial weights (global torch generator)
    META_LEARNER_INIT = "meta_learner_init"  # the learner initialisation meta-training starts from
    VALIDATION_LEARNERS = "validation_learners"  # fresh learners of pre-training's validation episodes
    TEST_LEARNERS = "test_learners"  # fresh learners of evaluation and prediction (same draws in both)
    EXAMPLE_IMAGES = "example_images"  # the images of the worked prediction example
    CALIBRATION_EPISODES = "calibration_episodes"  # validation episodes a run's temperature is fitted on
    CALIBRATION_LEARNERS = "calibration_learners"  # fresh learners of those episodes


def _entropy(seed: int, purpose: Purpose, index: tuple) -> int:
    if not isinstance(purpose, Purpose):
        raise TypeError(f"purpose must be a mtl.rng.Purpose, got {purpose!r}")
    # operator.index: integers only (numpy ones too); 1.0 and "1" would silently name other streams
    key = [STREAM_VERSION, purpose.value, operator.index(seed), *(operator.index(i) for i in index)]
    return int.from_bytes(hashlib.sha256(json.dumps(key).encode()).digest(), "big")


def stream(seed: int, purpose: Purpose, *index: int) -> np.random.Generator:
    """The numpy generator of ``purpose`` at ``index`` for the run ``seed``."""
    return np.random.default_rng(np.random.SeedSequence(_entropy(seed, purpose, index)))


def stream_seed(seed: int, purpose: Purpose, *index: int) -> int:
    """A 63-bit integer seed of ``purpose`` at ``index``: for ``torch.manual_seed`` (the global generator)."""
    words = np.random.SeedSequence(_entropy(seed, purpose, index)).generate_state(1, np.uint64)
    return int(words[0] >> np.uint64(1))


def torch_stream(seed: int, purpose: Purpose, *index: int):
    """A CPU ``torch.Generator`` of ``purpose`` at ``index`` for the run ``seed``."""
    import torch  # here: sampling episodes needs numpy only

    return torch.Generator().manual_seed(stream_seed(seed, purpose, *index))
