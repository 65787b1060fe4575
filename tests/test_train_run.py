"""The training-run skeleton (mtl/train/run.py): the history file's numbers, and checkpoints written
before both trainers shared one layout, which must still resume a stopped run exactly."""
from __future__ import annotations

import csv

import pytest
import torch

from mtl.stop_signals import Stopped
from mtl.train.run import write_history
from tests.test_meta import data, run as run_meta, tiny_config  # noqa: F401
from tests.test_pretrain import run as run_pretrain, splits  # noqa: F401


def test_history_keeps_every_digit_and_leaves_unmeasured_cells_empty(tmp_path):
    value = float(torch.tensor(1 / 3, dtype=torch.float32))  # a float32 result, as the trainers log
    rows = [{"epoch": 1, "train_loss": value, "val_acc": float("nan"), "lr": 0.1 * 0.2},
            {"epoch": 2, "train_loss": 2.5, "val_acc": 0.75, "lr": 5e-05}]
    write_history(tmp_path / "history.csv", rows, ("epoch", "train_loss", "val_acc", "lr"))
    back = list(csv.DictReader(open(tmp_path / "history.csv", newline="")))
    assert back[0]["val_acc"] == ""  # not validated that epoch: no number, not "nan"
    for written, read in zip(rows, back):
        assert int(read["epoch"]) == written["epoch"]
        for key in ("train_loss", "lr"):
            assert float(read[key]) == written[key]  # exact: a resumed run's rows compare equal
    assert float(back[1]["val_acc"]) == 0.75


# --------------------------------------------------------------------------- checkpoints of old layouts
def old_pretrain_layout(state: dict) -> dict:
    """A checkpoint as pre-training wrote it before format 2: model/optimizer/scaler at the top,
    best_acc/best_epoch/best_state, next_epoch 1-based, a partial place without its epoch."""
    old = {k: v for k, v in state.items() if k not in ("format", "trainer", "best", "epochs_done", "partial")}
    old.update(state["trainer"])
    old.update(best_acc=state["best"]["val_acc"], best_epoch=state["best"]["epoch"],
               best_state=state["best"]["state"], next_epoch=state["epochs_done"] + 1)
    partial = state["partial"]
    old["partial"] = None if partial is None else {k: v for k, v in partial.items() if k != "epoch"}
    return old


def old_meta_layout(state: dict) -> dict:
    """A checkpoint as meta-training wrote it before format 2: next_epoch and the partial place's
    epoch 0-based."""
    old = {k: v for k, v in state.items() if k not in ("format", "epochs_done")}
    old["next_epoch"] = state["epochs_done"]
    if state["partial"] is not None:
        old["partial"] = {**state["partial"], "epoch": state["partial"]["epoch"] - 1}
    return old


def timeless(path) -> list[dict]:
    """The history's rows without the time each epoch took."""
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def rewrite(checkpoint, convert) -> None:
    state = torch.load(checkpoint, weights_only=True)
    assert state["format"] == 2 and state["partial"] is not None  # stopped mid-epoch: the hardest case
    torch.save(convert(state), checkpoint)


def test_a_pretraining_checkpoint_of_the_old_layout_resumes_its_stopped_epoch(tmp_path, splits, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MTL_FAULT_AT", "pretrain.step#6=term")  # 4 batches an epoch: epoch 2, step 2
    monkeypatch.setenv("MTL_FAULT_DIR", str(tmp_path))
    with pytest.raises(Stopped):
        run_pretrain(tmp_path / "a", splits, epochs=3)
    rewrite(tmp_path / "a" / "ckpt" / "last.pt", old_pretrain_layout)
    run_pretrain(tmp_path / "a", splits, epochs=3)
    run_pretrain(tmp_path / "b", splits, epochs=3)
    resumed = torch.load(tmp_path / "a" / "out" / "encoder.pt", weights_only=True)
    straight = torch.load(tmp_path / "b" / "out" / "encoder.pt", weights_only=True)
    assert resumed["epoch"] == straight["epoch"] and resumed["val_acc"] == straight["val_acc"]
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in straight["state_dict"].items())
    assert timeless(tmp_path / "a" / "out" / "history.csv") == timeless(tmp_path / "b" / "out" / "history.csv")


def test_a_meta_training_checkpoint_of_the_old_layout_resumes_its_stopped_epoch(data, tmp_path, monkeypatch):  # noqa: F811
    config = tiny_config(epochs=2, episodes_per_epoch=4)
    monkeypatch.setenv("MTL_FAULT_AT", "meta.step#6=term")  # epoch 2, step 2
    monkeypatch.setenv("MTL_FAULT_DIR", str(tmp_path))
    with pytest.raises(Stopped):
        run_meta(data, tmp_path / "a", config=config)
    rewrite(tmp_path / "a" / "ckpt" / "last.pt", old_meta_layout)
    run_meta(data, tmp_path / "a", config=config)
    run_meta(data, tmp_path / "b", config=config)
    resumed = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    straight = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in straight["state_dict"].items())
    assert torch.equal(resumed["learner"]["weight"], straight["learner"]["weight"])
    assert timeless(tmp_path / "a" / "history.csv") == timeless(tmp_path / "b" / "history.csv")
