"""GPU throughput of the pipeline's stages on one CUDA device, in under 5 minutes.

    bash bench/gpu_check.sh                           # the agreement tests (tests/gpu), then this bench
    python bench/gpu_throughput.py                    # this bench alone, on a CUDA machine
    python bench/gpu_throughput.py --backbones resnet12
    python bench/gpu_throughput.py --cpu-smoke        # tiny run on the CPU: checks this script, not a GPU

Whether the GPU computes what the CPU does is a test, not a bench: tests/gpu (pytest marker
``gpu``). This bench measures, on synthetic images (random uint8, stored 84x84 like miniImageNet),
both backbones at width 1 and their native sizes, AMP as the pipeline uses it, synchronised timing
after warm-up:

1. Environment: torch / CUDA / cuDNN versions, the card, its capability, bf16 support, the AMP dtype the
   pipeline picks (``mtl.device.autocast_dtype``), CUDA_VISIBLE_DEVICES.
2. Throughput:
   - pre-train: PretrainClassifier (64 classes) SGD step at batch 128, as ``pretrain._fit_one_epoch``
     does it (on-device augmentation, autocast forward, fp32 loss, GradScaler, Nesterov SGD); also the
     model step alone on a ready batch; cudnn.benchmark on, as pre-training sets it;
   - meta-train: ``mtl.train.meta.train_epoch`` with a ``MetaTrainer`` (5-way 1-shot 15-query,
     update_step 100, first-order, reference augmentation) on an in-memory split, as ``meta_train``
     runs it with a split small enough to load into RAM;
   - evaluation: ``embed_episodes`` (scales folded, eval BN, autocast) of a 20 x 600 split for 600
     5-way 1-shot 15-query episodes, then ``evaluate_episodes`` with the meta-learned init (100 steps);
     run twice, the second (warm) pass reported, the first (cold) time printed beside it.
3. A Markdown table to paste into bench/RESULTS.md, naming the card.

Each timed section stops at a time budget (``--budget``) and the whole run skips what would not fit
before ``--deadline`` seconds, so the wrapper's time limit is not hit on an H100-class card.
Exit status: 0, or 2 when no CUDA device is usable (without ``--cpu-smoke``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import math
import sys
import time

import context  # this checkout's mtl, and the machine beside every figure
import numpy as np
import torch
import torch.nn.functional as F

try:
    from mtl.batching import inference_batch_size
    from mtl.data.episodes import EpisodeSampler
    from mtl.data.transforms import DEFAULT_MEAN, DEFAULT_STD, EvalTransform, TrainTransform
    from mtl.device import autocast, autocast_dtype, grad_scaler, select_device
    from mtl.errors import MTLError
    from mtl.models import PretrainClassifier, build_backbone, fold_scales
    from mtl.base_learner import embed_episodes, evaluate_episodes
    from mtl.train.meta import MetaConfig, MetaTrainer, train_epoch
except ImportError as exc:  # e.g. h5py or tqdm missing on a bare GPU machine
    sys.exit(f"gpu_throughput: cannot import the mtl library ({exc}); install the project's requirements "
             f"(`pip install -e .` in the repo root, or envs/mtl.yaml) with {sys.executable} and rerun.")

BACKBONES = ("resnet12", "resnet25")
WAY, SHOT, QUERY = 5, 1, 15
UPDATE_STEP, BASE_LR = 100, 0.01  # meta.update_step / meta.base_lr defaults
PRETRAIN_CLASSES = 64  # miniImageNet's meta-train classes


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
    pretrain_batch: int = 128  # pretrain.batch_size
    eval_episodes: int = 600  # protocol.test_episodes
    budget: float = 8.0  # seconds of timed iterations per throughput measurement
    warmup: int = 3  # untimed iterations first (cuDNN plans, autotuning, allocator)
    max_iters: int = 50
    deadline: float = 260.0  # seconds after start: later sections are skipped

    @classmethod
    def from_args(cls, args, device: torch.device) -> Settings:
        settings = cls(device=device, smoke=args.cpu_smoke, backbones=tuple(args.backbones))
        if args.cpu_smoke:
            settings = dataclasses.replace(settings, width=0.125, size=32, stored_size=40, per_class=20,
                                           pretrain_batch=8, eval_episodes=30, budget=0.3, warmup=1,
                                           max_iters=1, deadline=55.0)
        for name in ("budget", "deadline", "eval_episodes", "pretrain_batch"):
            if getattr(args, name) is not None:
                settings = dataclasses.replace(settings, **{name: getattr(args, name)})
        return settings

    def image_size(self, backbone) -> int:
        return int(self.size or backbone.native_size)


class Run:
    """Collects the figures, and knows how much time is left."""

    def __init__(self, deadline: float):
        self.started = time.perf_counter()
        self.deadline = deadline
        self.figures: dict[str, dict] = {}
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.deadline - self.elapsed()

    def skip(self, name: str, why: str) -> None:
        self.skipped.append(name)
        print(f"  SKIP  {name}: {why}", flush=True)


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    """cuDNN autotuning as the pipeline stage under test has it (pre-train on, the others off)."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


