"""HDF5 split files: write atomically with checked labels, read lazily, in any order, across fork."""
from __future__ import annotations

import os
import pickle

import h5py
import numpy as np
import pytest

from mtl.data.hdf5 import FORMAT_VERSION, HDF5Split, write_split
from mtl.errors import DataError

CLASS_NAMES = ["n01", "n02", "n03"]
ATTRS = {"dataset": "toy", "split": "train", "source_files": {"toy.pkl": "ab" * 32}}


def _toy(counts=(5, 4, 6), height=6, width=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    images = rng.integers(0, 256, (len(labels), height, width, 3), dtype=np.uint8)
    return images, labels


def _chunks(images, labels, size, with_labels):
    for start in range(0, len(images), size):
        chunk = images[start:start + size]
        yield (chunk, labels[start:start + size]) if with_labels else chunk


def _assert_nothing_written(path):
    assert not path.exists()
    assert list(path.parent.iterdir()) == []  # no temp file left behind either


def test_roundtrip_array(tmp_path):
    images, labels = _toy()
    path = write_split(tmp_path / "train.h5", images, labels, CLASS_NAMES, ATTRS)

    split = HDF5Split(path)

    assert len(split) == 15 and split.num_classes == 3 and split.image_shape == (6, 8, 3)
    assert split.labels.dtype == np.int64
    np.testing.assert_array_equal(split.labels, labels)
    assert split.class_names == CLASS_NAMES
    assert split.attrs["dataset"] == "toy" and split.attrs["split"] == "train"
    assert split.attrs["source_files"] == ATTRS["source_files"]
    assert split.attrs["format_version"] == FORMAT_VERSION == 1
    assert split.attrs["image_size"] == [6, 8]
    np.testing.assert_array_equal(split.get_images(np.arange(15)), images)
    by_class = split.indices_by_class()
    assert [list(rows) for rows in by_class] == [list(range(0, 5)), list(range(5, 9)), list(range(9, 15))]
    assert split.indices_by_class() is by_class
    text = repr(split)
    assert "HDF5Split" in text and "15" in text and "Classes: 3" in text and str(path) in text
    with h5py.File(path, "r") as f:  # the on-disk contract other tools may rely on
        assert f["images"].dtype == np.uint8 and f["images"].chunks == (1, 6, 8, 3)
        assert f["labels"].dtype == np.int64


@pytest.mark.parametrize("with_labels", [False, True])
def test_roundtrip_streamed_chunks(tmp_path, with_labels):
    images, labels = _toy(height=5, width=5)
    path = tmp_path / "val.h5"
    if with_labels:  # labels travel with each chunk; total count given up front
        write_split(path, _chunks(images, labels, 4, True), None, CLASS_NAMES, ATTRS, n_images=len(labels))
    else:
        write_split(path, _chunks(images, labels, 4, False), labels, CLASS_NAMES, ATTRS)

    split = HDF5Split(path)

    np.testing.assert_array_equal(split.labels, labels)
    np.testing.assert_array_equal(split.get_images(np.arange(len(labels))), images)
    assert split.attrs["image_size"] == 5


def test_content_fingerprint_follows_images_and_labels_not_how_they_were_written(tmp_path):
    images, labels = _toy()
    whole = HDF5Split(write_split(tmp_path / "a.h5", images, labels, CLASS_NAMES, ATTRS)).content_sha256
    streamed = HDF5Split(write_split(tmp_path / "b.h5", _chunks(images, labels, 4, True), None, CLASS_NAMES,
                                     {**ATTRS, "split": "val"}, n_images=len(labels))).content_sha256
    assert whole == streamed and len(whole) == 64  # same rows, other chunks and attributes
    one_pixel = images.copy()
    one_pixel[7, 2, 3, 1] ^= 1
    other = HDF5Split(write_split(tmp_path / "c.h5", one_pixel, labels, CLASS_NAMES, ATTRS)).content_sha256
    moved = np.repeat([0, 1, 2], (6, 3, 6))  # image 5 now in class 0: same images, other labels
    relabelled = HDF5Split(write_split(tmp_path / "d.h5", images, moved, CLASS_NAMES, ATTRS)).content_sha256
    assert len({whole, other, relabelled}) == 3
    with h5py.File(tmp_path / "a.h5", "a") as f:  # a file built before the fingerprint existed
        del f.attrs["content_sha256"]
    assert HDF5Split(tmp_path / "a.h5").content_sha256 is None


@pytest.mark.parametrize("in_memory", [False, True])
def test_get_images_any_order_with_repeats(tmp_path, in_memory):
    images, labels = _toy()
    path = write_split(tmp_path / "t.h5", images, labels, CLASS_NAMES, ATTRS)
    split = HDF5Split(path, in_memory=in_memory)
    indices = np.array([14, 0, 7, 7, 3, 14, 0, 9])

    np.testing.assert_array_equal(split.get_images(indices), images[indices])
    np.testing.assert_array_equal(split.get_images([2]), images[[2]])
    assert split.get_images(np.array([], dtype=np.int64)).shape == (0, 6, 8, 3)
    with pytest.raises(IndexError):
        split.get_images([15])


def test_reads_files_with_other_chunking(tmp_path):
    """A file written by another tool (contiguous layout) still reads, via the general path."""
    images, labels = _toy()
    path = tmp_path / "contiguous.h5"
    with h5py.File(path, "w") as f:
        f["images"], f["labels"] = images, labels
        f.create_dataset("class_names", data=CLASS_NAMES, dtype=h5py.string_dtype())
        f.attrs.update(dataset="toy", split="test", source_files="{}", format_version=1, image_size=6)
    indices = np.array([3, 1, 3, 12])
    np.testing.assert_array_equal(HDF5Split(path).get_images(indices), images[indices])


def test_failure_mid_stream_leaves_no_file(tmp_path):
    images, labels = _toy()

    def broken():
        yield images[:4]
        raise RuntimeError("decoder crashed")

    path = tmp_path / "out" / "train.h5"
    with pytest.raises(RuntimeError, match="decoder crashed"):
        write_split(path, broken(), labels, CLASS_NAMES, ATTRS)
    _assert_nothing_written(path)


@pytest.mark.parametrize(
    "labels, class_names, match",
    [
        ([0, 0, 2, 1, 2], CLASS_NAMES, "not sorted at row 3"),
        ([0, 1, 1, 2, 3], CLASS_NAMES, "outside 0..2"),
        ([0, 0, 1, 1, -1], CLASS_NAMES, "outside"),
        ([0, 0, 2, 2, 2], CLASS_NAMES, "no images"),
        ([0, 0, 1, 1, 2], ["b", "a", "c"], "sorted"),
    ],
)
def test_bad_labels_rejected(tmp_path, labels, class_names, match):
    images = np.zeros((5, 4, 4, 3), np.uint8)
    path = tmp_path / "bad" / "train.h5"
    with pytest.raises(DataError, match=match):
        write_split(path, images, labels, class_names, ATTRS)
    with pytest.raises(DataError, match=match):  # same checks when labels arrive chunk by chunk
        write_split(path, _chunks(images, np.array(labels), 2, True), None, class_names, ATTRS, n_images=5)
    assert not path.exists()


def test_wrong_image_count_or_type_rejected(tmp_path):
    images, labels = _toy()
    path = tmp_path / "w" / "train.h5"
    with pytest.raises(DataError, match="got 8 images, expected 15"):
        write_split(path, _chunks(images[:8], labels, 4, False), labels, CLASS_NAMES, ATTRS)
    with pytest.raises(DataError, match="uint8"):
        write_split(path, images.astype(np.float32), labels, CLASS_NAMES, ATTRS)
    with pytest.raises(DataError, match="dataset"):
        write_split(path, images, labels, CLASS_NAMES, {"split": "train"})
    assert not path.exists()


def test_reader_errors_name_path_and_rule(tmp_path):
    missing = tmp_path / "missing.h5"
    with pytest.raises(DataError, match="build_hdf5") as info:
        HDF5Split(missing)
    assert str(missing) in str(info.value)

    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"<html>quota exceeded</html>")
    with pytest.raises(DataError, match="build_hdf5") as info:
        HDF5Split(garbage)
    assert str(garbage) in str(info.value)

    partial = tmp_path / "partial.h5"
    with h5py.File(partial, "w") as f:
        f["images"] = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(DataError, match="labels.*build_hdf5"):
        HDF5Split(partial)

    images, labels = _toy()
    future = write_split(tmp_path / "future.h5", images, labels, CLASS_NAMES, ATTRS)
    with h5py.File(future, "a") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(DataError, match="format_version 2"):
        HDF5Split(future)


