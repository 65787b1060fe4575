"""Meta-train: learn scale/shift (+ BN affine) and the base learner's initialisation (MTL).

Follows the PyTorch reference protocol (docs/reference-implementation.md, section 1) by default:
  - the pre-trained encoder is loaded into the SS backbone; conv weights/biases are frozen;
  - one task per outer step; BN in train mode; the QUERY batch is embedded first, then the
    SUPPORT batch (the reference's order, which fixes the running-statistic updates);
  - inner loop: ``update_step`` plain SGD steps (``base_lr``) on the support cross-entropy of a
    linear learner starting from its meta-learned init (kaiming_normal weight, zero bias);
  - first-order meta-gradient: the inner-loop gradients are constants, so the query loss reaches
    scale/shift/BN only through the query embeddings and reaches the learner init as through an
    identity (``W_T = W_0 + const``);
  - Adam on scale/shift/BN affine (``meta_lr``) and on the learner init (``learner_lr``): one Adam
    with two parameter groups, as the reference (Adam is per-parameter, so it equals two Adams);
    StepLR(``step_size``, ``gamma``) per epoch; meta-validation each epoch, best model kept.

Where we differ on purpose (same maths, less work or fixed defects):
  - first-order: the support embedding is computed under ``no_grad`` (the reference builds its
    autograd graph and never uses it) and the inner loop runs on detached tensors;
  - validation embeds each validation image once in eval mode (scales folded into the convs) and
    adapts all episodes together (``evaluate_episodes``), without autograd and without augmentation
    (the reference validates on augmented images with autograd on);
  - meta-train augmentation is the reference's training transform (it builds its meta-train set with
    ``train_aug=True``), drawn from a generator seeded per epoch so a resumed run sees the same data;
  - the scheduler steps after each epoch (PyTorch's documented order: ``step_size`` full epochs at
    the initial rate); the reference steps it at the start of each epoch, so its first decay comes
    one epoch earlier.

Options: ``first_order: false`` (second-order: support embeddings and inner loop keep the graph),
``meta_batch > 1`` (average the query losses of several tasks per outer step), the hard-task
meta-batch (:mod:`mtl.train.hard_tasks`), and ``scope="last"`` (scales/shifts and BN affine of the
last residual block only). The ablation arms of :mod:`mtl.methods` are these options, named.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mtl.base_learner import DEFAULT_INFERENCE_BATCH_SIZE, adapt_linear, embed_episodes, evaluate_episodes
from mtl.config import check_section, schema_defaults
from mtl.data.episodes import EpisodeSampler, relabel
from mtl.data.hdf5 import HDF5Split
from mtl.data.transforms import DEFAULT_MEAN, DEFAULT_STD, EvalTransform, TrainTransform
from mtl.device import autocast, grad_scaler, select_device
from mtl.errors import ConfigError, MTLError, check_known_keys
from mtl.faults import fault_point
from mtl.io import atomic_torch_save, file_sha256
from mtl.methods import get_method, meta_settings
from mtl.models import fold_scales, freeze_for_meta, load_encoder_file
from mtl.rng import Purpose, torch_stream
from mtl.stats import mean_ci95
from mtl.train.hard_tasks import HardTaskConfig, HardTaskRound, TaskStream
from mtl.train.run import TrainingRun, check_finite, fit, stop_agreed

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "meta_loss", "train_acc", "val_acc", "val_ci95", "lr", "hard_tasks", "seconds")
# Config keys that may change between a run and its resume (a longer run continues the shorter one).
RESUMABLE_KEYS = ("epochs",)


#: The ``meta`` defaults as mtl/config.schema.yaml states them (the PyTorch reference's).
_DEFAULTS = schema_defaults("meta")


@dataclass
class MetaConfig:
    """Meta-train settings: the config's ``meta`` keys; defaults and bounds are the schema's (:mod:`mtl.config`)."""

    epochs: int = _DEFAULTS["epochs"]  # reference max_epoch
    episodes_per_epoch: int = _DEFAULTS["episodes_per_epoch"]  # outer steps per epoch (reference num_batch)
    meta_lr: float = _DEFAULTS["meta_lr"]  # Adam on scale/shift AND BN gamma/beta (reference meta_lr1)
    learner_lr: float = _DEFAULTS["learner_lr"]  # Adam on the learner init (reference meta_lr2)
    step_size: int = _DEFAULTS["step_size"]  # StepLR period in epochs
    gamma: float = _DEFAULTS["gamma"]  # StepLR factor
    base_lr: float = _DEFAULTS["base_lr"]  # inner-loop SGD learning rate
    update_step: int = _DEFAULTS["update_step"]  # inner-loop SGD steps (reference: train = val = test = 100)
    first_order: bool = _DEFAULTS["first_order"]  # reference: inner-loop gradients are constants
    # tasks whose query losses are averaged per outer step (reference 1); hard tasks count as tasks
    # here: see HardTaskConfig for how the two groupings interact
    meta_batch: int = _DEFAULTS["meta_batch"]
    hard_tasks: HardTaskConfig = field(default_factory=HardTaskConfig)

    def __post_init__(self) -> None:
        if isinstance(self.hard_tasks, dict):
            self.hard_tasks = HardTaskConfig.from_dict(self.hard_tasks)
        values = {name: value for name, value in vars(self).items() if name != "hard_tasks"}
        for name, value in check_section(values, "meta").items():
            setattr(self, name, value)

    @classmethod
    def from_dict(cls, values: dict | None) -> MetaConfig:
        """Build from the config's ``meta`` dict; an unknown key is an error naming the valid ones."""
        values = check_known_keys(values, cls, "meta")
        if "hard_tasks" in values and not isinstance(values["hard_tasks"], HardTaskConfig):
            values["hard_tasks"] = HardTaskConfig.from_dict(values["hard_tasks"])
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- base learner
def init_learner(way: int, dim: int, device: torch.device | str = "cpu", *,
                 generator: torch.Generator | None = None) -> tuple[nn.Parameter, nn.Parameter]:
    """The reference learner init: kaiming_normal weight (way, dim), zero bias; both meta-learned.

    Drawn on the CPU from ``generator`` (the global RNG when None), then moved to ``device``.
    """
    weight = torch.empty(way, dim)
    nn.init.kaiming_normal_(weight, generator=generator)
    return nn.Parameter(weight.to(device)), nn.Parameter(torch.zeros(way, device=device))


