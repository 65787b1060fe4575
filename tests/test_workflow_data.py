"""The data rules end to end through the Snakemake CLI, on tiny files in each dataset's raw format.

miniImageNet comes over HTTP from a loopback mirror (the real download code), FC100 from a
folder the user filled by hand, and an image-folder tree from disk; nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import hashlib

import pytest

from mtl.data.hdf5 import HDF5Split
from tests.fixtures.http_server import FileServer
from tests.fixtures.raw_formats import make_cifar100_tarball, make_image_folder, make_miniimagenet_pickles
from tests.workflow import REPO, job_counts, run_snakemake

MINI_MIRROR_NAMES = {
    "mini-imagenet-cache-train.pkl": "mini-imagenet-cache-train.pkl",
    "mini-imagenet-cache-val.pkl": "mini-imagenet-cache-validation.pkl",  # Zenodo's spelling
    "mini-imagenet-cache-test.pkl": "mini-imagenet-cache-test.pkl",
}


def disabled(source: str) -> dict:
    return {"enabled": False, "source": source}


def test_default_config_dry_run_lists_download_and_build_for_mini_and_fc100(tmp_path):
    result = run_snakemake(tmp_path, None, "--configfile", str(REPO / "config.yaml"), "-n", "all_hdf5")
    out = result.stdout
    for dataset in ("miniimagenet", "fc100"):
        assert f"data/raw/{dataset}/manifest.json" in out
        assert f"data/{dataset}/train.h5" in out
    assert "tieredimagenet" not in out  # disabled by default: ~13 GB
    counts = job_counts(out)
    assert counts["download"] == 2 and counts["build_hdf5"] == 2


@pytest.fixture
def raw_sources(tmp_path):
    """Serve miniImageNet pickles on loopback, and fill a hand-made CIFAR-100 folder."""
    mini = make_miniimagenet_pickles(tmp_path / "mini_src", images_per_class=4, classes={"train": 5, "val": 3, "test": 3})
    cifar_dir = tmp_path / "by_hand"
    cifar_dir.mkdir()
    cifar = make_cifar100_tarball(cifar_dir / "cifar-100-python.tar.gz", images_per_class=2)
    folder = make_image_folder(tmp_path / "my_images")
    with FileServer() as server:
        mirrors = {
            local: [server.add("/zenodo/" + remote, (mini.path / local).read_bytes())]
            for local, remote in MINI_MIRROR_NAMES.items()
        }
        yield {"server": server, "mirrors": mirrors, "mini": mini, "cifar": cifar, "folder": folder}


def data_config(raw_sources) -> dict:
    cifar_sha = hashlib.sha256(raw_sources["cifar"].path.read_bytes()).hexdigest()
    return {
        "data": {
            "miniimagenet": {"source": "miniimagenet", "mirrors": raw_sources["mirrors"], "strict_counts": False},
            "fc100": {
                "source": "fc100",
                "path": str(raw_sources["cifar"].path.parent),
                # a deliberate stand-in for the real archive: the pin replaces the registry's facts
                "checksums": {"cifar-100-python.tar.gz": cifar_sha},
                "strict_counts": False,
            },
            "mine": {"source": "imagefolder", "path": str(raw_sources["folder"].path), "image_size": 16},
            "tieredimagenet": disabled("tieredimagenet"),
        },
        # a folder of images must hold shot + query images per class: the fixture has 3
        "protocol": {"shots": [1], "query": 2},
    }


@pytest.mark.slow
def test_data_rules_build_every_split_from_mirror_manual_folder_and_image_tree(tmp_path, raw_sources):
    work = tmp_path / "run"
    work.mkdir()
    run_snakemake(work, data_config(raw_sources), "all_hdf5")

    mini = HDF5Split(work / "data/miniimagenet/test.h5")
    assert mini.class_names == raw_sources["mini"].class_names["test"]
    assert len(mini) == raw_sources["mini"].images["test"]
    assert mini.image_shape == (84, 84, 3)
    fc100 = HDF5Split(work / "data/fc100/val.h5")
    assert fc100.num_classes == 20 and fc100.image_shape == (32, 32, 3)
    assert len(fc100) == raw_sources["cifar"].images["val"]  # train and test images pooled per class
    mine = HDF5Split(work / "data/mine/train.h5")
    assert mine.class_names == raw_sources["folder"].class_names["train"]
    assert mine.image_shape == (16, 16, 3)

    # miniImageNet came over HTTP (one request per file); FC100 needed no network at all.
    server = raw_sources["server"]
    assert all(len(server.requests_for("/zenodo/" + name)) == 1 for name in MINI_MIRROR_NAMES.values())
    raw = work / "data/raw/miniimagenet"
    assert not list(raw.glob("*.part"))
    assert (raw / "mini-imagenet-cache-val.pkl.sha256").exists()  # observed digest recorded

    # A second run has nothing to do: downloads and builds are not repeated.
    again = run_snakemake(work, data_config(raw_sources), "all_hdf5")
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_html_instead_of_data_fails_clearly_and_leaves_nothing_half_written(tmp_path, raw_sources):
    server: FileServer = raw_sources["server"]
    quota_page = b"<!DOCTYPE html><html><head><title>Quota exceeded</title></head><body>Too many users</body></html>"
    html_url = server.add("/html/mini-imagenet-cache-train.pkl", quota_page, content_type="text/html")
    config = data_config(raw_sources)
    config["data"] = {"miniimagenet": {"source": "miniimagenet", "mirrors": {"mini-imagenet-cache-train.pkl": [html_url]}}}
    # the registry's Zenodo mirror must not be reached from a test: refuse it through a dead proxy
    work = tmp_path / "run"
    work.mkdir()
    result = run_snakemake(
        work, config, "all_hdf5", check=False,
        env={"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "127.0.0.1"},
    )
    assert result.returncode != 0
    log = (work / "logs/download/miniimagenet.log").read_text()
    assert "HTML" in log and "mini-imagenet-cache-train.pkl" in log
    assert "data/raw/miniimagenet/mini-imagenet-cache-train.pkl" in log  # where to drop a manual copy
    assert not (work / "data/raw/miniimagenet/manifest.json").exists()
    assert not (work / "data/raw/miniimagenet/mini-imagenet-cache-train.pkl").exists()
    assert not (work / "data/miniimagenet").exists()
