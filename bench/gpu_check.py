"""GPU check: CPU/GPU agreement and the pipeline's throughput on one CUDA device, in under 5 minutes.

    bash bench/gpu_check.sh                      # on a CUDA machine (tees to $OUT/gpu_check.txt when OUT is set)
    bash bench/gpu_check.sh --backbones resnet12 # one backbone only
    bash bench/gpu_check.sh --cpu-smoke          # tiny run on the CPU: checks this script, not a GPU (< 60 s)

1. Environment: torch / CUDA / cuDNN versions, the card, its capability, bf16 support, the AMP dtype the
   pipeline picks (``mtl.device.autocast_dtype``), CUDA_VISIBLE_DEVICES.
2. Agreement (width 1, native sizes, fixed seed; PASS/FAIL each, exit status 1 on any FAIL):
   - preprocessing: EvalTransform and TrainTransform (same CPU generator) CPU vs GPU, abs tol 1e-3;
   - eval-mode features of 8 images, CPU fp32 vs GPU fp32 with TF32 off (cuDNN/cuBLAS still sum in
     another order): max |diff| / max |CPU feature| <= 1e-3;
   - the same under ``mtl.device.autocast`` (bf16, or fp16 on older cards) vs CPU fp32: <= 5e-2
     (and, reported only, GPU fp32 with the process's default TF32 settings);
   - one first-order meta-train task (5-way 1-shot 15-query, 100 inner steps, train-mode BN) through
     ``mtl.train.meta.task_query_loss``: relative error (L2) of the scale gradients and of all meta
     gradients GPU fp32 vs CPU fp32 <= 1e-3; the AMP gradient is reported, not judged;
   - ``evaluate_episodes`` on the same (synthetic, clustered) features CPU vs GPU, 100 episodes each
     of 1- and 5-shot: equal, or at most one episode differing by at most one query prediction.
3. Throughput on synthetic images (random uint8, stored 84x84 like miniImageNet), both backbones at
   width 1 and their native sizes, AMP as the pipeline uses it, synchronised timing after warm-up:
   - pre-train: PretrainClassifier (64 classes) SGD step at batch 128, as ``pretrain._fit_one_epoch``
     does it (on-device augmentation, autocast forward, fp32 loss, GradScaler, Nesterov SGD); also the
     model step alone on a ready batch; cudnn.benchmark on, as pre-training sets it;
   - meta-train: ``mtl.train.meta.train_epoch`` with a ``MetaTrainer`` (5-way 1-shot 15-query,
     update_step 100, first-order, reference augmentation) on an in-memory split, as ``meta_train``
     runs it with a split small enough to load into RAM;
   - evaluation: ``embed_episodes`` (scales folded, eval BN, autocast) of a 20 x 600 split for 600
     5-way 1-shot 15-query episodes, then ``evaluate_episodes`` with the meta-learned init (100 steps);
     run twice, the second (warm) pass reported, the first (cold) time printed beside it.
4. A Markdown block to paste into bench/RESULTS.md, naming the card.

Each timed section stops at a time budget (``--budget``) and the whole run skips what would not fit
before ``--deadline`` seconds, so the wrapper's 300 s limit is not hit on an H100-class card.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import math
import os
import platform
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import context  # this checkout's mtl, and the machine beside every figure

try:
    from mtl.batching import inference_batch_size
    from mtl.data.episodes import EpisodeSampler
    from mtl.data.transforms import (
        DEFAULT_MEAN,
        DEFAULT_STD,
        EvalTransform,
        TrainTransform,
    )
    from mtl.device import autocast, autocast_dtype, grad_scaler, select_device
    from mtl.errors import MTLError
    from mtl.models import (
        PretrainClassifier,
        build_backbone,
        fold_scales,
        meta_parameters,
    )
    from mtl.train.learner import embed_episodes, evaluate_episodes
    from mtl.train.meta import MetaConfig, MetaTrainer, task_query_loss, train_epoch
except ImportError as exc:  # e.g. h5py or tqdm missing on a bare GPU machine
    sys.exit(f"gpu_check: cannot import the mtl library ({exc}); install the project's requirements "
             f"(`pip install -e .` in the repo root, or envs/mtl.yaml) with {sys.executable} and rerun.")

BACKBONES = ("resnet12", "resnet25")
WAY, SHOT, QUERY = 5, 1, 15
UPDATE_STEP, BASE_LR = 100, 0.01  # meta.update_step / meta.base_lr defaults
PRETRAIN_CLASSES = 64  # miniImageNet's meta-train classes
TOL = {  # agreement tolerances, all stated in the output
    "transform_abs": 1e-3,  # normalised pixels (range about -2..2): float32 interpolation order only
    "fp32_rel": 1e-3,  # max |gpu - cpu| / max |cpu|; TF32 off, cuDNN/cuBLAS still sum in another order
    "amp_rel": 5e-2,  # bf16 keeps 8 mantissa bits (~4e-3 per op) and rounds through 12-25 layers
    "grad_rel": 1e-3,  # ||g_gpu - g_cpu|| / ||g_cpu||, fp32, TF32 off
}


@dataclasses.dataclass
class Settings:
    """Every size and budget in one place; ``--cpu-smoke`` swaps in the tiny column."""

    device: torch.device
    smoke: bool
    backbones: tuple[str, ...]
    width: float = 1.0  # published networks
    size: int | None = None  # None: the backbone's native size (84 / 80)
    stored_size: int = 84  # synthetic split images, like miniImageNet's HDF5
    classes: int = 20  # synthetic evaluation / meta-train split: 20 x 600, a miniImageNet test split
    per_class: int = 600
    check_batch: int = 8  # images in the feature agreement check
    pretrain_batch: int = 128  # pretrain.batch_size
    eval_episodes: int = 600  # protocol.test_episodes
    check_episodes: int = 100  # episodes per shot in the evaluate_episodes agreement check
    budget: float = 8.0  # seconds of timed iterations per throughput measurement
    warmup: int = 3  # untimed iterations first (cuDNN plans, autotuning, allocator)
    max_iters: int = 50
    deadline: float = 260.0  # seconds after start: later sections are skipped

    @classmethod
    def from_args(cls, args, device: torch.device) -> Settings:
        settings = cls(device=device, smoke=args.cpu_smoke, backbones=tuple(args.backbones))
        if args.cpu_smoke:
            settings = dataclasses.replace(settings, width=0.125, size=32, stored_size=40, per_class=20,
                                           check_batch=4, pretrain_batch=8, eval_episodes=30,
                                           check_episodes=20, budget=0.3, warmup=1, max_iters=1, deadline=55.0)
        for name in ("budget", "deadline", "eval_episodes", "pretrain_batch"):
            if getattr(args, name) is not None:
                settings = dataclasses.replace(settings, **{name: getattr(args, name)})
        return settings

    def image_size(self, backbone) -> int:
        return int(self.size or backbone.native_size)


class Run:
    """Collects PASS/FAIL checks and figures, and knows how much time is left."""

    def __init__(self, deadline: float):
        self.started = time.perf_counter()
        self.deadline = deadline
        self.checks: list[tuple[str, bool]] = []
        self.figures: dict[str, dict] = {}
        self.agreement: dict[str, dict] = {}
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.deadline - self.elapsed()

    def check(self, name: str, passed: bool, detail: str) -> bool:
        self.checks.append((name, bool(passed)))
        print(f"  {'PASS' if passed else 'FAIL'}  {name}: {detail}", flush=True)
        return passed

    def info(self, name: str, detail: str) -> None:
        print(f"  INFO  {name}: {detail}", flush=True)

    def skip(self, name: str, why: str) -> None:
        self.skipped.append(name)
        print(f"  SKIP  {name}: {why}", flush=True)


# ----------------------------------------------------------------------------- small helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def strict_fp32():
    """TF32 off for matmul and cuDNN (restored afterwards): fp32 on the GPU means fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    """cuDNN autotuning as the pipeline stage under test has it (pre-train on, the others off)."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def synthetic_images(n: int, size: int, seed: int) -> np.ndarray:
    """Random uint8 (n, size, size, 3) RGB images."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


