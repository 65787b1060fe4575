"""Facts about each benchmark as data: files, mirrors, checksums, splits and expected counts.

Adding a dataset is filling in a table here; the download code and the builders only read it.
A URL of the form ``gdrive:<file id>`` names a Google Drive file (the download code handles its
"virus scan" confirm step); every other URL is plain HTTP(S).
"""
from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class RemoteFile:
    """One raw file of a dataset, stored as ``<raw_dir>/<name>``; mirrors are tried in order."""

    name: str
    urls: tuple[str, ...]
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class RemoteArchive:
    """A last-resort archive that holds several raw files.

    ``members`` maps a raw file's local name to the member base names accepted for it inside
    the archive (the archive's own naming may differ from the mirror's).
    """

    name: str
    urls: tuple[str, ...]
    members: dict[str, tuple[str, ...]]
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class SplitFacts:
    """What a complete split holds; builders check these unless the user allows a subset."""

    classes: int
    images: int


@dataclass(frozen=True)
class DatasetSource:
    name: str
    builder: str
    files: tuple[RemoteFile, ...]
    splits: dict[str, SplitFacts]
    archives: tuple[RemoteArchive, ...] = ()
    notes: str = ""
    # dataset-specific facts the builder needs (superclass split, class ids, ...)
    facts: dict = field(default_factory=dict)


# Zenodo record 7978538 serves the miniImageNet and tieredImageNet pickles. Zenodo publishes each
# file's size and MD5 in the record's listing (GET https://zenodo.org/api/records/7978538: `files`,
# each with `key`, `size` and `checksum` "md5:<hex>"); the download reads that listing before each
# Zenodo download and checks the file against it (mtl.data.download.zenodo). The values are not
# pinned below: zenodo.org could not be reached where this was written, and no stored copy of the
# MD5s of these exact files was found in the installed packages or in this repository, so none was
# invented. Were the listing unreachable at download time, the observed SHA-256 is recorded
# (<file>.sha256) and config `data.<dataset>.checksums` can pin it.
_ZENODO = "https://zenodo.org/record/7978538/files/"

CIFAR100 = RemoteFile(
    name="cifar-100-python.tar.gz",
    urls=("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    sha256="85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
    size=169_001_437,
)

FC100 = DatasetSource(
    name="fc100",
    builder="fc100",
    files=(CIFAR100,),
    splits={
        "train": SplitFacts(classes=60, images=60 * 600),
        "val": SplitFacts(classes=20, images=20 * 600),
        "test": SplitFacts(classes=20, images=20 * 600),
    },
    notes="Built from CIFAR-100 with TADAM's superclass split; train and test images pooled (600 per class).",
    facts={
        # CIFAR-100 coarse (superclass) indices per FC100 split (Oreshkin et al., TADAM).
        "superclasses": {
            "train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19),
            "val": (8, 11, 13, 16),
            "test": (0, 7, 12, 14),
        },
        # The fine-label ids those superclasses hold; a cross-check on the raw metadata.
        "fine_ids": {
            "val": (3, 15, 19, 21, 26, 31, 36, 38, 42, 43, 45, 50, 65, 74, 77, 79, 80, 88, 97, 99),
            "test": (2, 4, 6, 7, 11, 14, 18, 24, 30, 34, 35, 46, 55, 63, 64, 66, 72, 75, 95, 98),
        },
        "images_per_class": 600,
    },
)

MINIIMAGENET = DatasetSource(
    name="miniimagenet",
    builder="miniimagenet",
    files=(
        # Size and MD5 come from Zenodo's record listing at download time (see _ZENODO above);
        # the observed SHA-256 is recorded, and config `data.miniimagenet.checksums` can pin it.
        RemoteFile("mini-imagenet-cache-train.pkl", (_ZENODO + "mini-imagenet-cache-train.pkl",)),
        RemoteFile("mini-imagenet-cache-val.pkl", (_ZENODO + "mini-imagenet-cache-validation.pkl",)),
        RemoteFile("mini-imagenet-cache-test.pkl", (_ZENODO + "mini-imagenet-cache-test.pkl",)),
    ),
    archives=(
        RemoteArchive(
            name="mini-imagenet.tar.gz",
            urls=("gdrive:16V_ZlkW4SsnNDtnGmaBRq2OoPmUOc5mY",),
            md5="b38f1eb4251fb9459ecc8e7febf9b2eb",
            members={
                "mini-imagenet-cache-train.pkl": ("mini-imagenet-cache-train.pkl",),
                "mini-imagenet-cache-val.pkl": (
                    "mini-imagenet-cache-val.pkl",
                    "mini-imagenet-cache-validation.pkl",
                ),
                "mini-imagenet-cache-test.pkl": ("mini-imagenet-cache-test.pkl",),
            },
        ),
    ),
    splits={
        "train": SplitFacts(classes=64, images=38_400),
        "val": SplitFacts(classes=16, images=9_600),
        "test": SplitFacts(classes=20, images=12_000),
    },
    notes="Ravi & Larochelle split; cache pickles {'image_data': uint8 (N,84,84,3), 'class_dict': {wnid: rows}}.",
    facts={
        "split_files": {
            "train": "mini-imagenet-cache-train.pkl",
            "val": "mini-imagenet-cache-val.pkl",
            "test": "mini-imagenet-cache-test.pkl",
        },
        "wnids": {
            "val": (
                "n01855672 n02091244 n02114548 n02138441 n02174001 n02950826 n02971356 n02981792 "
                "n03075370 n03417042 n03535780 n03584254 n03770439 n03773504 n03980874 n09256479"
            ).split(),
            "test": (
                "n01930112 n01981276 n02099601 n02110063 n02110341 n02116738 n02129165 n02219486 "
                "n02443484 n02871525 n03127925 n03146219 n03272010 n03544143 n03775546 n04146614 "
                "n04149813 n04418357 n04522168 n07613480"
            ).split(),
        },
    },
)


def _tiered_file(name: str) -> RemoteFile:
    return RemoteFile(name, (_ZENODO + "tiered-imagenet-" + name,))


TIEREDIMAGENET = DatasetSource(
    name="tieredimagenet",
    builder="tieredimagenet",
    files=tuple(
        _tiered_file(f"{split}_{kind}.pkl") for split in SPLITS for kind in ("images_png", "labels")
    ),
    splits={
        "train": SplitFacts(classes=351, images=448_695),
        "val": SplitFacts(classes=97, images=124_261),
        "test": SplitFacts(classes=160, images=206_209),
    },
    notes="Ren et al. 2018; ~13 GB. Images are PNG bytes in Python-2 pickles, decoded once at build time.",
    facts={
        "split_files": {
            split: {"images": f"{split}_images_png.pkl", "labels": f"{split}_labels.pkl"}
            for split in SPLITS
        },
    },
)

SOURCES: dict[str, DatasetSource] = {s.name: s for s in (FC100, MINIIMAGENET, TIEREDIMAGENET)}

# Dataset kinds that read a user's local tree instead of downloading (see mtl.data.builders).
LOCAL_KINDS = ("imagefolder", "digits")


def list_sources() -> list[str]:
    return sorted(SOURCES)


def get_source(name: str) -> DatasetSource:
    if name not in SOURCES:
        raise ValueError(
            f"Unknown value '{name}' for argument source. Valid values are {{{', '.join(list_sources())}}}."
        )
    return SOURCES[name]