def adapt_learner(support_feats, support_targets, weight, bias, *, steps: int, lr: float, first_order: bool):
    """Adapted learner (W_T (way, D), b_T (way,)) from the meta-learned init (weight, bias).

    Uses the shared batched base learner (:func:`mtl.base_learner.adapt_linear`, analytic
    gradients). First-order: ``W_T = W_0 + const`` (inner-loop gradients are constants, computed
    without a tape): the query loss reaches W_0 through an identity and the support features not
    at all, as with the reference. Second-order: the loop runs on the tape, differentiable in the
    support features and the init.
    """
    fast_w, fast_b = adapt_linear(support_feats[None], support_targets, weight.shape[0], init_weight=weight,
                                  init_bias=bias, steps=steps, lr=lr, create_graph=True,
                                  first_order=first_order)
    return fast_w[0], fast_b[0]


# --------------------------------------------------------------------------- one task
def episode_targets(way: int, per_class: int, device) -> torch.Tensor:
    """Local labels of a class-major batch: 0,0,..,1,1,.. (``per_class`` each)."""
    return torch.as_tensor(relabel(way, per_class), device=device)


def task_query_loss(model: nn.Module, weight, bias, support_x, query_x, *, way: int, shot: int, query: int,
                    steps: int, lr: float, first_order: bool, amp=contextlib.nullcontext):
    """Query cross-entropy of the adapted learner for one task, and the query logits.

    Embeds the query batch first, then the support batch (reference order; BN in whatever mode
    ``model`` is in). First-order: the support embedding is computed under ``no_grad``.
    ``amp`` is a context factory (mixed precision on CUDA); the inner loop always runs in float32.
    """
    device = query_x.device
    with amp():
        query_feats = model(query_x)
    if first_order:
        with torch.no_grad(), amp():
            support_feats = model(support_x)
    else:
        with amp():
            support_feats = model(support_x)
    support_y = episode_targets(way, shot, device)
    fast_w, fast_b = adapt_learner(support_feats, support_y, weight, bias, steps=steps, lr=lr,
                                   first_order=first_order)
    logits = F.linear(query_feats.float(), fast_w, fast_b)
    loss = F.cross_entropy(logits, episode_targets(way, query, device))
    return loss, logits


