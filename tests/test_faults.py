"""The fault matrix: every stage x every fault a long run meets, through the Snakemake CLI, nothing lost.

Each test starts from a copy of one uninterrupted run of a small scenario (the session fixture
`baseline`: the tiny digits workflow, one shot, methods ft and mtl_ht, two short meta-epochs, one
thread per job), removes what the stage under test and everything after it produced, and injects
faults at chosen points: a kill or SIGTERM through the test hook ``mtl/faults.py`` (a no-op in
normal use), a full disk (a small tmpfs mounted over a folder, as root), a damaged file, a
diverging learning rate, a user's broken image folder, a second workflow on the same folder.
After each fault it does what a user does next: run ``snakemake`` again, with ``--unlock`` and
``--rerun-incomplete`` where Snakemake asks for them, or the fix the error message names. It
checks what the user saw (the message names the file and the fix), that no file under its final
name is damaged or holds NaN (what a rerun would trust), and that the final
``results/summary.csv`` is byte-identical to the uninterrupted run's.

Faults of one stage are tried one after another in one folder, as a bad day on a cluster brings
them, so the downstream rules run once per story, not once per fault (the suite must fit in
minutes on two cores). FAULTS is the fault table of FAULT_TABLE_DOC, row by row:
`test_readme_fault_table_is_the_suite` keeps the two equal, `test_every_fault_has_its_test` ties
each row to the test that tries it, and the count line under the table is the last recording run's
(tests/fault_record.py: which tests passed, and whether each row's injector fired in its test).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tests.fault_record import FAULT_TABLE_DOC, injected, injected_if, node_id, read_record, stale_claims
from tests.slurm_cluster import SlurmCluster, in_ci, run, run_workflow_on_slurm
from tests.workflow import REPO, scenario_config, snakemake_command, snakemake_env

# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Fault:
    """One row of the fault table; ``test`` names the test that tries it, ``injector`` what that test's
    helper records (tests/fault_record.py) once it has made the fault happen: the row counts as
    handled only when its test passed and its injector fired in it."""

    stage: str
    fault: str
    sees: str
    recovers: str
    test: str
    injector: str


KILLS = "test_session_killed_in_every_data_stage"
PRETRAIN = "test_pretrain_killed_stopped_and_out_of_disk"
META = "test_meta_train_diverged_killed_stopped_and_out_of_disk"
DAMAGED = "test_damaged_files_name_the_rule_that_rebuilds_them"
FAULTS = [
    Fault("download", "SIGKILL of Snakemake and its jobs mid-export", "next run: `Directory cannot be locked`",
          "`--unlock`, rerun: the half export is discarded", KILLS,
          "MTL_FAULT_AT=digits.export#5=kill-all"),
    Fault("build_hdf5", "disk full while writing an HDF5 split", "log: `No space left to write data/<dataset>/train.h5`",
          "free space, rerun", KILLS,
          "full disk: run/data/digits"),
    Fault("build_hdf5", "SIGKILL of Snakemake and its jobs mid-write of an HDF5 split",
          "locked, then incomplete files; no half `.h5` under its name", "`--unlock`, `--rerun-incomplete`", KILLS,
          "MTL_FAULT_AT=write:val.h5=cut-all"),
    Fault("episodes", "SIGKILL of Snakemake and its jobs mid-write", "locked; no half `.npz` under its name",
          "`--unlock`, rerun: the same episodes", KILLS,
          "MTL_FAULT_AT=write:3way1shot.npz=cut-all"),
    Fault("evaluate", "SIGKILL of Snakemake and its jobs mid-write", "locked, then incomplete files",
          "`--unlock`, `--rerun-incomplete`", KILLS,
          "MTL_FAULT_AT=write:metrics.json=cut-all"),
    Fault("summarize", "disk full while writing the summary", "log: `No space left to write results/summary.csv`",
          "free space, rerun", KILLS,
          "full disk: run/results"),
    Fault("summarize", "SIGKILL of Snakemake and its jobs mid-write", "locked, then incomplete files",
          "`--unlock`, `--rerun-incomplete`", KILLS,
          "MTL_FAULT_AT=write:summary.md=cut-all"),
    Fault("pretrain", "SIGKILL mid-epoch", "`Error in rule pretrain`", "rerun resumes at the last epoch", PRETRAIN,
          "MTL_FAULT_AT=pretrain.step#15=kill"),
    Fault("pretrain", "SIGTERM (time limit, preemption, `scancel`)",
          "log: `stopped by SIGTERM at epoch 2, step 5 of 12; <checkpoint> holds this point`",
          "rerun resumes at that step", PRETRAIN,
          "MTL_FAULT_AT=pretrain.step#5=term"),
    Fault("pretrain", "SIGKILL during the checkpoint write", "`Error in rule pretrain`",
          "rerun resumes from the previous checkpoint (atomic rename)", PRETRAIN,
          "MTL_FAULT_AT=write:last.pt=cut"),
    Fault("pretrain", "disk full while writing the checkpoint", "log: `No space left to write checkpoints/.../last.pt`",
          "free space, rerun: resumes from the previous checkpoint", PRETRAIN,
          "full disk: run/checkpoints"),
    Fault("pretrain", "NaN/inf loss (lr 1e3)", "log: `pre-training diverged ...; lower pretrain.lr`",
          "restore the lr, rerun; nothing NaN was saved", "test_pretrain_diverged_then_checkpoint_corrupt",
          "config pretrain.lr=1000.0"),
    Fault("pretrain", "corrupt `last.pt`", "log: `checkpoint ... cannot be read`, `pretrain` rule, delete it",
          "delete it, rerun: trains from scratch, same result", "test_pretrain_diverged_then_checkpoint_corrupt",
          "truncated last.pt"),
    Fault("meta_train", "NaN/inf loss (inner-loop base_lr 1e38)", "log: `meta-training diverged ...; lower meta.base_lr`",
          "restore the lr, rerun; no NaN model saved", META,
          "config meta.base_lr=1e+38"),
    Fault("meta_train", "SIGKILL mid-epoch", "`Error in rule meta_train`", "rerun resumes at the last epoch", META,
          "MTL_FAULT_AT=meta.step#8=kill"),
    Fault("meta_train", "SIGTERM mid-epoch, hard-task round in progress",
          "log: `stopped by SIGTERM at epoch 2, step 3`", "rerun resumes at that step", META,
          "MTL_FAULT_AT=meta.step#3=term"),
    Fault("meta_train", "disk full while writing `model.pt`", "log: `No space left to write .../model.pt`",
          "free space, rerun: the finished checkpoint is reused", META,
          "full disk: run/results/digits/resnet12/seed1/mtl_ht/1shot"),
    Fault("meta_train", "corrupt `encoder.pt`", "log: `cannot read ...`, `pretrain` rule, delete it",
          "delete it, rerun", DAMAGED,
          "truncated encoder.pt"),
    Fault("pretrain", "truncated HDF5 split", "log: `cannot open ... as HDF5`, `build_hdf5` rule, delete it",
          "delete it, rerun", DAMAGED,
          "truncated train.h5"),
    Fault("evaluate", "corrupt `model.pt`", "log: `cannot read ...`, `meta_train` rule, delete it",
          "delete it, rerun", DAMAGED,
          "truncated model.pt"),
    Fault("evaluate", "corrupt episodes `.npz`", "log: `episode file ... cannot be read`, `episodes` rule",
          "delete it, rerun: the same episodes", DAMAGED,
          "truncated 3way1shot.npz"),
    Fault("build_hdf5", "your image folder: corrupt file, looping symlink, empty class, class < shot + query, "
          "non-image file; grey, RGBA, CMYK, 16-bit images", "one error listing every bad file and class; "
          "a warning listing the skipped files", "fix them all, rerun; odd modes converted (16-bit scaled, "
          "not clipped)", "test_bad_image_folder_is_reported_whole",
          "bad image folder"),
    Fault("any", "a second `snakemake` on the same folder while one runs",
          "`incomplete files` (the running job's), then with `--rerun-incomplete`: `Directory cannot be locked`",
          "nothing deleted; the first run finishes with the same result", "test_second_snakemake_on_one_folder_is_refused",
          "MTL_FAULT_AT=pretrain.step#3=stall"),
    Fault("pretrain on Slurm", "`scontrol requeue` of the running job: SIGTERM, then requeued",
          "the job stops within a step", "Slurm reruns it, it resumes at that step; the workflow completes",
          "test_slurm_requeue_resumes_pretrain",
          "scontrol requeue"),
    Fault("GPU rules", "two GPU jobs racing for one GPU", "the second waits, naming the holder",
          "it takes the GPU once the first ends", "tests/test_device.py::test_a_waiting_job_takes_the_slot_a_finished_job_frees",
          "every GPU slot held"),
]

# --------------------------------------------------------------------------- the baseline run

SCENARIO = {"protocol": {"shots": [1]}, "methods": ["ft", "mtl_ht"], "meta": {"epochs": 2, "episodes_per_epoch": 6}}
ONE_THREAD = ("--max-threads", "1")  # same machine, one thread per job: reruns are bit-identical
# Each rule and what its outputs feed, in this workflow: removing a stage removes these too.
DOWNSTREAM = {
    "download": ("download", "build_hdf5", "pretrain", "episodes", "meta_train", "evaluate", "summarize"),
    "build_hdf5": ("build_hdf5", "pretrain", "episodes", "meta_train", "evaluate", "summarize"),
    "pretrain": ("pretrain", "meta_train", "evaluate", "summarize"),
    "meta_train": ("meta_train", "evaluate", "summarize"),
}
TRAINING_RULES = ("pretrain", "meta_train")


@dataclass
class Baseline:
    """The uninterrupted run every test copies, and what each rule wrote there."""

    workdir: Path
    outputs: dict[str, list[str]]  # rule -> its output files, relative (Snakemake's --summary)
    summary: bytes = b""

    def output(self, rule: str, name: str | None = None) -> str:
        """The one output of ``rule`` named ``name`` (found, not built: the layout may change)."""
        found = [path for path in self.outputs[rule] if name is None or Path(path).name == name]
        assert len(found) == 1, (rule, name, self.outputs[rule])
        return found[0]


@pytest.fixture(scope="session")
def baseline(tmp_path_factory) -> Baseline:
    workdir = tmp_path_factory.mktemp("faults") / "baseline"
    workdir.mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump(scenario_config("tiny", SCENARIO), sort_keys=False))
    snakemake(workdir, "all").check()
    listing = snakemake(workdir, "--summary", "all").check().output
    outputs: dict[str, list[str]] = {}
    for line in listing.splitlines():
        cells = line.split("\t")
        if len(cells) >= 3 and cells[0] != "output_file":
            outputs.setdefault(cells[2], []).append(cells[0])
    return Baseline(workdir, outputs, (workdir / summary_path(outputs)).read_bytes())


def summary_path(outputs: dict[str, list[str]]) -> str:
    return next(path for path in outputs["summarize"] if path.endswith("summary.csv"))


def fresh_copy(baseline: Baseline, dest: Path, stage: str | None = None) -> Path:
    """A copy of the baseline run without what ``stage`` and everything after it wrote.

    The stage's own training checkpoints go too, so it really trains; training after it resumes
    its finished checkpoint (whose identity check refuses it should the new input differ).
    """
    shutil.copytree(baseline.workdir, dest, symlinks=True)
    for rule in DOWNSTREAM.get(stage, ()):
        for path in baseline.outputs.get(rule, []):
            (dest / path).unlink(missing_ok=True)
    if stage == "download":
        shutil.rmtree(dest / Path(baseline.output("download")).parent)
    if stage in TRAINING_RULES:
        for checkpoint in checkpoints_of(dest, stage):
            checkpoint.unlink()
    return dest


def checkpoints_of(workdir: Path, rule: str) -> list[Path]:
    """The resume files of ``rule`` (``pretrain`` or ``meta_train``) under checkpoints/."""
    found = sorted((workdir / "checkpoints").rglob("last.pt"))
    return [path for path in found if ("pretrain" in path.parts) == (rule == "pretrain")]


# --------------------------------------------------------------------------- running it


@dataclass
class Run:
    """One snakemake command and what it printed."""

    command: list[str]
    returncode: int
    output: str

    def check(self) -> Run:
        assert self.returncode == 0, self.explain()
        return self

    def explain(self) -> str:
        return f"`{' '.join(self.command[2:])}` exited {self.returncode}; output ends:\n{self.output[-5000:]}"

    def failed_jobs(self, workdir: Path) -> list[tuple[str, str]]:
        """(rule, log text) of every failed job Snakemake reports (``Error in rule ...: log: ...``):
        all jobs that had started before it stopped, in the order it reports them."""
        found = re.findall(r"Error in rule (\w+):\n(?:\s+.*\n)*?\s+log: (\S+)", self.output)
        return [(rule, (workdir / log).read_text()) for rule, log in found]

    def failed_log(self, workdir: Path, rule: str) -> str:
        """The log Snakemake points the user to for the failed ``rule`` job."""
        logs = [log for failed, log in self.failed_jobs(workdir) if failed == rule]
        assert logs, f"no failed {rule} job reported\n{self.explain()}"
        return logs[0]


@dataclass
class Injection:
    """One fault for mtl/faults.py: fires once, the first time its point is reached, in any process."""

    spec: str
    folder: Path

    @property
    def env(self) -> dict[str, str]:
        return {"MTL_FAULT_AT": self.spec, "MTL_FAULT_DIR": str(self.folder)}

    @property
    def fired(self) -> bool:
        return (self.folder / "fired").exists()

    def release(self) -> None:
        """Let a ``stall`` go on."""
        (self.folder / "release").touch()


def inject(tmp_path: Path, spec: str) -> Injection:
    folder = tmp_path / f"fault-{len(list(tmp_path.glob('fault-*')))}"
    folder.mkdir()
    injection = Injection(spec, folder)
    injected_if(f"MTL_FAULT_AT={spec}", lambda: injection.fired)  # the hook fires in a job, if the job gets there
    return injection


def snakemake(workdir: Path, *args: str, fault: Injection | None = None, config: Path | None = None,
              timeout: int = 600) -> Run:
    """``snakemake <args>`` in ``workdir``, in a process group of its own (a fault may kill it whole);
    ``config``: an overlay on top of the workdir's config.yaml."""
    command = snakemake_command(workdir, None, *args, *ONE_THREAD)
    if config is not None:
        command += ["--configfile", str(workdir / "config.yaml"), str(config)]
        for setting in flat_settings(yaml.safe_load(config.read_text())):
            injected(f"config {setting}")
    proc = subprocess.Popen(command, env=snakemake_env(fault.env if fault else None), start_new_session=True,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"snakemake ran past {timeout} s: {' '.join(command)}\n{output[-5000:]}") from None
    return Run(command, proc.returncode, output)


