"""FC100 from the CIFAR-100 python tarball (Oreshkin et al., TADAM split by superclass).

CIFAR-100 ships 500 train + 100 test images per fine class; FC100 pools both (600 per class)
and splits the 100 fine classes by their 20 superclasses into 60/20/20. The pickles are read
straight out of the tarball (nothing extracted to disk) with the allow-list unpickler.
"""
from __future__ import annotations

import logging
import tarfile
import zlib
from pathlib import Path

import numpy as np

from mtl.data.builders.checks import (
    check_counts,
    check_native_size,
    class_order,
    require_file,
    source_files,
    split_attrs,
)
from mtl.data.hdf5 import write_split
from mtl.data.safe_pickle import safe_load
from mtl.data.sources import FC100, SPLITS
from mtl.errors import DataError

log = logging.getLogger(__name__)

MEMBER_DIR = "cifar-100-python"
NATIVE_SIZE = 32


def build(raw_dir: Path, out_dir: Path, *, strict_counts: bool = True, image_size: int | None = None) -> dict[str, Path]:
    """Write ``out_dir/{train,val,test}.h5`` for FC100 from ``raw_dir/cifar-100-python.tar.gz``."""
    check_native_size(FC100.name, image_size, NATIVE_SIZE)
    tar_path = require_file(Path(raw_dir) / FC100.files[0].name, FC100.name)
    meta, pooled = read_cifar100(tar_path)
    fine_names = meta["fine_label_names"]
    fine_to_coarse = fine_to_coarse_map(pooled["fine_labels"], pooled["coarse_labels"], tar_path)
    attrs_files = source_files(FC100, [tar_path])
    outputs = {}
    for split in SPLITS:
        fine_ids = split_fine_ids(split, fine_to_coarse, tar_path, strict_counts)
        rows = np.flatnonzero(np.isin(pooled["fine_labels"], fine_ids))  # train rows first, then test
        names, labels, order = class_order(np.asarray(fine_names, dtype=object)[pooled["fine_labels"][rows]])
        check_counts(
            FC100.name, split, labels, len(names), FC100.splits[split], tar_path,
            strict=strict_counts, per_class=FC100.facts["images_per_class"],
        )
        images = planar_to_hwc(pooled["data"][rows[order]])
        outputs[split] = write_split(
            Path(out_dir) / f"{split}.h5", images, labels[order], names,
            split_attrs(FC100.name, split, attrs_files),
        )
    return outputs


def read_cifar100(tar_path: Path) -> tuple[dict, dict]:
    """The ``meta`` member and the ``train`` + ``test`` members pooled (train rows first)."""
    try:
        with tarfile.open(tar_path, "r:gz") as tar:
            meta = _load_member(tar, "meta", tar_path)
            batches = [_load_member(tar, name, tar_path) for name in ("train", "test")]
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise DataError(
            f"Cannot read {tar_path} as a gzip tarball ({type(err).__name__}: {err}). "
            "The download is truncated or corrupt: delete it and download it again."
        ) from err
    for key in ("fine_label_names", "coarse_label_names"):
        _require_keys(meta, [key], tar_path, "meta")
        meta[key] = [_text(name) for name in meta[key]]
    pooled = {
        "data": np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]),
        "fine_labels": np.concatenate([np.asarray(b["fine_labels"], dtype=np.int64) for b in batches]),
        "coarse_labels": np.concatenate([np.asarray(b["coarse_labels"], dtype=np.int64) for b in batches]),
    }
    n = len(pooled["data"])
    if pooled["data"].shape != (n, 3 * NATIVE_SIZE * NATIVE_SIZE) or not (
        len(pooled["fine_labels"]) == len(pooled["coarse_labels"]) == n
    ):
        raise DataError(
            f"{tar_path}: expected 'data' uint8 (N, 3072) with N fine and coarse labels, found data "
            f"{pooled['data'].shape}, {len(pooled['fine_labels'])} fine and {len(pooled['coarse_labels'])} "
            "coarse labels. This is not the CIFAR-100 python tarball: delete it and download it again."
        )
    if n and pooled["fine_labels"].max() >= len(meta["fine_label_names"]):
        raise DataError(
            f"{tar_path}: fine label {pooled['fine_labels'].max()} has no name (meta lists "
            f"{len(meta['fine_label_names'])}). The archive is inconsistent: download it again."
        )
    return meta, pooled


