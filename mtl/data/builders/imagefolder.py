"""Your own images: ``root/{train,val,test}/<class>/<image files>`` -> square RGB HDF5 splits.

Class names are the folder names (sorted); files within a class are taken in sorted path order
(sub-folders included), decoded once, converted to RGB and resized to ``image_size`` x
``image_size`` with Pillow's antialiased bicubic filter (aspect ratio is not kept: crop beforehand
if it matters). Hidden files and folders are skipped; other non-image files are skipped with a warning.
There are no published counts, so ``strict_counts`` has no effect here.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mtl.data.builders import SPLITS, split_attrs
from mtl.data.hdf5 import write_split
from mtl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CHUNK = 256


def build(
    raw_dir: Path,
    out_dir: Path,
    *,
    strict_counts: bool = True,
    image_size: int | None = None,
    dataset: str = "imagefolder",
) -> dict[str, Path]:
    """Write ``out_dir/{train,val,test}.h5`` from the image tree at ``raw_dir``.

    ``image_size`` (required) is the side of the stored square images; ``dataset`` is the name
    written into the files' attributes.
    """
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ConfigError(
            f"The imagefolder builder needs image_size, a positive int (the side of the stored square "
            f"images), got {image_size!r}. Set data.<dataset>.image_size in config.yaml, e.g. 84."
        )
    root = Path(raw_dir)
    tree = {split: list_split(root, split) for split in SPLITS}  # fail on a bad tree before decoding
    outputs = {}
    for split, classes in tree.items():
        class_names = sorted(classes)
        files = [f for name in class_names for f in classes[name]]
        labels = np.repeat(np.arange(len(class_names), dtype=np.int64), [len(classes[n]) for n in class_names])
        outputs[split] = write_split(
            Path(out_dir) / f"{split}.h5",
            load_images(files, image_size, desc=f"{dataset} {split}"),
            labels,
            class_names,
            split_attrs(dataset, split, {}, image_root=str(root.resolve())),
        )
    return outputs


def list_split(root: Path, split: str) -> dict[str, list[Path]]:
    """Class name -> sorted image files of ``root/split``; errors name the folder that is wrong."""
    folder = root / split
    if not folder.is_dir():
        raise DataError(
            f"Image folder split '{split}' not found: {folder} is missing. Expected "
            f"{root}/{{train,val,test}}/<class>/<image files>."
        )
    classes, skipped = {}, []
    for entry in sorted(folder.iterdir()):
        if _hidden(entry):
            continue
        if not entry.is_dir():
            skipped.append(entry)
            continue
        images, other = _class_files(entry)
        skipped += other
        if not images:
            raise DataError(
                f"Class folder {entry} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}, any case). "
                "Add images or remove the folder."
            )
        classes[entry.name] = images
    if not classes:
        raise DataError(
            f"Image folder split '{split}' is empty: {folder} has no class sub-folders. Expected "
            f"{folder}/<class>/<image files>."
        )
    if skipped:
        log.warning("%s: skipped %d non-image file(s), e.g. %s", folder, len(skipped), skipped[0])
    return classes


def _class_files(folder: Path) -> tuple[list[Path], list[Path]]:
    images, other = [], []
    for path in sorted(folder.rglob("*")):
        if any(_hidden(part) for part in path.relative_to(folder).parts) or path.is_dir():
            continue
        (images if path.suffix.lower() in IMAGE_SUFFIXES else other).append(path)
    return images, other


def _hidden(entry: Path | str) -> bool:
    return str(getattr(entry, "name", entry)).startswith(".")


def load_images(files: list[Path], image_size: int, desc: str = "decode") -> Iterator[np.ndarray]:
    """uint8 (B, S, S, 3) chunks of the decoded, resized images, in ``files`` order."""
    for start in tqdm(range(0, len(files), CHUNK), desc=desc, unit="chunk", disable=None):
        batch = files[start:start + CHUNK]
        chunk = np.empty((len(batch), image_size, image_size, 3), dtype=np.uint8)
        for i, path in enumerate(batch):
            chunk[i] = load_image(path, image_size)
        yield chunk


def load_image(path: Path, image_size: int) -> np.ndarray:
    """One file -> uint8 (S, S, 3) RGB; an unreadable file raises DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"Cannot decode image {path} ({type(err).__name__}: {err}). Replace or delete the file and rebuild."
        ) from err
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(rgb)
