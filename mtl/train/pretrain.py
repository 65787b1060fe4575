"""Pre-training: an ordinary classifier over all meta-train images (step 1 of MTL).

Reference recipe (REFERENCE.md section 2): backbone + Linear(D, 1000)-ReLU-Linear(1000, C) head,
SGD (lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4 on everything), batch 128, LR x0.2 every
30 epochs, Resize -> RandomResizedCrop -> CenterCrop -> HFlip augmentation. Model selection: every
``val_every`` epochs, a fresh linear learner (100 SGD steps, lr 0.01) on frozen eval-mode features
of fixed, seeded validation episodes; the best encoder is kept.

Resume: ``checkpoint_dir/last.pt`` is replaced atomically after every epoch (model, optimizer,
RNG, next epoch, best score and weights, history). A rerun with the same settings continues
where it stopped; ``epochs`` may grow between runs. On SIGTERM/SIGINT (a scheduler's time limit or
preemption, Ctrl-C) the run saves its exact place inside the epoch after the current step and
stops (:mod:`mtl.train.stop`); the rerun continues from that step. Shuffling and augmentation of epoch e are
seeded by (seed, e), and the learning rate is a pure function of the epoch, so a resumed run
trains exactly as an uninterrupted one would (up to GPU non-determinism).

Example::

    pretrain("data/fc100/train.h5", "data/fc100/val.h5", encoder_out="encoder.pt",
             history_out="history.csv", checkpoint_dir="checkpoints/fc100",
             backbone={"name": "resnet12", "width": 1.0, "image_size": None},
             config=PretrainConfig.from_dict(config["pretrain"]))
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mtl.data.episodes import EpisodeSampler, EpisodeSet
from mtl.data.hdf5 import HDF5Split
from mtl.data.transforms import DEFAULT_MEAN, DEFAULT_STD, EvalTransform, TrainTransform
from mtl.device import autocast, grad_scaler, select_device
from mtl.errors import CheckpointError, ConfigError, MTLError, check_known_keys
from mtl.faults import fault_point
from mtl.io import atomic_path
from mtl.models import PretrainClassifier, build_backbone, save_encoder
from mtl.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from mtl.train.stop import ignore_stop_signals, raise_if_stop_requested, stop_on_signals, stop_requested
from mtl.results import mean_ci95
from mtl.train.learner import evaluate_encoder

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_acc", "val_ci95", "lr", "seconds")
VAL_STEPS, VAL_LR = 100, 0.01  # reference pre-train validation learner
# Settings that may change between a run and its resume without invalidating the checkpoint.
RESUMABLE_CHANGES = ("epochs", "num_workers")


def _default_normalize() -> dict:
    return {"mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)}


@dataclass
class PretrainConfig:
    """The config.yaml ``pretrain`` block; defaults are the reference's."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    step_size: int = 30  # epochs between LR drops
    gamma: float = 0.2  # LR factor at each drop
    val_shot: int = 1  # shot of the validation episodes
    val_every: int = 1  # validate every N epochs (and always after the last one)
    augment: bool = True
    num_workers: int = 2  # DataLoader processes reading the HDF5 split
    normalize: dict = field(default_factory=_default_normalize)

    @classmethod
    def from_dict(cls, values: dict | None) -> PretrainConfig:
        """Build from a config dict; unknown keys and bad values are a ConfigError, not a default run."""
        config = cls(**check_known_keys(values, cls, "pretrain"))
        config.validate()
        return config

    def validate(self) -> None:
        minimum = {"epochs": 0, "num_workers": 0}
        for name in ("epochs", "batch_size", "step_size", "val_shot", "val_every", "num_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum.get(name, 1):
                raise ConfigError(f"pretrain.{name} must be an integer >= {minimum.get(name, 1)}, got {value!r}")
            setattr(self, name, int(value))
        for name in ("lr", "momentum", "weight_decay", "gamma"):
            value = getattr(self, name)
            try:
                number = float(value)  # YAML reads 5e-4 (no dot) as a string
            except (TypeError, ValueError):
                number = float("nan")
            if isinstance(value, bool) or not math.isfinite(number) or number < 0:
                raise ConfigError(f"pretrain.{name} must be a non-negative number, got {value!r}")
            setattr(self, name, number)
        for name in ("nesterov", "augment"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"pretrain.{name} must be true or false, got {getattr(self, name)!r}")
        norm = self.normalize
        if (not isinstance(norm, dict) or set(norm) != {"mean", "std"}
                or any(len(norm[k]) != 3 for k in norm) or min(norm["std"]) <= 0):
            raise ConfigError("pretrain.normalize must be {mean: [3 numbers], std: [3 positive numbers]}, "
                              f"got {norm!r}")
        self.normalize = {k: [float(v) for v in norm[k]] for k in ("mean", "std")}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_at(epoch: int, config: PretrainConfig) -> float:
    """Learning rate of (1-based) ``epoch``: StepLR(step_size, gamma) as a pure function."""
    return config.lr * config.gamma ** ((epoch - 1) // config.step_size)


# ----------------------------------------------------------------------------- data
class _Batches(torch.utils.data.Dataset):
    """Batch i = images and labels at ``batches[i]`` (sorted: file order reads fastest)."""

    def __init__(self, split: HDF5Split, batches: list[np.ndarray]):
        self.split, self.batches = split, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        rows = np.sort(self.batches[i])
        return torch.from_numpy(self.split.get_images(rows)), torch.from_numpy(self.split.labels[rows])


def epoch_batches(num_images: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The shuffled batches of ``epoch``, fixed by (seed, epoch); a 1-image tail is dropped (BatchNorm)."""
    order = np.random.default_rng([seed, epoch, 0]).permutation(num_images)
    batches = [order[i:i + batch_size] for i in range(0, num_images, batch_size)]
    return [b for b in batches if len(b) > 1]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Augmentation randomness of ``epoch``, fixed by (seed, epoch)."""
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, epoch, 1]).integers(2**62)))