class ArraySplit:
    """An in-memory split with HDF5Split's reading interface (``HDF5Split(in_memory=True)`` does the same
    numpy fancy indexing), so ``train_epoch`` runs without writing an HDF5 file."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def get_images(self, indices) -> np.ndarray:
        return self.images[np.asarray(indices)]


def gib(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f} GiB"


# ----------------------------------------------------------------------------- 1. environment
def describe_environment(settings: Settings) -> dict:
    device = settings.device
    env = context.environment(device)
    dtype = autocast_dtype(device)
    env["pipeline AMP dtype"] = str(dtype).replace("torch.", "") if dtype is not None else "none (fp32 on CPU)"
    env["TF32 defaults (matmul, cudnn)"] = (f"{torch.backends.cuda.matmul.allow_tf32}, "
                                           f"{torch.backends.cudnn.allow_tf32}")
    for key, value in env.items():
        print(f"  {key}: {value}")
    return env


# ----------------------------------------------------------------------------- 2. throughput
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
        step_s, n_full = context.seconds_per_iteration(
            lambda n: [full_step() for _ in range(n)], device, warmup=settings.warmup, budget=budget,
            max_iters=settings.max_iters, min_iters=min(2, settings.max_iters))
        model_s, n_model = context.seconds_per_iteration(
            lambda n: [model_step(ready_x, ready_y) for _ in range(n)], device, warmup=1, budget=budget,
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
        seconds, steps = context.seconds_per_iteration(  # one epoch of n episodes: n steps
            epoch, device, warmup=min(2, settings.warmup), budget=budget, max_iters=settings.max_iters,
            min_iters=min(2, settings.max_iters))
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
        (features, support, query), embed_s = context.timed(lambda: embed_episodes(
            encoder, images, arrays, transform, inference_batch_size=batch_size, device=device), device)
        accuracies, adapt_s = context.timed(lambda: evaluate_episodes(
            features, (support, query), WAY, SHOT, QUERY, init=init, steps=UPDATE_STEP, lr=BASE_LR), device)
        return embed_s, adapt_s, len(features), accuracies

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


# ----------------------------------------------------------------------------- 3. report
def markdown(settings: Settings, env: dict, run: Run) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    card = env["device"] + (f" ({env.get('memory')})" if "memory" in env else "")
    smoke = " (CPU SMOKE RUN: not GPU figures)" if settings.smoke else ""
    columns = ["backbone", "input", f"pre-train images/s (batch {settings.pretrain_batch}, augment + step)",
               "pre-train images/s (model step only)", "pre-train peak memory",
               f"meta-train episodes/s ({WAY}-way {SHOT}-shot {QUERY}-query, {UPDATE_STEP} inner steps)",
               "embedding images/s (probed batch)", f"{settings.eval_episodes} eval episodes (embed + adapt)",
               "eval episodes/s"]
    rows = []
    for name in settings.backbones:
        f = run.figures.get(name, {})
        rows.append([name, f.get("size", "?"), context.cell(f, "pretrain_ips", ",.0f"),
                     context.cell(f, "pretrain_model_ips", ",.0f"),
                     gib(f["pretrain_peak_gib"]) if "pretrain_peak_gib" in f else "skipped",
                     context.cell(f, "meta_eps", ".2f"),
                     f"{context.cell(f, 'embed_ips', ',.0f')} ({f.get('batch_size', '-')})",
                     (f"{f['eval_total_s']:.2f} s ({f['embed_s']:.2f} + {f['adapt_s']:.2f})"
                      if "eval_total_s" in f else "skipped"),
                     context.cell(f, "eval_eps", ",.0f")])
    return "\n".join([
        (f"**{card}**{smoke}, {stamp}: torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
         f"AMP {env['pipeline AMP dtype']}, width {settings.width:g}, synthetic uint8 images stored "
         f"{settings.stored_size}x{settings.stored_size}; host CPU {env['CPU']}. Command: "
         f"`python bench/gpu_throughput.py{' --cpu-smoke' if settings.smoke else ''}`."),
        "",
        context.markdown_table(columns, rows),
    ])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny widths, sizes and iterations on the CPU: checks the script, not a GPU (< 60 s)")
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
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
        print(f"gpu_throughput: a CUDA device is needed and none is usable: {exc}\n"
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
        print("  NOTE: --cpu-smoke times tiny networks on the CPU: it checks that this script runs, nothing "
              "about a GPU.")

    print(f"\n== Throughput ({device.type}, synthetic data, width {settings.width:g}, AMP as the pipeline) ==",
          flush=True)
    n_images = settings.classes * settings.per_class
    images, seconds = context.timed(lambda: context.synthetic_images(n_images, settings.stored_size, args.seed))
    labels = np.repeat(np.arange(settings.classes), settings.per_class)
    print(f"  synthetic split: {settings.classes} classes x {settings.per_class} uint8 "
          f"{settings.stored_size}x{settings.stored_size} images ({images.nbytes / 2**20:.0f} MiB, "
          f"{seconds:.1f} s)", flush=True)
    for name in settings.backbones:
        started = time.perf_counter()
        bench_backbone(name, settings, run, images, labels, args.seed)
        print(f"  ({name} throughput: {time.perf_counter() - started:.1f} s)", flush=True)

    print("\n== Markdown for bench/RESULTS.md ==\n")
    print(markdown(settings, env, run))
    print(f"\n== Done ({run.elapsed():.0f} s) ==")
    if run.skipped:
        print(f"  skipped for time: {'; '.join(run.skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