# --------------------------------------------------------------------------- helpers
def normalize_stats(normalize) -> tuple[list[float], list[float]]:
    """(mean, std) from the encoder's ``normalize`` entry; the reference statistics when absent."""
    if not normalize:
        return list(DEFAULT_MEAN), list(DEFAULT_STD)
    if isinstance(normalize, dict):
        return list(normalize["mean"]), list(normalize["std"])
    mean, std = normalize
    return list(mean), list(std)


def clone_state(model: nn.Module, weight, bias) -> dict:
    """CPU copy of everything meta-train changes plus the frozen weights (the full SS state)."""
    return {
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "learner": {"weight": weight.detach().cpu().clone(), "bias": bias.detach().cpu().clone()},
    }


# --------------------------------------------------------------------------- the trainer
@dataclass
class MetaData:
    """What one meta-train run reads: its training tasks and its fixed validation episodes."""

    split: HDF5Split
    sampler: EpisodeSampler
    transform: TrainTransform
    indices_by_class: dict | None  # where hard tasks are filled from (HT only)
    val_split: HDF5Split
    val_episodes: list
    val_transform: EvalTransform
    inference_batch_size: int  # images per forward pass of the validation embedding (see mtl.batching)
    seed: int

    @classmethod
    def open(cls, train_h5, val_h5, *, way: int, shot: int, query: int, val_episodes: int, seed: int,
             image_size: int, mean, std, hard_tasks: bool,
             inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE) -> MetaData:
        split, val_split = open_split(train_h5), open_split(val_h5)
        sampler = EpisodeSampler(split.labels, way, shot, query, seed, purpose=Purpose.TRAIN_EPISODES)
        val_sampler = EpisodeSampler(val_split.labels, way, shot, query, seed, purpose=Purpose.VALIDATION_EPISODES)
        return cls(split=split, sampler=sampler, transform=TrainTransform(image_size, mean, std),
                   indices_by_class=split.indices_by_class() if hard_tasks else None, val_split=val_split,
                   val_episodes=val_sampler.sample(val_episodes), val_transform=EvalTransform(image_size, mean, std),
                   inference_batch_size=int(inference_batch_size), seed=int(seed))


