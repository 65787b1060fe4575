"""Console commands for people outside Snakemake (``[project.scripts]`` in pyproject.toml).

``mtl-predict``: classify a folder of images with exported models (one file, several seeds' files,
or a folder of them), adapting to a folder of labelled support images::

    mtl-predict --model results/models/digits/resnet12/mtl/5shot/ \\
                --support my_support/ --query my_query/ --out predictions.csv
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mtl.errors import MTLError


def predict_main(argv: list[str] | None = None) -> int:
    from mtl.predict import NONE_OF_THESE

    parser = argparse.ArgumentParser(
        prog="mtl-predict",
        description="Classify the images of a query folder with exported few-shot models, adapted to a support "
                    "folder of labelled class folders (support/<class>/<images>). Several models (the seeds of "
                    "one method) are averaged: a seed ensemble.")
    parser.add_argument("--model", required=True, action="append",
                        help="an exported model file, or a folder of them (seed*.pt); repeat for more")
    parser.add_argument("--support", required=True, help="folder of class folders holding labelled images")
    parser.add_argument("--query", required=True, help="flat folder of images to classify")
    parser.add_argument("--out", required=True, help="CSV to write: one row per query image")
    parser.add_argument("--device", default="auto", help="auto (CUDA when visible), cuda or cpu (default: auto)")
    parser.add_argument("--batch-size", default="auto",
                        help="images per forward pass: auto (measured once per machine, model and image size, "
                             "then read from the cache folder) or an integer")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()),
                        help="where auto keeps its measurements (default: %(default)s; $MTL_INFERENCE_CACHE, "
                             "when set, replaces it)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--unknown", type=float, default=None, metavar="THRESHOLD",
                        help=f"report a query whose support similarity (-1..1) is below THRESHOLD as '{NONE_OF_THESE}' "
                             "(docs/prediction.md; default: off, every query gets its most probable class)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        written = run_prediction(args.model, args.support, args.query, args.out, device=args.device,
                                 inference_batch=args.batch_size, threads=args.threads, cache_dir=args.cache_dir,
                                 unknown=args.unknown)
    except MTLError as error:  # a message the user can act on, not a traceback
        print(f"mtl-predict: {error}", file=sys.stderr)
        return 2
    print(f"mtl-predict: wrote {written}")
    return 0


def default_cache_dir() -> Path:
    """The per-user folder of ``mtl-predict``'s inference batch-size measurements (the workflow keeps
    its own in results/.cache)."""
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mtl-fewshot")) / "inference"


def run_prediction(models, support, query, out, *, device="auto", inference_batch="auto", threads=None,
                   cache_dir=None, expected_backbone=None, unknown=None):
    """Load the models, predict, write the CSV atomically; returns its path.

    ``device``, ``inference_batch`` ("auto" or an integer), ``threads``, ``cache_dir``: the job's
    opening, as the workflow's (:func:`mtl.jobs.open_gpu_job`), for the models' own backbone.
    ``unknown``: the threshold past which a query is reported as none of the support classes
    (:meth:`mtl.predict.SeedEnsemble.predict`); None: off.
    """
    from mtl.jobs import open_gpu_job
    from mtl.predict import load_models, write_predictions

    ensemble = load_models(models, expected_backbone=expected_backbone)
    first = ensemble.models[0]
    backbone = {**first.info["backbone"], "image_size": first.image_size}
    with open_gpu_job(threads=threads, device=device, inference_batch=inference_batch, backbone=backbone,
                      cache_dir=cache_dir) as job:
        write_predictions(ensemble, support, query, out, inference_batch_size=job.inference_batch_size,
                          device=job.device, unknown=unknown)
    return out


if __name__ == "__main__":
    sys.exit(predict_main())
