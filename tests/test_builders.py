"""Builders turn each dataset's real raw format into the HDF5 contract (docs/data-format.md).

Every test builds from a tiny fixture written in the real on-disk format (tests/fixtures/raw_formats.py)
and checks what a user of the HDF5 files relies on: shapes, labels 0..C-1 in sorted class-name order,
each class contiguous, the right images under each label, and errors that say what to do.
"""
from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from mtl.data.builders import build_dataset
from mtl.data.hdf5 import HDF5Split
from mtl.errors import ConfigError, DataError
from tests.fixtures import raw_formats as rf

SPLITS = ("train", "val", "test")


def read_split(path) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    split = HDF5Split(path, in_memory=True)
    return split.get_images(np.arange(len(split))), split.labels, split.class_names, split.attrs


def assert_contract(path, class_names, n_images):
    images, labels, names, attrs = read_split(path)
    assert names == class_names == sorted(class_names)
    assert images.dtype == np.uint8 and images.shape[0] == n_images and images.shape[3] == 3
    assert labels.dtype == np.int64 and np.all(np.diff(labels) >= 0), "each class must be contiguous"
    assert set(np.unique(labels)) == set(range(len(class_names)))
    return images, labels, attrs


# --------------------------------------------------------------------------- FC100
@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    raw = tmp_path_factory.mktemp("cifar")
    return rf.make_cifar100_tarball(raw / "cifar-100-python.tar.gz", images_per_class=6)


def cifar_oracle(tar_path) -> dict[str, list[np.ndarray]]:
    """Fine class name -> its images, train member first then test, each in file order."""
    meta = rf.read_cifar_member(tar_path, "meta")
    by_class: dict[str, list[np.ndarray]] = {name: [] for name in meta["fine_label_names"]}
    for member in ("train", "test"):
        batch = rf.read_cifar_member(tar_path, member)
        for row, fine in zip(batch["data"], batch["fine_labels"]):
            by_class[meta["fine_label_names"][fine]].append(row.reshape(3, 32, 32).transpose(1, 2, 0))
    return by_class


def test_fc100_pools_train_and_test_per_class_by_superclass(cifar, tmp_path):
    out = build_dataset("fc100", cifar.path.parent, tmp_path, strict_counts=False)
    assert sorted(out) == sorted(SPLITS)
    assert {split: len(names) for split, names in cifar.class_names.items()} == {"train": 60, "val": 20, "test": 20}
    oracle = cifar_oracle(cifar.path)
    for split in SPLITS:
        images, labels, attrs = assert_contract(out[split], cifar.class_names[split], cifar.images[split])
        assert images.shape[1:] == (32, 32, 3)
        assert np.all(np.bincount(labels) == 6)  # 5 from the train member + 1 from test
        for label, name in enumerate(cifar.class_names[split]):
            np.testing.assert_array_equal(images[labels == label], np.stack(oracle[name]))
        assert attrs["dataset"] == "fc100" and attrs["split"] == split
        assert attrs["source_files"] == {"cifar-100-python.tar.gz": rf_sha256()}


def rf_sha256():
    from mtl.data.sources import FC100

    return FC100.files[0].sha256


def test_fc100_val_and_test_hold_the_published_fine_classes(cifar, tmp_path):
    out = build_dataset("fc100", cifar.path.parent, tmp_path, strict_counts=False)
    names = HDF5Split(out["val"]).class_names
    assert {"bear", "camel", "crab", "hamster", "wolf"} <= set(names)
    assert "baby" in HDF5Split(out["test"]).class_names


@pytest.mark.parametrize("keys", ["bytes", "str"])
def test_fc100_reads_python3_pickles_with_bytes_or_str_keys(tmp_path, keys):
    fixture = rf.make_cifar100_tarball(tmp_path / "raw" / "cifar-100-python.tar.gz", images_per_class=2, keys=keys)
    out = build_dataset("fc100", tmp_path / "raw", tmp_path / "out", strict_counts=False)
    assert HDF5Split(out["test"]).class_names == fixture.class_names["test"]


def test_fc100_strict_counts_names_the_fix(cifar, tmp_path):
    with pytest.raises(DataError) as err:
        build_dataset("fc100", cifar.path.parent, tmp_path)
    message = str(err.value)
    assert "fc100 split 'train': expected 60 classes x 600 images (36,000), found 60 classes and 360 images" in message
    assert str(cifar.path) in message
    assert "set data.fc100.strict_counts: false in config.yaml" in message
    assert not list(tmp_path.iterdir()), "a failed build leaves no output"


