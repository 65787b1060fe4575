"""miniImageNet (Ravi & Larochelle split) from the ``mini-imagenet-cache-{split}.pkl`` pickles.

Each pickle is ``{'image_data': uint8 (N, 84, 84, 3), 'class_dict': {wnid: [row, ...]}}``. Classes
are written in sorted-wnid order, each class's rows in ``class_dict`` order, one class at a time
(so the extra memory beyond the loaded pickle is one class).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mtl.data.builders.checks import (
    check_counts,
    check_native_size,
    require_file,
    source_files,
    split_attrs,
)
from mtl.data.hdf5 import write_split
from mtl.data.safe_pickle import safe_load
from mtl.data.sources import MINIIMAGENET, SPLITS
from mtl.errors import DataError

log = logging.getLogger(__name__)

NATIVE_SIZE = 84
IMAGES_PER_CLASS = 600


def build(raw_dir: Path, out_dir: Path, *, strict_counts: bool = True, image_size: int | None = None) -> dict[str, Path]:
    """Write ``out_dir/{train,val,test}.h5`` from the three cache pickles in ``raw_dir``."""
    check_native_size(MINIIMAGENET.name, image_size, NATIVE_SIZE)
    outputs = {}
    for split in SPLITS:
        path = require_file(Path(raw_dir) / MINIIMAGENET.facts["split_files"][split], MINIIMAGENET.name)
        images, class_rows = read_cache(path)
        wnids = sorted(class_rows)
        check_wnids(split, wnids, path, strict_counts)
        labels = np.repeat(np.arange(len(wnids), dtype=np.int64), [len(class_rows[w]) for w in wnids])
        check_counts(
            MINIIMAGENET.name, split, labels, len(wnids), MINIIMAGENET.splits[split], path,
            strict=strict_counts, per_class=IMAGES_PER_CLASS,
        )
        outputs[split] = write_split(
            Path(out_dir) / f"{split}.h5",
            _class_blocks(images, class_rows, wnids),
            labels,
            wnids,
            split_attrs(MINIIMAGENET.name, split, source_files(MINIIMAGENET, [path])),
        )
        del images
    return outputs


def read_cache(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Load one cache pickle and check its structure: every row belongs to exactly one class."""
    cache = safe_load(path)
    if not isinstance(cache, dict) or not {"image_data", "class_dict"} <= set(_keys(cache)):
        found = sorted(_keys(cache)) if isinstance(cache, dict) else type(cache).__name__
        raise DataError(
            f"{path}: expected a dict with keys 'image_data' and 'class_dict', found {found}. "
            "This is not a mini-imagenet-cache pickle: delete it and download it again."
        )
    cache = {_text(k): v for k, v in cache.items()}
    images = cache["image_data"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        seen = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"{path}: expected 'image_data' uint8 (N, 84, 84, 3), found {seen}. Download the file again.")
    class_rows = {_text(w): np.asarray(rows, dtype=np.int64).reshape(-1) for w, rows in cache["class_dict"].items()}
    all_rows = np.concatenate(list(class_rows.values())) if class_rows else np.zeros(0, np.int64)
    covered = np.bincount(all_rows[(all_rows >= 0) & (all_rows < len(images))], minlength=len(images))
    if len(all_rows) != len(images) or len(covered) != len(images) or not (covered == 1).all():
        raise DataError(
            f"{path}: 'class_dict' should assign each of the {len(images):,} images in 'image_data' to "
            f"exactly one class; it lists {len(all_rows):,} rows, {(covered == 0).sum():,} images have no "
            "class. The pickle is inconsistent: delete it and download it again."
        )
    return images, class_rows


def check_wnids(split: str, wnids: list[str], path: Path, strict: bool) -> None:
    """val/test must hold exactly the Ravi & Larochelle classes (the train list is not in the registry)."""
    published = MINIIMAGENET.facts["wnids"].get(split)
    if published is None or wnids == sorted(published):
        return
    unexpected, missing = sorted(set(wnids) - set(published)), sorted(set(published) - set(wnids))
    message = (
        f"miniimagenet split '{split}': expected the {len(published)} Ravi & Larochelle classes, found "
        f"{len(wnids)} in {path} ({len(unexpected)} unexpected, e.g. {unexpected[:3]}; {len(missing)} "
        f"missing, e.g. {missing[:3]})."
    )
    if strict:
        raise DataError(
            message + " Check that the file is the right split's pickle, or download it again. If you "
            "meant to use other classes, set data.miniimagenet.strict_counts: false in config.yaml."
        )
    log.warning("%s Continuing because strict_counts is false.", message)


def _class_blocks(images: np.ndarray, class_rows: dict[str, np.ndarray], wnids: list[str]) -> Iterator[np.ndarray]:
    for wnid in wnids:
        yield images[class_rows[wnid]]


def _keys(obj: dict) -> list[str]:
    return [_text(k) for k in obj]


def _text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)
