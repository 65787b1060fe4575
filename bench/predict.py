"""Prediction speed: query images per second of `mtl.predict`, one seed and the 3-seed ensemble,
against the embedding passes the same images need (the floor: what any predictor must spend).

    .venv/bin/python bench/predict.py                          # 10,000 queries, resnet12 w0.25, 84 px
    .venv/bin/python bench/predict.py --images 2000 --method ft --from-files

Goal (issue 17): 10,000 query images cost no more than 1.3x the embedding passes they need, i.e.
the support set is embedded once per seed and the queries go through in probed batches, with
little on top. Random weights and images (cost, not accuracy); each figure is the best of
``--repeats`` runs. ``--from-files`` also times the same queries written as PNG files (decoding
included), the way `snakemake predict` reads them.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import context  # first: this checkout's mtl, and the machine beside every figure
import numpy as np
import torch

from mtl.batching import inference_batch_size
from mtl.data.user_images import SupportSet
from mtl.io import atomic_torch_save
from mtl.model_file import export_model
from mtl.models import build_backbone, save_encoder
from mtl.predict import load_models
from mtl.base_learner import embed

NORMALIZE = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def model_files(folder: Path, method: str, seeds: int, width: float, size: int, way: int) -> list[Path]:
    """Exported files of ``method`` for ``seeds`` seeds, each with its own random weights."""
    files = []
    for seed in range(1, seeds + 1):
        torch.manual_seed(seed)
        encoder = build_backbone("resnet12", width=width)
        trained = folder / f"trained{seed}.pt"
        if method.startswith("mtl"):
            atomic_torch_save({"backbone": encoder.config, "state_dict": encoder.state_dict(),
                               "learner": {"weight": torch.randn(way, encoder.out_dim) * 0.01,
                                           "bias": torch.zeros(way)},
                               "image_size": size, "normalize": NORMALIZE,
                               "inner": {"update_step": 100, "base_lr": 0.01}}, trained)
        else:
            save_encoder(encoder, trained, image_size=size, normalize=NORMALIZE)
        files.append(export_model(method, trained, folder / f"seed{seed}.pt", trained_on="bench", seed=seed,
                                  shot=5, way=way, data_sha256={}, stored_image_size=size, config={},
                                  commit="bench"))
    return files


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="query images")
    parser.add_argument("--method", default="mtl", help="ft, lr, proto, mtl, ... (ft_last/ft_all adapt per image set)")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--size", type=int, default=84)
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shot", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", default="auto", help="auto (probed, not cached) or an integer")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--from-files", action="store_true", help="also time the queries read from PNG files")
    context.add_device_options(parser)
    args = parser.parse_args()
    device = context.device_from(args)
    print(context.machine_line())
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    support = SupportSet(rng.integers(0, 256, (args.way * args.shot, args.size, args.size, 3), dtype=np.uint8),
                         np.repeat(np.arange(args.way), args.shot), [f"class{c}" for c in range(args.way)], [])
    batch = inference_batch_size(args.batch_size, {"name": "resnet12", "width": args.width, "image_size": args.size},
                                 device)
    print(f"resnet12 width {args.width:g}, {args.size} px, {args.method}, {args.way}-way {args.shot}-shot support, "
          f"{args.images:,} query images, batch {batch}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = model_files(folder, args.method, args.seeds, args.width, args.size, args.way)
        for count in (1, args.seeds):
            ensemble = load_models(files[:count])
            for model in ensemble.models:  # embed() runs the encoder where it is: put it on the device
                model.backbone.to(device)
            both = np.concatenate([support.images, queries])
            floor = best_of(args.repeats, lambda: [embed(m.backbone, both, m.transform, batch, device)
                                                   for m in ensemble.models])
            spent = best_of(args.repeats, lambda: ensemble.predict(support, queries, inference_batch_size=batch,
                                                                   device=device))
            context.figure(f"{count} seed(s): predict {spent:.1f} s ({args.images / spent:,.0f} query images/s); "
                           f"embedding passes alone {floor:.1f} s; ratio {spent / floor:.2f}x (goal <= 1.3x)")
        if args.from_files:
            from PIL import Image

            query_dir = folder / "query"
            query_dir.mkdir()
            for k, image in enumerate(queries):
                Image.fromarray(image).save(query_dir / f"{k:05d}.png")
            spent = best_of(args.repeats, lambda: ensemble.predict(support, query_dir, inference_batch_size=batch,
                                                                   device=device))
            context.figure(f"{args.seeds} seed(s), queries decoded from PNG files: {spent:.1f} s "
                           f"({args.images / spent:,.0f} query images/s)")


if __name__ == "__main__":
    main()
