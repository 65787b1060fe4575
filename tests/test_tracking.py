"""TensorBoard tracking (mtl/tracking.py, config `tracking`): what a user watching a run reads back."""
from __future__ import annotations

import pytest

from mtl import tracking
from mtl.distributed import ranks
from mtl.errors import ConfigError
from tests.test_meta import data, read_history as read_meta_history, run as run_meta, tiny_config  # noqa: F401
from tests.test_pretrain import read_history as read_pretrain_history, run as run_pretrain, splits  # noqa: F401
from tests.workflow import run_snakemake, scenario_config

needs_tensorboard = pytest.mark.skipif(
    not tracking.tensorboard_available(),
    reason="tensorboard is not installed: pip install -e '.[tracking]' (the `test` extra brings it)")

EPOCH_TAGS = {"train/loss", "train/accuracy", "val/accuracy", "lr"}


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard reads the event files of ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def event_files(folder) -> list:
    return sorted(folder.rglob("events.out.tfevents.*"))


@needs_tensorboard
def test_pretraining_writes_each_epochs_scalars(tmp_path, splits):  # noqa: F811
    run_pretrain(tmp_path, splits, epochs=2, val_every=2, augment=False, tensorboard_dir=tmp_path / "tb")
    scalars = read_scalars(tmp_path / "tb")
    assert set(scalars) == EPOCH_TAGS | {"throughput/images_per_s"}
    history = read_pretrain_history(tmp_path)
    assert scalars["train/loss"] == [(int(r["epoch"]), pytest.approx(float(r["train_loss"]), rel=1e-5)) for r in history]
    # epoch 1 is not validated (val_every 2): a gap in the curve, not a NaN point
    assert [step for step, _ in scalars["val/accuracy"]] == [2]
    assert scalars["val/accuracy"][0][1] == pytest.approx(float(history[1]["val_acc"]), rel=1e-5)
    assert all(value > 0 for _, value in scalars["throughput/images_per_s"])


@needs_tensorboard
def test_meta_training_writes_each_epochs_scalars(data, tmp_path):  # noqa: F811
    run_meta(data, tmp_path, config=tiny_config(epochs=2), tensorboard_dir=tmp_path / "tb")
    scalars = read_scalars(tmp_path / "tb")
    assert set(scalars) == EPOCH_TAGS | {"throughput/episodes_per_s"}
    history = read_meta_history(tmp_path / "history.csv")
    for tag, column in (("train/loss", "meta_loss"), ("val/accuracy", "val_acc"), ("lr", "lr")):
        assert scalars[tag] == [(int(r["epoch"]), pytest.approx(float(r[column]), rel=1e-5)) for r in history], tag
    assert [step for step, _ in scalars["throughput/episodes_per_s"]] == [1, 2]


def test_tracking_off_writes_no_event_files(tmp_path, splits, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)  # SummaryWriter's own default would be ./runs/
    run_pretrain(tmp_path, splits, epochs=1)
    assert event_files(tmp_path) == []


def test_only_rank_0_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(ranks, "rank", lambda: 1)
    with tracking.open_tracker(tmp_path / "tb") as tracker:
        tracker.log(1, {"train/loss": 1.0})
    assert not (tmp_path / "tb").exists()


def test_missing_tensorboard_stops_before_the_first_epoch_and_names_the_extra(tmp_path, splits, monkeypatch):  # noqa: F811
    monkeypatch.setattr(tracking, "tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[tracking\]"'):
        run_pretrain(tmp_path, splits, epochs=1, tensorboard_dir=tmp_path / "tb")
    assert not (tmp_path / "ckpt" / "last.pt").exists()  # no epoch was trained


@needs_tensorboard
@pytest.mark.slow
def test_workflow_writes_curves_outside_its_outputs_and_switching_reruns_nothing(tmp_path):
    config = scenario_config("tiny", {"protocol": {"shots": [1]}, "methods": ["mtl"],
                                      "tracking": {"tensorboard": True}})
    target = "results/digits/resnet12/seed1/mtl/1shot/model.pt"
    run_snakemake(tmp_path, config, target)
    pretrain = read_scalars(tmp_path / "tensorboard/digits/resnet12/seed1/pretrain")
    meta = read_scalars(tmp_path / "tensorboard/digits/resnet12/seed1/mtl/1shot/meta")
    assert [step for step, _ in pretrain["train/loss"]] == [1, 2]  # tiny: 2 pre-training epochs
    assert [step for step, _ in meta["train/loss"]] == [1]  # and 1 meta-training epoch
    assert event_files(tmp_path / "results") == [] and event_files(tmp_path / "checkpoints") == []
    # the switch lives in no rule's params: turning it off (or on) leaves finished jobs finished
    config["tracking"]["tensorboard"] = False
    again = run_snakemake(tmp_path, config, target, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
