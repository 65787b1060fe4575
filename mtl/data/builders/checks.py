"""Checks and helpers every builder shares: class order, published counts, raw files, attributes."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mtl.data.download import read_sha256_record
from mtl.data.sources import DatasetSource, SplitFacts
from mtl.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def class_order(names_per_image: np.ndarray | list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Sorted class names, each image's label in that order, and the row order that makes classes contiguous.

    ``order[j]`` is the source index of output row ``j``; the sort is stable, so images of a class
    keep their source order.
    """
    class_names, labels = np.unique(np.asarray(names_per_image, dtype=object).astype(str), return_inverse=True)
    labels = labels.astype(np.int64).reshape(-1)
    order = np.argsort(labels, kind="stable")
    return [str(n) for n in class_names], labels, order


def check_counts(
    dataset: str,
    split: str,
    labels: np.ndarray,
    num_classes: int,
    expected: SplitFacts,
    source: Path | str,
    *,
    strict: bool,
    per_class: int | None = None,
) -> None:
    """Compare what a split holds with the published figures; raise (strict) or warn (subset).

    ``per_class`` additionally requires every class to hold exactly that many images (FC100 and
    miniImageNet are balanced; tieredImageNet is not).
    """
    per_class_counts = np.bincount(labels, minlength=num_classes) if len(labels) else np.zeros(0, int)
    ok = num_classes == expected.classes and len(labels) == expected.images
    if per_class is not None and len(per_class_counts):
        ok = ok and bool((per_class_counts == per_class).all())
    if ok:
        return
    want = (
        f"{expected.classes} classes x {per_class} images ({expected.images:,})"
        if per_class is not None
        else f"{expected.classes} classes and {expected.images:,} images"
    )
    spread = (
        f" ({per_class_counts.min():,} to {per_class_counts.max():,} per class)" if len(per_class_counts) else ""
    )
    found = f"{num_classes} classes and {len(labels):,} images{spread}"
    message = f"{dataset} split '{split}': expected {want}, found {found} in {source}."
    if strict:
        raise DataError(
            message + " The raw file is incomplete or not the published one: delete it and download it "
            f"again. If you meant to use a subset, set data.{dataset}.strict_counts: false in config.yaml."
        )
    log.warning("%s Continuing because strict_counts is false.", message)


def source_files(source: DatasetSource | None, paths: Iterable[Path]) -> dict[str, str | None]:
    """Raw file name -> SHA-256 for the HDF5 ``source_files`` attribute: the registry's digest,
    else the one the download step recorded beside the file, else None (not recomputed: the
    tieredImageNet pickles are 13 GB)."""
    registry = {f.name: f for f in source.files} if source is not None else {}
    digests = {}
    for path in paths:
        remote = registry.get(path.name)
        digests[path.name] = (remote.sha256 if remote else None) or read_sha256_record(path)
    return digests


def split_attrs(dataset: str, split: str, files: dict[str, str | None], **extra) -> dict:
    return {"dataset": dataset, "split": split, "source_files": files, **extra}


def require_file(path: Path, dataset: str) -> Path:
    """Fail early, naming the file and the fix, when a raw file the builder needs is missing."""
    if not path.is_file():
        raise DataError(
            f"{dataset}: raw file {path} not found. Run the workflow's download step for "
            f"{dataset}, or place the file there by hand."
        )
    return path


def check_native_size(dataset: str, image_size: int | None, native: int) -> None:
    """Fixed-format datasets are stored at their native size; resizing is the transforms' job."""
    if image_size not in (None, native):
        raise ConfigError(
            f"data.{dataset}.image_size is {image_size}, but {dataset} is stored at its native "
            f"{native}x{native}; remove the key (the backbone's image_size resizes at load time)."
        )

