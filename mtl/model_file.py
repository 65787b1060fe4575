"""The exported model: one self-contained file per trained (dataset, method, shot, seed).

The workflow's own files (``encoder.pt`` of pre-training, ``model.pt`` of meta-training) hold
what training needs; using a model on new images needs more: how the method adapts at test time,
the normalisation and image size, and what the model is (its data, config, code version). An
exported file holds all of it and loads without this repository's config::

    {"backbone": {"name", "width"}, "state_dict": plain weights (scales folded),
     "format": "mtl-fewshot model", "format_version": 2,
     "method", "test_time": {"learner", "finetune", "steps", "lr", "encoder_lr", "logistic"},
     "temperature", "calibration": {"episodes", "ece", "nll", "accuracy", ...} (from the in-domain test run),
     "learner": {"weight", "bias"} (meta-trained methods only), "way", "shot", "seed",
     "trained_on", "image_size", "stored_image_size", "normalize", "data_sha256": {"train", "val"},
     "config", "version", "commit", "val_acc", "epoch"}

``image_size`` is the network's input side; ``stored_image_size`` the side the training images
were stored at (new images are resized to it first, as the dataset's were when it was built).
``test_time`` is :func:`mtl.learners.learner_settings` of the method; :func:`mtl.learners.learner_for`
builds the learner from it. ``temperature`` turns the learner's scores into calibrated
probabilities (:mod:`mtl.learners.calibration`); format 1 files had none and read as 1.
Everything is plain data, so :func:`read_model_file` loads with ``torch.load(weights_only=True)``
like every file of this project: no code runs from a model file.
"""
from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

import torch

from mtl.errors import CheckpointError
from mtl.learners import learner_settings
from mtl.methods import META_LEARNED, get_method
from mtl.models.backbone import Backbone
from mtl.models.encoder_io import (
    ENCODER_PRODUCER,
    MODEL_PRODUCER,
    check_expected_backbone,
    load_encoder_file,
    save_encoder,
    stored_backbone_config,
)

log = logging.getLogger(__name__)

FORMAT = "mtl-fewshot model"
FORMAT_VERSION = 2
#: What an exported file records about its run's calibration and test scores (metrics.json keys).
CALIBRATION_KEYS = ("calibration_episodes", "accuracy", "ci95", "ece", "nll", "ece_uncalibrated", "nll_uncalibrated",
                    "episodes", "episodes_file")
EXPORT_PRODUCER = "the `export_model` rule (results/models/<dataset>/<backbone>/<method>/<shot>shot/seed<N>.pt)"


def export_model(method: str, trained_path, out_path, *, trained_on: str, seed: int, shot: int, way: int,
                 data_sha256: Mapping[str, str | None], stored_image_size: int, config: Mapping,
                 metrics: Mapping | None = None, commit: str | None = None) -> Path:
    """Write the exported file of ``method`` from its trained file (``encoder.pt`` or ``model.pt``).

    ``data_sha256``: content hashes of the training splits (from their HDF5 files);
    ``stored_image_size``: the side of the training images as stored; ``config``: the settings the
    model was trained and is used with (backbone, protocol, pretrain, meta, the dataset entry);
    ``metrics``: the run's in-domain metrics.json, whose ``temperature`` the model predicts with
    (None: temperature 1, uncalibrated).
    """
    from mtl import __version__

    entry = get_method(method)
    if metrics is not None:
        _check_same_run(metrics, method=method, seed=int(seed), shot=int(shot), dataset=str(trained_on))
    encoder, info = load_encoder_file(trained_path, producer=MODEL_PRODUCER if entry.meta_trained
                                      else ENCODER_PRODUCER)
    extra = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "method": method,
        "test_time": learner_settings(method, info),
        "temperature": float(metrics.get("temperature", 1.0)) if metrics else 1.0,  # older metrics: uncalibrated
        "calibration": {key: _plain(metrics[key]) for key in CALIBRATION_KEYS if key in metrics} if metrics else {},
        "way": int(way), "shot": int(shot), "seed": int(seed), "trained_on": str(trained_on),
        "image_size": int(info["image_size"]), "stored_image_size": int(stored_image_size),
        "normalize": {"mean": [float(v) for v in info["normalize"]["mean"]],
                      "std": [float(v) for v in info["normalize"]["std"]]},
        "data_sha256": {str(k): (None if v is None else str(v)) for k, v in data_sha256.items()},
        "config": _plain(config), "version": __version__, "commit": commit or source_commit(),
        "val_acc": float(info.get("val_acc", float("nan"))), "epoch": int(info.get("epoch", 0)),
    }
    if entry.test_time.learner == META_LEARNED:
        extra["learner"] = {"weight": info["learner"]["weight"].float(), "bias": info["learner"]["bias"].float()}
    return save_encoder(encoder.eval(), out_path, **extra)


def _check_same_run(metrics: Mapping, **run) -> None:
    """The metrics an exported file takes its temperature from must be its own run's (in-domain)."""
    differing = {key: (metrics.get(key), value) for key, value in run.items() if metrics.get(key) != value}
    if metrics.get("trained_on", metrics.get("dataset")) != run["dataset"]:
        differing["trained_on"] = (metrics.get("trained_on"), run["dataset"])
    if differing:
        raise CheckpointError("the metrics given to export_model are another run's: "
                              + ", ".join(f"{key} {got!r} instead of {want!r}" for key, (got, want) in differing.items()))


def read_model_file(path, *, expected_backbone: Mapping | None = None,
                    map_location="cpu") -> tuple[Backbone, dict]:
    """The backbone (plain form, eval mode) and the entries of an exported file.

    Refuses, naming the file: a file that is not an exported model (a training checkpoint, an
    encoder), a newer format than this code reads, and, when ``expected_backbone`` ({"name",
    "width"}) is given, a file made for another backbone.
    """
    path = Path(path)
    backbone, info = load_encoder_file(path, map_location=map_location, producer=EXPORT_PRODUCER)
    if info.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an exported model (no 'format: {FORMAT}' entry; a workflow-internal encoder.pt or "
            f"model.pt?). Exported models are written by {EXPORT_PRODUCER}: run `snakemake` to make them.")
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has model format version {version!r}, newer than the version {FORMAT_VERSION} this "
            "mtl-fewshot reads: upgrade mtl-fewshot (pip install -U mtl-fewshot) to load it.")
    if expected_backbone is not None:
        check_expected_backbone(stored_backbone_config(info, path), expected_backbone, path)
    info.setdefault("temperature", 1.0)  # format 1: uncalibrated scores
    return backbone.eval(), info


def source_commit(folder: str | os.PathLike | None = None) -> str:
    """The git commit of this code (``+dirty`` with uncommitted changes), or ``unknown`` outside git."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}+dirty" if dirty else commit


def _plain(value):
    """Config values as plain Python data (Snakemake hands over its own mapping/list types)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def peek_model_file(path) -> dict:
    """The entries of an exported file without reading its weights (memory-mapped), for choosing
    among many files cheaply."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # corrupt, truncated, or not a zip-format torch file
        raise CheckpointError(f"cannot read {path} ({type(error).__name__}); it is written by {EXPORT_PRODUCER}: "
                              "delete it and rerun the workflow") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an exported model; they are written by {EXPORT_PRODUCER}")
    return {key: value for key, value in payload.items() if key != "state_dict"}
