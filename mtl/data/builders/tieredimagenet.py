"""tieredImageNet (Ren et al. 2018) from ``{split}_images_png.pkl`` + ``{split}_labels.pkl``.

The image pickles are Python-2 lists of PNG files (1-D uint8 arrays), 448,695 of them for train:
~9.5 GB once decoded, so nothing here ever holds a split in memory. The labels are small and read
first, which fixes every image's output row (classes in sorted-name order, file order within a
class). The PNG payloads are then streamed out of the pickle in file order and decoded in chunks:

* if the file order already is the output order, decoded chunks go straight to the HDF5 writer;
* otherwise each decoded chunk is written to its rows of a temporary raw pixel file beside the
  output (``pwrite``, not a memory map, so it never counts as resident memory), and that file is
  then streamed to the HDF5 writer in row order and deleted.

Peak memory is one chunk of decoded images plus one PNG, whatever the split size (measured in
``bench/RESULTS.md``); the temporary file needs as much disk as the split's pixels.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mtl.data.builders.checks import (
    check_counts,
    check_native_size,
    class_order,
    require_file,
    source_files,
    split_attrs,
)
from mtl.data.hdf5 import write_split
from mtl.data.safe_pickle import iter_pickled_bytes, safe_load
from mtl.data.sources import SPLITS, TIEREDIMAGENET
from mtl.errors import DataError

log = logging.getLogger(__name__)

NATIVE_SIZE = 84
CHUNK = 2048  # images decoded before they are written: 2048 x 84 x 84 x 3 = 43 MB


def build(
    raw_dir: Path,
    out_dir: Path,
    *,
    strict_counts: bool = True,
    image_size: int | None = None,
    chunk_size: int = CHUNK,
) -> dict[str, Path]:
    """Write ``out_dir/{train,val,test}.h5`` from the six tieredImageNet pickles in ``raw_dir``."""
    check_native_size(TIEREDIMAGENET.name, image_size, NATIVE_SIZE)
    outputs = {}
    for split in SPLITS:
        names = TIEREDIMAGENET.facts["split_files"][split]
        image_file = require_file(Path(raw_dir) / names["images"], TIEREDIMAGENET.name)
        label_file = require_file(Path(raw_dir) / names["labels"], TIEREDIMAGENET.name)
        outputs[split] = build_split(
            split, image_file, label_file, Path(out_dir) / f"{split}.h5",
            strict_counts=strict_counts, chunk_size=chunk_size,
        )
    return outputs


def build_split(
    split: str, image_file: Path, label_file: Path, out_path: Path, *, strict_counts: bool, chunk_size: int = CHUNK
) -> Path:
    class_names, labels, order = read_labels(label_file)
    check_counts(
        TIEREDIMAGENET.name, split, labels, len(class_names), TIEREDIMAGENET.splits[split], label_file,
        strict=strict_counts,
    )
    attrs = split_attrs(TIEREDIMAGENET.name, split, source_files(TIEREDIMAGENET, [image_file, label_file]))
    decoded = decode_chunks(image_file, len(labels), chunk_size, desc=f"decode {split}")
    sorted_labels = labels[order]
    if np.array_equal(order, np.arange(len(order))):  # file order is output order: no reordering
        return write_split(out_path, (chunk for _, chunk in decoded), sorted_labels, class_names, attrs)
    row_of = np.empty_like(order)
    row_of[order] = np.arange(len(order))  # source index -> output row
    with _pixel_file(out_path, len(labels)) as pixels:
        for start, chunk in decoded:
            pixels.write_rows(row_of[start:start + len(chunk)], chunk)
        return write_split(out_path, pixels.read_in_order(chunk_size), sorted_labels, class_names, attrs, progress=True)


def read_labels(label_file: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Class names (sorted), per-image labels in that order, and the stable row order by class."""
    record = safe_load(label_file)
    if isinstance(record, dict):
        record = {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in record.items()}
    if not isinstance(record, dict) or not {"label_specific", "label_specific_str"} <= set(record):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(
            f"{label_file}: expected a dict with 'label_specific' and 'label_specific_str' (tieredImageNet "
            f"labels pickle), found {found}. Delete the file and download it again."
        )
    specific = np.asarray(record["label_specific"]).reshape(-1)
    names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in record["label_specific_str"]]
    if specific.size and (
        not np.issubdtype(specific.dtype, np.integer) or specific.min() < 0 or specific.max() >= len(names)
    ):
        raise DataError(
            f"{label_file}: 'label_specific' must index 'label_specific_str' ({len(names)} names); found "
            f"{specific.dtype} values {specific.min()}..{specific.max()}. Download the file again."
        )
    return class_order(np.asarray(names, dtype=object)[specific])


