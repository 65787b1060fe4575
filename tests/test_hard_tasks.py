"""Hard-task meta-batch: failure classes, hard-task classes, fresh images, the per-round stream."""
from __future__ import annotations

import numpy as np
import pytest

from mtl.data.episodes import Episode, indices_by_class
from mtl.errors import ConfigError, DataError
from mtl.train.hard_tasks import (
    HardTaskConfig,
    HardTaskRound,
    build_hard_tasks,
    collect_failure_classes,
    failure_class,
    hard_task_classes,
    hard_task_rng,
    per_class_accuracy,
)

WAY, SHOT, QUERY = 5, 1, 3


def split_labels(num_classes=20, per_class=10):
    return np.repeat(np.arange(num_classes), per_class)


def test_failure_class_is_lowest_query_accuracy():
    targets = np.repeat(np.arange(WAY), QUERY)
    predictions = targets.copy()
    predictions[QUERY * 3:QUERY * 3 + 2] = 0  # local class 3: 1/3 correct
    predictions[QUERY * 1] = 2  # local class 1: 2/3 correct
    classes = np.array([40, 11, 7, 23, 2])
    assert per_class_accuracy(predictions, targets, WAY)[3] == pytest.approx(1 / 3)
    assert failure_class(predictions, targets, classes) == 23


def test_failure_class_ties_go_to_lowest_global_class_id():
    targets = np.repeat(np.arange(WAY), QUERY)
    predictions = np.zeros_like(targets)  # local class 0 perfect, the rest all 0% correct
    classes = np.array([3, 17, 9, 12, 30])
    assert failure_class(predictions, targets, classes) == 9


def test_failure_set_is_deduplicated_and_sorted():
    assert collect_failure_classes([7, 3, 7, 12]).tolist() == [3, 7, 12]


def test_hard_task_uses_only_failure_classes_when_enough():
    rng = np.random.default_rng(0)
    failures = [4, 9, 1, 15, 8, 2]
    for _ in range(20):
        classes = hard_task_classes(np.array(failures), WAY, 20, rng)
        assert len(set(classes.tolist())) == WAY
        assert set(classes.tolist()) <= set(failures)


def test_fill_random_keeps_every_failure_class_and_adds_distinct_others():
    rng = np.random.default_rng(1)
    classes = hard_task_classes(np.array([3, 3, 11]), WAY, 20, rng, fill="random")
    assert len(classes) == WAY and len(set(classes.tolist())) == WAY
    assert {3, 11} <= set(classes.tolist())
    assert all(0 <= c < 20 for c in classes)


def test_fill_skip_builds_no_task():
    assert hard_task_classes(np.array([3, 11]), WAY, 20, np.random.default_rng(0), fill="skip") is None
    tasks = build_hard_tasks([3, 11], indices_by_class(split_labels()), way=WAY, shot=SHOT, query=QUERY,
                             count=2, rng=np.random.default_rng(0), fill="skip")
    assert tasks == []


def test_hard_tasks_have_fresh_images_of_their_classes_in_episode_layout():
    labels = split_labels()
    by_class = indices_by_class(labels)
    failures = [0, 5, 6, 13, 19]
    tasks = build_hard_tasks(failures, by_class, way=WAY, shot=SHOT, query=QUERY, count=3,
                             rng=hard_task_rng(seed=1, epoch=0, round_index=0))
    assert len(tasks) == 3
    for task in tasks:
        assert isinstance(task, Episode)
        assert set(task.classes.tolist()) == set(failures)
        # class-major: support image k belongs to classes[k // shot], query likewise
        assert (labels[task.support] == np.repeat(task.classes, SHOT)).all()
        assert (labels[task.query] == np.repeat(task.classes, QUERY)).all()
        assert len(set(task.support.tolist()) | set(task.query.tolist())) == WAY * (SHOT + QUERY)
    # resampled, not reused: three tasks from the same classes draw different images
    assert len({tuple(t.support.tolist()) for t in tasks}) == 3


def test_a_class_too_small_for_a_hard_task_is_named():
    labels = np.concatenate([split_labels(), [20, 20, 20]])  # class 20 has 3 images, a task needs 4
    with pytest.raises(DataError, match=r"class 20 has 3 images.*shot\+query=4"):
        build_hard_tasks([20, 1, 2, 3, 4], indices_by_class(labels), way=WAY, shot=SHOT, query=QUERY, count=1,
                         rng=hard_task_rng(seed=1, epoch=0, round_index=0))


def test_hard_task_draws_are_reproducible_per_round():
    by_class = indices_by_class(split_labels())
    make = lambda r: build_hard_tasks([1, 2, 3, 4, 5], by_class, way=WAY, shot=SHOT, query=QUERY,  # noqa: E731
                                      count=1, rng=hard_task_rng(seed=7, epoch=2, round_index=r))[0]
    assert np.array_equal(make(0).support, make(0).support)
    assert not np.array_equal(make(0).support, make(1).support)


def test_round_stream_orders_normal_then_hard_and_clears_the_set():
    config = HardTaskConfig(enabled=True, normal_tasks=3, hard_tasks=2, fill="random")
    by_class = indices_by_class(split_labels())
    ht = HardTaskRound(config, by_class, way=WAY, shot=SHOT, query=QUERY, seed=0, epoch=0)
    kinds, hard = [], []
    failures = iter([[2, 9, 4], [6, 6, 1]])
    for round_failures in failures:
        for failure in round_failures:
            kinds.append(ht.next_kind())
            ht.record(failure)
        for _ in range(config.hard_tasks):
            kinds.append(ht.next_kind())
            hard.append(ht.pop_hard())
    assert kinds == ["normal"] * 3 + ["hard"] * 2 + ["normal"] * 3 + ["hard"] * 2
    assert all({2, 9, 4} <= set(t.classes.tolist()) for t in hard[:2])
    # second round: only its own failures (6, 1) plus filler; the first round's set was cleared
    second = [set(t.classes.tolist()) for t in hard[2:]]
    assert all({6, 1} <= s for s in second)
    assert ht.failures == [] and ht.position == 0


def test_round_stream_with_skip_continues_with_normal_tasks():
    config = HardTaskConfig(enabled=True, normal_tasks=2, hard_tasks=1, fill="skip")
    ht = HardTaskRound(config, indices_by_class(split_labels()), way=WAY, shot=SHOT, query=QUERY, seed=0, epoch=0)
    kinds = []
    for failure in [3, 4, 5]:
        kinds.append(ht.next_kind())
        ht.record(failure)
    assert kinds == ["normal"] * 3  # 2 failures < way: no hard task; the third task starts round 2


def test_config_rejects_unknown_keys_and_bad_fill():
    with pytest.raises(ConfigError, match="per_batch.*Valid keys"):
        HardTaskConfig.from_dict({"per_batch": 2})
    with pytest.raises(ConfigError, match="fill"):
        HardTaskConfig.from_dict({"fill": "pad"})
    assert HardTaskConfig.from_dict({"enabled": True}).normal_tasks == 5