def flat_settings(overlay: dict, prefix: str = "") -> list[str]:
    """``{"meta": {"base_lr": 1e38}}`` -> ``["meta.base_lr=1e+38"]``."""
    settings = []
    for key, value in overlay.items():
        if isinstance(value, dict):
            settings += flat_settings(value, f"{prefix}{key}.")
        else:
            settings.append(f"{prefix}{key}={value}")
    return settings


LOCKED = "Directory cannot be locked"
INCOMPLETE = "--rerun-incomplete"


def rerun_as_a_user(workdir: Path, *args: str, fault: Injection | None = None,
                    unlock: bool = True) -> tuple[Run, list[str]]:
    """``snakemake all`` again, doing what Snakemake says: ``--unlock`` when a dead run left its
    lock (``unlock``: the user knows no other run is going on), ``--rerun-incomplete`` when it
    names incomplete files. Returns the last run and the advice followed, in order."""
    followed: list[str] = []
    extra: list[str] = []
    while True:
        result = snakemake(workdir, "all", *extra, *args, fault=fault)
        if LOCKED in result.output and unlock and "--unlock" not in followed:
            followed.append("--unlock")
            snakemake(workdir, "--unlock", "all").check()
        elif result.returncode != 0 and INCOMPLETE in result.output and INCOMPLETE not in followed:
            followed.append(INCOMPLETE)
            extra = [INCOMPLETE]
        else:
            return result, followed


