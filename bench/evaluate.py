"""Meta-test cost: `mtl.evaluate.evaluate` (batched) vs the per-episode protocol, and vs one embedding pass.

    .venv/bin/python bench/evaluate.py                          # both parts, resnet12 width 0.25, CPU
    .venv/bin/python bench/evaluate.py --part 1 --baseline-episodes 100 --repeats 3
    .venv/bin/python bench/evaluate.py --part 2 --big-episodes 2000   # quick look at part 2
    .venv/bin/python bench/evaluate.py --batch-size 256         # a fixed embedding batch instead of the probe

Synthetic split: 20 classes x 600 random 84x84 images (miniImageNet's test split shape), written
with `write_split` to a temporary folder; a pre-trained-style encoder file (`save_encoder`, random
resnet12 weights at a reduced width: the full width is ~16x the conv cost on a CPU); episode files
drawn with `write_test_episodes` (5-way 1-shot 15-query, seed 1), as the `episodes` rule does.

Part 1, 600 episodes: `evaluate("ft", ...)` (embed each used image once, adapt all 600 fresh
learners together, 100 SGD steps lr 0.01) vs the per-episode protocol (per episode: read its 80
images from the HDF5 file, embed them, adapt one learner with a 100-step autograd SGD loop). The
per-episode cost is linear in the number of episodes, so it is timed on the first
``--baseline-episodes`` episodes and scaled; both draw the fresh learners from the same generator
(seeded with the episode seed, as `evaluate` does), so their per-episode accuracies must agree.
Both embed with the same fast model and batch size (``--batch-size``, default ``auto``: chosen by
`mtl.batching` as the workflow does, and printed), so the ratio measures the batched design alone;
``--baseline reference`` times the per-episode protocol as the reference code runs it (and as this
bench did before issue 13: the eval-mode model as it is, one batch of 80 per episode).
``--repeats`` alternates the two timings that many times (load on a shared machine moves both)
and reports every ratio and their median.

Part 2, ``--big-episodes`` (10,000) episodes: embedding every image of the split once with
`mtl.base_learner.embed` (the same HDF5 read path and batch size as `evaluate`), then the full
`evaluate("ft", ...)`; the target is evaluate <= 1.3x the embedding pass. Each `evaluate` call is
profiled by wrapping the functions it calls (library code is not changed), so the report shows
where its non-embedding time goes; the 10,000-episode sampling (`write_test_episodes`, the
`episodes` rule, not part of `evaluate`) is timed too.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import context  # first: this checkout's mtl, and the machine beside every figure
import numpy as np
import torch

import mtl.evaluate
import mtl.base_learner
import mtl.learners.base
import mtl.learners.linear
from mtl.batching import inference_batch_size
from mtl.data.episodes import load_episodes, write_test_episodes
from mtl.data.hdf5 import HDF5Split
from mtl.data.transforms import DEFAULT_MEAN, DEFAULT_STD, EvalTransform
from mtl.models import build_backbone, load_encoder, save_encoder
from validation_pass import per_episode_protocol  # bench/ is on sys.path when run as a script

WAY, SHOT, QUERY, SIZE, SEED = 5, 1, 15, 84, 1
STEPS, LR = 100, 0.01

# What `evaluate` calls, wrapped to time it: (owner, attribute, label). Nested: embed_episodes
# contains embed, which contains get_images; _fit_and_score (the learner adapting a chunk of
# episodes and scoring its queries) contains adapt_linear and fresh_init.
PROFILED = (
    (mtl.evaluate, "load_for_method", "load model"),
    (mtl.evaluate, "load_episodes", "load + check episode file (sha256)"),
    (mtl.learners.base, "embed_episodes", "embed_episodes"),
    (mtl.base_learner, "embed", "  embed (read + transform + forward)"),
    (HDF5Split, "get_images", "    HDF5 reads"),
    (mtl.learners.base, "_fit_and_score", "adapt all episodes, score their queries"),
    (mtl.learners.linear, "adapt_linear", "  adapt_linear (100 SGD steps, all episodes)"),
    (mtl.learners.linear, "fresh_init", "    fresh_init (kaiming draws, one per episode)"),
    (mtl.evaluate, "calibration_report", "calibration (ECE, NLL)"),
    (mtl.evaluate, "write_episode_results", "write episodes.csv + metrics.json"),
)


# ----------------------------------------------------------------------------- setup
def encoder_file(path: Path, width: float) -> Path:
    """A pre-trained-encoder file as the `pretrain` rule writes it (random weights: cost, not accuracy)."""
    torch.manual_seed(0)
    backbone = build_backbone("resnet12", width=width)
    normalize = {"mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)}
    return save_encoder(backbone, path, image_size=SIZE, normalize=normalize, epoch=0, val_acc=0.0)


# ----------------------------------------------------------------------------- timing
def timed(fn, device: torch.device):
    """(result, seconds, (load average before, after)): the load moves both variants' timings."""
    load_before = os.getloadavg()[0]
    out, seconds = context.timed(fn, device)
    return out, seconds, (load_before, os.getloadavg()[0])