@pytest.mark.parametrize("in_memory", [False, True])
def test_pickle_after_use_reopens(tmp_path, in_memory):
    images, labels = _toy()
    split = HDF5Split(write_split(tmp_path / "t.h5", images, labels, CLASS_NAMES, ATTRS), in_memory=in_memory)
    split.get_images([1, 2])  # opens the handle

    data = pickle.dumps(split)
    clone = pickle.loads(data)

    assert len(data) < images.nbytes  # neither an h5py handle nor the in-memory copy travels
    np.testing.assert_array_equal(clone.get_images([5, 1, 5]), images[[5, 1, 5]])
    assert clone.class_names == CLASS_NAMES


def test_use_after_fork_reopens(tmp_path):
    images, labels = _toy()
    split = HDF5Split(write_split(tmp_path / "t.h5", images, labels, CLASS_NAMES, ATTRS))
    split.get_images([0])  # the parent holds an open handle when the child is forked
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must reopen, never read through the parent's handle
        code = 1
        try:
            ok = np.array_equal(split.get_images([14, 2, 2]), images[[14, 2, 2]])
            code = 0 if ok and split._pid == os.getpid() else 1
        finally:
            os.write(write_fd, bytes([code]))
            os._exit(code)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    assert os.read(read_fd, 1) == b"\x00" and os.waitstatus_to_exitcode(status) == 0
    np.testing.assert_array_equal(split.get_images([3, 14]), images[[3, 14]])  # parent still fine
