"""Your own images: ``root/{train,val,test}/<class>/<image files>`` -> square RGB HDF5 splits, or,
for a test-only dataset (``test_only=True``, a transfer target), ``root/<class>/<image files>`` ->
``test.h5`` alone.

Class names are the folder names (sorted); files within a class are taken in sorted path order
(sub-folders included, symbolic links to folders not followed), decoded once, converted to RGB
(grayscale, palette, RGBA, CMYK and 16-bit images included: 16-bit values are scaled to 8 bits,
not clipped) and resized to ``image_size`` x ``image_size`` with Pillow's antialiased bicubic
filter (aspect ratio is not kept: crop beforehand if it matters). Hidden files and folders are
skipped; other non-image files are skipped with a warning that lists them.

A folder is checked whole before anything is kept: every file that cannot be decoded (corrupt,
truncated, a broken or looping symbolic link), every empty class and every class with fewer than
``min_images_per_class`` images (an episode needs shot + query of each class) is listed in one
error, with a split holding fewer than ``min_classes`` usable classes (a test-only folder needs
``way``), so a user fixes them all in one go. There are no published counts, so ``strict_counts``
has no effect here.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mtl.data.builders.checks import split_attrs
from mtl.data.hdf5 import write_split
from mtl.data.sources import SPLITS
from mtl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CHUNK = 256
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class _UndecodableImages(Exception):
    """Raised at the end of a split's image stream so its HDF5 file is not kept."""


def build(
    raw_dir: Path,
    out_dir: Path,
    *,
    strict_counts: bool = True,
    image_size: int | None = None,
    dataset: str = "imagefolder",
    min_images_per_class: int = 1,
    min_classes: int = 1,
    test_only: bool = False,
) -> dict[str, Path]:
    """Write ``out_dir/{train,val,test}.h5`` from the image tree at ``raw_dir``; with ``test_only``,
    ``out_dir/test.h5`` alone from the class folders directly under ``raw_dir``.

    ``image_size`` (required) is the side of the stored square images; ``dataset`` is the name
    written into the files' attributes; a class with fewer than ``min_images_per_class`` images,
    or a split with fewer than ``min_classes`` classes, is an error. Raises one DataError listing
    every problem of the tree.
    """
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ConfigError(
            f"The imagefolder builder needs image_size, a positive int (the side of the stored square "
            f"images), got {image_size!r}. Set data.<dataset>.image_size in config.yaml, e.g. 84."
        )
    root = Path(raw_dir)
    folders = split_folders(root, test_only)
    # fail on a bad tree before decoding
    tree = {split: list_split(root, split, folder=folder) for split, folder in folders.items()}
    if test_only:
        _refuse_split_tree(root, tree["test"])
    problems = class_problems(tree, folders, max(1, int(min_images_per_class)))
    if min_classes > 1:
        problems += class_count_problems(tree, folders, max(1, int(min_images_per_class)), int(min_classes))
    if problems:  # nothing will be written: still decode everything, to list every bad file now
        all_files = [f for classes in tree.values() for files in classes.values() for f in files]
        raise folder_error(root, problems + undecodable(all_files))
    outputs, failures = {}, []
    for split, classes in tree.items():
        class_names = sorted(classes)
        files = [f for name in class_names for f in classes[name]]
        labels = np.repeat(np.arange(len(class_names), dtype=np.int64), [len(classes[n]) for n in class_names])
        try:
            outputs[split] = write_split(
                Path(out_dir) / f"{split}.h5",
                load_images(files, image_size, failures, desc=f"{dataset} {split}"),
                labels,
                class_names,
                split_attrs(dataset, split, {}, image_root=str(root.resolve())),
            )
        except _UndecodableImages:
            continue  # listed in `failures`; the other splits are still decoded, to list theirs
    if failures:
        raise folder_error(root, failures)
    return outputs


def split_folders(root: Path, test_only: bool = False) -> dict[str, Path]:
    """Split -> the folder holding its class folders: ``root/<split>``, or ``root`` itself for the
    one split (test) of a test-only folder."""
    root = Path(root)
    return {"test": root} if test_only else {split: root / split for split in SPLITS}


def _refuse_split_tree(root: Path, classes: dict[str, list[Path]]) -> None:
    """A test-only folder whose 'classes' are train/val/test is a whole split tree given by mistake."""
    if "test" in classes and set(classes) <= set(SPLITS):
        raise DataError(
            f"Test-only image folder {root} holds {', '.join(sorted(classes))}/ folders: that is a train/val/test "
            f"tree, not root/<class>/<image files>. Point the dataset's path at {root / 'test'} to score its test "
            "classes only, or set test_only: false to train on it."
        )