def test_fc100_missing_or_corrupt_tarball(tmp_path):
    with pytest.raises(DataError, match="cifar-100-python.tar.gz not found"):
        build_dataset("fc100", tmp_path, tmp_path / "out")
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"<html>quota exceeded</html>")
    with pytest.raises(DataError, match="Cannot read .*cifar-100-python.tar.gz as a gzip tarball"):
        build_dataset("fc100", tmp_path, tmp_path / "out")


def test_fc100_tarball_without_member_says_which(tmp_path):
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("cifar-100-python/meta")
        payload = rf.python2_pickle_bytes({"fine_label_names": [], "coarse_label_names": []})
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(DataError, match="has no member 'cifar-100-python/train'"):
        build_dataset("fc100", tmp_path, tmp_path / "out")


# --------------------------------------------------------------------------- miniImageNet
@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return rf.make_miniimagenet_pickles(tmp_path_factory.mktemp("mini"), images_per_class=3)


def test_miniimagenet_sorted_wnids_and_class_dict_rows(mini, tmp_path):
    out = build_dataset("miniimagenet", mini.path, tmp_path, strict_counts=False)
    for split in SPLITS:
        images, labels, attrs = assert_contract(out[split], mini.class_names[split], mini.images[split])
        with open(mini.path / f"mini-imagenet-cache-{split}.pkl", "rb") as f:
            cache = pickle.load(f)
        for label, wnid in enumerate(mini.class_names[split]):
            np.testing.assert_array_equal(images[labels == label], cache["image_data"][cache["class_dict"][wnid]])
        assert attrs["source_files"] == {f"mini-imagenet-cache-{split}.pkl": None}


def test_miniimagenet_records_downloaded_digest(tmp_path):
    fixture = rf.make_miniimagenet_pickles(tmp_path / "raw", images_per_class=1)
    (fixture.path / "mini-imagenet-cache-val.pkl.sha256").write_text("ab12  mini-imagenet-cache-val.pkl\n")
    out = build_dataset("miniimagenet", fixture.path, tmp_path / "out", strict_counts=False)
    assert HDF5Split(out["val"]).attrs["source_files"] == {"mini-imagenet-cache-val.pkl": "ab12"}


def test_miniimagenet_strict_counts(mini, tmp_path):
    with pytest.raises(DataError, match=r"miniimagenet split 'train': expected 64 classes x 600 images \(38,400\), "
                                        r"found 64 classes and 192 images .*strict_counts: false"):
        build_dataset("miniimagenet", mini.path, tmp_path)


def test_miniimagenet_wrong_val_classes(tmp_path):
    fixture = rf.make_miniimagenet_pickles(tmp_path / "raw", images_per_class=1, classes={"train": 2, "val": 15, "test": 20})
    from mtl.data.builders.miniimagenet import check_wnids

    val_file = fixture.path / "mini-imagenet-cache-val.pkl"
    with pytest.raises(DataError, match=r"split 'val': expected the 16 Ravi & Larochelle classes, found 15 .*1 missing"):
        check_wnids("val", fixture.class_names["val"], val_file, strict=True)
    out = build_dataset("miniimagenet", fixture.path, tmp_path / "out", strict_counts=False)
    assert HDF5Split(out["val"]).num_classes == 15


# --------------------------------------------------------------------------- tieredImageNet
def naive_tiered(raw_dir, split):
    """Unpickle everything and decode every PNG: the obviously correct (and memory-hungry) way."""
    with open(raw_dir / f"{split}_images_png.pkl", "rb") as f:
        pngs = pickle.load(f, encoding="latin1")
    with open(raw_dir / f"{split}_labels.pkl", "rb") as f:
        record = pickle.load(f, encoding="latin1")
    images = np.stack([np.asarray(Image.open(io.BytesIO(p.tobytes())).convert("RGB")) for p in pngs])
    names = np.asarray(record["label_specific_str"])[record["label_specific"]]
    order = np.argsort(names, kind="stable")
    return images[order], names[order]


@pytest.mark.parametrize("file_order", ["shuffled", "grouped", "sorted"])
def test_tiered_streaming_equals_naive_decode(tmp_path, file_order):
    fixture = rf.make_tieredimagenet_pickles(tmp_path / "raw", classes={"train": 5, "val": 3, "test": 3},
                                             images_per_class=4, file_order=file_order)
    # chunk_size=3: several chunks, with boundaries inside classes
    out = build_dataset("tieredimagenet", fixture.path, tmp_path / "out", strict_counts=False, chunk_size=3)
    for split in SPLITS:
        images, labels, _ = assert_contract(out[split], fixture.class_names[split], fixture.images[split])
        expected_images, expected_names = naive_tiered(fixture.path, split)
        np.testing.assert_array_equal(images, expected_images)
        assert [fixture.class_names[split][i] for i in labels] == list(expected_names)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test.h5", "train.h5", "val.h5"]


