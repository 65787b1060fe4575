"""The hard-task (HT) meta-batch of Meta-Transfer Learning, as pure functions over labels.

What the paper fixes (Sun et al., CVPR 2019, Algorithm 2; journal version arXiv 1910.03648):
  1. after a meta-batch of ordinary tasks, take from *each* task its failure class: the class
     with the lowest query accuracy of the adapted base learner;
  2. build new ("hard") tasks from those failure classes with freshly re-sampled support and
     query images;
  3. meta-train on the hard tasks as on any other task, then clear the failure set.

What neither the paper nor any released code fixes, and what we therefore chose (config keys of
``meta.hard_tasks``, see :class:`HardTaskConfig`):
  - how many ordinary tasks make one HT meta-batch (``normal_tasks``),
  - how many hard tasks are built from one failure set (``hard_tasks``),
  - what to do when the failure set holds fewer than ``way`` distinct classes (``fill``),
  - ties in the failure class: the lowest *global* class id wins (deterministic, seed-independent).

Everything here works on label arrays and integer class ids only (no images, no model), so the
sampling logic is testable in milliseconds; :mod:`mtl.train.meta` feeds it query predictions and
turns the returned :class:`~mtl.data.episodes.Episode` into images.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mtl.config import check_section, schema_defaults, section_schema
from mtl.data.episodes import Episode, pick_shots, split_support_query
from mtl.errors import ConfigError, DataError, check_known_keys
from mtl.rng import Purpose, stream

FILL_MODES = tuple(section_schema("meta.hard_tasks")["properties"]["fill"]["enum"])
#: The ``meta.hard_tasks`` defaults as mtl/config.schema.yaml states them (reasons below).
_DEFAULTS = schema_defaults("meta.hard_tasks")


@dataclass
class HardTaskConfig:
    """Settings of the hard-task meta-batch (config ``meta.hard_tasks``).

    Defaults and why:
      - ``enabled`` False: plain MTL; the ``mtl_ht`` method switches it on.
      - ``normal_tasks`` 5: one failure class per task, so 5 ordinary tasks can yield a full
        5-way hard task made *only* of failure classes (the paper's intent). The TF code's meta-batch
        of 2 would give at most 2 failure classes, so every 5-way hard task would be 60% random
        filler. With 64 (mini) / 60 (FC100) train classes duplicates are rare but happen; then
        ``fill`` decides.
      - ``hard_tasks`` 1: one hard task after every 5 ordinary ones (1 in 6 tasks is hard).
        More hard tasks from the same 5 classes would only repeat that class set with other images.
      - ``fill`` "random": when fewer than ``way`` distinct failure classes exist, complete the
        task with classes drawn uniformly from the other classes of the split, so a hard task is
        still built every round and the hard/normal ratio stays constant. "skip" builds no hard
        task that round (purer hard tasks, fewer of them).

    Interaction with ``meta.meta_batch``: ``meta_batch`` is how many tasks' query losses are averaged
    per optimiser step; the HT meta-batch is how tasks are *grouped to collect failure classes*. The
    two are independent: tasks form one stream (``normal_tasks`` ordinary tasks, then their hard
    tasks, repeat), and each optimiser step consumes the next ``meta_batch`` tasks of that stream.
    A hard task is built as soon as the forward passes of its round's ordinary tasks are done, so
    it may share an optimiser step with them. An epoch is ``episodes_per_epoch`` optimiser steps
    with or without HT (same number of updates and the same schedule for ``mtl`` and ``mtl_ht``);
    the failure set is cleared at every epoch start, so a resumed run draws the same tasks.
    """

    enabled: bool = False  # not a config key: the method (mtl.methods) decides
    normal_tasks: int = _DEFAULTS["normal_tasks"]
    hard_tasks: int = _DEFAULTS["hard_tasks"]
    fill: str = _DEFAULTS["fill"]

    def __post_init__(self) -> None:
        for name, value in check_section(vars(self), "meta.hard_tasks").items():
            setattr(self, name, value)

    @classmethod
    def from_dict(cls, values: dict | None) -> HardTaskConfig:
        """Build from the config dict, rejecting unknown keys (a typo must not run the default)."""
        return cls(**check_known_keys(values, cls, "meta.hard_tasks"))

    @property
    def round_length(self) -> int:
        """Tasks in one HT round: the ordinary tasks followed by the hard tasks built from them."""
        return self.normal_tasks + self.hard_tasks


def per_class_accuracy(predictions: np.ndarray, targets: np.ndarray, way: int) -> np.ndarray:
    """Query accuracy of each local class 0..way-1 (a class without queries counts as 1.0)."""
    predictions = np.asarray(predictions).reshape(-1)
    targets = np.asarray(targets).reshape(-1)
    correct = np.bincount(targets, weights=(predictions == targets).astype(float), minlength=way)
    counts = np.bincount(targets, minlength=way)
    return np.where(counts > 0, correct / np.maximum(counts, 1), 1.0)


def failure_class(predictions: np.ndarray, targets: np.ndarray, classes: np.ndarray) -> int:
    """Global id of the task's class with the lowest query accuracy.

    ``targets`` are local labels 0..way-1 and ``classes[k]`` the global id of local class k.
    Ties go to the lowest global class id, so the choice does not depend on the order in which
    the sampler happened to list the classes.
    """
    classes = np.asarray(classes)
    accuracy = per_class_accuracy(predictions, targets, len(classes))
    worst = np.flatnonzero(accuracy == accuracy.min())
    return int(classes[worst].min())


def collect_failure_classes(failures: Sequence[int]) -> np.ndarray:
    """The failure set: distinct global class ids, sorted (order-free, hence reproducible)."""
    return np.unique(np.asarray(list(failures), dtype=np.int64))


def hard_task_classes(
    failure_set: np.ndarray, way: int, num_classes: int, rng: np.random.Generator, fill: str = "random"
) -> np.ndarray | None:
    """The ``way`` global classes of one hard task, or None when ``fill="skip"`` and too few failed.

    More failure classes than ``way``: a random subset. Fewer: all of them plus random other classes
    (``fill="random"``). The result is shuffled so failure classes do not always take the first
    positions of the meta-learned learner initialisation.
    """
    if fill not in FILL_MODES:
        raise ConfigError(f"Unknown value '{fill}' for argument fill. Valid values are {set(FILL_MODES)}")
    failure_set = collect_failure_classes(failure_set)
    if len(failure_set) >= way:
        chosen = rng.choice(failure_set, size=way, replace=False)
    elif fill == "skip":
        return None
    else:
        others = np.setdiff1d(np.arange(num_classes), failure_set)
        need = way - len(failure_set)
        if len(others) < need:
            raise ConfigError(f"cannot build a {way}-way hard task from a split with {num_classes} classes")
        chosen = np.concatenate([failure_set, rng.choice(others, size=need, replace=False)])
    return rng.permutation(chosen).astype(np.int64)


def sample_task_images(
    indices_by_class: Sequence[np.ndarray], classes: np.ndarray, shot: int, query: int, rng: np.random.Generator
):
    """Fresh support/query image indices for ``classes``, class-major like EpisodeSampler (its
    pieces ``pick_shots`` and ``split_support_query``, so the layout cannot drift apart).

    Images are drawn without replacement within a class, independently of the ordinary tasks
    the classes failed in (the paper re-samples the data of the failure classes).
    """
    pools = [indices_by_class[int(cls)] for cls in classes]
    for cls, pool in zip(classes, pools):
        if len(pool) < shot + query:
            raise DataError(f"class {int(cls)} has {len(pool)} images, a hard task needs shot+query={shot + query}")
    picked = np.stack([pick_shots(rng, pool, shot + query) for pool in pools])
    support, queries = split_support_query(picked, shot)
    return Episode(support.astype(np.int64), queries.astype(np.int64), np.asarray(classes, dtype=np.int64))


def hard_task_rng(seed: int, epoch: int, round_index: int) -> np.random.Generator:
    """RNG of one HT round, a pure function of (seed, epoch, round): resume draws the same tasks."""
    return stream(seed, Purpose.HARD_TASKS, epoch, round_index)


def build_hard_tasks(
    failures: Sequence[int],
    indices_by_class: Sequence[np.ndarray],
    *,
    way: int,
    shot: int,
    query: int,
    count: int,
    rng: np.random.Generator,
    fill: str = "random",
) -> list:
    """Up to ``count`` hard tasks (Episodes) from one round's failure classes; [] when skipped."""
    failure_set = collect_failure_classes(failures)
    tasks = []
    for _ in range(count):
        classes = hard_task_classes(failure_set, way, len(indices_by_class), rng, fill)
        if classes is None:
            break
        tasks.append(sample_task_images(indices_by_class, classes, shot, query, rng))
    return tasks


class HardTaskRound:
    """Collects failure classes over one HT round and hands out its hard tasks once, then clears.

    Usage per task of the stream: ``kind = round.next_kind()``; for an ordinary task call
    ``round.record(failure_class)`` after its forward pass; for a hard task take ``round.pop_hard()``.
    """

    def __init__(self, config: HardTaskConfig, indices_by_class, *, way, shot, query, seed, epoch):
        self.config = config
        self.indices_by_class = indices_by_class
        self.way, self.shot, self.query = way, shot, query
        self.seed, self.epoch = seed, epoch
        self.position = 0  # position inside the current round
        self.round_index = 0
        self.failures: list[int] = []
        self.pending: list = []
        self.built = False

    def next_kind(self) -> str:
        """Kind of the next task of the stream: "normal" or "hard" (a skipped hard slot is normal)."""
        if self.position < self.config.normal_tasks:
            return "normal"
        if not self.built:
            self._build()
        if self.pending:
            return "hard"
        self._next_round()
        return "normal"

    def record(self, failure: int) -> None:
        """Note an ordinary task's failure class and advance the stream."""
        self.failures.append(int(failure))
        self.position += 1

    def pop_hard(self):
        """The next hard task of this round; the round ends (set cleared) after its last one."""
        task = self.pending.pop(0)
        self.position += 1
        if not self.pending:
            self._next_round()
        return task

    def state(self) -> dict:
        """The round's progress as plain values (pending tasks as index lists), for a checkpoint."""
        pending = [{"support": e.support.tolist(), "query": e.query.tolist(), "classes": e.classes.tolist()}
                   for e in self.pending]
        return {"position": self.position, "round_index": self.round_index, "failures": list(self.failures),
                "pending": pending, "built": self.built}

    def load_state(self, state: dict) -> None:
        self.position, self.round_index = int(state["position"]), int(state["round_index"])
        self.failures, self.built = [int(c) for c in state["failures"]], bool(state["built"])
        self.pending = [Episode(*(np.asarray(task[k], dtype=np.int64) for k in ("support", "query", "classes")))
                        for task in state["pending"]]

    def _build(self) -> None:
        rng = hard_task_rng(self.seed, self.epoch, self.round_index)
        self.pending = build_hard_tasks(
            self.failures, self.indices_by_class, way=self.way, shot=self.shot, query=self.query,
            count=self.config.hard_tasks, rng=rng, fill=self.config.fill,
        )
        self.built = True
        self.failures = []  # the paper clears the set once its hard tasks exist

    def _next_round(self) -> None:
        self.position = 0
        self.round_index += 1
        self.failures = []
        self.pending = []
        self.built = False


class TaskStream:
    """Tasks of one epoch in order: ordinary episodes, with hard tasks interleaved when HT is on.

    Ordinary task j of epoch e is ``sampler.episode(e * tasks_per_epoch + j)``, so the stream is a
    pure function of (seed, epoch) and a resumed epoch sees the tasks it would have seen.
    """

    def __init__(self, sampler, epoch: int, tasks_per_epoch: int, hard_round: HardTaskRound | None):
        self.sampler = sampler
        self.first_index = epoch * tasks_per_epoch
        self.normal_count = 0
        self.hard_round = hard_round
        self.hard_count = 0
        self._kind = None

    def next(self):
        """(kind, Episode) of the next task; call :meth:`done` with its query predictions after."""
        kind = self.hard_round.next_kind() if self.hard_round is not None else "normal"
        if kind == "hard":
            episode = self.hard_round.pop_hard()
            self.hard_count += 1
        else:
            episode = self.sampler.episode(self.first_index + self.normal_count)
            self.normal_count += 1
        self._kind = kind
        return kind, episode

    def done(self, episode, predictions: np.ndarray, targets: np.ndarray) -> None:
        """Record an ordinary task's failure class (HT only)."""
        if self.hard_round is not None and self._kind == "normal":
            self.hard_round.record(failure_class(predictions, targets, episode.classes))

    def state(self) -> dict:
        """Where the stream stands between two tasks, as plain values (for a mid-epoch checkpoint)."""
        return {"normal_count": self.normal_count, "hard_count": self.hard_count,
                "hard_round": self.hard_round.state() if self.hard_round is not None else None}

    def load_state(self, state: dict) -> None:
        self.normal_count, self.hard_count = int(state["normal_count"]), int(state["hard_count"])
        if self.hard_round is not None:
            self.hard_round.load_state(state["hard_round"])