@contextlib.contextmanager
def profiled_calls(targets=PROFILED):
    """Wrap the listed functions to add up their wall time per label; restore them afterwards."""
    totals: dict[str, float] = defaultdict(float)
    saved = []

    def wrap(fn, label):
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - start
        return timed_call

    try:
        for owner, name, label in targets:
            original = owner.__dict__[name]
            saved.append((owner, name, original))
            setattr(owner, name, wrap(original, label))
        yield totals
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def run_evaluate(model: Path, split_path: Path, episodes: Path, out_dir: Path, device: torch.device,
                 batch_size: int):
    """`evaluate("ft", ...)` as the `evaluate` rule calls it, profiled; (accuracies, seconds, load, profile)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "episodes.csv"
    with profiled_calls() as profile:
        _, seconds, load = timed(lambda: mtl.evaluate.evaluate(
            "ft", model, split_path, episodes, episodes_out=csv, metrics_out=out_dir / "metrics.json",
            protocol={"dataset": "bench", "backbone": "resnet12", "seed": SEED}, ft_steps=STEPS, ft_lr=LR,
            inference_batch_size=batch_size, device=str(device)), device)
    accuracies = np.loadtxt(csv, delimiter=",", skiprows=1)[:, 1]
    return accuracies, seconds, load, dict(profile)




# ----------------------------------------------------------------------------- parts
def warm_up(encoder, split: HDF5Split, transform, device: torch.device, batch_size: int) -> None:
    """Two untimed batches (kernel selection, allocator), of evaluate's embedding batch size."""
    mtl.base_learner.embed(encoder, split, transform, batch_size, device,
                            indices=np.arange(min(2 * batch_size, len(split))))


def part1(args, tmp: Path, split_path: Path, model: Path, device: torch.device, batch_size: int) -> None:
    episodes_path = write_test_episodes(split_path, tmp / "episodes600.npz", way=WAY, shot=SHOT, query=QUERY,
                                        count=args.episodes, seed=SEED)
    eps = load_episodes(episodes_path)
    distinct = len(np.unique(np.concatenate([eps.support.ravel(), eps.query.ravel()])))
    encoder = load_encoder(model).to(device).eval()
    transform = EvalTransform(SIZE)
    split = HDF5Split(split_path)
    warm_up(encoder, split, transform, device, batch_size)
    base_batch = batch_size if args.baseline == "same" else None
    per_episode_protocol(encoder, split, eps.support, eps.query, transform, device, 2, WAY, seed=SEED,
                         batch_size=base_batch)  # warm-up
    n_base = min(args.baseline_episodes, args.episodes)
    embeddings = args.episodes * WAY * (SHOT + QUERY)
    print(f"\n== part 1: {args.episodes} episodes, batched evaluate vs per-episode protocol ({args.baseline} "
          f"model and batch), embedding batch {batch_size}, {args.repeats} alternating repeat(s)")
    speedups = []
    for repeat in range(1, args.repeats + 1):
        batched, t_batched, load_b, profile = run_evaluate(model, split_path, episodes_path, tmp / "part1", device,
                                                           batch_size)
        baseline, t_base, load_p = timed(lambda: per_episode_protocol(
            encoder, split, eps.support, eps.query, transform, device, n_base, WAY, seed=SEED, steps=STEPS, lr=LR,
            batch_size=base_batch), device)
        t_base_full = t_base * args.episodes / n_base
        diff = float(np.abs(batched[:n_base] - baseline).max())
        print(f"-- repeat {repeat}")
        context.figure(f"batched `evaluate('ft')` (embeds {distinct} distinct images once, adapts all "
                       f"{args.episodes} learners): {t_batched:.1f} s (load {load_b[0]:.1f} -> {load_b[1]:.1f}), "
                       f"mean acc {batched.mean():.4f}")
        print_profile(profile, t_batched)
        context.figure(f"per-episode protocol ({embeddings} embeddings): {t_base:.1f} s for {n_base} episodes "
                       f"({t_base / n_base:.3f} s/episode, load {load_p[0]:.1f} -> {load_p[1]:.1f})"
                       + (f" -> {t_base_full:.1f} s for {args.episodes} (scaled x{args.episodes / n_base:g})"
                          if n_base < args.episodes else ""))
        speedups.append(t_base_full / t_batched)
        context.figure(f"speed-up {speedups[-1]:.2f}x at batch {batch_size}; max |acc difference| on the "
                       f"{n_base} common episodes: {diff:.2e}")
    split.close()
    print(f"embeddings: {embeddings} -> {distinct} ({embeddings / distinct:.2f}x fewer)")
    median = float(np.median(speedups))
    context.figure(f"speed-up at batch {batch_size}: {', '.join(f'{s:.2f}x' for s in speedups)}; median {median:.2f}x "
                   f"(target >= 3.5x: {'met' if median >= 3.5 else 'NOT met'})")