def kill_session_at(workdir: Path, fault: Injection, *args: str) -> list[str]:
    """The user's next run, during which the machine dies at ``fault``; the advice it followed."""
    killed, followed = rerun_as_a_user(workdir, *args, fault=fault)
    assert fault.fired and killed.returncode == -signal.SIGKILL, killed.explain()
    assert_nothing_damaged(workdir)
    return followed


# --------------------------------------------------------------------------- what must hold


def assert_results_identical(workdir: Path, baseline: Baseline) -> None:
    """summary.csv byte for byte, and every epoch of every training history (but its wall time):
    a resume that went wrong in an epoch that did not become the best one shows only there."""
    summary = workdir / summary_path(baseline.outputs)
    built_before = (baseline.workdir / summary_path(baseline.outputs)).stat().st_mtime
    assert summary.stat().st_mtime > built_before, "the summary was not rebuilt: this compares nothing"
    assert summary.read_bytes() == baseline.summary, (
        f"summary differs from the uninterrupted run's:\n{summary.read_text()}\nvs\n{baseline.summary.decode()}")
    for rule in TRAINING_RULES:
        history = baseline.output(rule, "history.csv")
        seen, expected = (pd.read_csv(root / history).drop(columns="seconds") for root in (workdir, baseline.workdir))
        pd.testing.assert_frame_equal(seen, expected, check_exact=True, obj=history)


