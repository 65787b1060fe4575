"""Benchmarks for the dataset builders (results: bench/RESULTS.md, section "Dataset builders").

    python bench/build_fc100.py                 # FC100 from a full-size synthetic CIFAR-100 tarball
    python bench/build_fc100.py --tiered 30000  # peak RSS of the tieredImageNet streaming build

FC100: the fixture builder writes a tarball of the real shape (60,000 32x32 images, 500 + 100 per
fine class, Python-2 pickles, gzip) in a temp dir; the FC100 build (read tar, unpickle, pool,
split, write three HDF5 files) is timed with strict counts on. Target: < 60 s on 2 cores.

tieredImageNet: a synthetic train pickle of N random 84x84 PNGs over 351 classes in shuffled file
order (the worst case: every image goes through the temporary row file) is built in a fresh
child process, which reports its own peak RSS (``ru_maxrss``) next to the RSS of the same imports
alone. Run it for two sizes to see that the peak does not grow with N.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import context  # first: this checkout's mtl; light (no torch, no numpy: the children's peak RSS stays theirs)

ROOT = context.ROOT


def bench_fc100() -> dict:
    from mtl.data.builders import build_dataset
    from tests.fixtures.raw_formats import make_cifar100_tarball

    with tempfile.TemporaryDirectory(prefix="bench-fc100-") as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "out"
        start = time.perf_counter()
        make_cifar100_tarball(raw / "cifar-100-python.tar.gz", images_per_class=600)
        generate_s = time.perf_counter() - start
        tar_mb = (raw / "cifar-100-python.tar.gz").stat().st_size / 1e6
        start = time.perf_counter()
        paths = build_dataset("fc100", raw, out)  # strict counts: the synthetic tarball is full size
        build_s = time.perf_counter() - start
        h5_mb = sum(p.stat().st_size for p in paths.values()) / 1e6
    return {"generate_s": round(generate_s, 1), "build_s": round(build_s, 1),
            "tarball_mb": round(tar_mb), "hdf5_mb": round(h5_mb)}


# Each step runs in its own child process: Linux keeps ru_maxrss across fork+exec, so the
# measuring child must be spawned by a parent that never held the synthetic data (this one
# imports nothing heavy in --tiered mode). VmHWM (reset at exec) is reported as a cross-check.
_GENERATE = """
import json, sys
sys.path.insert(0, {root!r})
from tests.fixtures.raw_formats import make_tieredimagenet_pickles
fixture = make_tieredimagenet_pickles({raw!r}, classes={{"train": 351, "val": 2, "test": 2}},
                                      images_per_class={per_class}, file_order="shuffled")
print(json.dumps({{"images": fixture.images["train"]}}))
"""

_MEASURE = """
import json, pathlib, resource, sys, time
sys.path.insert(0, {root!r})
import h5py, numpy, PIL.Image, tqdm
from mtl.data.builders import tieredimagenet
seconds = 0.0
if {build!r}:
    raw, out = pathlib.Path({raw!r}), pathlib.Path({out!r})
    start = time.perf_counter()
    tieredimagenet.build_split("train", raw / "train_images_png.pkl", raw / "train_labels.pkl",
                               out / "train.h5", strict_counts=False)
    seconds = time.perf_counter() - start
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")]
print(json.dumps({{"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "vmhwm_mb": int(hwm[0]) / 1024, "seconds": seconds}}))
"""


def bench_tiered(n_images: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-tiered-") as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "out"
        start = time.perf_counter()
        images = _child(_GENERATE, raw=str(raw), per_class=max(1, n_images // 351))["images"]
        generate_s = time.perf_counter() - start
        pickle_mb = (raw / "train_images_png.pkl").stat().st_size / 1e6
        imports = _child(_MEASURE, raw=str(raw), out=str(out), build=False)
        built = _child(_MEASURE, raw=str(raw), out=str(out), build=True)
    return {"images": images, "pickle_mb": round(pickle_mb), "pixels_mb": round(images * 84 * 84 * 3 / 1e6),
            "generate_s": round(generate_s, 1), "build_s": round(built["seconds"], 1),
            "peak_rss_mb": round(built["ru_maxrss_mb"]), "peak_vmhwm_mb": round(built["vmhwm_mb"]),
            "imports_only_rss_mb": round(imports["ru_maxrss_mb"])}


def _child(template: str, **fields) -> dict:
    code = template.format(root=str(ROOT), **fields)
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiered", type=int, metavar="N", help="measure the tiered build's peak RSS on N images")
    args = parser.parse_args()
    result = bench_tiered(args.tiered) if args.tiered else bench_fc100()
    result["python"] = platform.python_version()
    result["machine"] = context.context()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