def part2(args, tmp: Path, split_path: Path, model: Path, device: torch.device, batch_size: int) -> None:
    episodes_path, t_sample, _ = timed(lambda: write_test_episodes(
        split_path, tmp / "episodes_big.npz", way=WAY, shot=SHOT, query=QUERY, count=args.big_episodes,
        seed=SEED), device)
    encoder = load_encoder(model).to(device).eval()
    split = HDF5Split(split_path)
    transform = EvalTransform(SIZE)
    warm_up(encoder, split, transform, device, batch_size)
    feats, t_embed, load_e = timed(lambda: mtl.base_learner.embed(
        encoder, split, transform, batch_size, device, indices=np.arange(len(split))), device)
    split.close()
    accs, t_eval, load_v, profile = run_evaluate(model, split_path, episodes_path, tmp / "part2", device, batch_size)
    ratio = t_eval / t_embed
    print(f"\n== part 2: {args.big_episodes} episodes vs one embedding pass over the split, embedding batch "
          f"{batch_size}")
    context.figure(f"sampling {args.big_episodes} episodes (`write_test_episodes`, the episodes rule; "
                   f"not in evaluate): {t_sample:.2f} s")
    context.figure(f"embed the split once ({len(split)} images, `embed`, batch {batch_size}): {t_embed:.1f} s "
                   f"({len(split) / t_embed:.0f} images/s, load {load_e[0]:.1f} -> {load_e[1]:.1f})")
    context.figure(f"`evaluate('ft')` on {args.big_episodes} episodes: {t_eval:.1f} s (load {load_v[0]:.1f} -> "
                   f"{load_v[1]:.1f}), mean acc {accs.mean():.4f}")
    print_profile(profile, t_eval)
    non_embed = t_eval - profile.get("  embed (read + transform + forward)", 0.0)
    context.figure(f"ratio evaluate / embedding pass: {ratio:.3f}x (target <= 1.3x: "
                   f"{'met' if ratio <= 1.3 else 'NOT met'}); non-embedding part of evaluate {non_embed:.2f} s = "
                   f"{non_embed / t_embed:.3f}x of the embedding pass (same-run view, immune to load changes "
                   f"between the two timings: 1 + that = {1 + non_embed / t_embed:.3f}x)")
    del feats


def print_profile(profile: dict, total: float) -> None:
    print("  where evaluate's time goes (wrapped calls, nested labels indented):")
    for _, _, label in PROFILED:
        if label in profile:
            print(f"    {label:<52s} {profile[label]:8.2f} s {100 * profile[label] / total:6.1f}%")
    top = sum(v for k, v in profile.items() if not k.startswith(" "))
    rest = total - top
    print(f"    {'rest (open split, device, protocol dict)':<52s} {rest:8.2f} s {100 * rest / total:6.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("1", "2", "both"), default="both")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--episodes", type=int, default=600, help="part 1 episodes")
    parser.add_argument("--baseline-episodes", type=int, default=100, help="part 1 per-episode prefix timed")
    parser.add_argument("--repeats", type=int, default=2, help="part 1: alternating timings of both variants")
    parser.add_argument("--batch-size", default="auto", help="embedding batch: auto (probe, as the workflow) or N")
    parser.add_argument("--baseline", choices=("same", "reference"), default="same",
                        help="part 1: per-episode protocol with the batched path's model and batch, or as the reference")
    parser.add_argument("--big-episodes", type=int, default=10_000, help="part 2 episodes")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=600)
    context.add_device_options(parser)
    args = parser.parse_args()
    device = context.device_from(args)
    began = time.perf_counter()
    print(context.machine_line(device))
    print(f"setup: resnet12 width {args.width}, {SIZE}x{SIZE}, {args.classes} classes x {args.per_class} images, "
          f"{WAY}-way {SHOT}-shot {QUERY}-query, seed {SEED}, fresh learner {STEPS} SGD steps lr {LR}")
    probe_start = time.perf_counter()
    batch_size = inference_batch_size(args.batch_size, {"name": "resnet12", "width": args.width, "image_size": SIZE}, device)
    context.figure(f"inference batch size {batch_size} ({args.batch_size}; chosen in "
                   f"{time.perf_counter() - probe_start:.1f} s, not part of the timings below)")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        split_path = context.write_synthetic_split(tmp / "test.h5", args.classes * args.per_class, args.classes, SIZE)
        model = encoder_file(tmp / "encoder.pt", args.width)
        if args.part in ("1", "both"):
            part1(args, tmp, split_path, model, device, batch_size)
        if args.part in ("2", "both"):
            part2(args, tmp, split_path, model, device, batch_size)
    print(f"\ntotal bench wall time {time.perf_counter() - began:.0f} s, load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
