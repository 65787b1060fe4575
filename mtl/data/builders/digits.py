"""The offline demo dataset: scikit-learn's bundled 8x8 handwritten digits as an image folder.

:func:`export_digits` is the demo's "download": it writes the 1,797 images that ship inside
scikit-learn (``sklearn.datasets.load_digits``, 16 grey levels) as PNGs under
``raw_dir/{train,val,test}/<digit>/<index>.png``, with digits 0-3 for train, 4-6 for val and 7-9
for test, so meta-test classes are never seen in training. :func:`build` then runs the
imagefolder builder on that tree. No network is involved.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mtl.data.builders import imagefolder
from mtl.data.builders.checks import check_counts
from mtl.data.sources import SPLITS, SplitFacts
from mtl.errors import DataError
from mtl.faults import fault_point

log = logging.getLogger(__name__)

DIGITS_BY_SPLIT = {"train": (0, 1, 2, 3), "val": (4, 5, 6), "test": (7, 8, 9)}
# What load_digits holds (per digit: 178 182 177 183 181 182 181 179 174 180).
SPLIT_FACTS = {
    "train": SplitFacts(classes=4, images=720),
    "val": SplitFacts(classes=3, images=544),
    "test": SplitFacts(classes=3, images=533),
}
DEFAULT_IMAGE_SIZE = 32
TEMP_PREFIX = ".digits-"


def export_digits(raw_dir) -> Path:
    """Write the digits image folder into ``raw_dir`` and return ``raw_dir``.

    The tree is written in a temporary folder first and each split folder is swapped in whole,
    so an interrupted export never leaves a half-filled split behind; the temporary folder a
    killed export left is removed by the next one.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    for stale in raw_dir.glob(f"{TEMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    digits = load_digits()
    grey = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX, dir=raw_dir) as tmp:
        for split, wanted in DIGITS_BY_SPLIT.items():
            for digit in wanted:
                folder = Path(tmp) / split / str(digit)
                folder.mkdir(parents=True)
                for index in np.flatnonzero(digits.target == digit):
                    Image.fromarray(rgb[index]).save(folder / f"{index:04d}.png", compress_level=1)
                fault_point("digits.export")  # test hook (mtl/faults.py); a no-op in normal use
        for split in SPLITS:
            shutil.rmtree(raw_dir / split, ignore_errors=True)
            (Path(tmp) / split).rename(raw_dir / split)
    log.info("exported %d scikit-learn digits to %s", len(grey), raw_dir)
    return raw_dir


def build(
    raw_dir: Path, out_dir: Path, *, strict_counts: bool = True, image_size: int | None = None,
    min_images_per_class: int = 1,
) -> dict[str, Path]:
    """Build HDF5 splits from an :func:`export_digits` tree (default ``image_size`` 32)."""
    raw_dir = Path(raw_dir)
    missing = [split for split in SPLITS if not (raw_dir / split).is_dir()]
    if missing:
        raise DataError(
            f"Digits image folder {raw_dir} lacks {missing}. Run the demo's download step "
            "(mtl.data.builders.digits.export_digits) to write it; it needs only scikit-learn."
        )
    for split in SPLITS:
        classes = imagefolder.list_split(raw_dir, split)
        labels = np.repeat(np.arange(len(classes)), [len(files) for _, files in sorted(classes.items())])
        check_counts("digits", split, labels, len(classes), SPLIT_FACTS[split], raw_dir / split, strict=strict_counts)
    return imagefolder.build(
        raw_dir, out_dir, image_size=image_size or DEFAULT_IMAGE_SIZE, dataset="digits",
        min_images_per_class=min_images_per_class,
    )