def list_split(root: Path, split: str, *, folder: Path | None = None) -> dict[str, list[Path]]:
    """Class name -> sorted image files of ``root/split`` (or of ``folder``, the class folders of a
    test-only dataset); empty for an empty class folder."""
    expected = (f"{folder}/<class>/<image files>" if folder is not None
                else f"{root}/{{train,val,test}}/<class>/<image files>")
    folder = root / split if folder is None else Path(folder)
    if not folder.is_dir():
        raise DataError(f"Image folder split '{split}' not found: {folder} is missing. Expected {expected}.")
    classes, skipped = {}, []
    for entry in sorted(folder.iterdir()):
        if is_hidden(entry):
            continue
        if not entry.is_dir():
            skipped.append(entry)
            continue
        images, other = class_files(entry)
        skipped += other
        classes[entry.name] = images
    if not classes:
        raise DataError(
            f"Image folder split '{split}' is empty: {folder} has no class sub-folders. Expected "
            f"{folder}/<class>/<image files>."
        )
    if skipped:
        log.warning("%s: skipped %d file(s) that are not images (%s): %s", folder, len(skipped),
                    ", ".join(IMAGE_SUFFIXES), ", ".join(str(p) for p in skipped))
    return classes


def class_problems(tree: dict[str, dict[str, list[Path]]], folders: dict[str, Path], min_images: int) -> list[str]:
    """One line per class folder that is empty or too small for an episode (``folders``: split -> the
    folder holding its class folders, :func:`split_folders`)."""
    problems = []
    for split, classes in tree.items():
        for name, files in sorted(classes.items()):
            folder = Path(folders[split]) / name
            if not files:
                problems.append(f"{folder}: empty class folder (no {', '.join(IMAGE_SUFFIXES)} files); "
                                "add images or remove the folder")
            elif len(files) < min_images:
                problems.append(f"{folder}: {len(files)} image(s), fewer than the {min_images} an episode "
                                "needs (shot + query, from protocol.shots and protocol.query); add images, "
                                "remove the folder, or lower shot/query")
    return problems


def class_count_problems(tree: dict[str, dict[str, list[Path]]], folders: dict[str, Path], min_images: int,
                         min_classes: int) -> list[str]:
    """One line per split with fewer than ``min_classes`` classes of at least ``min_images`` images
    (a ``way``-way episode draws ``way`` distinct classes)."""
    problems = []
    for split, classes in tree.items():
        usable = sum(len(files) >= min_images for files in classes.values())
        if usable < min_classes:
            problems.append(f"{folders[split]}: {usable} class folder(s) with at least {min_images} images, fewer "
                            f"than the {min_classes} a {min_classes}-way episode needs (protocol.way); add class "
                            "folders or lower protocol.way")
    return problems


def folder_error(root: Path, problems: list[str]) -> DataError:
    listing = "\n".join(f"  - {line}" for line in problems)
    return DataError(f"Image folder {root} has {len(problems)} problem(s); fix them all, then rerun the "
                     f"workflow:\n{listing}")


def class_files(folder: Path) -> tuple[list[Path], list[Path]]:
    images, other = [], []
    for path in sorted(folder.rglob("*")):  # does not follow links to folders: no loops
        if any(is_hidden(part) for part in path.relative_to(folder).parts) or path.is_dir():
            continue
        (images if path.suffix.lower() in IMAGE_SUFFIXES else other).append(path)
    return images, other


def is_hidden(entry: Path | str) -> bool:
    return str(getattr(entry, "name", entry)).startswith(".")


def load_images(files: list[Path], image_size: int, failures: list[str],
                desc: str = "decode") -> Iterator[np.ndarray]:
    """uint8 (B, S, S, 3) chunks of the decoded, resized images, in ``files`` order.

    A file that cannot be decoded is appended to ``failures`` and the stream goes on (a black
    placeholder keeps the shapes), so one pass finds them all; if any turned up, the stream ends
    by raising, so the split being written is not kept.
    """
    found = len(failures)
    for start in tqdm(range(0, len(files), CHUNK), desc=desc, unit="chunk", disable=None):
        yield decode_images(files[start:start + CHUNK], image_size, failures)
    if len(failures) > found:
        raise _UndecodableImages()


def decode_images(files: list[Path], image_size: int, failures: list[str]) -> np.ndarray:
    """uint8 (N, S, S, 3) of ``files``; one that cannot be decoded adds its error to ``failures``
    and leaves a black placeholder, so a caller can list every bad file after one pass."""
    images = np.zeros((len(files), image_size, image_size, 3), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            images[i] = load_image(path, image_size)
        except DataError as err:
            failures.append(str(err))
    return images


def undecodable(files: list[Path]) -> list[str]:
    """The decode error of every file in ``files`` that cannot be read as an image."""
    failures = []
    for path in files:
        try:
            load_image(path, 1)
        except DataError as err:
            failures.append(str(err))
    return failures


def load_image(path: Path, image_size: int) -> np.ndarray:
    """One file -> uint8 (S, S, 3) RGB; an unreadable file raises DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            rgb = _to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot decode ({type(err).__name__}: {err}); replace or delete the file") from err
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(rgb)


def _to_rgb(img):
    """8-bit RGB from any mode; 16-bit grayscale is scaled (Pillow's convert would clip it to white)."""
    from PIL import Image

    if img.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img, dtype=np.float64)
        if img.mode != "I" or values.max(initial=0) > 255:  # mode I also holds plain 8-bit data
            values = values / 257.0
        img = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return img.convert("RGB")