def assert_nothing_damaged(workdir: Path) -> None:
    """Every file under its final name (what a rerun would trust) reads whole, with no NaN in it."""
    for folder in ("data", "results", "checkpoints"):
        for path in sorted((workdir / folder).rglob("*")):
            if path.is_file() and not path.name.startswith(".") and "raw" not in path.relative_to(workdir).parts:
                check_readable(path)


def check_readable(path: Path) -> None:
    from PIL import Image

    from mtl.data.episodes import load_episodes
    from mtl.data.hdf5 import HDF5Split

    try:
        if path.suffix == ".h5":
            split = HDF5Split(path)
            split.get_images(np.arange(len(split)))
        elif path.suffix == ".pt":
            assert_finite(torch.load(path, map_location="cpu", weights_only=True), path)
        elif path.suffix == ".npz":
            load_episodes(path)
        elif path.suffix == ".csv":
            assert len(pd.read_csv(path)) > 0
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.verify()
    except AssertionError:
        raise
    except Exception as err:
        raise AssertionError(f"{path} is damaged under its final name: {type(err).__name__}: {err}") from err


def assert_finite(value, path: Path) -> None:
    """No NaN/inf anywhere in a checkpoint or model: a diverged run must never be kept."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        assert torch.isfinite(value).all(), f"{path} holds NaN/inf"
    elif isinstance(value, dict):
        for item in value.values():
            assert_finite(item, path)
    elif isinstance(value, (list, tuple)):
        for item in value:
            assert_finite(item, path)


def assert_no_leftovers(workdir: Path) -> None:
    """After recovery no temporary file or folder of an interrupted write is left behind."""
    leftovers = [p for p in workdir.rglob(".*") if not p.relative_to(workdir).parts[0].startswith(".snakemake")
                 and (p.name.endswith(".tmp") or p.name.startswith(".digits-"))]
    assert not leftovers, leftovers


def assert_plain_error(log: str, *fragments: str) -> None:
    """The log ends in our error with every fragment (the file, the rule, the fix) and no traceback."""
    assert "ERROR: " in log and "Traceback" not in log, log[-3000:]
    message = log[log.index("ERROR: "):]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in the error:\n{message}"


def finish_and_compare(workdir: Path, baseline: Baseline) -> list[str]:
    """The user's last rerun: the results equal the uninterrupted run's, nothing left over.
    Returns the advice it followed."""
    final, followed = rerun_as_a_user(workdir)
    assert final.returncode == 0, final.explain()
    assert_results_identical(workdir, baseline)
    assert_nothing_damaged(workdir)
    assert_no_leftovers(workdir)
    return followed


def job_log(workdir: Path, rule: str) -> str:
    """The log of this scenario's one job of ``rule`` (its latest run)."""
    logs = sorted((workdir / "logs" / rule).rglob("*.log"))
    assert len(logs) == 1, logs
    return logs[0].read_text()


def truncate(path: Path) -> None:
    """Cut a file to half its size, as a copy interrupted outside our writers leaves it."""
    os.truncate(path, path.stat().st_size // 2)
    injected(f"truncated {path.name}")


# --------------------------------------------------------------------------- a full disk


class SmallDisk:
    """A tmpfs mounted over ``folder`` (what was there copied in), to be filled to the last byte."""

    def __init__(self, folder: Path, name: str):
        self.folder = folder
        self.filler = folder / ".filler"
        self.name = name  # the injector it records when full

    def mount(self) -> bool:
        """Mount it; False (and the folder as it was) where this machine does not allow it."""
        held = self.folder.with_name(self.folder.name + ".before-tmpfs")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.rename(held)
        self.folder.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(self.folder)],
                                 capture_output=True, text=True).returncode == 0
        if not mounted:
            self.folder.rmdir()
        shutil.copytree(held, self.folder, symlinks=True, dirs_exist_ok=True)  # mtimes kept: no reruns
        shutil.rmtree(held)
        return mounted

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for size in (1 << 20, 1 << 12, 1):
                with contextlib.suppress(OSError):
                    while os.write(fd, b"\0" * size):
                        pass
        finally:
            os.close(fd)
        assert shutil.disk_usage(self.folder).free < 4096
        injected(f"full disk: {self.name}")

    def free(self) -> None:
        self.filler.unlink()

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.folder)], check=False, capture_output=True)