# ----------------------------------------------------------------------------- entry point
def pretrain(train_h5, val_h5, *, encoder_out, history_out, checkpoint_dir, backbone: dict,
             config: PretrainConfig | dict, way: int = 5, shot: int | None = None, query: int = 15,
             val_episodes: int = 600, seed: int = 1, device: str = "auto") -> Path:
    """Pre-train an encoder on ``train_h5``, select it on ``val_h5`` episodes, write ``encoder_out``.

    ``backbone``: {name, width, image_size (None = native)}. ``shot``: validation shot, default
    ``config.val_shot``. Writes ``history_out`` (CSV, one row per epoch) and keeps resume state in
    ``checkpoint_dir/last.pt``. Returns ``encoder_out``.
    """
    config = config if isinstance(config, PretrainConfig) else PretrainConfig.from_dict(config)
    config.validate()
    run = _Run(train_h5, val_h5, backbone, config, way, config.val_shot if shot is None else shot,
               query, val_episodes, seed, select_device(device), Path(checkpoint_dir))
    run.resume_or_start()
    run.write_history(history_out)
    epochs = tqdm(range(run.next_epoch, config.epochs + 1), desc="pretrain", unit="epoch",
                  initial=run.next_epoch - 1, total=config.epochs, disable=None)
    with stop_on_signals():
        for epoch in epochs:
            row = run.train_epoch(epoch)
            epochs.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row['val_acc']:.3f}")
            run.write_history(history_out)
            run.stop_if_requested(f"after epoch {epoch}")
    return run.save_best_encoder(encoder_out)


