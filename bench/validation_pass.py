"""One validation pass: batched evaluation (embed each image once) vs the per-episode protocol.

Synthetic split (16 classes x 600 images, 84x84, like miniImageNet's val split), resnet12 at a
reduced width (default 0.25: the full width is ~16x the CPU time), 600 5-way 1-shot 15-query
episodes, fresh linear learner (100 SGD steps, lr 0.01) per episode, as in pre-train validation.

- batched: `mtl.base_learner.evaluate_encoder` -- embed the distinct images used by any episode
  once, then adapt all 600 learners together (`evaluate_episodes`).
- per-episode (reference protocol): for each episode read its 80 images, embed them, adapt one
  learner with autograd (100 steps). Its cost is linear in the number of episodes, so on a CPU
  it is timed on the first ``--baseline-episodes`` episodes and scaled to 600 (stated in the output).

Both embed with the same fast model (`inference_copy`: scales and BN folded, channels_last) and
the same batch size (``--batch-size``, default ``auto``: measured by `mtl.batching`, as the
workflow does, and printed), so the ratio measures embedding each image once and adapting all
learners together, not the model preparation. ``--baseline reference`` times the per-episode
protocol as the reference code runs it (and as this bench did before issue 13): the eval-mode
model as it is, one batch per episode.

Run: .venv/bin/python bench/validation_pass.py [--width 0.25] [--baseline-episodes 100] [--device cpu]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import context  # first: this checkout's mtl, and the machine beside every figure
import numpy as np
import torch
import torch.nn.functional as F

from mtl.batching import inference_batch_size
from mtl.data.episodes import EpisodeSampler, EpisodeSet
from mtl.data.hdf5 import HDF5Split
from mtl.data.transforms import EvalTransform
from mtl.device import autocast
from mtl.models import build_backbone, inference_copy
from mtl.base_learner import embed_batch, evaluate_encoder


def per_episode_protocol(encoder, split, support: np.ndarray, query: np.ndarray, transform, device, count: int,
                         way: int, *, batch_size: int | None, seed: int = 0, steps: int = 100,
                         lr: float = 0.01) -> np.ndarray:
    """The straightforward protocol: each episode reads and embeds its own images and adapts its
    own fresh learner with autograd. Fresh weights come from a generator seeded like the batched
    path's, drawn episode after episode, so episode e starts from the same learner in both.
    ``batch_size``: embed with the batched path's fast model (`inference_copy`) in batches of that
    size; None: as the reference code, the eval-mode model as it is, one batch per episode.
    Shared with bench/evaluate.py."""
    generator = torch.Generator().manual_seed(seed)
    s_t = torch.arange(way, device=device).repeat_interleave(support.shape[1] // way)
    q_t = torch.arange(way, device=device).repeat_interleave(query.shape[1] // way)
    accs = []
    model = encoder.eval() if batch_size is None else inference_copy(encoder)
    for e in range(count):
        rows = np.concatenate([support[e], query[e]])
        if batch_size is None:
            with torch.no_grad(), autocast(device):
                feats = model(transform(split.get_images(rows), device=device)).float()
        else:
            feats = torch.cat([embed_batch(model, split.get_images(rows[start:start + batch_size]), transform, device)
                               for start in range(0, len(rows), batch_size)])
        s_feats, q_feats = feats[: len(s_t)], feats[len(s_t):]
        weight = torch.nn.init.kaiming_normal_(torch.empty(way, feats.shape[1]), generator=generator)
        weight = weight.to(device).requires_grad_()
        bias = torch.zeros(way, device=device, requires_grad=True)
        for _ in range(steps):
            loss = F.cross_entropy(F.linear(s_feats, weight, bias), s_t)
            grad_w, grad_b = torch.autograd.grad(loss, (weight, bias))
            weight = (weight - lr * grad_w).detach().requires_grad_()
            bias = (bias - lr * grad_b).detach().requires_grad_()
        with torch.no_grad():
            accs.append((F.linear(q_feats, weight, bias).argmax(1) == q_t).float().mean().item())
    return np.array(accs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--baseline-episodes", type=int, default=100)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--per-class", type=int, default=600)
    context.add_device_options(parser)
    parser.add_argument("--batch-size", default="auto", help="embedding batch: auto (probe, as the workflow) or N")
    parser.add_argument("--baseline", choices=("same", "reference"), default="same",
                        help="per-episode protocol with the batched path's model and batch, or as the reference")
    args = parser.parse_args()
    device = context.device_from(args)
    way, shot, query, size = 5, 1, 15, 84
    print(context.machine_line(device))
    probe_start = time.perf_counter()
    batch_size = inference_batch_size(args.batch_size, {"name": "resnet12", "width": args.width, "image_size": size}, device)
    context.figure(f"inference batch size {batch_size} ({args.batch_size}; "
                   f"chosen in {time.perf_counter() - probe_start:.1f} s, not part of the timings below)")
    base_batch = batch_size if args.baseline == "same" else None
    torch.manual_seed(0)
    encoder = build_backbone("resnet12", width=args.width).to(device).eval()
    transform = EvalTransform(size)
    with tempfile.TemporaryDirectory() as tmp:
        split = HDF5Split(context.write_synthetic_split(Path(tmp) / "val.h5", args.classes * args.per_class,
                                                        args.classes, size))
        sampler = EpisodeSampler(split.labels, way, shot, query, seed=1)
        episodes = EpisodeSet.from_episodes(sampler.sample(args.episodes))
        distinct = len(np.unique(np.concatenate([episodes.support.ravel(), episodes.query.ravel()])))

        # warm-up (kernel selection, allocator), not timed
        per_episode_protocol(encoder, split, episodes.support, episodes.query, transform, device, 2, way,
                             batch_size=base_batch)
        batched, t_batched = context.timed(lambda: evaluate_encoder(
            encoder, split, episodes, transform, way, shot, query, inference_batch_size=batch_size, device=device,
            generator=torch.Generator().manual_seed(0)), device)
        n_base = min(args.baseline_episodes, args.episodes)
        baseline, t_base = context.timed(lambda: per_episode_protocol(
            encoder, split, episodes.support, episodes.query, transform, device, n_base, way, batch_size=base_batch),
            device)
        split.close()
    t_base_full = t_base * args.episodes / n_base
    diff = np.abs(batched[:n_base] - baseline).max()
    print(f"setup: resnet12 width {args.width} (out_dim {encoder.out_dim}), {size}x{size}, "
          f"{args.classes} classes x {args.per_class} images, {args.episodes} episodes {way}-way {shot}-shot "
          f"{query}-query, 100 SGD steps lr 0.01, embedding batch {batch_size}")
    context.figure(f"batched (embed {distinct} distinct images once + adapt all): {t_batched:.1f} s, "
                   f"mean acc {batched.mean():.4f}")
    context.figure(f"per-episode protocol, {args.baseline} model and batch "
                   f"({args.episodes * way * (shot + query)} image embeddings): {t_base:.1f} s "
                   f"for {n_base} episodes -> {t_base_full:.1f} s for {args.episodes}"
                   + (" (extrapolated linearly)" if n_base < args.episodes else ""))
    context.figure(f"speed-up: {t_base_full / t_batched:.1f}x at batch {batch_size}; "
                   f"max |acc difference| on the {n_base} common episodes: {diff:.2e}")


if __name__ == "__main__":
    main()