@pytest.fixture
def small_disk(tmp_path) -> Iterator:
    """``small_disk(folder)`` -> a mounted SmallDisk, or None where tmpfs cannot be mounted (not root):
    the story then leaves its disk-full steps out and ends in a skip that says so (a failure in CI)."""
    mounted: list[SmallDisk] = []

    def make(folder: Path) -> SmallDisk | None:
        disk = SmallDisk(folder, folder.relative_to(tmp_path).as_posix())
        if os.geteuid() == 0 and shutil.which("mount") and disk.mount():
            mounted.append(disk)
            return disk
        if in_ci():
            pytest.fail("CI=true but a tmpfs cannot be mounted here: the disk-full faults need root and mount")
        return None

    yield make
    for disk in reversed(mounted):
        disk.unmount()


NO_TMPFS = "disk-full steps left out: mounting a tmpfs needs root (everything else in this story passed)"


def assert_disk_full_reported(run: Run, workdir: Path, rule: str, written: str) -> None:
    """A write that met a full disk: the log names the file and the fix; no part of it is left."""
    assert run.returncode != 0, run.explain()
    assert_plain_error(run.failed_log(workdir, rule), f"No space left to write {written}", "Free space there")
    assert not (workdir / written).exists()
    assert not list((workdir / written).parent.glob(f".{Path(written).name}*"))
    assert_nothing_damaged(workdir)


# --------------------------------------------------------------------------- the stories


@pytest.mark.slow
def test_session_killed_in_every_data_stage(baseline, tmp_path, small_disk):
    """The machine dies (Snakemake and its jobs, SIGKILL) once in each stage that writes declared
    outputs, and the disk fills up twice; each time the user runs what Snakemake and the error
    message say, and the end result is the uninterrupted one."""
    work = fresh_copy(baseline, tmp_path / "run", "download")
    h5 = baseline.output("build_hdf5", "train.h5")
    episodes = Path(baseline.output("episodes")).name

    # Each step returns the advice its rerun followed to get past the previous step's fault.
    assert kill_session_at(work, inject(tmp_path, "digits.export#5=kill-all")) == []
    data_disk = small_disk(work / Path(h5).parent)
    if data_disk:
        data_disk.fill()
        full, followed = rerun_as_a_user(work)
        assert followed == ["--unlock"], followed  # the manifest never appeared: nothing incomplete
        assert_disk_full_reported(full, work, "build_hdf5", h5)
        data_disk.free()
    kill_session_at(work, inject(tmp_path, "write:val.h5=cut-all"))
    # train.h5 was whole but its job was cut short: Snakemake calls it incomplete
    assert set(kill_session_at(work, inject(tmp_path, f"write:{episodes}=cut-all"))) == {"--unlock", INCOMPLETE}
    assert "--unlock" in kill_session_at(work, inject(tmp_path, "write:metrics.json=cut-all"))
    done, followed = rerun_as_a_user(work, "--omit-from", "summarize")
    assert done.returncode == 0 and set(followed) == {"--unlock", INCOMPLETE}, (followed, done.explain())
    results_disk = small_disk(work / Path(summary_path(baseline.outputs)).parent)
    if results_disk:
        results_disk.fill()
        full, _ = rerun_as_a_user(work)
        assert_disk_full_reported(full, work, "summarize", summary_path(baseline.outputs))
        results_disk.free()
    assert kill_session_at(work, inject(tmp_path, "write:summary.md=cut-all")) == []
    assert set(finish_and_compare(work, baseline)) == {"--unlock", INCOMPLETE}
    if not (data_disk and results_disk):
        pytest.skip(NO_TMPFS)


@pytest.mark.slow
def test_pretrain_killed_stopped_and_out_of_disk(baseline, tmp_path, small_disk):
    """Pre-training meets SIGKILL mid-epoch, SIGTERM, a kill while writing its checkpoint and a full
    disk at the next checkpoint; each rerun resumes from the last safe point, and the encoder it
    ends with gives the uninterrupted summary."""
    work = fresh_copy(baseline, tmp_path / "run", "pretrain")

    killed, _ = rerun_as_a_user(work, fault=inject(tmp_path, "pretrain.step#15=kill"))  # epoch 2, step 3 of 12
    assert "Error in rule pretrain" in killed.output, killed.explain()
    assert_nothing_damaged(work)

    stopped, _ = rerun_as_a_user(work, fault=inject(tmp_path, "pretrain.step#5=term"))
    assert "pretrain: resuming from epoch 2 (" in job_log(work, "pretrain")  # the kill lost only epoch 2
    checkpoint = str(checkpoints_of(work, "pretrain")[0].relative_to(work))
    assert_plain_error(stopped.failed_log(work, "pretrain"), "pre-training stopped by SIGTERM at epoch 2, step 5 "
                       f"of 12; {checkpoint} holds this point", "Run the same snakemake command again")
    assert_nothing_damaged(work)

    cut, _ = rerun_as_a_user(work, fault=inject(tmp_path, "write:last.pt=cut"))
    assert "resuming from epoch 2, step 5 " in job_log(work, "pretrain")
    assert cut.returncode != 0, cut.explain()
    assert_nothing_damaged(work)  # the half-written checkpoint never took the name last.pt

    disk = small_disk(work / "checkpoints")
    if disk:
        disk.fill()
        full, _ = rerun_as_a_user(work)
        assert "resuming from epoch 2, step 5 " in job_log(work, "pretrain")
        assert_plain_error(full.failed_log(work, "pretrain"), f"No space left to write {checkpoint}",
                           "Free space there")
        assert_nothing_damaged(work)
        disk.free()

    finish_and_compare(work, baseline)
    assert "resuming from epoch 2, step 5 " in job_log(work, "pretrain")
    if not disk:
        pytest.skip(NO_TMPFS)