def decode_chunks(image_file: Path, expected: int, chunk_size: int, desc: str) -> Iterator[tuple[int, np.ndarray]]:
    """(first source index, uint8 (B, 84, 84, 3)) chunks decoded from the PNGs in file order."""
    shape = (NATIVE_SIZE, NATIVE_SIZE, 3)
    chunk_size = min(chunk_size, max(expected, 1))
    chunk, filled, seen = np.empty((chunk_size, *shape), dtype=np.uint8), 0, 0
    with tqdm(total=expected, desc=desc, unit="img", disable=None) as bar:
        for payload in iter_pickled_bytes(image_file):
            if seen >= expected:
                raise DataError(
                    f"{image_file} holds more than the {expected:,} images its labels pickle lists. "
                    "The two files are from different splits or versions: download both again."
                )
            chunk[filled] = _decode_png(payload, image_file, seen, shape)
            filled, seen = filled + 1, seen + 1
            bar.update(1)
            if filled == chunk_size:
                yield seen - filled, chunk
                chunk, filled = np.empty((chunk_size, *shape), dtype=np.uint8), 0
    if filled:
        yield seen - filled, chunk[:filled]
    if seen != expected:
        raise DataError(
            f"{image_file} holds {seen:,} images but its labels pickle lists {expected:,}. "
            "The two files are from different splits or versions, or one is truncated: download both again."
        )


def _decode_png(payload: bytes, image_file: Path, index: int, shape: tuple[int, int, int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(payload)) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{image_file}: image {index} is not a readable PNG ({err}). Download the file again.") from err
    if rgb.shape != shape:
        raise DataError(
            f"{image_file}: image {index} is {rgb.shape[1]}x{rgb.shape[0]}, expected {shape[1]}x{shape[0]}. "
            "This is not the tieredImageNet pickle: download it again."
        )
    return rgb


class _RowFile:
    """A raw (N, 84, 84, 3) uint8 file written by row with pwrite and read back sequentially."""

    def __init__(self, path: Path, n_rows: int):
        self.path = path
        self.n_rows = n_rows
        self.row_bytes = NATIVE_SIZE * NATIVE_SIZE * 3
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, n_rows * self.row_bytes)

    def write_rows(self, rows: np.ndarray, images: np.ndarray) -> None:
        """Write ``images[i]`` to row ``rows[i]``, one pwrite per run of consecutive rows."""
        by_row = np.argsort(rows, kind="stable")
        rows, images = rows[by_row], images[by_row]
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for lo, hi in zip(np.concatenate(([0], breaks)), np.concatenate((breaks, [len(rows)]))):
            data = memoryview(np.ascontiguousarray(images[lo:hi])).cast("B")
            offset, done = int(rows[lo]) * self.row_bytes, 0
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], offset + done)

    def read_in_order(self, chunk_size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.n_rows, chunk_size):
            count = min(chunk_size, self.n_rows - start)
            out = np.empty((count, NATIVE_SIZE, NATIVE_SIZE, 3), dtype=np.uint8)
            view, done = memoryview(out).cast("B"), 0
            while done < len(view):
                got = os.preadv(self.fd, [view[done:]], start * self.row_bytes + done)
                if got == 0:
                    raise DataError(f"Temporary pixel file {self.path} ended early; rerun the build.")
                done += got
            yield out

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def _pixel_file(out_path: Path, n_rows: int) -> Iterator[_RowFile]:
    """A temporary row file beside ``out_path`` (same disk as the output), always removed."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    need = n_rows * NATIVE_SIZE * NATIVE_SIZE * 3
    free = shutil.disk_usage(out_path.parent).free
    if free < 2 * need:
        raise DataError(
            f"Building {out_path} needs about {2 * need / 1e9:.1f} GB free in {out_path.parent} (a temporary "
            f"pixel file plus the HDF5 file, {need / 1e9:.1f} GB each); only {free / 1e9:.1f} GB is free. "
            "Free some space or point the output elsewhere."
        )
    path = out_path.with_name(f".{out_path.name}.pixels.tmp")
    rows = _RowFile(path, n_rows)
    try:
        yield rows
    finally:
        rows.close()
        path.unlink(missing_ok=True)
