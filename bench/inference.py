"""Inference (embedding) speed on this machine: batch size, cheap model rewrites, and the probe's cost.

    .venv/bin/python bench/inference.py                       # all three parts, resnet12 width 0.25, 84 px
    .venv/bin/python bench/inference.py --part sizes --images 1280
    .venv/bin/python bench/inference.py --part variants --width 1.0 --images 64
    .venv/bin/python bench/inference.py --part probe

Random 84x84 uint8 images, random-weight encoders with non-trivial BatchNorm statistics, eval
mode, CPU unless ``--device``. Every figure is printed with the machine and load beside it.

- sizes: images/s of `mtl.base_learner.embed` per batch size, in two orders (large to small,
  then small to large: warm-up and load drift show up as a disagreement), for the model `embed`
  runs now ("fast": `inference_copy`, i.e. scales and BN folded, channels_last) and for the plain
  eval-mode model it ran before ("plain": NCHW, BN as a layer), at the same sizes.
- variants: each rewrite alone and combined, at the probed batch size and at 256, interleaved
  over ``--reps`` rounds (best and median); max |difference| to the plain model's features.
  torch.inference_mode instead of no_grad; channels_last weights and input; BN folded into the
  convs (`fold_batchnorm`); both (what `embed` runs); TorchScript trace + freeze +
  optimize_for_inference (oneDNN conv+BN fusion; deprecated in torch 2.x).
- probe: wall time of `mtl.batching.inference_batch_size("auto", ...)` on a cache miss (builds
  the model, probes) and on a hit, the size it picks and the rates it saw, per model.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings

import context  # first: this checkout's mtl, and the machine beside every figure
import torch
from torch import nn

from mtl.batching import BatchSizeCache, inference_batch_size
from mtl.data.transforms import EvalTransform
from mtl.models import build_backbone, fold_batchnorm, inference_copy
from mtl.base_learner import embed

SIZES = (512, 256, 128, 80, 64, 32, 16, 8, 4)


def encoder_with_statistics(name: str, width: float, seed: int = 0) -> nn.Module:
    """A random encoder whose BN layers do something (a trained one's would): folding must show."""
    torch.manual_seed(seed)
    model = build_backbone(name, width=width)
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def plain_embed(model, images, transform, batch_size, device) -> torch.Tensor:
    """What `embed` did before: the eval-mode model as it is, NCHW input, under no_grad."""
    with torch.no_grad():
        return torch.cat([model(transform(images[s:s + batch_size], device=device)).float()
                          for s in range(0, len(images), batch_size)])


# ----------------------------------------------------------------------------- sizes
def part_sizes(args, encoder, images, transform, device) -> None:
    print(f"\n== sizes: images/s of embedding {len(images)} images, per batch size, two orders")
    plain = encoder.to(device).eval()
    runners = {"fast (embed now)": lambda bs: embed(encoder, images, transform, bs, device),
               "plain (embed before)": lambda bs: plain_embed(plain, images, transform, bs, device)}
    for label, run in runners.items():
        run(64)  # warm-up
        rates: dict[int, list[float]] = {size: [] for size in SIZES}
        for order in (SIZES, SIZES[::-1]):
            for size in order:
                start = time.perf_counter()
                run(size)
                rates[size].append(len(images) / (time.perf_counter() - start))
        line = " | ".join(f"{size}: {'/'.join(f'{r:.0f}' for r in rates[size])}" for size in SIZES)
        context.figure(f"{label}: images/s by batch size (large->small / small->large) {line}")


# ----------------------------------------------------------------------------- variants
def variants(encoder: nn.Module) -> dict:
    """name -> (model, grad mode, input memory format)."""
    nchw, nhwc = torch.contiguous_format, torch.channels_last
    folded = fold_batchnorm(copy.deepcopy(encoder).eval())
    cl = copy.deepcopy(encoder).to(memory_format=nhwc)
    return {
        "plain, no_grad (before)": (encoder, torch.no_grad, nchw),
        "inference_mode": (encoder, torch.inference_mode, nchw),
        "channels_last": (cl, torch.no_grad, nhwc),
        "BN folded": (folded, torch.no_grad, nchw),
        "BN folded + channels_last (embed now)": (inference_copy(encoder), torch.no_grad, nhwc),
        "BN folded + channels_last + inference_mode": (inference_copy(encoder), torch.inference_mode, nhwc),
        "TorchScript freeze + optimize_for_inference": (scripted(encoder), torch.no_grad, nchw),
    }


def scripted(encoder: nn.Module):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        example = torch.zeros(2, 3, 84, 84)
        return torch.jit.optimize_for_inference(torch.jit.trace(copy.deepcopy(encoder).eval(), example))


def forward_all(model, grad_mode, memory_format, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with grad_mode():
        return torch.cat([model(x[s:s + batch_size].contiguous(memory_format=memory_format)).float()
                          for s in range(0, len(x), batch_size)])


def part_variants(args, encoder, images, transform, device, batch_sizes) -> None:
    x = transform(images, device=device)
    table = variants(encoder.to(device))
    reference = forward_all(*table["plain, no_grad (before)"], x, batch_sizes[0])
    scale = float(reference.abs().max())
    print(f"\n== variants: {len(images)} pre-transformed images, {args.reps} interleaved rounds, max |feature| "
          f"{scale:.2f}")
    for name, spec in table.items():
        diff = float((forward_all(*spec, x, batch_sizes[0]) - reference).abs().max())
        print(f"  {name:<46s} max |diff| to plain {diff:.2e} ({diff / scale:.1e} of max |feature|)")
    for batch_size in batch_sizes:
        times: dict[str, list[float]] = {name: [] for name in table}
        for rnd in range(args.reps):
            for name in (list(table) if rnd % 2 == 0 else list(table)[::-1]):
                start = time.perf_counter()
                forward_all(*table[name], x, batch_size)
                times[name].append(time.perf_counter() - start)
        base = min(times["plain, no_grad (before)"])
        for name, seconds in times.items():
            context.figure(f"batch {batch_size:>3d} {name:<46s} {len(x) / min(seconds):7.0f} images/s best, "
                           f"{len(x) / statistics.median(seconds):7.0f} median, x{base / min(seconds):.2f} vs plain")


# ----------------------------------------------------------------------------- probe
def part_probe(args, device) -> None:
    print("\n== probe: inference_batch_size('auto') on a cache miss and on a hit")
    models = [("resnet12", args.width, 84), ("resnet12", 1.0, 84), ("resnet25", 1.0, 80)]
    for name, width, size in models:
        backbone = {"name": name, "width": width, "image_size": size}
        with tempfile.TemporaryDirectory() as cache_dir:
            start = time.perf_counter()
            chosen = inference_batch_size("auto", backbone, device, cache_dir=cache_dir)
            miss = time.perf_counter() - start
            start = time.perf_counter()
            inference_batch_size("auto", backbone, device, cache_dir=cache_dir)
            hit = time.perf_counter() - start
            (entry,) = BatchSizeCache(cache_dir).entries().values()
        rates = ", ".join(f"{s}: {r:.0f}" for s, r in entry["images_per_s"].items())
        context.figure(f"{name} width {width:g} {size} px: batch {chosen}; miss {miss:.2f} s, hit {1000 * hit:.1f} ms; "
                       f"images/s seen {rates}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("sizes", "variants", "probe", "all"), default="all")
    parser.add_argument("--backbone", default="resnet12")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--reps", type=int, default=3)
    context.add_device_options(parser)
    args = parser.parse_args()
    device = context.device_from(args)
    print(context.machine_line(device))
    size = 84
    print(f"setup: {args.backbone} width {args.width:g}, {size}x{size}, {args.images} random images")
    encoder = encoder_with_statistics(args.backbone, args.width).to(device)
    images = context.synthetic_images(args.images, size, seed=0)
    transform = EvalTransform(size)
    if args.part in ("sizes", "all"):
        part_sizes(args, encoder, images, transform, device)
    if args.part in ("variants", "all"):
        chosen = inference_batch_size("auto", {"name": args.backbone, "width": args.width, "image_size": size}, device)
        context.figure(f"probed batch size {chosen}")
        part_variants(args, encoder, images, transform, device, sorted({chosen, 256}))
    if args.part in ("probe", "all"):
        part_probe(args, device)
    print(context.machine_line())


if __name__ == "__main__":
    main()
