"""Pre-training: an ordinary classifier over all meta-train images (step 1 of MTL).

Reference recipe (docs/reference-implementation.md, section 1): backbone +
Linear(D, 1000)-ReLU-Linear(1000, C) head, SGD (lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4
on everything), batch 128, LR x0.2 every 30 epochs, Resize -> RandomResizedCrop -> CenterCrop ->
HFlip augmentation. Model selection: every ``val_every`` epochs, a fresh linear learner (100 SGD
steps, lr 0.01) on frozen eval-mode features of fixed, seeded validation episodes; the best encoder
is kept.

Resume (:mod:`mtl.train.run`, the skeleton shared with meta-training): ``checkpoint_dir/last.pt``
is replaced atomically after every epoch (model, optimizer, RNG, epochs done, best score and
weights, history). A rerun with the same settings continues where it stopped; ``epochs`` may grow
between runs. On SIGTERM/SIGINT (a scheduler's time limit or preemption, Ctrl-C) the run saves its
exact place inside the epoch after the current step and stops (:mod:`mtl.stop_signals`); the rerun
continues from that step. Shuffling and augmentation of epoch e are seeded by (seed, e), and the
learning rate is a pure function of the epoch, so a resumed run trains exactly as an
uninterrupted one would (up to GPU non-determinism).

Several processes (``config.gpus``, started by `mtl.distributed.launch`): the same training with
more hands. Every process walks the same batches of the same per-epoch permutation and takes its
contiguous part of each (`mtl.distributed.ranks.shard`); it draws the augmentation of the whole batch
and keeps its part's draws; BatchNorm statistics are those of the whole batch (synchronised BN);
the loss is scaled so that DDP's averaged gradient is the whole batch's mean gradient. So N
processes train as one does, up to float rounding, with the same learning-rate schedule. Rank 0
validates, writes the checkpoint, the history and the encoder while the others wait; the
checkpoint does not depend on N, so a run may resume with another process count.

Example::

    pretrain("data/fc100/train.h5", "data/fc100/val.h5", encoder_out="encoder.pt",
             history_out="history.csv", checkpoint_dir="checkpoints/fc100",
             backbone={"name": "resnet12", "width": 1.0, "image_size": None},
             config=PretrainConfig.from_dict(config["pretrain"]))
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mtl.base_learner import DEFAULT_INFERENCE_BATCH_SIZE, evaluate_encoder
from mtl.config import check_section, schema_defaults
from mtl.data.episodes import EpisodeSampler, EpisodeSet
from mtl.data.hdf5 import HDF5Split
from mtl.data.transforms import EvalTransform, TrainTransform
from mtl.device import autocast, grad_scaler, select_device
from mtl.distributed import ranks
from mtl.distributed.sync_bn import wrap_for_training
from mtl.errors import ConfigError, check_known_keys
from mtl.faults import fault_point
from mtl.models import PretrainClassifier, build_backbone, save_encoder
from mtl.rng import Purpose, stream, stream_seed, torch_stream
from mtl.stats import mean_ci95
from mtl.stop_signals import ignore_stop_signals
from mtl.train.run import TrainingRun, check_finite, fit, stop_agreed


log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_acc", "val_ci95", "lr", "seconds")
VAL_STEPS, VAL_LR = 100, 0.01  # reference pre-train validation learner
# Settings that may change between a run and its resume without invalidating the checkpoint.
RESUMABLE_CHANGES = ("epochs", "num_workers", "gpus")


#: The ``pretrain`` defaults as mtl/config.schema.yaml states them (the reference's recipe).
_DEFAULTS = schema_defaults("pretrain")


@dataclass
class PretrainConfig:
    """The config.yaml ``pretrain`` block; defaults and bounds are the schema's (:mod:`mtl.config`)."""

    epochs: int = _DEFAULTS["epochs"]
    batch_size: int = _DEFAULTS["batch_size"]
    lr: float = _DEFAULTS["lr"]
    momentum: float = _DEFAULTS["momentum"]
    nesterov: bool = _DEFAULTS["nesterov"]
    weight_decay: float = _DEFAULTS["weight_decay"]
    step_size: int = _DEFAULTS["step_size"]  # epochs between LR drops
    gamma: float = _DEFAULTS["gamma"]  # LR factor at each drop
    val_shot: int = _DEFAULTS["val_shot"]  # shot of the validation episodes
    val_every: int = _DEFAULTS["val_every"]  # validate every N epochs (and always after the last one)
    augment: bool = _DEFAULTS["augment"]
    num_workers: int = _DEFAULTS["num_workers"]  # DataLoader processes reading the HDF5 split (per training process)
    normalize: dict = field(default_factory=lambda: schema_defaults("pretrain")["normalize"])
    # Training processes (one GPU each) that mtl.distributed.launch starts; `pretrain` itself
    # trains in whatever process group it runs in, with the same result for any count.
    gpus: int = _DEFAULTS["gpus"]

    @classmethod
    def from_dict(cls, values: dict | None) -> PretrainConfig:
        """Build from a config dict; unknown keys and bad values are a ConfigError, not a default run."""
        config = cls(**check_known_keys(values, cls, "pretrain"))
        config.validate()
        return config

    def validate(self) -> None:
        """Every value checked against the schema's type and bounds (YAML's ``5e-4`` string becomes a float)."""
        for name, value in check_section(dataclasses.asdict(self), "pretrain").items():
            setattr(self, name, value)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_at(epoch: int, config: PretrainConfig) -> float:
    """Learning rate of (1-based) ``epoch``: StepLR(step_size, gamma) as a pure function."""
    return config.lr * config.gamma ** ((epoch - 1) // config.step_size)


# ----------------------------------------------------------------------------- data
class _Batches(torch.utils.data.Dataset):
    """Item i = images and labels at ``rows[i]`` (this process's part of batch i)."""

    def __init__(self, split: HDF5Split, rows: list[np.ndarray]):
        self.split, self.rows = split, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        rows = self.rows[i]
        return torch.from_numpy(self.split.get_images(rows)), torch.from_numpy(self.split.labels[rows])


def epoch_batches(num_images: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The shuffled batches of ``epoch``, fixed by (seed, epoch); a 1-image tail is dropped (BatchNorm)."""
    order = stream(seed, Purpose.PRETRAIN_SHUFFLE, epoch).permutation(num_images)
    batches = [order[i:i + batch_size] for i in range(0, num_images, batch_size)]
    return [b for b in batches if len(b) > 1]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Augmentation randomness of ``epoch``, fixed by (seed, epoch)."""
    return torch_stream(seed, Purpose.PRETRAIN_AUGMENT, epoch)


# ----------------------------------------------------------------------------- entry point
def pretrain(train_h5, val_h5, *, encoder_out, history_out, checkpoint_dir, backbone: dict,
             config: PretrainConfig | dict, way: int = 5, shot: int | None = None, query: int = 15,
             val_episodes: int = 600, seed: int = 1, device: str = "auto",
             inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
             tensorboard_dir: str | Path | None = None, steps_per_epoch: int | None = None) -> Path:
    """Pre-train an encoder on ``train_h5``, select it on ``val_h5`` episodes, write ``encoder_out``.

    ``backbone``: {name, width, image_size (None = native)}. ``shot``: validation shot, default
    ``config.val_shot``. Writes ``history_out`` (CSV, one row per epoch) and keeps resume state in
    ``checkpoint_dir/last.pt``. ``inference_batch_size``: images per forward pass of the validation
    embedding (:func:`mtl.distributed.launch` resolves it in each training process, on the device
    that process claims). ``tensorboard_dir``: where rank 0 writes each epoch's scalars for
    TensorBoard (:mod:`mtl.tracking`; None: nowhere). ``steps_per_epoch``: train only the first
    batches of each epoch (benchmarks, smoke runs; None: all). Returns ``encoder_out``.
    """
    config = config if isinstance(config, PretrainConfig) else PretrainConfig.from_dict(config)
    config.validate()
    device = select_device(device)
    trainer = PretrainTrainer(train_h5, val_h5, backbone, config, way=way,
                              shot=config.val_shot if shot is None else shot, query=query,
                              val_episodes=val_episodes, seed=seed, device=device,
                              inference_batch_size=inference_batch_size, steps_per_epoch=steps_per_epoch)
    run = TrainingRun(checkpoint_dir, trainer.identity, config=config.to_dict(), name="pretrain",
                      what="pre-training", producer="the `pretrain` rule", columns=HISTORY_COLUMNS, log=log,
                      device=device)
    run.resume(trainer)
    fit(run, trainer, config.epochs, desc="pretrain", tensorboard_dir=tensorboard_dir, history_out=history_out)
    return trainer.save_encoder(encoder_out, run.best)


def random_encoder(encoder_out, *, backbone: dict, config: PretrainConfig | dict, seed: int) -> Path:
    """Write the encoder pre-training of ``seed`` starts from, untrained: the start of the
    "no pre-training" ablation arm (``mtl_no_pretrain``).

    Same seeded initialisation as :func:`pretrain` (the seed's ``MODEL_INIT`` stream, then the backbone),
    same file format, image size and normalisation as a pre-trained encoder; ``epoch`` 0.
    """
    config = config if isinstance(config, PretrainConfig) else PretrainConfig.from_dict(config)
    spec = _backbone_spec(backbone)
    torch.manual_seed(stream_seed(seed, Purpose.MODEL_INIT))
    encoder = build_backbone(spec["name"], width=spec["width"])
    image_size = int(spec["image_size"] or encoder.native_size)
    log.info("random_init: untrained %s (width %s, seed %d) -> %s", spec["name"], spec["width"], seed, encoder_out)
    return save_encoder(encoder, encoder_out, image_size=image_size, normalize=config.normalize, epoch=0,
                        val_acc=float("nan"))


class PretrainTrainer:
    """The model, optimiser and data of one pre-training run, on :mod:`mtl.train.run`'s skeleton.

    `run_epoch` (train, then validate when due) is what :func:`mtl.train.run.fit` calls;
    `train_epoch` and `train_step` are the epoch and the step alone (benchmarks time them).
    """

    def __init__(self, train_h5, val_h5, backbone: dict, config: PretrainConfig, *, way: int, shot: int,
                 query: int, val_episodes: int, seed: int, device, inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
                 steps_per_epoch: int | None = None):
        self.config, self.device, self.seed = config, torch.device(device), int(seed)
        self.is_main = ranks.is_main()  # validates and writes; the other ranks only train
        self.inference_batch_size = int(inference_batch_size)
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        self.way, self.shot, self.query = int(way), int(shot), int(query)
        self.train, self.val = HDF5Split(train_h5), HDF5Split(val_h5)
        self.backbone_spec = _backbone_spec(backbone)
        torch.manual_seed(stream_seed(self.seed, Purpose.MODEL_INIT))  # model init
        encoder = build_backbone(self.backbone_spec["name"], width=self.backbone_spec["width"])
        self.image_size = int(self.backbone_spec["image_size"] or encoder.native_size)
        self.model = PretrainClassifier(encoder, self.train.num_classes).to(self.device)
        self.trainer = wrap_for_training(self.model, self.device)  # the model, or DDP(synced-BN model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                         nesterov=config.nesterov, weight_decay=config.weight_decay)
        self.scaler = grad_scaler(self.device)
        norm = config.normalize
        train_kind = TrainTransform if config.augment else EvalTransform
        self.train_transform = train_kind(self.image_size, norm["mean"], norm["std"])
        self.eval_transform = EvalTransform(self.image_size, norm["mean"], norm["std"])
        sampler = EpisodeSampler(self.val.labels, self.way, self.shot, self.query, self.seed,
                                 class_names=self.val.class_names, purpose=Purpose.VALIDATION_EPISODES)
        self.val_set = EpisodeSet.from_episodes(sampler.sample(int(val_episodes)), sampler.meta())
        self.identity = {
            "config": {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES},
            "backbone": self.backbone_spec,
            "train": _split_identity(self.train), "val": _split_identity(self.val),
            "protocol": {"way": self.way, "shot": self.shot, "query": self.query,
                         "val_episodes": int(val_episodes), "seed": self.seed},
        }
        if self.steps_per_epoch is not None:  # a cut run is another run (absent: checkpoints of full runs)
            self.identity["steps_per_epoch"] = self.steps_per_epoch
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick kernels

    # -- the skeleton's interface (mtl.train.run.Trainer)
    def run_epoch(self, epoch: int, resume: dict | None = None, on_stop=None) -> dict:
        lr = lr_at(epoch, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        stats = self.train_epoch(epoch, resume=resume, on_stop=on_stop)
        validate = self.is_main and (epoch % self.config.val_every == 0 or epoch == self.config.epochs)
        val_acc, val_ci = mean_ci95(self.validate()) if validate else (float("nan"), float("nan"))
        return {"epoch": epoch, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
                "val_acc": val_acc, "val_ci95": val_ci, "lr": lr}

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # empty when the run used bf16 or the CPU (no loss scaling)
            self.scaler.load_state_dict(state["scaler"])
        if ranks.is_distributed():
            log.info("pretrain: training in %d processes; the checkpoint is the same for any count",
                     ranks.world_size())

    def keep(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.model.encoder.state_dict().items()}

    def scalars(self, row: dict) -> dict[str, float]:
        return {"train/loss": row["train_loss"], "train/accuracy": row["train_acc"], "val/accuracy": row["val_acc"],
                "lr": row["lr"], "throughput/images_per_s": len(self.train) / row["seconds"]}

    # -- one epoch, one step
    def train_epoch(self, epoch: int, *, resume: dict | None = None, on_stop=None,
                    max_steps: int | None = None) -> dict:
        """Train epoch ``epoch`` (learning rate as set); its mean loss and accuracy over every process
        and the images it trained on. ``max_steps`` (or ``steps_per_epoch``): the first batches only.

        ``resume``: the place a stopped run of this epoch saved; ``on_stop(place, where)``: called
        after the step during which a stop signal reached any process (see mtl.train.run).
        """
        self.model.train()
        # Each batch in file order (reads fastest); this process trains on its part of it.
        batches = [np.sort(b) for b in epoch_batches(len(self.train), self.config.batch_size, self.seed, epoch)]
        batches = batches[:max_steps or self.steps_per_epoch]
        parts = [ranks.shard(len(b)) for b in batches]
        generator = epoch_generator(self.seed, epoch)
        # this process's summed cross-entropy and correct predictions (on the device: no sync per step)
        totals, seen, step = torch.zeros(2, device=self.device), 0, 0
        if resume is not None:  # a stopped epoch: continue after its last step
            step = resume["step"]
            generator.set_state(resume["generator"])
            if self.is_main:  # the sums over every process so far, counted once
                totals += resume["totals"].to(self.device)
                seen = resume["seen"]
        loader = torch.utils.data.DataLoader(_Batches(self.train, [b[p] for b, p in zip(batches[step:], parts[step:])]),
                                             batch_size=None, shuffle=False, num_workers=self.config.num_workers,
                                             worker_init_fn=ignore_stop_signals,
                                             pin_memory=self.device.type == "cuda")
        steps = tqdm(zip(loader, batches[step:], parts[step:]), initial=step, total=len(batches),
                     desc=f"epoch {epoch}", unit="batch", leave=False, disable=None if self.is_main else True)
        for (images, labels), batch, part in steps:
            # Augmentation is drawn for the whole batch, in one process's order; keep this part's draws.
            draws = (self.train_transform.draw(len(batch), *self.train.image_shape[:2], generator)[part]
                     if self.config.augment else None)
            totals += self.train_step(images, labels, len(batch), draws)
            seen += len(labels)
            step += 1
            fault_point("pretrain.step")
            if on_stop is not None and stop_agreed(self.device):
                sums = ranks.all_reduce_sum(torch.cat([totals.detach(), totals.new_tensor([seen])])).cpu()
                on_stop({"step": step, "generator": generator.get_state(), "totals": sums[:2], "seen": int(sums[2])},
                        f"at epoch {epoch}, step {step} of {len(batches)}")
        epoch_sums = torch.cat([totals, totals.new_tensor([seen])])
        total_loss, correct, seen = ranks.all_reduce_sum(epoch_sums).tolist()  # over all processes
        mean_loss = total_loss / max(seen, 1)
        check_finite(mean_loss, what="pre-training", where=f"at epoch {epoch}", quantity="training loss",
                     advice=f"lower pretrain.lr (now {self.config.lr})")
        return {"train_loss": mean_loss, "train_acc": correct / max(seen, 1), "images": int(seen)}

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, draws=None) -> torch.Tensor:
        """One optimiser step on this process's part (``images``, ``labels``) of a batch of
        ``batch_size`` images; ``draws``: its augmentation. Returns (summed loss, correct) detached."""
        x = (self.train_transform(images, device=self.device, draws=draws) if self.config.augment
             else self.train_transform(images, device=self.device))
        y = labels.to(self.device, non_blocking=True)
        with autocast(self.device):
            logits = self.trainer(x)
        summed = F.cross_entropy(logits.float(), y, reduction="sum")
        # DDP averages gradients over the processes: this scale makes the average the whole
        # batch's mean-loss gradient, whatever the parts' sizes (one process: the mean loss).
        loss = summed * ranks.world_size() / batch_size
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return torch.stack([summed.detach(), (logits.argmax(1) == y).sum().float()])

    def validate(self) -> np.ndarray:
        """Per-episode accuracies of a fresh linear learner per fixed val episode on frozen eval-mode
        features (seeded init)."""
        return evaluate_encoder(self.model.encoder, self.val, self.val_set, self.eval_transform, self.way,
                                self.shot, self.query, steps=VAL_STEPS, lr=VAL_LR,
                                inference_batch_size=self.inference_batch_size, device=self.device,
                                generator=torch_stream(self.seed, Purpose.VALIDATION_LEARNERS))

    # -- output
    def save_encoder(self, path, best: dict) -> Path:
        """The best epoch's encoder (``best`` from the run) at ``path``; rank 0 writes."""
        if not self.is_main:
            return Path(path)
        encoder = build_backbone(self.backbone_spec["name"], width=self.backbone_spec["width"])
        if best["state"] is not None:
            encoder.load_state_dict(best["state"])
        else:  # no validation ran (epochs 0): keep what we have
            encoder.load_state_dict({k: v.cpu() for k, v in self.model.encoder.state_dict().items()})
        best_acc = best["val_acc"] if best["state"] is not None else float("nan")
        log.info("pretrain: best val accuracy %.4f at epoch %d -> %s", best_acc, best["epoch"], path)
        return save_encoder(encoder, path, image_size=self.image_size, normalize=self.config.normalize,
                            epoch=best["epoch"], val_acc=best_acc)


def _backbone_spec(backbone: dict) -> dict:
    unknown = set(backbone) - {"name", "width", "image_size"}
    if unknown or "name" not in backbone:
        raise ConfigError(f"backbone must be {{name, width, image_size}}, got keys {sorted(backbone)}")
    size = backbone.get("image_size")
    return {"name": str(backbone["name"]), "width": float(backbone.get("width", 1.0)),
            "image_size": None if size is None else int(size)}


def _split_identity(split: HDF5Split) -> dict:
    """What a checkpoint must have been trained on: the file's name, counts and content."""
    identity = {"file": split.path.name, "num_images": len(split), "num_classes": split.num_classes}
    if split.content_sha256 is not None:  # files built before the fingerprint existed: counts only
        identity["content_sha256"] = split.content_sha256
    return identity
