"""Test-time fine-tuning cost (ablation arms ft_last, ft_all): seconds per episode and SGD step of
`mtl.learners.finetune.adapt_on_support` for several chunk sizes (episodes adapted together with torch.func),
and the same step as a plain per-episode autograd loop.

    .venv/bin/python bench/finetune.py                         # the ablation demo's shape
    .venv/bin/python bench/finetune.py --size 84 --way 5 --shot 1 --width 0.25

Random weights and inputs (cost, not accuracy). Each figure is the best of ``--repeats`` runs of
``--steps`` steps after one warm-up call; "per episode-step" = time / (steps x episodes). An arm's
evaluation costs about 100 (its steps) x test episodes x this figure, plus the embedding.
"""
from __future__ import annotations

import argparse
import time

import context  # first: this checkout's mtl, and the machine beside every figure
import torch
import torch.nn.functional as F

from mtl.learners.finetune import adapt_on_support
from mtl.models import build_backbone
from mtl.base_learner import fresh_init


def batched(encoder, scope, inputs, targets, way, steps) -> float:
    weight, bias = fresh_init(len(inputs), way, encoder.out_dim)
    started = time.perf_counter()
    adapt_on_support(encoder, scope, inputs, targets, weight, bias, steps=steps, lr=0.01, encoder_lr=0.01)
    return time.perf_counter() - started


def loop(encoder, scope, inputs, targets, way, steps) -> float:
    """One episode, autograd SGD on the same parameters (the straightforward way)."""
    params = list((encoder if scope == "all" else encoder.last_stage()).parameters())
    head = encoder if scope == "all" else encoder.forward_head
    weight = torch.zeros(way, encoder.out_dim, requires_grad=True)
    started = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(head(inputs[0]) @ weight.T, targets)
        torch.autograd.grad(loss, params + [weight])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--way", type=int, default=3)
    parser.add_argument("--shot", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(context.machine_line())
    print(f"resnet12 width {args.width}, {args.size} px, {args.way}-way {args.shot}-shot, {args.steps} steps")
    encoder = build_backbone("resnet12", width=args.width).eval()
    support = args.way * args.shot
    targets = torch.arange(args.way).repeat_interleave(args.shot)
    for scope in ("last", "all"):
        for chunk in args.chunks:
            images = torch.randn(chunk, support, 3, args.size, args.size)
            with torch.no_grad():
                inputs = images if scope == "all" else encoder.forward_trunk(images.flatten(0, 1)).unflatten(
                    0, (chunk, support))
            batched(encoder, scope, inputs, targets, args.way, 1)  # warm-up
            best = min(batched(encoder, scope, inputs, targets, args.way, args.steps) for _ in range(args.repeats))
            context.figure(f"{scope:4s} batched, chunk {chunk:3d}: {1000 * best / (args.steps * chunk):7.2f} ms per episode-step")
        best = min(loop(encoder, scope, inputs, targets, args.way, args.steps) for _ in range(args.repeats))
        context.figure(f"{scope:4s} per-episode autograd loop:  {1000 * best / args.steps:7.2f} ms per episode-step")


if __name__ == "__main__":
    main()
