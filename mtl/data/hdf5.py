"""One HDF5 file per split: the only image store training reads.

Contract (docs/data-format.md): ``images`` uint8 (N, H, W, 3), one image per chunk and no compression (so
any image is one direct chunk read); ``labels`` int64 (N,), 0..C-1 in sorted class-name order,
sorted so each class's images are contiguous; ``class_names`` utf-8 strings (C,); file attributes
``dataset``, ``split``, ``source_files`` (JSON: raw file name -> checksum), ``image_size`` and
``format_version``. Images are decoded once by the builders; the reader never decodes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from mtl.errors import DataError
from mtl.io import atomic_path

__all__ = ["FORMAT_VERSION", "write_split", "HDF5Split"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_DATASETS = ("images", "labels", "class_names")
_REQUIRED_ATTRS = ("dataset", "split", "source_files", "format_version", "image_size")
_REBUILD = "It is made by the `build_hdf5` rule: delete the file and rerun the workflow to rebuild it."


# --------------------------------------------------------------------------- writing

def write_split(
    path: str | os.PathLike,
    images: np.ndarray | Iterable[np.ndarray] | Iterable[tuple[np.ndarray, np.ndarray]],
    labels: np.ndarray | Sequence[int] | None,
    class_names: Sequence[str],
    attrs: Mapping[str, object],
    *,
    n_images: int | None = None,
    progress: bool = False,
) -> Path:
    """Write one split to ``path`` atomically (the file appears whole or not at all).

    ``images`` is either the whole uint8 (N, H, W, 3) array, or, to keep memory bounded by one
    chunk, an iterable of uint8 (B, H, W, 3) chunks in label order. With an iterable, give the
    full ``labels`` array when you know it (checked before anything is written) and yield image
    arrays; or pass ``labels=None`` with ``n_images=N`` and yield ``(images, labels)`` pairs,
    whose labels are checked as they arrive. Labels must be int 0..C-1, sorted (each class's images
    contiguous) and cover every class; ``class_names`` must be sorted and unique. ``attrs`` needs
    ``dataset`` and ``split``; ``source_files`` (name -> checksum dict) is stored as JSON, and
    ``format_version``, ``image_size`` and ``content_sha256`` (of the image bytes and labels, so a
    training checkpoint can tell a rebuilt file with other images from the same one rebuilt) are
    set here. Any problem raises DataError.
    """
    path = Path(path)
    class_names = _checked_class_names(class_names, path)
    file_attrs = _file_attrs(attrs, path)
    checker = _LabelChecker(class_names, path)
    if labels is not None:
        labels = np.asarray(labels)
        checker.check_all(labels)
        if n_images is not None and n_images != len(labels):
            raise DataError(f"Writing {path}: n_images={n_images} but {len(labels)} labels were given.")
        n_images = len(labels)
    elif n_images is None:
        raise DataError(f"Writing {path}: give either the full labels array or n_images= with (images, labels) chunks.")
    if isinstance(images, np.ndarray):
        chunks: Iterable = (images,)
    else:
        chunks = images

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            content = _write_chunks(f, chunks, labels, n_images, checker, path, progress)
            f.create_dataset("class_names", data=class_names, dtype=h5py.string_dtype("utf-8"))
            f.attrs.update(file_attrs)
            height, width = f["images"].shape[1:3]
            f.attrs["image_size"] = height if height == width else np.array([height, width])
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["content_sha256"] = content
    log.info("wrote %s: %d images, %d classes", path, n_images, len(class_names))
    return path


def _write_chunks(f, chunks, labels, n_images, checker, path, progress) -> str:
    """Stream chunks into ``images`` (created from the first chunk's shape) and ``labels``.

    Returns the sha256 of the image bytes in row order, then of the int64 labels.
    """
    digest = hashlib.sha256()
    images = None
    all_labels = np.empty(n_images, dtype=np.int64)
    start = 0
    bar = tqdm(total=n_images, desc=f"write {path.name}", unit="img", disable=None if progress else True)
    with bar:
        for item in chunks:
            chunk, chunk_labels = _split_item(item, labels, start, path)
            stop = start + len(chunk)
            if stop > n_images:
                raise DataError(f"Writing {path}: the image chunks hold more than the {n_images} images expected.")
            if images is None:
                images = _create_images(f, n_images, chunk, path)
            elif chunk.shape[1:] != images.shape[1:]:
                raise DataError(
                    f"Writing {path}: image chunk at row {start} has shape {chunk.shape[1:]}, "
                    f"expected {images.shape[1:]} like the first chunk."
                )
            if labels is None:
                checker.check_chunk(chunk_labels, start)
            images[start:stop] = chunk
            digest.update(np.ascontiguousarray(chunk))
            all_labels[start:stop] = chunk_labels
            start = stop
            bar.update(len(chunk))
    if start != n_images or images is None:
        raise DataError(f"Writing {path}: got {start} images, expected {n_images}.")
    if labels is None:
        checker.check_complete()
    f.create_dataset("labels", data=all_labels)
    digest.update(all_labels)
    return digest.hexdigest()


def _split_item(item, labels, start: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One streamed item -> (images chunk, its labels), cross-checked against full labels."""
    if isinstance(item, tuple):
        chunk, chunk_labels = np.asarray(item[0]), np.asarray(item[1])
        if labels is not None and not np.array_equal(chunk_labels, labels[start:start + len(chunk)]):
            raise DataError(f"Writing {path}: chunk labels at row {start} differ from the labels array given.")
    elif labels is None:
        raise DataError(f"Writing {path}: with labels=None each chunk must be an (images, labels) pair.")
    else:
        chunk = np.asarray(item)
        chunk_labels = labels[start:start + len(chunk)]
    if chunk.dtype != np.uint8 or chunk.ndim != 4 or chunk.shape[3] != 3:
        raise DataError(
            f"Writing {path}: images must be uint8 (N, H, W, 3) RGB; got {chunk.dtype} {chunk.shape} at row {start}."
        )
    if len(chunk_labels) != len(chunk):
        raise DataError(f"Writing {path}: chunk at row {start} has {len(chunk)} images but {len(chunk_labels)} labels.")
    return chunk, chunk_labels


def _create_images(f: h5py.File, n_images: int, first_chunk: np.ndarray, path: Path) -> h5py.Dataset:
    height, width = first_chunk.shape[1:3]
    # One image per chunk, unfiltered: a random image is one direct chunk read (see bench/).
    return f.create_dataset("images", shape=(n_images, height, width, 3), dtype=np.uint8,
                            chunks=(1, height, width, 3))


def _checked_class_names(class_names: Sequence[str], path: Path) -> list[str]:
    names = [str(name) for name in class_names]
    if not names:
        raise DataError(f"Writing {path}: no class names given.")
    if names != sorted(set(names)):
        raise DataError(
            f"Writing {path}: class_names must be unique and sorted (labels follow sorted class-name order); "
            f"got {names[:5]}{' ...' if len(names) > 5 else ''}."
        )
    return names


def _file_attrs(attrs: Mapping[str, object], path: Path) -> dict[str, object]:
    missing = [key for key in ("dataset", "split") if key not in attrs]
    if missing:
        raise DataError(f"Writing {path}: attrs lack {missing}; expected at least 'dataset' and 'split'.")
    out = {}
    for key, value in attrs.items():
        if key in ("format_version", "image_size"):
            continue  # set by the writer from what it writes
        if key == "source_files":
            value = value if isinstance(value, str) else json.dumps(dict(value), sort_keys=True)
        elif not isinstance(value, (str, int, float, bool, np.generic)):
            raise DataError(f"Writing {path}: attribute {key!r} must be a str or number, got {type(value).__name__}.")
        out[key] = value
    out.setdefault("source_files", "{}")
    return out


class _LabelChecker:
    """Labels must be 0..C-1, non-decreasing and cover every class; checked whole or chunk by chunk."""

    def __init__(self, class_names: list[str], path: Path):
        self.class_names = class_names
        self.path = path
        self.last = -1
        self.counts = np.zeros(len(class_names), dtype=np.int64)

    def check_all(self, labels: np.ndarray) -> None:
        self.check_chunk(labels, 0)
        self.check_complete()

    def check_chunk(self, labels: np.ndarray, start: int) -> None:
        if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
            raise DataError(f"Writing {self.path}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}.")
        if not labels.size:
            return
        num_classes = len(self.class_names)
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            row = start + bad[0]
            raise DataError(
                f"Writing {self.path}: label {labels[bad[0]]} at row {row} is outside 0..{num_classes - 1} "
                f"({num_classes} class names)."
            )
        steps = np.diff(np.concatenate(([self.last], labels)))
        down = np.flatnonzero(steps < 0)
        if down.size:
            row = start + down[0]
            raise DataError(
                f"Writing {self.path}: labels are not sorted at row {row} (label {labels[down[0]]} after "
                f"{self.last if down[0] == 0 else labels[down[0] - 1]}); sort images by label so each class is contiguous."
            )
        self.counts += np.bincount(labels, minlength=num_classes)
        self.last = int(labels[-1])

    def check_complete(self) -> None:
        empty = np.flatnonzero(self.counts == 0)
        if empty.size:
            names = [self.class_names[i] for i in empty[:5]]
            raise DataError(
                f"Writing {self.path}: {empty.size} class(es) have no images, e.g. {names}; "
                "every class name needs at least one image."
            )


# --------------------------------------------------------------------------- reading

class HDF5Split:
    """A split file, read lazily: labels and names load at once, images on demand.

    The h5py handle opens on first image access in each process (the pid is remembered, and a
    handle inherited through ``fork`` is dropped and reopened), and is never pickled, so the
    object is safe to hand to DataLoader workers. ``in_memory=True`` reads all images into RAM.
    """

    def __init__(self, path: str | os.PathLike, in_memory: bool = False):
        self.path = Path(path)
        self.in_memory = in_memory
        self._file: h5py.File | None = None
        self._images_dset: h5py.Dataset | None = None
        self._direct_chunks = False
        self._pid: int | None = None
        self._images: np.ndarray | None = None
        self._by_class: list[np.ndarray] | None = None
        with self._open_checked() as f:
            self._read_metadata(f)
            if in_memory:
                self._images = self._read_all_images(f)

    # -- metadata
    def _open_checked(self) -> h5py.File:
        if not self.path.exists():
            raise DataError(f"HDF5 split not found: {self.path}. {_REBUILD}")
        try:
            return h5py.File(self.path, "r")
        except OSError as e:
            raise DataError(f"Cannot open {self.path} as HDF5 ({e}); the file is corrupt or not HDF5. {_REBUILD}") from e

    def _read_metadata(self, f: h5py.File) -> None:
        missing = [name for name in _DATASETS if name not in f] + [
            f"attribute {name}" for name in _REQUIRED_ATTRS if name not in f.attrs
        ]
        if missing:
            raise DataError(f"{self.path} lacks {', '.join(missing)}: not a complete split file. {_REBUILD}")
        version = int(f.attrs["format_version"])
        if version != FORMAT_VERSION:
            raise DataError(
                f"{self.path} has format_version {version}; this reader reads version {FORMAT_VERSION}. {_REBUILD}"
            )
        try:
            self.labels = f["labels"][()].astype(np.int64, copy=False)
            self.class_names = [str(name) for name in f["class_names"].asstr()[()]]
            self.attrs = _plain_attrs(f.attrs)
            images = f["images"]
            self.image_shape = tuple(int(n) for n in images.shape[1:])
            num_images = images.shape[0]
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise DataError(f"Cannot read {self.path}: {e}. {_REBUILD}") from e
        if len(self.labels) != num_images or len(self.image_shape) != 3 or images.dtype != np.uint8:
            raise DataError(
                f"{self.path}: images {images.dtype} {images.shape} do not match {len(self.labels)} labels "
                f"(expected uint8 (N, H, W, 3)). {_REBUILD}"
            )

    @property
    def content_sha256(self) -> str | None:
        """sha256 of the images and labels, written at build time (None in files built before it was)."""
        value = self.attrs.get("content_sha256")
        return None if value is None else str(value)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def indices_by_class(self) -> list[np.ndarray]:
        """Row indices of each class (read-only arrays; computed once)."""
        if self._by_class is None:
            order = np.argsort(self.labels, kind="stable")
            bounds = np.searchsorted(self.labels[order], np.arange(self.num_classes + 1))
            self._by_class = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            for rows in self._by_class:
                rows.flags.writeable = False
        return self._by_class

    # -- images
    def get_images(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """uint8 (B, H, W, 3) images at ``indices`` (any order, repeats allowed)."""
        indices = np.asarray(indices)
        if indices.ndim != 1 or not (np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
            raise IndexError(f"indices must be a 1-D integer array, got {indices.dtype} {indices.shape}.")
        indices = indices.astype(np.int64, copy=False)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices must lie in 0..{len(self) - 1} for {self.path}; got {indices.min()}..{indices.max()}.")
        if self.in_memory:
            if self._images is None:  # unpickled in another process
                with self._open_checked() as f:
                    self._images = self._read_all_images(f)
            return self._images[indices]
        return self._read_images(indices)

    def _read_images(self, indices: np.ndarray) -> np.ndarray:
        dset = self._dataset()
        out = np.empty((len(indices), *self.image_shape), dtype=np.uint8)
        order = np.argsort(indices, kind="stable")  # file order: friendlier to a cold disk
        if self._direct_chunks:
            # h5py fancy indexing costs ~1 ms per index; a raw chunk read is ~10 us.
            flat = out.reshape(len(indices), int(np.prod(self.image_shape)))
            read_chunk = dset.id.read_direct_chunk
            for j in order:
                read_chunk((int(indices[j]), 0, 0, 0), out=flat[j])
        else:
            for j in order:
                out[j] = dset[int(indices[j])]
        return out

    def _dataset(self) -> h5py.Dataset:
        if self._images_dset is None or self._pid != os.getpid():
            self._reopen()
        return self._images_dset

    def _reopen(self) -> None:
        if self._file is not None:  # inherited through fork: never read through the parent's handle
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - a stale handle must not stop the reopen
                pass
        self._file = self._open_checked()
        self._pid = os.getpid()
        dset = self._file["images"]
        plist = dset.id.get_create_plist()
        self._direct_chunks = dset.chunks == (1, *self.image_shape) and plist.get_nfilters() == 0
        self._images_dset = dset

    def _read_all_images(self, f: h5py.File) -> np.ndarray:
        images = np.empty((len(self), *self.image_shape), dtype=np.uint8)
        if len(self):
            f["images"].read_direct(images)
        return images

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._images_dset = None

    # -- pickling: never carry an h5py handle (or an in-memory copy) to another process
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_file=None, _images_dset=None, _pid=None, _images=None)
        return state

    def __repr__(self) -> str:
        lines = [
            f"Dataset {type(self).__name__}",
            f"    Number of datapoints: {len(self)}",
            f"    Classes: {self.num_classes}",
            f"    Image shape: {self.image_shape}",
            f"    Dataset: {self.attrs.get('dataset')}, split: {self.attrs.get('split')}",
            f"    In memory: {self.in_memory}",
            f"    Path: {self.path}",
        ]
        return "\n".join(lines)


def _plain_attrs(attrs: h5py.AttributeManager) -> dict[str, object]:
    """File attributes as plain Python values, ``source_files`` decoded from JSON."""
    out: dict[str, object] = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    out["source_files"] = json.loads(out["source_files"])
    return out