class _Run:
    """One pre-training run's state; methods are the steps `pretrain` reads top to bottom."""

    def __init__(self, train_h5, val_h5, backbone, config, way, shot, query, val_episodes, seed, device,
                 checkpoint_dir):
        self.config, self.device, self.seed = config, device, int(seed)
        self.way, self.shot, self.query = int(way), int(shot), int(query)
        self.train, self.val = HDF5Split(train_h5), HDF5Split(val_h5)
        self.backbone_spec = _backbone_spec(backbone)
        torch.manual_seed(self.seed)  # model init
        encoder = build_backbone(self.backbone_spec["name"], width=self.backbone_spec["width"])
        self.image_size = int(self.backbone_spec["image_size"] or encoder.native_size)
        self.model = PretrainClassifier(encoder, self.train.num_classes).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                         nesterov=config.nesterov, weight_decay=config.weight_decay)
        self.scaler = grad_scaler(device)
        norm = config.normalize
        train_kind = TrainTransform if config.augment else EvalTransform
        self.train_transform = train_kind(self.image_size, norm["mean"], norm["std"])
        self.eval_transform = EvalTransform(self.image_size, norm["mean"], norm["std"])
        sampler = EpisodeSampler(self.val.labels, self.way, self.shot, self.query, self.seed,
                                 class_names=self.val.class_names)
        self.val_set = EpisodeSet.from_episodes(sampler.sample(int(val_episodes)), sampler.meta())
        self.checkpoint_path = checkpoint_dir / "last.pt"
        self.identity = {
            "config": {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES},
            "backbone": self.backbone_spec,
            "train": _split_identity(self.train), "val": _split_identity(self.val),
            "protocol": {"way": self.way, "shot": self.shot, "query": self.query,
                         "val_episodes": int(val_episodes), "seed": self.seed},
        }
        self.next_epoch, self.history = 1, []
        self.best_acc, self.best_epoch, self.best_state = -1.0, 0, None
        self.partial = None  # where a stopped epoch resumes: see _fit_one_epoch
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick kernels

    # -- resume
    def resume_or_start(self) -> None:
        state = load_checkpoint(self.checkpoint_path, producer="the `pretrain` rule")
        if state is None:
            log.info("pretrain: starting from scratch (no %s)", self.checkpoint_path)
            return
        self._check_identity(state.get("identity", {}))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # empty when the run used bf16 or the CPU (no loss scaling)
            self.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])
        self.next_epoch, self.history = int(state["next_epoch"]), list(state["history"])
        self.best_acc, self.best_epoch = float(state["best_acc"]), int(state["best_epoch"])
        self.best_state = state["best_state"]
        self.partial = state.get("partial")
        step = f", step {self.partial['step']}" if self.partial else ""
        log.info("pretrain: resuming from epoch %d%s (%s)", self.next_epoch, step, self.checkpoint_path)

    def _check_identity(self, saved: dict) -> None:
        differ = _differences(saved, self.identity)
        if differ:
            raise CheckpointError(
                f"checkpoint {self.checkpoint_path} belongs to another pre-training run: "
                f"{'; '.join(differ[:5])}. Delete the folder {self.checkpoint_path.parent} to start this run "
                "from scratch, or restore the settings it was made with.")

    def _save_checkpoint(self, next_epoch: int, partial: dict | None = None) -> None:
        save_checkpoint(self.checkpoint_path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": capture_rng(), "next_epoch": next_epoch,
            "best_acc": self.best_acc, "best_epoch": self.best_epoch, "best_state": self.best_state,
            "identity": self.identity, "config": self.config.to_dict(), "history": self.history,
            "partial": partial,
        })

    def stop_if_requested(self, where: str) -> None:
        """After a checkpoint of this very point: end the run if SIGTERM/SIGINT arrived."""
        raise_if_stop_requested("pre-training", where, self.checkpoint_path)

    # -- one epoch
    def train_epoch(self, epoch: int) -> dict:
        start = time.perf_counter()
        lr = lr_at(epoch, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, acc = self._fit_one_epoch(epoch)
        val_acc, val_ci = (self._validate() if epoch % self.config.val_every == 0 or epoch == self.config.epochs
                           else (float("nan"), float("nan")))
        if val_acc > self.best_acc:  # NaN (not validated) never wins
            self.best_acc, self.best_epoch = val_acc, epoch
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.encoder.state_dict().items()}
        row = {"epoch": epoch, "train_loss": loss, "train_acc": acc, "val_acc": val_acc, "val_ci95": val_ci,
               "lr": lr, "seconds": time.perf_counter() - start}
        self.history.append(row)
        self._save_checkpoint(epoch + 1)
        log.info("pretrain epoch %d/%d: loss %.4f acc %.4f val %.4f +- %.4f lr %.4g (%.1fs)", epoch,
                 self.config.epochs, loss, acc, val_acc, val_ci, lr, row["seconds"])
        return row

    def _fit_one_epoch(self, epoch: int) -> tuple[float, float]:
        self.model.train()
        batches = epoch_batches(len(self.train), self.config.batch_size, self.seed, epoch)
        generator = epoch_generator(self.seed, epoch)
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        step, seen = 0, 0
        if self.partial is not None:  # a stopped epoch: continue after its last step
            step, seen = self.partial["step"], self.partial["seen"]
            generator.set_state(self.partial["generator"])
            total_loss += self.partial["total_loss"].to(self.device)
            correct += self.partial["correct"].to(self.device)
            self.partial = None
        loader = torch.utils.data.DataLoader(_Batches(self.train, batches[step:]), batch_size=None, shuffle=False,
                                             num_workers=self.config.num_workers, worker_init_fn=ignore_stop_signals,
                                             pin_memory=self.device.type == "cuda")
        for images, labels in tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=None,
                                   initial=step, total=len(batches)):
            x = (self.train_transform(images, device=self.device, generator=generator) if self.config.augment
                 else self.train_transform(images, device=self.device))
            y = labels.to(self.device, non_blocking=True)
            with autocast(self.device):
                logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            total_loss += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            step += 1
            fault_point("pretrain.step")
            if stop_requested():
                self._save_checkpoint(epoch, partial={
                    "step": step, "seen": seen, "generator": generator.get_state(),
                    "total_loss": total_loss.detach().cpu(), "correct": correct.detach().cpu()})
                self.stop_if_requested(f"at epoch {epoch}, step {step} of {len(batches)}")
        mean_loss = total_loss.item() / max(seen, 1)
        if not math.isfinite(mean_loss):
            raise MTLError(f"pre-training diverged at epoch {epoch} (training loss {mean_loss}); lower "
                           f"pretrain.lr (now {self.config.lr}) and rerun; {self.checkpoint_path} still holds "
                           "the previous epoch.")
        return mean_loss, correct.item() / max(seen, 1)

    def _validate(self) -> tuple[float, float]:
        """Fresh linear learner per fixed val episode on frozen eval-mode features (seeded init)."""
        accs = evaluate_encoder(self.model.encoder, self.val, self.val_set, self.eval_transform, self.way,
                                self.shot, self.query, steps=VAL_STEPS, lr=VAL_LR,
                                batch_size=2 * self.config.batch_size, device=self.device,
                                generator=torch.Generator().manual_seed(self.seed))
        return mean_ci95(accs)

    # -- outputs
    def write_history(self, path) -> None:
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
            writer.writeheader()
            for row in self.history:
                writer.writerow({k: _csv_value(row[k]) for k in HISTORY_COLUMNS})

    def save_best_encoder(self, path) -> Path:
        encoder = build_backbone(self.backbone_spec["name"], width=self.backbone_spec["width"])
        if self.best_state is not None:
            encoder.load_state_dict(self.best_state)
        else:  # no validation ran (epochs 0): keep what we have
            encoder.load_state_dict({k: v.cpu() for k, v in self.model.encoder.state_dict().items()})
        best_acc = self.best_acc if self.best_state is not None else float("nan")
        log.info("pretrain: best val accuracy %.4f at epoch %d -> %s", best_acc, self.best_epoch, path)
        return save_encoder(encoder, path, image_size=self.image_size, normalize=self.config.normalize,
                            epoch=self.best_epoch, val_acc=best_acc)


def _backbone_spec(backbone: dict) -> dict:
    unknown = set(backbone) - {"name", "width", "image_size"}
    if unknown or "name" not in backbone:
        raise ConfigError(f"backbone must be {{name, width, image_size}}, got keys {sorted(backbone)}")
    size = backbone.get("image_size")
    return {"name": str(backbone["name"]), "width": float(backbone.get("width", 1.0)),
            "image_size": None if size is None else int(size)}


def _split_identity(split: HDF5Split) -> dict:
    return {"file": split.path.name, "num_images": len(split), "num_classes": split.num_classes}


def _differences(saved, current, prefix: str = "") -> list[str]:
    """Human-readable 'key: checkpoint X vs now Y' for every leaf that differs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            out += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [f"{prefix.rstrip('.')}: checkpoint {saved!r} vs now {current!r}"]


def _csv_value(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value
