"""Pre-training on a tiny separable synthetic split: learns, writes its outputs, resumes."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from mtl.errors import CheckpointError, ConfigError
from mtl.models import load_encoder
from mtl.train.pretrain import PretrainConfig, epoch_batches, lr_at, pretrain
from mtl.stop_signals import Stopped

BACKBONE = {"name": "resnet12", "width": 0.125, "image_size": 16}


@pytest.fixture
def splits(tmp_path, tiny_split):
    """Train and val; classes separable by colour, so a few steps must lower the loss."""
    torch.set_num_threads(1)
    return (tiny_split(tmp_path / "train.h5", classes=4, per_class=16, split="train", seed=1),
            tiny_split(tmp_path / "val.h5", classes=3, per_class=6, split="val", seed=2))


def run(tmp_path, splits, epochs, tensorboard_dir=None, **overrides):
    config = PretrainConfig.from_dict({"epochs": epochs, "batch_size": 16, "lr": 0.05, "num_workers": 0,
                                       "step_size": 2, **overrides})
    return pretrain(*splits, encoder_out=tmp_path / "out" / "encoder.pt", history_out=tmp_path / "out" / "history.csv",
                    checkpoint_dir=tmp_path / "ckpt", backbone=BACKBONE, config=config, way=3, query=2,
                    val_episodes=4, seed=0, device="cpu", tensorboard_dir=tensorboard_dir)


def read_history(tmp_path):
    with open(tmp_path / "out" / "history.csv") as handle:
        return list(csv.DictReader(handle))


def test_pretrain_lowers_loss_and_writes_encoder(tmp_path, splits):
    encoder_path = run(tmp_path, splits, epochs=4, augment=False)
    rows = read_history(tmp_path)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[2]["lr"]) == pytest.approx(0.05 * 0.2)  # StepLR(2, 0.2): epochs 3-4
    assert all(0 <= float(r["val_acc"]) <= 1 for r in rows)
    payload = torch.load(encoder_path, weights_only=True)
    assert payload["image_size"] == 16 and payload["backbone"] == {"name": "resnet12", "width": 0.125}
    best = max(rows, key=lambda r: float(r["val_acc"]))
    assert payload["val_acc"] == pytest.approx(float(best["val_acc"]), abs=1e-5)
    encoder = load_encoder(encoder_path).eval()
    assert encoder(torch.zeros(2, 3, 16, 16)).shape == (2, encoder.out_dim)


def test_pretrain_resumes_after_a_stop(tmp_path, splits, caplog):
    run(tmp_path, splits, epochs=1)
    assert len(read_history(tmp_path)) == 1
    (tmp_path / "out" / "history.csv").unlink()  # Snakemake deletes a failed job's outputs
    caplog.set_level("INFO", logger="mtl.train.pretrain")
    run(tmp_path, splits, epochs=2)
    assert "resuming from epoch 2" in caplog.text
    assert [int(r["epoch"]) for r in read_history(tmp_path)] == [1, 2]
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0.05 vs now 0.1.*Delete the folder"):
        run(tmp_path, splits, epochs=3, lr=0.1)


def test_a_rebuilt_split_resumes_only_if_its_images_are_the_same(tmp_path, splits, caplog, tiny_split):
    """Rebuilding train.h5 makes Snakemake rerun pre-training, which finds its old checkpoint:
    the same images rebuilt resume it; other images with the same counts must not."""
    run(tmp_path, splits, epochs=1)
    tiny_split(splits[0], classes=4, per_class=16, split="train", seed=1)  # rebuilt, same content
    caplog.set_level("INFO", logger="mtl.train.pretrain")
    run(tmp_path, splits, epochs=2)
    assert "resuming from epoch 2" in caplog.text
    tiny_split(splits[0], classes=4, per_class=16, split="train", seed=7)  # same names and counts, other pixels
    with pytest.raises(CheckpointError, match=r"train.content_sha256: checkpoint '[0-9a-f]{64}' vs now .*Delete"):
        run(tmp_path, splits, epochs=3)


def test_epoch_batches_are_fixed_by_seed_and_epoch_and_cover_the_split():
    """What a resumed epoch relies on: its shuffle is drawn again, not carried; each epoch and seed
    its own order."""
    batches = epoch_batches(101, 10, seed=1, epoch=3)
    assert all(np.array_equal(a, b) for a, b in zip(batches, epoch_batches(101, 10, seed=1, epoch=3)))
    seen = np.concatenate(batches)
    assert len(seen) == len(set(seen.tolist())) == 100  # every image once but a 1-image tail (BatchNorm)
    orders = {tuple(np.concatenate(epoch_batches(101, 10, seed=s, epoch=e))) for s, e in [(1, 3), (1, 4), (2, 3)]}
    assert len(orders) == 3


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match=r"(?i)unknown key\(s\) \['epoch'\].*valid keys.*epochs"):
        PretrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="batch_size"):
        PretrainConfig.from_dict({"batch_size": 0})
    assert PretrainConfig.from_dict({"weight_decay": "5e-4"}).weight_decay == 5e-4
    config = PretrainConfig()
    assert [lr_at(e, config) for e in (1, 30, 31, 61)] == pytest.approx([0.1, 0.1, 0.02, 0.004])


def test_resumed_run_trains_like_an_uninterrupted_one(tmp_path, splits):
    run(tmp_path / "a", splits, epochs=1)
    run(tmp_path / "a", splits, epochs=2)
    run(tmp_path / "b", splits, epochs=2)
    resumed, straight = read_history(tmp_path / "a"), read_history(tmp_path / "b")
    for key in ("train_loss", "train_acc", "val_acc"):
        assert float(resumed[1][key]) == pytest.approx(float(straight[1][key]), rel=1e-5, abs=1e-6)


def test_dataloader_workers_read_the_hdf5_split_as_the_default_config_does(tmp_path, splits):
    """config.yaml trains with 2 DataLoader workers, each reopening the HDF5 file in its process."""
    run(tmp_path, splits, epochs=1, num_workers=2)
    rows = read_history(tmp_path)
    assert len(rows) == 1 and float(rows[0]["train_loss"]) > 0


def test_sigterm_mid_epoch_saves_that_step_and_the_rerun_ends_as_an_uninterrupted_run(tmp_path, splits,
                                                                                        monkeypatch, caplog):
    """SIGTERM (a scheduler's time limit) after step 2 of epoch 2: a checkpoint of that step, a
    Stopped error saying how to resume, and a rerun that ends with the same encoder bit for bit."""
    monkeypatch.setenv("MTL_FAULT_AT", "pretrain.step#6=term")  # 4 batches an epoch: epoch 2, step 2
    monkeypatch.setenv("MTL_FAULT_DIR", str(tmp_path))
    with pytest.raises(Stopped, match=r"stopped by SIGTERM at epoch 2, step 2 of 4; .*last.pt holds this point"):
        run(tmp_path / "a", splits, epochs=3)
    caplog.set_level("INFO", logger="mtl.train.pretrain")
    run(tmp_path / "a", splits, epochs=3)  # the hook fires once: this run goes clean
    assert "resuming from epoch 2, step 2 " in caplog.text
    run(tmp_path / "b", splits, epochs=3)
    resumed = torch.load(tmp_path / "a" / "out" / "encoder.pt", weights_only=True)["state_dict"]
    straight = torch.load(tmp_path / "b" / "out" / "encoder.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(resumed[key], straight[key]) for key in straight)
    assert [r["train_loss"] for r in read_history(tmp_path / "a")] == [r["train_loss"] for r in read_history(tmp_path / "b")]
