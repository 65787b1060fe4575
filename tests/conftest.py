"""Shared pytest fixtures."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl.batching import CACHE_ENV
from mtl.data.hdf5 import write_split
from tests.slurm_cluster import SKIP_REASON, SlurmCluster, in_ci, local_slurm_cluster, slurm_tests_requested, why_unavailable
from tests.workflow import use_inference_cache

# Records what the fault tests tried (--fault-record) and which injectors fired in each.
pytest_plugins = ["tests.fault_record"]


@pytest.fixture(scope="session", autouse=True)
def session_inference_cache(tmp_path_factory) -> Path:
    """The inference batch-size cache every workflow run of this session shares
    (``$MTL_INFERENCE_CACHE``, see tests/workflow.py): a new folder each session, never one left by an
    earlier run (pytest's numbered session folder, of which it keeps the last few for inspection)."""
    folder = tmp_path_factory.mktemp("inference-cache")
    use_inference_cache(folder)
    return folder


@pytest.fixture(autouse=True)
def no_inference_cache_override(monkeypatch) -> None:
    """A developer's ``$MTL_INFERENCE_CACHE`` must not redirect a test's cache to a folder that outlives
    it: unit tests use the folder they pass (their ``tmp_path``); workflow runs get the session's
    folder from tests/workflow.py whatever the environment says."""
    monkeypatch.delenv(CACHE_ENV, raising=False)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The test machine's two cores are shared with other work: keep each test on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The local Slurm (tests/slurm_cluster.py), or a skip (a failure under CI=true) saying why there is none."""
    if not slurm_tests_requested():
        pytest.skip(SKIP_REASON)
    reason = why_unavailable()
    if reason:
        if in_ci():
            pytest.fail(f"CI=true but no local Slurm can run: {reason}", pytrace=False)
        pytest.skip(reason)
    with local_slurm_cluster() as cluster:
        yield cluster


def _write_tiny_split(path: str | Path, classes: int = 4, per_class: int = 10, size: int = 20, *, split: str = "test",
                      seed: int = 0, noise: int = 40) -> Path:
    """``classes`` x ``per_class`` images of ``size`` x ``size`` pixels, written by the library's own
    writer (so each file passes the checks every real split passes). Class ``c`` is one colour plus
    uniform integer noise in [-``noise``, ``noise``) per pixel: classes are separable, so training
    must score above chance, and one seed gives the same file content every time (a "rebuilt" split)
    while another seed gives other images with the same names and counts."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    colours = rng.integers(0, 256, size=(classes, 1, 1, 3))
    pixels = colours[labels] + rng.integers(-noise, noise, size=(len(labels), size, size, 3))
    names = [f"class{c:02d}" for c in range(classes)]
    return write_split(path, np.clip(pixels, 0, 255).astype(np.uint8), labels, names, {"dataset": "toy", "split": split})


@pytest.fixture(scope="session")
def tiny_split() -> Callable[..., Path]:
    """``tiny_split(path, classes=4, per_class=10, size=20, *, split="test", seed=0, noise=40)`` writes
    a tiny HDF5 split (see ``_write_tiny_split``) and returns its path. Session-scoped, so module-scoped
    fixtures can use it too."""
    return _write_tiny_split
