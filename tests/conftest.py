"""Shared pytest fixtures."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.slurm_cluster import SKIP_REASON, SlurmCluster, in_ci, local_slurm_cluster, slurm_tests_requested, why_unavailable


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