def _load_member(tar: tarfile.TarFile, name: str, tar_path: Path) -> dict:
    member = f"{MEMBER_DIR}/{name}"
    try:
        fileobj = tar.extractfile(member)
    except KeyError:
        fileobj = None
    if fileobj is None:
        raise DataError(
            f"{tar_path} has no member '{member}'; expected {MEMBER_DIR}/{{train,test,meta}}, found "
            f"{sorted(tar.getnames())[:8]}. This is not the CIFAR-100 python tarball: download it again."
        )
    try:
        with fileobj:
            obj = safe_load(fileobj, encoding="latin1")
    except DataError as err:
        raise DataError(f"{tar_path}, member '{member}': {err}") from err
    if not isinstance(obj, dict):
        raise DataError(f"{tar_path}, member '{member}': expected a dict, found {type(obj).__name__}.")
    batch = {_text(key): value for key, value in obj.items()}  # Python-2 str keys may arrive as bytes
    if name != "meta":
        _require_keys(batch, ["data", "fine_labels", "coarse_labels"], tar_path, member)
    return batch


def _require_keys(obj: dict, keys: list[str], tar_path: Path, member: str) -> None:
    missing = [key for key in keys if key not in obj]
    if missing:
        raise DataError(
            f"{tar_path}, member '{member}': missing key(s) {missing}; found {sorted(obj)}. "
            "This is not the CIFAR-100 python tarball: delete it and download it again."
        )


def _text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def fine_to_coarse_map(fine: np.ndarray, coarse: np.ndarray, tar_path: Path) -> dict[int, int]:
    """Each fine class's superclass, read from the images; a fine class under two superclasses is an error."""
    pairs = np.unique(np.stack([fine, coarse], axis=1), axis=0)
    mapping: dict[int, int] = {}
    for f, c in pairs.tolist():
        if f in mapping:
            raise DataError(
                f"{tar_path}: fine class {f} appears under superclasses {mapping[f]} and {c}; "
                "CIFAR-100 maps each fine class to one superclass. Download the archive again."
            )
        mapping[f] = c
    return mapping


def split_fine_ids(split: str, fine_to_coarse: dict[int, int], tar_path: Path, strict: bool) -> np.ndarray:
    """Fine ids whose superclass belongs to ``split``, cross-checked against the registry's list."""
    supers = set(FC100.facts["superclasses"][split])
    found = sorted(f for f, c in fine_to_coarse.items() if c in supers)
    published = FC100.facts["fine_ids"].get(split)
    if published is not None and found != sorted(published):
        unexpected = sorted(set(found) - set(published))
        if unexpected or strict:
            raise DataError(
                f"fc100 split '{split}': superclasses {sorted(supers)} should hold fine ids "
                f"{sorted(published)}, found {found} in {tar_path}. The label metadata is not "
                "CIFAR-100's: delete the file and download it again."
                + ("" if unexpected else " If you meant to use a subset, set data.fc100.strict_counts: false in config.yaml.")
            )
        log.warning("fc100 split '%s': %d of %d fine classes present in %s", split, len(found), len(published), tar_path)
    return np.asarray(found, dtype=np.int64)


def planar_to_hwc(data: np.ndarray) -> np.ndarray:
    """CIFAR rows are 1024 R, then G, then B values of a 32x32 image -> (N, 32, 32, 3) contiguous."""
    return np.ascontiguousarray(data.reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE).transpose(0, 2, 3, 1))
