"""Random access from an HDF5 split, as an episode reads it: batches of 80 random indices.

Builds a synthetic 20 classes x 600 images 84x84 split in a temp dir, warms the page cache, then
times HDF5Split.get_images (direct chunk reads), in_memory=True, and, for comparison, h5py fancy
indexing on sorted unique indices and h5py one image at a time (what the reader does not do, and why).

    .venv/bin/python bench/hdf5_random_access.py [--batches 300] [--batch-size 80]

With --png-pickle-mb M it instead writes an M MB tieredImageNet-style pickle (Python 2 cPickle
protocol 2: a list of 1-D uint8 arrays, each a 20 kB "PNG"), streams it with
mtl.data.safe_pickle.iter_pickled_bytes and prints the time and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import resource
import struct
import tempfile
import time
from pathlib import Path

import context  # first: this checkout's mtl, and the machine beside every figure
import h5py
import numpy as np

from mtl.data.hdf5 import HDF5Split
from mtl.data.safe_pickle import iter_pickled_bytes

CLASSES, PER_CLASS, SIZE = 20, 600, 84


def images_per_second(read, batches: list[np.ndarray]) -> float:
    read(batches[0])  # warm-up (first open)
    start = time.perf_counter()
    for batch in batches:
        read(batch)
    return sum(map(len, batches)) / (time.perf_counter() - start)


def _py2_array(data: bytes) -> bytes:
    """What Python 2 cPickle (protocol 2) wrote for a 1-D uint8 numpy array."""
    length = b"K" + bytes([len(data)]) if len(data) < 256 else b"J" + struct.pack("<i", len(data))
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01(" + length
            + b"tcnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
            + b"T" + struct.pack("<i", len(data)) + data + b"tb")


def png_pickle_stream(megabytes: int) -> None:
    rng = np.random.default_rng(0)
    count = megabytes * 1_000_000 // 20_000
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train_images_png.pkl"
        with open(path, "wb") as f:  # written item by item: the writer holds one payload
            f.write(b"\x80\x02](")
            for _ in range(count):
                f.write(_py2_array(b"\x89PNG" + rng.bytes(19_996)))
            f.write(b"e.")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        found = sum(1 for _ in iter_pickled_bytes(path))
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert found == count
        context.figure(f"iter_pickled_bytes: {path.stat().st_size / 1e6:.0f} MB, {count} payloads in {seconds:.2f} s "
                       f"({count / seconds:,.0f} payloads/s); peak RSS {peak / 1024:.0f} MB "
                       f"(before streaming {before / 1024:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=80)
    parser.add_argument("--png-pickle-mb", type=int, default=0, help="run the pickle-streaming bench instead")
    args = parser.parse_args()
    print(context.machine_line())
    if args.png_pickle_mb:
        png_pickle_stream(args.png_pickle_mb)
        return
    rng = np.random.default_rng(1)
    n = CLASSES * PER_CLASS
    batches = [rng.integers(0, n, args.batch_size) for _ in range(args.batches)]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.h5"
        _, seconds = context.timed(lambda: context.write_synthetic_split(path, n, CLASSES, SIZE))
        context.figure(f"write_split: {n} images {SIZE}x{SIZE} in {seconds:.2f} s ({n / seconds:,.0f} images/s), "
                       f"{path.stat().st_size / 1e6:.0f} MB")
        path.read_bytes()  # warm page cache

        split = HDF5Split(path)
        rate = images_per_second(split.get_images, batches)
        context.figure(f"get_images (direct chunk reads), batch {args.batch_size}: {rate:,.0f} images/s")

        start = time.perf_counter()
        in_memory = HDF5Split(path, in_memory=True)
        load = time.perf_counter() - start
        rate = images_per_second(in_memory.get_images, batches)
        context.figure(f"in_memory=True: load {load:.2f} s, get_images {rate:,.0f} images/s")

        with h5py.File(path, "r") as f:
            dset = f["images"]

            def fancy(batch):
                unique, inverse = np.unique(batch, return_inverse=True)
                return dset[unique][inverse]

            rate = images_per_second(fancy, batches[: max(1, args.batches // 10)])
            context.figure(f"h5py fancy indexing (sorted unique, re-expanded), for comparison: {rate:,.0f} images/s")

            def per_image(batch):
                return np.stack([dset[int(i)] for i in batch])

            rate = images_per_second(per_image, batches)
            context.figure(f"h5py one image at a time (the reader's fallback for other layouts): {rate:,.0f} images/s")


if __name__ == "__main__":
    main()