@pytest.mark.slow
def test_meta_train_diverged_killed_stopped_and_out_of_disk(baseline, tmp_path, small_disk):
    """Meta-training meets a diverging learning rate, SIGKILL mid-epoch, SIGTERM in the middle of a
    hard-task round and a full disk when writing model.pt; nothing NaN is kept, each rerun resumes
    from the last safe point, and the summary is the uninterrupted one."""
    work = fresh_copy(baseline, tmp_path / "run", "meta_train")
    model = baseline.output("meta_train", "model.pt")

    bad_lr = tmp_path / "bad-lr.yaml"
    # (at lr 1e3 the query loss of this tiny run reaches 1e6 but stays finite: BatchNorm after every
    # scaled conv; an inner-loop rate of 1e38 overflows the logits, as fp16 does on a GPU far sooner)
    bad_lr.write_text(yaml.safe_dump({"meta": {"base_lr": 1.0e38}}))
    diverged = snakemake(work, "all", config=bad_lr)
    assert_plain_error(diverged.failed_log(work, "meta_train"), "meta-training diverged",
                       "meta.base_lr (now 1e+38)", "and rerun")
    assert not (work / model).exists() and not checkpoints_of(work, "meta_train")  # it diverged in epoch 1
    assert_nothing_damaged(work)

    killed, _ = rerun_as_a_user(work, fault=inject(tmp_path, "meta.step#8=kill"))  # epoch 2, step 2 of 6
    assert "Error in rule meta_train" in killed.output, killed.explain()
    assert_nothing_damaged(work)

    # step 3 of epoch 2: its hard-task round holds three failure classes when the signal comes
    stopped, _ = rerun_as_a_user(work, fault=inject(tmp_path, "meta.step#3=term"))
    assert "resuming from epoch 2 (" in job_log(work, "meta_train")
    checkpoint = str(checkpoints_of(work, "meta_train")[0].relative_to(work))
    assert_plain_error(stopped.failed_log(work, "meta_train"), "meta-training stopped by SIGTERM at epoch 2, "
                       f"step 3; {checkpoint} holds this point", "Run the same snakemake command again")
    assert_nothing_damaged(work)

    disk = small_disk(work / Path(model).parent)
    if disk:
        disk.fill()
        full, _ = rerun_as_a_user(work)
        assert "resuming from epoch 2, step 3 " in job_log(work, "meta_train")
        assert_disk_full_reported(full, work, "meta_train", model)
        disk.free()

    finish_and_compare(work, baseline)
    if not disk:
        assert "resuming from epoch 2, step 3 " in job_log(work, "meta_train")
        pytest.skip(NO_TMPFS)


@pytest.mark.slow
def test_pretrain_diverged_then_checkpoint_corrupt(baseline, tmp_path):
    """lr 1e3 stops pre-training with the suggestion and saves nothing; later a damaged checkpoint
    is refused with the fix, and the from-scratch rerun gives the uninterrupted result."""
    work = fresh_copy(baseline, tmp_path / "run", "pretrain")
    bad_lr = tmp_path / "bad-lr.yaml"
    bad_lr.write_text(yaml.safe_dump({"pretrain": {"lr": 1000.0}}))
    diverged = snakemake(work, "all", config=bad_lr)
    assert_plain_error(diverged.failed_log(work, "pretrain"), "pre-training diverged",
                       "lower pretrain.lr (now 1000.0) and rerun")
    assert not (work / baseline.output("pretrain", "encoder.pt")).exists()
    assert not checkpoints_of(work, "pretrain")  # it diverged in epoch 1: nothing to keep
    assert_nothing_damaged(work)

    rerun_as_a_user(work, fault=inject(tmp_path, "pretrain.step#15=kill"))
    checkpoint = checkpoints_of(work, "pretrain")[0]
    truncate(checkpoint)
    refused, _ = rerun_as_a_user(work)
    assert_plain_error(refused.failed_log(work, "pretrain"), f"checkpoint {checkpoint.relative_to(work)} cannot be "
                       "read", "`pretrain` rule: delete it and rerun the workflow")
    checkpoint.unlink()  # what the message says
    finish_and_compare(work, baseline)
    assert "starting from scratch" in job_log(work, "pretrain")