def test_tiered_label_and_image_counts_must_agree(tmp_path):
    fixture = rf.make_tieredimagenet_pickles(tmp_path / "raw", classes={"train": 2, "val": 2, "test": 2})
    labels = pickle.load(open(fixture.path / "val_labels.pkl", "rb"), encoding="latin1")
    labels["label_specific"] = np.concatenate([labels["label_specific"], [0]])
    rf.dump_python2_pickle(labels, fixture.path / "val_labels.pkl")
    with pytest.raises(DataError, match=r"val_images_png.pkl holds 7 images but its labels pickle lists 8"):
        build_dataset("tieredimagenet", fixture.path, tmp_path / "out", strict_counts=False)
    assert not (tmp_path / "out" / "val.h5").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")], "temporary files removed"


def test_tiered_strict_counts(tmp_path):
    fixture = rf.make_tieredimagenet_pickles(tmp_path / "raw")
    with pytest.raises(DataError, match=r"tieredimagenet split 'train': expected 351 classes and 448,695 images, "
                                        r"found 4 classes and 14 images"):
        build_dataset("tieredimagenet", fixture.path, tmp_path / "out")


# --------------------------------------------------------------------------- image folders
def test_imagefolder_resizes_to_square_rgb(tmp_path):
    fixture = rf.make_image_folder(tmp_path / "raw", image_size=(24, 20))
    out = build_dataset("imagefolder", fixture.path, tmp_path / "out", image_size=12)
    for split in SPLITS:
        images, labels, attrs = assert_contract(out[split], fixture.class_names[split], fixture.images[split])
        assert images.shape[1:] == (12, 12, 3)
        assert np.all(np.bincount(labels) == 3)
    first = sorted((fixture.path / "train" / "train_class_0").iterdir())[0]
    expected = np.asarray(Image.open(first).convert("RGB").resize((12, 12), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(read_split(out["train"])[0][0], expected)


def test_imagefolder_corrupt_image_is_named(tmp_path):
    fixture = rf.make_image_folder(tmp_path / "raw")
    bad = fixture.path / "val" / "val_class_1" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=f"{bad}: cannot decode"):
        build_dataset("imagefolder", fixture.path, tmp_path / "out", image_size=8)


def test_imagefolder_missing_or_empty_split_is_named(tmp_path):
    fixture = rf.make_image_folder(tmp_path / "raw")
    for path in (fixture.path / "test").rglob("img_*"):
        path.unlink()
    with pytest.raises(DataError, match=r"test/test_class_0: empty class folder"):
        build_dataset("imagefolder", fixture.path, tmp_path / "out", image_size=8)
    for folder in (fixture.path / "test").iterdir():
        if folder.is_dir():
            folder.rmdir()
    with pytest.raises(DataError, match="split 'test' is empty"):
        build_dataset("imagefolder", fixture.path, tmp_path / "out", image_size=8)
    (fixture.path / "test" / ".DS_Store").unlink()
    (fixture.path / "test").rmdir()
    with pytest.raises(DataError, match=r"split 'test' not found: .*test is missing"):
        build_dataset("imagefolder", fixture.path, tmp_path / "out", image_size=8)


def test_imagefolder_needs_image_size(tmp_path):
    fixture = rf.make_image_folder(tmp_path / "raw")
    with pytest.raises(ConfigError, match="needs image_size"):
        build_dataset("imagefolder", fixture.path, tmp_path / "out")


# --------------------------------------------------------------------------- test-only folders
def make_class_folders(root, counts: dict[str, int], size=(10, 14), seed=0):
    """``root/<class>/img_<i>.png`` with ``counts[class]`` random images each (0: an empty folder)."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i, image in enumerate(rf.random_images(rng, count, size[1], size[0])):
            Image.fromarray(image).save(root / name / f"img_{i}.png")
    return root


def test_imagefolder_test_only_builds_the_test_split_alone(tmp_path):
    root = make_class_folders(tmp_path / "parts", {"bolt": 5, "nut": 6, "gear": 5, "washer": 7})
    (root / "notes.txt").write_text("not an image")
    out = build_dataset("imagefolder", root, tmp_path / "out", image_size=12, test_only=True,
                        min_images_per_class=5, min_classes=3)
    assert list(out) == ["test"] and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test.h5"]
    images, labels, attrs = assert_contract(out["test"], ["bolt", "gear", "nut", "washer"], 23)
    assert images.shape[1:] == (12, 12, 3) and np.bincount(labels).tolist() == [5, 5, 6, 7]
    assert attrs["split"] == "test"
    first = sorted((root / "bolt").iterdir())[0]
    expected = np.asarray(Image.open(first).convert("RGB").resize((12, 12), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(images[0], expected)


def test_imagefolder_test_only_lists_every_problem_in_one_error(tmp_path):
    root = make_class_folders(tmp_path / "parts", {"bolt": 0, "nut": 2, "gear": 6})
    (root / "gear" / "img_9.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError) as error:
        build_dataset("imagefolder", root, tmp_path / "out", image_size=8, test_only=True,
                      min_images_per_class=6, min_classes=3)
    message = str(error.value)
    assert "has 4 problem(s)" in message
    assert f"{root / 'bolt'}: empty class folder" in message
    assert f"{root / 'nut'}: 2 image(s), fewer than the 6 an episode needs" in message
    assert f"{root}: 1 class folder(s) with at least 6 images, fewer than the 3 a 3-way episode needs" in message
    assert f"{root / 'gear' / 'img_9.jpg'}: cannot decode" in message
    assert not (tmp_path / "out").exists()


def test_imagefolder_test_only_needs_way_classes(tmp_path):
    root = make_class_folders(tmp_path / "parts", {"bolt": 6, "nut": 6})
    with pytest.raises(DataError, match=r"2 class folder\(s\) with at least 6 images, fewer than the 5 a 5-way"):
        build_dataset("imagefolder", root, tmp_path / "out", image_size=8, test_only=True,
                      min_images_per_class=6, min_classes=5)
    assert build_dataset("imagefolder", root, tmp_path / "out", image_size=8, test_only=True,
                         min_images_per_class=6, min_classes=2)["test"].exists()


def test_imagefolder_test_only_refuses_a_train_val_test_tree(tmp_path):
    fixture = rf.make_image_folder(tmp_path / "raw")
    with pytest.raises(DataError, match=f"holds test, train, val/ folders.*path at {fixture.path / 'test'}"):
        build_dataset("imagefolder", fixture.path, tmp_path / "out", image_size=8, test_only=True)


def test_prepare_fetches_and_builds_a_test_only_folder(tmp_path):
    from mtl.data.prepare import build_splits, fetch_raw

    root = make_class_folders(tmp_path / "parts", {"bolt": 4, "nut": 4, "gear": 4})
    entry = {"source": "imagefolder", "path": str(root), "test_only": True}
    manifest = fetch_raw("parts", entry, tmp_path / "raw", tmp_path / "raw" / "manifest.json", progress=False)
    out = build_splits(manifest, tmp_path / "data", image_size=16, min_images_per_class=4, test_only=True,
                       min_classes=3)
    assert list(out) == ["test"] and HDF5Split(out["test"]).class_names == ["bolt", "gear", "nut"]
    assert not (tmp_path / "data" / "train.h5").exists()
    # without test_only the same folder is a train/val/test tree that lacks its splits
    with pytest.raises(DataError, match=r"lacks the split folder\(s\) \['train', 'val', 'test'\]"):
        fetch_raw("parts", {**entry, "test_only": False}, tmp_path / "raw", tmp_path / "m.json", progress=False)


# --------------------------------------------------------------------------- digits demo
def test_digits_export_and_build(tmp_path):
    from sklearn.datasets import load_digits

    from mtl.data.builders.digits import export_digits

    root = export_digits(tmp_path / "raw")
    folders = {split: sorted(p.name for p in (root / split).iterdir()) for split in SPLITS}
    assert folders == {"train": ["0", "1", "2", "3"], "val": ["4", "5", "6"], "test": ["7", "8", "9"]}
    digits = load_digits()
    png = np.asarray(Image.open(root / "val" / "5" / f"{np.flatnonzero(digits.target == 5)[0]:04d}.png"))
    np.testing.assert_array_equal(png[..., 0], np.rint(digits.images[digits.target == 5][0] * 255 / 16))
    assert png.shape == (8, 8, 3)

    out = build_dataset("digits", root, tmp_path / "out", image_size=16)
    sizes = {split: len(HDF5Split(out[split])) for split in SPLITS}
    assert sizes == {"train": 720, "val": 544, "test": 533}
    assert HDF5Split(out["test"]).image_shape == (16, 16, 3)
    assert HDF5Split(out["train"]).attrs["dataset"] == "digits"


# --------------------------------------------------------------------------- dispatch
def test_unknown_kind_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"Unknown value 'cifar10' for argument kind. Valid values are "
                                          r"\{digits, fc100, imagefolder, miniimagenet, tieredimagenet\}"):
        build_dataset("cifar10", tmp_path, tmp_path)


def test_unknown_option_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"does not take the option\(s\) \['imagesize'\]"):
        build_dataset("imagefolder", tmp_path, tmp_path, imagesize=8)
    with pytest.raises(ConfigError, match="stored at its native 32x32"):
        build_dataset("fc100", tmp_path, tmp_path, image_size=84)