class ArraySplit:
    """An in-memory split with HDF5Split's reading interface (``HDF5Split(in_memory=True)`` does the same
    numpy fancy indexing), so ``train_epoch`` runs without writing an HDF5 file."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def get_images(self, indices) -> np.ndarray:
        return self.images[np.asarray(indices)]


def max_rel(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(max |other - reference|, that divided by max |reference|), compared on the CPU in float64."""
    reference, other = reference.detach().double().cpu(), other.detach().double().cpu()
    diff = float((other - reference).abs().max())
    return diff, diff / max(float(reference.abs().max()), 1e-30)


def flat_grad(params) -> torch.Tensor:
    """The gradients of ``params`` as one CPU vector (zeros where a parameter got none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().cpu()
                      for p in params])


def cell(values: dict, key: str, spec: str, missing: str = "skipped") -> str:
    """One Markdown table cell: ``values[key]`` formatted, or ``missing``."""
    if key not in values:
        return missing
    return gib(values[key]) if spec == "gib" else format(values[key], spec)


def gib(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f} GiB"


def l2_rel(reference: torch.Tensor, other: torch.Tensor) -> float:
    reference, other = reference.detach().double().cpu(), other.detach().double().cpu()
    return float((other - reference).norm() / reference.norm().clamp_min(1e-30))


def calibrate_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Give eval-mode BN the statistics of ``x`` instead of the init's 0 / 1, so eval features are those
    of a network whose activations stay in range (as after pre-training), not of a fresh init."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics exactly
    model.train()
    with torch.no_grad():
        model(x)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    model.eval()


def timed(step: Callable[[], object], device: torch.device, *, warmup: int, budget: float,
          max_iters: int, min_iters: int = 2) -> tuple[float, int]:
    """Seconds per call of ``step`` (median-free: total of n synchronised calls / n) and n.

    After ``warmup`` calls, one synchronised call sizes n to fit ``budget`` seconds (min_iters..max_iters).
    """
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    probe = time.perf_counter() - start
    n = int(min(max_iters, max(min_iters, budget / max(probe, 1e-6))))
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - start) / n, n


# ----------------------------------------------------------------------------- 1. environment
def describe_environment(settings: Settings) -> dict:
    device = settings.device
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"),
        "cpu threads": str(torch.get_num_threads()),
        "host": platform.node(),
        "CPU": context.context(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "device": torch.cuda.get_device_name(device),
            "capability": f"{props.major}.{props.minor}",
            "memory": f"{props.total_memory / 2**30:.1f} GiB",
            "visible GPUs": str(torch.cuda.device_count()),
            "bf16 supported": str(torch.cuda.is_bf16_supported()),
        })
    else:
        env.update({"device": f"CPU ({context.cpu_model()})", "capability": "n/a",
                    "bf16 supported": "n/a"})
    dtype = autocast_dtype(device)
    env["pipeline AMP dtype"] = str(dtype).replace("torch.", "") if dtype is not None else "none (fp32 on CPU)"
    env["TF32 defaults (matmul, cudnn)"] = (f"{torch.backends.cuda.matmul.allow_tf32}, "
                                           f"{torch.backends.cudnn.allow_tf32}")
    for key, value in env.items():
        print(f"  {key}: {value}")
    return env


# ----------------------------------------------------------------------------- 2. agreement
def check_agreement(name: str, settings: Settings, run: Run, seed: int) -> None:
    """Every CPU-vs-device comparison for one backbone."""
    device, cpu = settings.device, torch.device("cpu")
    torch.manual_seed(seed)
    model = build_backbone(name, width=settings.width)
    size = settings.image_size(model)
    raw = synthetic_images(settings.check_batch, settings.stored_size, seed)
    label = f"{name} {size}px"
    row = run.agreement.setdefault(name, {})

    # preprocessing
    evaluate = EvalTransform(size)
    x_cpu = evaluate(raw, cpu)
    diff = float((evaluate(raw, device).cpu() - x_cpu).abs().max())
    run.check(f"{label} EvalTransform CPU vs {device.type}", diff <= TOL["transform_abs"],
              f"max abs diff {diff:.2e} (tol {TOL['transform_abs']:.0e})")
    augment = TrainTransform(size)
    a_cpu = augment(raw, cpu, generator=torch.Generator().manual_seed(seed))
    a_dev = augment(raw, device, generator=torch.Generator().manual_seed(seed))
    diff = float((a_dev.cpu() - a_cpu).abs().max())
    run.check(f"{label} TrainTransform CPU vs {device.type}", diff <= TOL["transform_abs"],
              f"max abs diff {diff:.2e} (tol {TOL['transform_abs']:.0e}, same crops/flips from one CPU generator)")

    # eval-mode features
    calibrate_bn(model, x_cpu)
    model_dev = copy.deepcopy(model).to(device).eval()
    x_dev = x_cpu.to(device)
    with torch.no_grad():
        ref = model(x_cpu)
        with strict_fp32():
            fp32 = model_dev(x_dev).float()
            flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        default_fp32 = model_dev(x_dev).float()  # TF32 as the process has it (cuDNN convs: on by default)
        with autocast(device):
            amp = model_dev(x_dev).float()
    abs_diff, rel = max_rel(ref, fp32)
    row["fp32_rel"] = rel
    run.check(f"{label} features fp32 CPU vs {device.type} fp32 (TF32 off)", rel <= TOL["fp32_rel"],
              f"max abs diff {abs_diff:.2e}, / max |feature| {rel:.2e} (tol {TOL['fp32_rel']:.0e}); "
              f"max |feature| {float(ref.abs().max()):.3g}; allow_tf32 read back (matmul, cudnn) {flags}")
    abs_diff, rel = max_rel(ref, default_fp32)
    run.info(f"{label} features fp32 with TF32 at this process's defaults vs CPU fp32",
             f"max abs diff {abs_diff:.2e}, / max |feature| {rel:.2e} (what fp32 code outside autocast gets)")
    abs_diff, rel = max_rel(ref, amp)
    cosine = float(F.cosine_similarity(ref.double(), amp.double().cpu(), dim=1).min())
    row["amp_rel"], row["amp_cos"] = rel, cosine
    amp_name = str(autocast_dtype(device)).replace("torch.", "") if autocast_dtype(device) else "none: fp32"
    run.check(f"{label} features AMP ({amp_name}) on {device.type} vs CPU fp32",
              bool(torch.isfinite(amp).all()) and rel <= TOL["amp_rel"],
              f"max abs diff {abs_diff:.2e}, / max |feature| {rel:.2e} (tol {TOL['amp_rel']:.0e}); "
              f"min cosine per image {cosine:.5f}")
    check_meta_gradient(name, settings, run, seed, size, label)
    check_evaluate_episodes(name, model.out_dim, settings, run, seed, label)


def check_meta_gradient(name: str, settings: Settings, run: Run, seed: int, size: int, label: str) -> None:
    """One first-order meta-train task's gradients, CPU fp32 vs device fp32 (and AMP, reported)."""
    device, cpu = settings.device, torch.device("cpu")
    torch.manual_seed(seed)
    ss_model = build_backbone(name, width=settings.width, ss=True)
    config = MetaConfig(update_step=UPDATE_STEP, base_lr=BASE_LR, first_order=True)
    common = {"way": WAY, "shot": SHOT, "query": QUERY, "config": config, "image_size": size,
              "mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD), "seed": seed}
    trainers = {"cpu": MetaTrainer(copy.deepcopy(ss_model), device=cpu, **common),
                "dev": MetaTrainer(ss_model, device=device, **common)}  # same learner init (CPU draw)
    raw = synthetic_images(WAY * (SHOT + QUERY), settings.stored_size, seed + 1)
    images = TrainTransform(size)(raw, cpu, generator=torch.Generator().manual_seed(seed))
    support, query = images[:WAY * SHOT], images[WAY * SHOT:]

    def gradients(trainer: MetaTrainer, amp: bool):
        trainer.model.train()
        trainer.optimizer.zero_grad(set_to_none=True)
        s, q = support.to(trainer.device), query.to(trainer.device)
        if amp:  # the pipeline's own step: autocast forward, GradScaler (active for fp16 only)
            loss, _ = trainer.task_forward_backward(s, q)
            if trainer.scaler.is_enabled():
                trainer.scaler.unscale_(trainer.optimizer)
        else:
            loss, _ = task_query_loss(trainer.model, trainer.weight, trainer.bias, s, q, way=WAY, shot=SHOT,
                                      query=QUERY, steps=UPDATE_STEP, lr=BASE_LR, first_order=True)
            loss.backward()
            loss = float(loss.detach())
        scales = [m.scale for m in trainer.model.modules() if getattr(m, "scale", None) is not None]
        every = meta_parameters(trainer.model) + [trainer.weight, trainer.bias]
        return float(loss), flat_grad(scales), flat_grad(every)

    loss_ref, scale_ref, all_ref = gradients(trainers["cpu"], amp=False)
    with strict_fp32():
        loss_dev, scale_dev, all_dev = gradients(trainers["dev"], amp=False)
    rel_scale, rel_all = l2_rel(scale_ref, scale_dev), l2_rel(all_ref, all_dev)
    run.agreement[name]["grad_rel"] = max(rel_scale, rel_all)
    run.check(f"{label} meta-train task gradient CPU fp32 vs {device.type} fp32 (TF32 off)",
              max(rel_scale, rel_all) <= TOL["grad_rel"] and math.isfinite(loss_dev),
              f"relative error (L2) scales {rel_scale:.2e}, all meta parameters + learner init {rel_all:.2e} "
              f"(tol {TOL['grad_rel']:.0e}); query loss {loss_ref:.6f} vs {loss_dev:.6f}")
    loss_amp, scale_amp, all_amp = gradients(trainers["dev"], amp=True)
    run.agreement[name]["grad_rel_amp"] = l2_rel(all_ref, all_amp)
    run.info(f"{label} meta-train task gradient, the pipeline's AMP step vs CPU fp32",
             f"relative error (L2) scales {l2_rel(scale_ref, scale_amp):.2e}, all {l2_rel(all_ref, all_amp):.2e}; "
             f"query loss {loss_amp:.6f} (reported, not judged)")


def clustered_features(classes: int, per_class: int, dim: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Non-negative features with class structure (like pooled ReLU features), so accuracies are
    neither chance nor 100% and few queries sit on a decision boundary."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator)
    labels = np.repeat(np.arange(classes), per_class)
    noise = 1.5 * torch.randn(len(labels), dim, generator=generator)
    return torch.relu(centres[torch.as_tensor(labels)] + noise), labels


def check_evaluate_episodes(name: str, dim: int, settings: Settings, run: Run, seed: int, label: str) -> None:
    """Batched evaluate_episodes on the same features, CPU vs device: equal or one prediction flip."""
    device = settings.device
    features, labels = clustered_features(20, 30, dim, seed)
    flips = []
    for shot in (1, 5):
        episodes = EpisodeSampler(labels, WAY, shot, QUERY, seed).sample(settings.check_episodes)
        arrays = (np.stack([e.support for e in episodes]), np.stack([e.query for e in episodes]))
        accs = [evaluate_episodes(f, arrays, WAY, shot, QUERY, steps=UPDATE_STEP, lr=BASE_LR,
                                  generator=torch.Generator().manual_seed(seed))
                for f in (features, features.to(device))]
        changed = np.rint(np.abs(accs[0] - accs[1]) * WAY * QUERY).astype(int)
        flips.append(int(changed.sum()))
        run.check(f"{label} evaluate_episodes CPU vs {device.type}, {shot}-shot, {len(episodes)} episodes "
                  f"(D={dim})", (changed > 0).sum() <= 1 and changed.max() <= 1,
                  f"episodes differing {(changed > 0).sum()}, query predictions flipped {changed.sum()} "
                  f"(tol: at most 1 episode, by 1 query); mean accuracy {accs[0].mean():.4f} vs "
                  f"{accs[1].mean():.4f}")
    run.agreement[name]["eval_flips"] = sum(flips)


# ----------------------------------------------------------------------------- 3. throughput
def bench_pretrain(name: str, settings: Settings, run: Run, images: np.ndarray, seed: int) -> dict:
    """Images/s of the pre-train step (as pretrain._fit_one_epoch) and of the model step alone."""
    device = settings.device
    torch.manual_seed(seed)
    encoder = build_backbone(name, width=settings.width)
    size = settings.image_size(encoder)
    model = PretrainClassifier(encoder, PRETRAIN_CLASSES).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scaler = grad_scaler(device)
    transform = TrainTransform(size)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    batch = settings.pretrain_batch
    pin = device.type == "cuda"
    batches = []  # a few uint8 batches as the DataLoader hands them over (pinned on CUDA)
    for _ in range(4):
        rows = np.sort(rng.choice(len(images), batch, replace=False))
        x = torch.from_numpy(images[rows])
        y = torch.from_numpy(rng.integers(0, PRETRAIN_CLASSES, batch))
        batches.append((x.pin_memory(), y.pin_memory()) if pin else (x, y))
    counter = iter(range(10**9))

    def model_step(x, y):
        with autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def full_step():
        x_raw, y_raw = batches[next(counter) % len(batches)]
        model_step(transform(x_raw, device=device, generator=generator), y_raw.to(device, non_blocking=True))

    ready_x = transform(batches[0][0], device=device, generator=generator)
    ready_y = batches[0][1].to(device)
    budget = min(settings.budget, max(0.5, run.left() / 20))
    with cudnn_benchmark(True):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_s, n_full = timed(full_step, device, warmup=settings.warmup, budget=budget,
                               max_iters=settings.max_iters, min_iters=min(2, settings.max_iters))
        model_s, n_model = timed(lambda: model_step(ready_x, ready_y), device, warmup=1, budget=budget,
                                 max_iters=settings.max_iters, min_iters=min(2, settings.max_iters))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    result = {"size": size, "pretrain_ips": batch / step_s, "pretrain_model_ips": batch / model_s,
              "pretrain_peak_gib": peak}
    context.figure(f"  {name} {size}px pre-train, batch {batch}: {result['pretrain_ips']:.0f} images/s with "
                   f"on-device augmentation ({1000 * step_s:.1f} ms/step, {n_full} steps); model step alone "
                   f"{result['pretrain_model_ips']:.0f} images/s ({n_model} steps); peak memory {gib(peak)}")
    return result


def bench_meta(name: str, settings: Settings, run: Run, split: ArraySplit, seed: int) -> dict:
    """Outer steps/s of the pipeline's meta-train loop (train_epoch over a MetaTrainer)."""
    device = settings.device
    torch.manual_seed(seed)
    model = build_backbone(name, width=settings.width, ss=True)
    size = settings.image_size(model)
    config = MetaConfig(episodes_per_epoch=2, update_step=UPDATE_STEP, base_lr=BASE_LR, first_order=True)
    trainer = MetaTrainer(model, way=WAY, shot=SHOT, query=QUERY, config=config, device=device, image_size=size,
                          mean=list(DEFAULT_MEAN), std=list(DEFAULT_STD), seed=seed)
    sampler = EpisodeSampler(split.labels, WAY, SHOT, QUERY, seed)
    transform = TrainTransform(size)
    epochs = iter(range(10**6))

    def epoch(steps: int) -> None:
        trainer.config = dataclasses.replace(config, episodes_per_epoch=steps)
        train_epoch(trainer, split, sampler, transform, epoch=next(epochs), seed=seed, hard_config=None)

    budget = min(2 * settings.budget, max(0.5, run.left() / 15))
    with cudnn_benchmark(False):  # meta_train runs in its own process, where nothing turns it on
        epoch(min(2, settings.warmup))  # warm-up
        sync(device)
        start = time.perf_counter()
        epoch(1)
        sync(device)
        probe = time.perf_counter() - start
        steps = int(min(settings.max_iters, max(min(2, settings.max_iters), budget / max(probe, 1e-6))))
        start = time.perf_counter()
        epoch(steps)
        sync(device)
        seconds = (time.perf_counter() - start) / steps
    context.figure(f"  {name} {size}px meta-train ({WAY}-way {SHOT}-shot {QUERY}-query, update_step "
                   f"{UPDATE_STEP}, first-order, AMP): {1 / seconds:.2f} episodes/s ({1000 * seconds:.1f} ms/episode, "
                   f"{steps} episodes)")
    return {"meta_eps": 1 / seconds, "meta_ms": 1000 * seconds, "trainer": trainer}


def bench_evaluation(name: str, settings: Settings, run: Run, trainer: MetaTrainer, images: np.ndarray,
                     labels: np.ndarray, seed: int) -> dict:
    """Meta-test of the mtl method on a synthetic split: embed each used image once, adapt all episodes."""
    device = settings.device
    size = trainer.image_size
    encoder = fold_scales(trainer.model).eval()
    transform = EvalTransform(size)
    episodes = EpisodeSampler(labels, WAY, SHOT, QUERY, seed).sample(settings.eval_episodes)
    arrays = (np.stack([e.support for e in episodes]), np.stack([e.query for e in episodes]))
    init = (trainer.weight.detach(), trainer.bias.detach())
    probe_start = time.perf_counter()  # as the workflow: the embedding batch measured on this device
    batch_size = inference_batch_size("auto", {"name": name, "width": settings.width, "image_size": size}, device)
    context.figure(f"  {name} {size}px inference batch size {batch_size} (probe {time.perf_counter() - probe_start:.1f} s)")

    def one_pass() -> tuple[float, float, int, np.ndarray]:
        sync(device)
        start = time.perf_counter()
        features, support, query = embed_episodes(encoder, images, arrays, transform,
                                                  inference_batch_size=batch_size, device=device)
        sync(device)
        embedded = time.perf_counter()
        accuracies = evaluate_episodes(features, (support, query), WAY, SHOT, QUERY, init=init,
                                       steps=UPDATE_STEP, lr=BASE_LR)  # returns numpy: synchronised
        return embedded - start, time.perf_counter() - embedded, len(features), accuracies

    with cudnn_benchmark(False):  # the evaluate rule runs in its own process, where nothing turns it on
        cold = one_pass()  # first pass: cuDNN plans, cuBLAS handles, allocator growth
        embed_s, adapt_s, distinct, accuracies = one_pass() if run.left() > 3 * sum(cold[:2]) else cold
    total_s = embed_s + adapt_s
    result = {"embed_ips": distinct / embed_s, "distinct": distinct, "embed_s": embed_s, "adapt_s": adapt_s,
              "batch_size": batch_size,
              "eval_total_s": total_s, "eval_eps": len(episodes) / total_s, "episodes": len(episodes)}
    context.figure(f"  {name} {size}px evaluation, {len(episodes)} episodes ({WAY}-way {SHOT}-shot {QUERY}-query, "
                   f"{UPDATE_STEP} steps, meta-learned init): embedding {distinct} distinct images at batch "
                   f"{batch_size} {embed_s:.2f} s ({result['embed_ips']:.0f} images/s), adapting {adapt_s:.2f} s, "
                   f"total {total_s:.2f} s = {result['eval_eps']:.0f} episodes/s (first, cold pass "
                   f"{sum(cold[:2]):.2f} s; mean accuracy {accuracies.mean():.3f}, chance level: random images)")
    return result


def bench_backbone(name: str, settings: Settings, run: Run, images: np.ndarray, labels: np.ndarray,
                   seed: int) -> None:
    figures = run.figures.setdefault(name, {})
    if run.left() < 10:
        run.skip(f"{name} throughput", f"{run.elapsed():.0f} s used of the {settings.deadline:.0f} s allowed")
        return
    figures.update(bench_pretrain(name, settings, run, images, seed))
    if run.left() < 8:
        run.skip(f"{name} meta-train and evaluation throughput", "out of time")
        return
    meta = bench_meta(name, settings, run, ArraySplit(images, labels), seed)
    trainer = meta.pop("trainer")
    figures.update(meta)
    if run.left() < 5:
        run.skip(f"{name} evaluation throughput", "out of time")
        return
    figures.update(bench_evaluation(name, settings, run, trainer, images, labels, seed))
    del trainer
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- 4. report
def markdown(settings: Settings, env: dict, run: Run) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    card = env["device"] + (f" ({env.get('memory')})" if "memory" in env else "")
    smoke = " (CPU SMOKE RUN: not GPU figures)" if settings.smoke else ""
    lines = [
        (f"**{card}**{smoke}, {stamp}: torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
         f"AMP {env['pipeline AMP dtype']}, width {settings.width:g}, synthetic uint8 images stored "
         f"{settings.stored_size}x{settings.stored_size}; host CPU {env['CPU']}. Command: `bash bench/gpu_check.sh"
         f"{' --cpu-smoke' if settings.smoke else ''}`."),
        "",
        (f"| backbone | input | pre-train images/s (batch {settings.pretrain_batch}, augment + step) "
         "| pre-train images/s (model step only) | pre-train peak memory | meta-train episodes/s "
         f"({WAY}-way {SHOT}-shot {QUERY}-query, {UPDATE_STEP} inner steps) | embedding images/s (probed batch) "
         f"| {settings.eval_episodes} eval episodes (embed + adapt) | eval episodes/s |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in settings.backbones:
        f = run.figures.get(name, {})
        eval_cell = (f"{f['eval_total_s']:.2f} s ({f['embed_s']:.2f} + {f['adapt_s']:.2f})"
                     if "eval_total_s" in f else "skipped")
        lines.append(f"| {name} | {f.get('size', '?')} | {cell(f, 'pretrain_ips', ',.0f')} "
                     f"| {cell(f, 'pretrain_model_ips', ',.0f')} | {cell(f, 'pretrain_peak_gib', 'gib')} "
                     f"| {cell(f, 'meta_eps', '.2f')} | {cell(f, 'embed_ips', ',.0f')} ({f.get('batch_size', '-')}) | {eval_cell} "
                     f"| {cell(f, 'eval_eps', ',.0f')} |")
    lines += [
        "",
        (f"| backbone | features fp32 rel. diff (tol {TOL['fp32_rel']:.0e}) | features AMP rel. diff "
         f"(tol {TOL['amp_rel']:.0e}) | meta gradient rel. err fp32 (tol {TOL['grad_rel']:.0e}) "
         "| meta gradient rel. err AMP (reported) | eval predictions flipped (1- + 5-shot) |"),
        "|---|---|---|---|---|---|",
    ]
    for name in settings.backbones:
        a = run.agreement.get(name, {})
        lines.append(f"| {name} | {cell(a, 'fp32_rel', '.1e', '-')} | {cell(a, 'amp_rel', '.1e', '-')} "
                     f"| {cell(a, 'grad_rel', '.1e', '-')} | {cell(a, 'grad_rel_amp', '.1e', '-')} "
                     f"| {cell(a, 'eval_flips', 'd', '-')} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny widths, sizes and iterations on the CPU: checks the script, not a GPU (< 60 s)")
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed iterations per measurement")
    parser.add_argument("--deadline", type=float, default=None, help="skip sections that start after this many s")
    parser.add_argument("--eval-episodes", type=int, default=None)
    parser.add_argument("--pretrain-batch", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def pick_device(smoke: bool) -> torch.device | None:
    if smoke:
        return torch.device("cpu")
    try:
        return select_device("cuda")
    except MTLError as exc:
        print(f"gpu_check: a CUDA device is needed and none is usable: {exc}\n"
              "Run this on a CUDA machine, or pass --cpu-smoke to check the script itself on the CPU.",
              file=sys.stderr)
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.cpu_smoke)
    if device is None:
        return 2
    settings = Settings.from_args(args, device)
    run = Run(settings.deadline)
    print("== Environment ==")
    env = describe_environment(settings)
    if settings.smoke:
        print("  NOTE: --cpu-smoke compares the CPU with itself and times tiny networks: it checks that this "
              "script runs, nothing about a GPU.")

    if not args.skip_agreement:
        print(f"\n== Agreement (CPU vs {device.type}, width {settings.width:g}, seed {args.seed}) ==", flush=True)
        for name in settings.backbones:
            if run.left() < 20:
                run.skip(f"{name} agreement", "out of time")
                continue
            started = time.perf_counter()
            check_agreement(name, settings, run, args.seed)
            print(f"  ({name} agreement: {time.perf_counter() - started:.1f} s)", flush=True)

    if not args.skip_throughput:
        print(f"\n== Throughput ({device.type}, synthetic data, width {settings.width:g}, AMP as the pipeline) ==",
              flush=True)
        n_images = settings.classes * settings.per_class
        started = time.perf_counter()
        images = synthetic_images(n_images, settings.stored_size, args.seed)
        labels = np.repeat(np.arange(settings.classes), settings.per_class)
        print(f"  synthetic split: {settings.classes} classes x {settings.per_class} uint8 "
              f"{settings.stored_size}x{settings.stored_size} images ({images.nbytes / 2**20:.0f} MiB, "
              f"{time.perf_counter() - started:.1f} s)", flush=True)
        for name in settings.backbones:
            started = time.perf_counter()
            bench_backbone(name, settings, run, images, labels, args.seed)
            print(f"  ({name} throughput: {time.perf_counter() - started:.1f} s)", flush=True)

    print("\n== Markdown for bench/RESULTS.md ==\n")
    print(markdown(settings, env, run))
    failed = [name for name, passed in run.checks if not passed]
    print(f"\n== Result ({run.elapsed():.0f} s) ==")
    if run.skipped:
        print(f"  skipped for time: {'; '.join(run.skipped)}")
    if failed:
        print(f"  {len(failed)} of {len(run.checks)} checks FAILED: " + "; ".join(failed))
        return 1
    print(f"  all {len(run.checks)} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