@pytest.mark.slow
def test_damaged_files_name_the_rule_that_rebuilds_them(baseline, tmp_path):
    """A file truncated on disk before the job that reads it (encoder, HDF5 split, episodes, model,
    in turn, with meta-training and what follows still to run): each error names the file, the
    rule that makes it and the fix; deleting it and rerunning rebuilds it, and the end result is the
    uninterrupted one."""
    work = fresh_copy(baseline, tmp_path / "run", "meta_train")
    train, encoder = baseline.output("build_hdf5", "train.h5"), baseline.output("pretrain", "encoder.pt")
    episodes, model = baseline.output("episodes"), baseline.output("meta_train", "model.pt")

    def damaged_then_deleted(damaged: str, rule: str, readers: set[str], says: str, *args: str) -> None:
        truncate(work / damaged)
        failed, _ = rerun_as_a_user(work, *args)
        assert failed.returncode != 0, failed.explain()
        # Snakemake stops after the first failures; which readers had started is its scheduler's
        # choice (CI once saw evaluate and export_model fail first, meta_train never started).
        jobs = failed.failed_jobs(work)
        assert jobs, f"no failed job reported\n{failed.explain()}"
        assert {reader for reader, _ in jobs} <= readers, (readers, [reader for reader, _ in jobs])
        for _, log in jobs:
            assert_plain_error(log, damaged, says, f"`{rule}` rule", "delete", "rerun the workflow")
        (work / damaged).unlink()  # what the message says

    # the encoder is read by meta-training, by ft's evaluation and by ft's model export
    damaged_then_deleted(encoder, "pretrain", {"meta_train", "evaluate", "export_model"}, "cannot read")
    damaged_then_deleted(train, "build_hdf5", {"pretrain", "meta_train", "export_model"}, "as HDF5")
    rebuilt, _ = rerun_as_a_user(work, "--omit-from", "evaluate")  # up to the trained model
    assert rebuilt.returncode == 0, rebuilt.explain()
    damaged_then_deleted(episodes, "episodes", {"evaluate"}, "cannot be read")
    damaged_then_deleted(model, "meta_train", {"evaluate", "export_model"}, "cannot read")
    finish_and_compare(work, baseline)


@pytest.mark.slow
def test_second_snakemake_on_one_folder_is_refused(baseline, tmp_path):
    """While one workflow runs, a second on the same folder is refused and changes nothing."""
    work = fresh_copy(baseline, tmp_path / "run", "pretrain")
    stall = inject(tmp_path, "pretrain.step#3=stall")
    command = snakemake_command(work, None, "all", *ONE_THREAD)
    first = subprocess.Popen(command, env=snakemake_env(stall.env), start_new_session=True, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: stall.fired or first.poll() is not None, "the first run to reach pre-training")
        assert first.poll() is None, first.communicate()[0]
        # The running job's history.csv makes Snakemake call it incomplete before it checks the
        # lock; a user who follows that advice is still refused, and nothing is deleted.
        second, followed = rerun_as_a_user(work, unlock=False)
        assert second.returncode != 0 and LOCKED in second.output, second.explain()
        assert followed == [INCOMPLETE], followed
        stall.release()
        output, _ = first.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, output[-5000:]
    assert_results_identical(work, baseline)


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.2)


# --------------------------------------------------------------------------- a user's image folder


