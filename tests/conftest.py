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
from tests.workflow import FinishedRun, StartedRun, finish_run, scenario_config, start_run, use_inference_cache

# Records what the fault tests tried (--fault-record) and which injectors fired in each.
pytest_plugins = ["tests.fault_record"]

# ----------------------------------------------------------------------------- test processes
# Half the suite's time is one process waiting on one core (a fault story's reruns, a Slurm job's
# status checks, unit tests), so where pytest-xdist is installed (the `test` extra) a run of the
# whole suite (no files or tests named: `pytest`, `pytest -m "not slow"`) uses up to MAX_PROCESSES
# test processes, one per core (`-n 0`: this process only; `-n N`: N). A run that names files or
# tests stays in this process unless `-n` is given: starting a process that imports torch costs more
# than a few modules take. Tests go out in work units that must stay in one process:
#  - every test that needs the local Slurm (one per machine: /etc/slurm and its daemons);
#  - the tests that read the shared tiny runs below (each runs once, in the process that reads it);
#  - otherwise a module (its module- and session-scoped fixtures run once in each process it is in).
# The heaviest units go out first, so that no process is left alone with a long one at the end; the
# shared runs (two CPUs busy) start beside the Slurm unit (which mostly waits on Slurm's status checks),
# and the fault suite (its reruns one job at a time: one CPU) after it, beside the ablation run.
MAX_PROCESSES = 4
SLURM_UNIT = "tests that need the local Slurm"
SHARED_RUNS_UNIT = "tests that read the shared tiny runs"
SHARED_RUN_MODULES = ("tests/test_workflow_full.py", "tests/test_workflow_predict.py")
SHARED_RUN_FIXTURES = ("tiny_two_seeds", "tiny_seed_two_alone", "seed_two_alone_started")
#: Longest first, as measured (bench/RESULTS.md, "Where CI's time goes"); other units keep their order.
LONGEST_UNITS = (SLURM_UNIT, SHARED_RUNS_UNIT, "tests/test_faults.py", "tests/test_workflow_ablation.py")


def work_unit(nodeid: str) -> str:
    """The unit of a test: Slurm tests are named ``test_slurm*`` or live in tests/test_slurm.py (what
    the scheduler sees is the test id alone; pytest_collection_modifyitems checks the names)."""
    module, _, name = nodeid.partition("::")
    if module == "tests/test_slurm.py" or name.startswith("test_slurm"):
        return SLURM_UNIT
    return SHARED_RUNS_UNIT if module in SHARED_RUN_MODULES else module


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config) -> None:
    """Test processes for the whole suite where pytest-xdist is installed, as above; one process for a
    fault record, which needs every fault test's outcome in the process that writes it."""
    if not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput"):
        return
    if config.getoption("fault_record", False):
        config.option.numprocesses = 0
    elif (config.option.numprocesses is None and not config.option.file_or_dir
          and not config.getoption("usepdb", False)):
        config.option.numprocesses = "auto"  # one per core ...
        config.option.maxprocesses = config.option.maxprocesses or MAX_PROCESSES  # ... up to MAX_PROCESSES


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Hand out work units (work_unit) rather than single tests, unless `--dist` names another way."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    # Keep the collection's order (longest units first, pytest_collection_modifyitems); xdist's
    # default would reorder units by their number of tests, sending the few long Slurm tests last.
    config.option.loadscopereorder = False

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByWorkUnit(config, log)


def pytest_collection_modifyitems(config, items) -> None:
    """Every test that needs the local Slurm or a shared run is in its unit (a test elsewhere would
    start a second Slurm on the machine, or run a shared run twice); in a test process, the longest
    units come first (every process collects the same order, which the scheduler hands out)."""
    misplaced = [f"{item.nodeid} (uses slurm_cluster: name it test_slurm_*)" for item in items
                 if "slurm_cluster" in getattr(item, "fixturenames", ()) and work_unit(item.nodeid) != SLURM_UNIT]
    misplaced += [f"{item.nodeid} (reads a shared run: put it in one of {', '.join(SHARED_RUN_MODULES)})"
                  for item in items if set(SHARED_RUN_FIXTURES) & set(getattr(item, "fixturenames", ()))
                  and work_unit(item.nodeid) != SHARED_RUNS_UNIT]
    if misplaced:
        raise pytest.UsageError("tests outside their work unit (tests/conftest.py):\n" + "\n".join(misplaced))
    if hasattr(config, "workerinput"):
        rank = {unit: position for position, unit in enumerate(LONGEST_UNITS)}
        items.sort(key=lambda item: rank.get(work_unit(item.nodeid), len(rank)))  # stable: the rest keep order


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


# ----------------------------------------------------------------------------- shared workflow runs
# A tiny workflow run costs a minute or more of two cores, mostly Python starting and importing torch
# in each of its jobs (~3 CPU s a job), so each of these runs once per session for every test that
# reads it (tests/test_workflow_full.py, tests/test_workflow_predict.py); a test that changes
# something works on a copy (FinishedRun.copy_to). Each fails the session's teardown if a test wrote
# to it.
#: One image per forward pass, in evaluate and in predict: a backend's kernels may differ with the
#: batch's size (oneDNN below 16 images: features ~4e-6 apart), and ft's inner loop is sensitive
#: enough for that to flip predictions; the prediction contract (a saved test episode written out as
#: folders gets evaluate's predictions) is exact equality given the same features, and the runs
#: compared bit for bit must embed alike. (inference.batch_size: auto is measured by the ablation run.)
ONE_IMAGE_PER_PASS = {"inference": {"batch_size": 1}}


def tiny_with_seeds(seeds: list[int]) -> dict:
    """The tiny scenario with these training seeds, one image per forward pass."""
    return scenario_config("tiny", {"protocol": {"seeds": seeds}, **ONE_IMAGE_PER_PASS})


def _shared(run: FinishedRun) -> Iterator[FinishedRun]:
    yield run
    changed = run.changes()
    if changed:
        pytest.fail(f"a test wrote to the shared run {run.workdir} (work on FinishedRun.copy_to instead): "
                    f"{changed[:10]}", pytrace=False)


@pytest.fixture(scope="session")
def seed_two_alone_started(tmp_path_factory) -> Iterator[StartedRun]:
    """tiny_seed_two_alone's run, started in the background (stopped at the end if nobody read it)."""
    started = start_run(tmp_path_factory.mktemp("seed_two_alone"), tiny_with_seeds([2]), cores=1)
    yield started
    started.stop()


@pytest.fixture(scope="session")
def tiny_two_seeds(tmp_path_factory, seed_two_alone_started) -> Iterator[FinishedRun]:
    """The tiny scenario with training seeds 1 and 2 (``--cores 2``: two jobs at a time). The seed-2
    run goes on beside it (its one job at a time would leave a core idle after it)."""
    yield from _shared(finish_run(tmp_path_factory.mktemp("two_seeds"), tiny_with_seeds([1, 2]), cores=2))


@pytest.fixture(scope="session")
def tiny_seed_two_alone(seed_two_alone_started) -> Iterator[FinishedRun]:
    """Seed 2 of tiny_two_seeds alone, one job at a time (``--cores 1``)."""
    yield from _shared(seed_two_alone_started.finish())


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