class MetaTrainer:
    """Holds the model, learner init, optimiser and data of one meta-train run.

    :func:`meta_train` runs it on :mod:`mtl.train.run`'s skeleton (`run_epoch` needs ``data``);
    tests and benchmarks use its pieces directly: the step (`task_forward_backward`,
    `optimizer_step`) and the epoch (:func:`train_epoch`).
    """

    def __init__(self, model, *, way, shot, query, config: MetaConfig, device, image_size, mean, std,
                 seed: int | None = None, scope: str = "all", data: MetaData | None = None):
        self.model = model.to(device)
        self.params = freeze_for_meta(self.model, scope)
        self.way, self.shot, self.query = way, shot, query
        self.config = config
        self.device = torch.device(device)
        generator = torch_stream(seed, Purpose.META_LEARNER_INIT) if seed is not None else None
        self.weight, self.bias = init_learner(way, model.out_dim, self.device, generator=generator)
        # One Adam with two groups is the reference's optimiser (Adam is per-parameter, so this is
        # the same as two Adams); one StepLR scales both learning rates.
        self.optimizer = torch.optim.Adam(
            [{"params": self.params, "lr": config.meta_lr},
             {"params": [self.weight, self.bias], "lr": config.learner_lr}])
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=config.step_size,
                                                         gamma=config.gamma)
        self.scaler = grad_scaler(self.device)
        self._autocast = lambda: autocast(self.device)
        self.image_size = image_size
        self.mean, self.std = mean, std
        self.data = data

    # ---- the skeleton's interface (mtl.train.run.Trainer)
    def run_epoch(self, epoch: int, resume: dict | None = None, on_stop=None) -> dict:
        """Train epoch ``epoch`` (1-based), validate, step the schedule; the history row."""
        if self.data is None:
            raise ValueError("MetaTrainer.run_epoch needs the run's data: MetaTrainer(..., data=MetaData.open(...))")
        lr, data = self.lr, self.data
        stats = train_epoch(self, data.split, data.sampler, data.transform, epoch=epoch - 1, seed=data.seed,
                            hard_config=self.config.hard_tasks, indices_by_class=data.indices_by_class,
                            resume=resume, on_stop=on_stop)
        val_acc, val_ci = mean_ci95(self.validate())
        self.scheduler.step()
        return {"epoch": epoch, "meta_loss": stats["meta_loss"], "train_acc": stats["train_acc"],
                "val_acc": val_acc, "val_ci95": val_ci, "lr": lr, "hard_tasks": stats["hard_tasks"]}

    def validate(self) -> np.ndarray:
        """Per-episode validation accuracies from the meta-learned init, (E,) float.

        Eval-mode BN, scales folded into the convs, every image used by the episodes embedded once
        without autograd; all episodes adapt in one batched computation (``evaluate_episodes``).
        """
        data = self.data
        plain = fold_scales(self.model).eval()
        arrays = (np.stack([e.support for e in data.val_episodes]), np.stack([e.query for e in data.val_episodes]))
        features, support, query = embed_episodes(plain, data.val_split, arrays, data.val_transform,
                                                  inference_batch_size=data.inference_batch_size, device=self.device)
        init = (self.weight.detach(), self.bias.detach())
        return evaluate_episodes(features, (support, query), self.way, self.shot, self.query, init=init,
                                 steps=self.config.update_step, lr=self.config.base_lr)

    def keep(self) -> dict:
        return clone_state(self.model, self.weight, self.bias)

    def scalars(self, row: dict) -> dict[str, float]:
        tasks = self.config.episodes_per_epoch * self.config.meta_batch  # hard tasks included
        return {"train/loss": row["meta_loss"], "train/accuracy": row["train_acc"], "val/accuracy": row["val_acc"],
                "lr": row["lr"], "throughput/episodes_per_s": tasks / row["seconds"]}

    # ---- one task / one outer step
    def task_forward_backward(self, support_x, query_x, loss_scale: float = 1.0):
        """Forward one task, backpropagate ``loss * loss_scale``; return (loss, query predictions)."""
        loss, logits = task_query_loss(
            self.model, self.weight, self.bias, support_x, query_x, way=self.way, shot=self.shot,
            query=self.query, steps=self.config.update_step, lr=self.config.base_lr,
            first_order=self.config.first_order, amp=self._autocast)
        self.scaler.scale(loss * loss_scale).backward()
        return float(loss.detach()), logits.detach().argmax(dim=1).cpu().numpy()

    def optimizer_step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- state
    def state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "learner": {"weight": self.weight.detach().clone(), "bias": self.bias.detach().clone()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            self.weight.copy_(state["learner"]["weight"])
            self.bias.copy_(state["learner"]["bias"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def _load_images(split, episode, transform, device, generator=None):
    """Support and query images of an episode as normalised float tensors on ``device``.

    One read and one transform call for both sets; augmentation draws from ``generator``.
    """
    indices = np.concatenate([episode.support, episode.query])
    images = split.get_images(indices)
    if isinstance(transform, TrainTransform):
        batch = transform(images, device, generator=generator)
    else:
        batch = transform(images, device)
    n_support = len(episode.support)
    return batch[:n_support], batch[n_support:]


def train_epoch(trainer: MetaTrainer, split, sampler, transform, *, epoch: int, seed: int,
                hard_config: HardTaskConfig | None, indices_by_class=None, resume: dict | None = None,
                on_stop: Callable[[dict, str], None] | None = None) -> dict:
    """One epoch of ``episodes_per_epoch`` outer steps; returns mean loss/accuracy and hard-task count.

    ``epoch``: 0-based (it fixes the tasks and the augmentation). ``resume``: the place a stopped
    epoch saved (see ``on_stop``), to continue after its last step. ``on_stop(place, where)``: called
    after the step during which SIGTERM/SIGINT arrived, with the place reached (step, task stream,
    augmentation generator, running statistics); it saves a checkpoint and ends the run.
    """
    config = trainer.config
    tasks_per_epoch = config.episodes_per_epoch * config.meta_batch
    hard_round = None
    if hard_config is not None and hard_config.enabled:
        hard_round = HardTaskRound(hard_config, indices_by_class, way=trainer.way, shot=trainer.shot,
                                   query=trainer.query, seed=seed, epoch=epoch)
    stream = TaskStream(sampler, epoch, tasks_per_epoch, hard_round)
    generator = torch_stream(seed, Purpose.META_AUGMENT, epoch)
    query_targets = relabel(trainer.way, trainer.query)
    trainer.model.train()
    losses, accuracies, first_step = [], [], 0
    if resume is not None:
        first_step, losses, accuracies = resume["step"], list(resume["losses"]), list(resume["accuracies"])
        stream.load_state(resume["stream"])
        generator.set_state(resume["generator"])
    steps = tqdm(range(first_step, config.episodes_per_epoch), desc=f"meta epoch {epoch + 1}", leave=False,
                 disable=None, unit="step", initial=first_step, total=config.episodes_per_epoch)
    for step in steps:
        for _ in range(config.meta_batch):
            _, episode = stream.next()
            support_x, query_x = _load_images(split, episode, transform, trainer.device, generator)
            loss, predictions = trainer.task_forward_backward(support_x, query_x, 1.0 / config.meta_batch)
            check_finite(loss, what="meta-training", where=f"at epoch {epoch + 1}, step {step + 1}",
                         quantity="query loss", advice=f"lower meta.meta_lr (now {config.meta_lr}), meta.learner_lr "
                         f"(now {config.learner_lr}) or meta.base_lr (now {config.base_lr})")
            stream.done(episode, predictions, query_targets)
            losses.append(loss)
            accuracies.append(float((predictions == query_targets).mean()))
        trainer.optimizer_step()
        steps.set_postfix(loss=f"{np.mean(losses):.3f}", acc=f"{np.mean(accuracies):.3f}")
        fault_point("meta.step")
        if on_stop is not None and stop_agreed(trainer.device):
            on_stop({"step": step + 1, "stream": stream.state(), "generator": generator.get_state(),
                     "losses": losses, "accuracies": accuracies}, f"at epoch {epoch + 1}, step {step + 1}")
    return {"meta_loss": float(np.mean(losses)), "train_acc": float(np.mean(accuracies)),
            "hard_tasks": stream.hard_count}


# --------------------------------------------------------------------------- entry point
def meta_train(train_h5, val_h5, encoder_path, *, method: str, model_out, history_out, checkpoint_dir,
               config: MetaConfig | dict, way: int, shot: int, query: int, val_episodes: int, seed: int,
               device: str = "auto", inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
               tensorboard_dir: str | Path | None = None) -> Path:
    """Meta-train ``method`` from the encoder at ``encoder_path``; write ``model_out`` and ``history_out``.

    ``method``: a meta-trained entry of :mod:`mtl.methods`, whose arm decides what ``config`` (the
    config's ``meta`` block) does not: where scales/shifts are learned (``scope``, see
    :func:`mtl.models.freeze_for_meta`), the hard-task meta-batch (``config.hard_tasks.enabled``),
    and the ``meta`` keys it fixes (second order, meta-batch). The name is recorded in the model
    file. Resumes from ``checkpoint_dir/last.pt`` when present (a longer
    ``epochs`` continues a finished shorter run); any other config, protocol, backbone or encoder
    change is refused with a CheckpointError, since silently mixing two runs would corrupt results.
    Outputs are written once, at the end: the best-validation model and the full history.
    ``inference_batch_size``: images per forward pass of the validation embedding (see mtl.batching).
    ``tensorboard_dir``: where each epoch's scalars are written for TensorBoard (:mod:`mtl.tracking`;
    None: nowhere).
    """
    values = config.to_dict() if isinstance(config, MetaConfig) else dict(config or {})
    settings = meta_settings(method, values)  # refuses a method that is not meta-trained
    arm = get_method(method).meta
    config, scope = with_hard_tasks(settings, arm.hard_tasks), arm.scope
    if int(val_episodes) < 1:
        raise ConfigError(f"protocol.val_episodes must be >= 1 (meta-validation picks the best epoch), "
                          f"got {val_episodes!r}")
    device = select_device(device)
    # missing file: its error names the pretrain rule
    model, encoder_meta = load_encoder_file(encoder_path, ss=True)
    image_size = int(encoder_meta.get("image_size") or model.native_size)
    mean, std = normalize_stats(encoder_meta.get("normalize"))
    protocol = {"way": way, "shot": shot, "query": query, "seed": seed, "scope": scope, "method": method}
    identity = run_identity(model, config, protocol, val_episodes, image_size, Path(encoder_path))

    data = MetaData.open(train_h5, val_h5, way=way, shot=shot, query=query, val_episodes=val_episodes, seed=seed,
                         image_size=image_size, mean=mean, std=std, hard_tasks=config.hard_tasks.enabled,
                         inference_batch_size=inference_batch_size)
    trainer = MetaTrainer(model, way=way, shot=shot, query=query, config=config, device=device,
                          image_size=image_size, mean=mean, std=std, seed=seed, scope=scope, data=data)
    contents = {"train": data.split.content_sha256, "val": data.val_split.content_sha256}
    if any(contents.values()):  # splits built before the fingerprint existed: the encoder's hash only
        identity["splits_sha256"] = contents  # an encoder that ignores the data (random_init) covers nothing
    run = TrainingRun(checkpoint_dir, identity, config=config.to_dict(), name="meta-train", what="meta-training",
                      producer="the `meta_train` rule", columns=HISTORY_COLUMNS, log=log, device=device)
    run.resume(trainer)
    # the history is written with the model, at the end: a history never describes a missing model
    fit(run, trainer, config.epochs, desc=f"meta-train {method} {shot}-shot", tensorboard_dir=tensorboard_dir)

    best = run.best
    if best["state"] is None:  # only when no epoch validated to a number
        raise MTLError(f"meta-training finished without a model to keep: no epoch gave a finite validation "
                       f"accuracy (history: {history_out}). Delete {checkpoint_dir} and rerun with lower "
                       "meta learning rates.")
    atomic_torch_save({"backbone": model.config, **best["state"], "image_size": image_size,
                       "normalize": {"mean": mean, "std": std}, "protocol": protocol,
                       # meta-test adapts with the inner loop the init was meta-learned for
                       "inner": {"update_step": config.update_step, "base_lr": config.base_lr},
                       "epoch": best["epoch"], "val_acc": best["val_acc"]}, model_out)
    run.write_history(history_out)
    log.info("meta-train done: best val_acc %.4f at epoch %d -> %s", best["val_acc"], best["epoch"], model_out)
    return Path(model_out)


def with_hard_tasks(config: MetaConfig | dict, enabled: bool) -> MetaConfig:
    """``config`` (a MetaConfig or the ``meta`` dict) with HT switched by the method, not the file."""
    if not isinstance(config, MetaConfig):
        config = MetaConfig.from_dict(config)
    values = config.to_dict()
    values["hard_tasks"]["enabled"] = bool(enabled)
    return MetaConfig.from_dict(values)


def run_identity(model, config: MetaConfig, protocol: dict, val_episodes: int, image_size: int,
                 encoder_path: Path) -> dict:
    """What a checkpoint must match to be resumed: everything but ``epochs``, and the same encoder."""
    return {
        "backbone": model.config,
        "config": {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_KEYS},
        "protocol": {**protocol, "val_episodes": val_episodes},
        "image_size": image_size,
        "encoder_sha256": file_sha256(encoder_path),
    }


def open_split(path, limit_bytes: int = 4 << 30) -> HDF5Split:
    """Open a split, in RAM when its images are small (mini/FC100), lazily otherwise (tiered)."""
    split = HDF5Split(path)
    if len(split) * int(np.prod(split.image_shape)) <= limit_bytes:
        split.close()
        return HDF5Split(path, in_memory=True)
    return split
