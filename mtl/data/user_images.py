"""A user's own images for prediction: a support folder of labelled class folders, a query folder.

``support/<class>/<image files>``: any number of classes >= 2, any number of images >= 1 per
class, unequal counts allowed; files of a class may sit in sub-folders, as in the image-folder
datasets. ``query/<image files>``: a flat folder of images to classify.

Images are decoded as the image-folder datasets are (:func:`mtl.data.builders.imagefolder.load_image`:
greyscale, palette, RGBA, CMYK and 16-bit converted to 8-bit RGB) and resized to the side the
model's training images were stored at. Each folder is checked whole before anything is used: every
empty class, stray or non-image file, nested query folder and undecodable file is listed in one
error, so a user fixes them all at once.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtl.data.builders.imagefolder import IMAGE_SUFFIXES, class_files, is_hidden, decode_images
from mtl.errors import DataError
from mtl.rng import Purpose, stream

@dataclass(frozen=True)
class SupportSet:
    """Labelled images: uint8 (S, H, W, 3), labels (S,) in 0..C-1 (sorted class names), their files."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    files: list[Path]

    def counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=len(self.class_names)).tolist()


def read_support_folder(root, image_size: int) -> SupportSet:
    """Decode ``root/<class>/...`` into a :class:`SupportSet`, or one DataError listing every problem."""
    root = _existing_folder(root, "support")
    classes, problems = {}, []
    for entry in sorted(root.iterdir()):
        if is_hidden(entry):
            continue
        if not entry.is_dir():
            problems.append(f"{entry}: a file directly in the support folder; put each image in the folder "
                            "of its class (support/<class>/<image>)")
            continue
        images, other = class_files(entry)
        problems += [_not_an_image(path) for path in other]
        if not images:
            problems.append(f"{entry}: empty class folder (no {', '.join(IMAGE_SUFFIXES)} files); add at least "
                            "one image of this class or remove the folder")
        classes[entry.name] = images
    if len(classes) < 2:
        problems.append(f"{root}: {len(classes)} class folder(s) ({', '.join(classes) or 'none'}); a few-shot "
                        "classifier needs at least 2 classes, one sub-folder each")
    files = [path for name in sorted(classes) for path in classes[name]]
    images = decode_images(files, image_size, problems)
    if problems:
        raise _folder_error(root, "support", problems)
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(classes[n]) for n in sorted(classes)])
    return SupportSet(images, labels, sorted(classes), files)


def list_query_folder(root) -> list[Path]:
    """The image files of a flat query folder (sorted), or one DataError listing every problem."""
    root = _existing_folder(root, "query")
    files, problems = [], []
    for entry in sorted(root.iterdir()):
        if is_hidden(entry):
            continue
        if entry.is_dir():
            problems.append(f"{entry}: a folder inside the query folder; the query folder must hold image "
                            "files directly (move them up, or point the query at that folder)")
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            files.append(entry)
        else:
            problems.append(_not_an_image(entry))
    if not files:
        problems.append(f"{root}: no {', '.join(IMAGE_SUFFIXES)} files to classify")
    if problems:
        raise _folder_error(root, "query", problems)
    return files


def read_query_chunks(files: list[Path], image_size: int, chunk: int) -> Iterator[np.ndarray]:
    """uint8 (B, S, S, 3) chunks of ``files`` in order. Every undecodable file is collected; when any
    turned up, the stream ends with one DataError listing them all (after the last chunk)."""
    problems: list[str] = []
    for start in range(0, len(files), chunk):
        yield decode_images(files[start:start + chunk], image_size, problems)
    if problems:
        raise _folder_error(files[0].parent, "query", problems)


def _existing_folder(root, role: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        layout = "<class>/<image files>" if role == "support" else "<image files>"
        raise DataError(f"{role} folder {root} {what}; expected {root}/{layout}")
    return root


def _not_an_image(path: Path) -> str:
    return f"{path}: not an image file (expected {', '.join(IMAGE_SUFFIXES)}); remove it or move it elsewhere"


def _folder_error(root: Path, role: str, problems: list[str]) -> DataError:
    listing = "\n".join(f"  - {line}" for line in problems)
    return DataError(f"The {role} folder {root} has {len(problems)} problem(s); fix them all, then run the "
                     f"prediction again (nothing was written):\n{listing}")


def write_image_folders(split_path, root, *, support_per_class: int, query_per_class: int, seed: int = 0) -> dict:
    """Write images of an HDF5 split as ``root/support/<class>/`` and ``root/query/`` PNG folders,
    with ``root/query_truth.csv`` (file, class): a worked example of prediction on data with known
    labels (the offline demo's digits). Per class, ``support_per_class`` + ``query_per_class``
    distinct images drawn with ``seed``; query files are shuffled so their names say nothing."""
    import pandas as pd
    from PIL import Image

    from mtl.data.hdf5 import HDF5Split
    from mtl.io import atomic_path

    split, root, rng = HDF5Split(split_path), Path(root), stream(seed, Purpose.EXAMPLE_IMAGES)
    need = support_per_class + query_per_class
    queries = []
    for name, members in zip(split.class_names, split.indices_by_class()):
        if len(members) < need:
            raise DataError(f"{split_path}: class {name} has {len(members)} images, fewer than the {need} asked for")
        picked = rng.choice(members, size=need, replace=False)
        folder = root / "support" / name
        folder.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(split.get_images(np.sort(picked[:support_per_class]))):
            Image.fromarray(image).save(folder / f"{k:03d}.png")
        queries += [(index, name) for index in picked[support_per_class:]]
    (root / "query").mkdir(parents=True, exist_ok=True)
    order = rng.permutation(len(queries))
    truth = []
    for k, position in enumerate(order):
        index, name = queries[position]
        Image.fromarray(split.get_images(np.array([index]))[0]).save(root / "query" / f"{k:04d}.png")
        truth.append({"file": f"{k:04d}.png", "class": name})
    with atomic_path(root / "query_truth.csv") as tmp:
        pd.DataFrame(truth).to_csv(tmp, index=False)
    return {"classes": len(split.class_names), "support": support_per_class, "query": len(truth)}