@pytest.mark.slow
def test_bad_image_folder_is_reported_whole(tmp_path):
    """Every problem of a user's image folder in one error (not the first only); odd image modes
    are converted; once the listed files are fixed the build succeeds."""
    from PIL import Image

    from mtl.data.hdf5 import HDF5Split
    from tests.fixtures.raw_formats import make_image_folder

    root = make_image_folder(tmp_path / "images", classes={"train": 3, "val": 3, "test": 3},
                             images_per_class=3).path
    odd = root / "train" / "train_class_0"
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 16-bit, up to 63,000
    Image.fromarray(grey).save(odd / "a_grey.png")
    Image.fromarray(np.dstack([grey, grey, grey, grey])).save(odd / "b_rgba.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(odd / "c_cmyk.jpg")
    Image.fromarray(deep).save(odd / "d_deep.png")
    bad = {
        "corrupt": root / "val" / "val_class_1" / "broken.jpg",
        "loop": root / "test" / "test_class_2" / "loop.png",
        "empty": root / "train" / "empty_class",
        "small": root / "test" / "small_class",
    }
    bad["corrupt"].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    bad["loop"].symlink_to(bad["loop"].name)
    (bad["empty"] / "sub").mkdir(parents=True)
    (bad["empty"] / "README.txt").write_text("no images here")
    bad["small"].mkdir()
    shutil.copy(odd / "a_grey.png", bad["small"] / "only.png")
    notes = root / "val" / "val_class_0" / "notes.txt"
    notes.write_text("not an image")
    injected("bad image folder")

    work = tmp_path / "run"
    work.mkdir()
    config = {"data": {"mine": {"source": "imagefolder", "path": str(root), "image_size": 8}},
              "protocol": {"shots": [1], "query": 2}}  # an episode needs 3 images per class
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    failed = snakemake(work, "all_hdf5")
    log = failed.failed_log(work, "build_hdf5")
    assert_plain_error(log, "4 problem(s)", f"{bad['corrupt']}: cannot decode", f"{bad['loop']}: cannot decode",
                       f"{bad['empty']}: empty class folder", f"{bad['small']}: 1 image(s), fewer than the 3")
    assert "skipped 1 file(s) that are not images" in log and str(notes) in log

    # Without class problems the files are decoded while the splits are written: still all listed.
    shutil.rmtree(bad["empty"]), shutil.rmtree(bad["small"])
    failed = snakemake(work, "all_hdf5")
    assert_plain_error(failed.failed_log(work, "build_hdf5"), "2 problem(s)", f"{bad['corrupt']}: cannot decode",
                       f"{bad['loop']}: cannot decode")
    assert not list((work / "data" / "mine").glob("*.h5")) and not list((work / "data" / "mine").glob(".*"))

    bad["corrupt"].unlink(), bad["loop"].unlink()
    snakemake(work, "all_hdf5").check()
    train = HDF5Split(work / "data/mine/train.h5")
    rows = train.indices_by_class()[0]  # class 0, files in sorted order: a_grey, b_rgba, c_cmyk, d_deep, img_*
    images = train.get_images(rows[:4]).astype(int)
    assert (images[0] == grey[..., None]).all()  # grey -> R = G = B
    assert (images[1] == grey[..., None]).all()  # RGBA -> RGB, alpha dropped
    assert (np.abs(images[2] - [255, 0, 0]) <= 2).all()  # CMYK (0, 255, 255, 0) is red
    assert (np.abs(images[3] - np.rint(deep / 257.0)[..., None]) <= 1).all()  # scaled, not clipped at 255


# --------------------------------------------------------------------------- Slurm


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_requeue_resumes_pretrain(baseline, tmp_path, slurm_cluster: SlurmCluster):
    """On a real Slurm, `scontrol requeue` of the running pre-training job (SIGTERM, then SIGKILL
    after KillWait, then a new start, as on preemption): the job saves its step and stops, Slurm
    starts it again, it resumes at that step, and the workflow ends with the uninterrupted summary."""
    work = fresh_copy(baseline, tmp_path / "run", "pretrain")
    stall = inject(tmp_path, "pretrain.step#15=stall")
    config = yaml.safe_load((work / "config.yaml").read_text())
    finished: dict = {}
    workflow = threading.Thread(target=lambda: finished.update(run=run_workflow_on_slurm(
        slurm_cluster, work, ["all"], config=config, extra_args=list(ONE_THREAD), env=stall.env, timeout=900)))
    workflow.start()
    try:
        wait_for(lambda: stall.fired or not workflow.is_alive(), "pre-training to run on Slurm", timeout=600)
        assert stall.fired, finished["run"].explain()
        job = slurm_job_of("pretrain")
        run(["scontrol", "requeue", job])  # raises unless Slurm took it
        injected("scontrol requeue")
        # Slurm holds a requeued job back (BeginTime, about two minutes); let it start when it is
        # pending again, as an administrator would: the wait is Slurm's, not ours to test.
        wait_for(lambda: slurm_job_state(job) == "PENDING", "the requeued job to be pending", timeout=120)
        run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    finally:
        workflow.join(timeout=1000)
    result = finished["run"]
    if result.returncode != 0:  # the plugin saw the job fail before Slurm requeued it: the user reruns
        result = run_workflow_on_slurm(slurm_cluster, work, ["all"], config=config, extra_args=list(ONE_THREAD))
    assert result.returncode == 0, result.explain()
    log = job_log(work, "pretrain")
    assert "pretrain: resuming from epoch 2, step 3 " in log, log
    assert_results_identical(work, baseline)


def slurm_job_state(job: str) -> str:
    return run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"], check=False).stdout.strip()


def slurm_job_of(rule: str) -> str:
    """The Slurm job id of the running job of ``rule`` (the plugin puts the rule in the comment)."""
    listing = run(["squeue", "-h", "-t", "running", "-o", "%i %k"]).stdout
    jobs = [line.split()[0] for line in listing.splitlines() if f"rule_{rule}" in line]
    assert len(jobs) == 1, listing
    return jobs[0]


# --------------------------------------------------------------------------- the table


def test_every_fault_has_its_test():
    missing = []
    for fault in FAULTS:
        module, _, name = fault.test.rpartition("::")
        source = importlib.import_module(module.removesuffix(".py").replace("/", ".")) if module else None
        if not callable((vars(source) if source else globals()).get(name)):
            missing.append(fault.test)
    assert not missing, f"fault rows without a test: {missing}"
    # Two rows of one test with the same injector could not be told apart in the record.
    injectors = [(node_id(fault), fault.injector) for fault in FAULTS]
    assert len(set(injectors)) == len(injectors), f"rows sharing a test and an injector: {injectors}"


def readme_table() -> str:
    """The fault table as FAULTS renders it (the count line under it comes from the record)."""
    lines = ["| stage | fault | what the user sees | what recovers | test |", "|---|---|---|---|---|"]
    lines += [f"| {f.stage} | {f.fault} | {f.sees} | {f.recovers} | `{f.test.replace('tests/', '')}` |" for f in FAULTS]
    return "\n".join(lines)


def test_readme_fault_table_is_the_suite():
    doc = (REPO / FAULT_TABLE_DOC).read_text()
    assert readme_table() in doc, f"{FAULT_TABLE_DOC}'s fault table differs from tests/test_faults.py; it should read:\n{readme_table()}"


def test_the_doc_claims_no_more_than_the_recorded_run():
    """The count line under the table is the last recording run's, and that run tried this table."""
    problems = stale_claims((REPO / FAULT_TABLE_DOC).read_text(), read_record(), FAULTS)
    assert not problems, "\n".join(problems)
