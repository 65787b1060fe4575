"""Drive the workflow through the Snakemake CLI, as a user would, in a scratch directory."""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SNAKEFILE = REPO / "Snakefile"
SCENARIOS = Path(__file__).resolve().parent / "workflow"
# One inference-batch measurement per pytest session for every workflow test (inference.batch_size:
# auto): runs in different scratch folders then embed with the same batch, so their numbers stay
# comparable bit for bit. The folder is new each session (tests/conftest.py sets it from
# tmp_path_factory), so no test can pass on an entry measured by an earlier run.
_inference_cache: list[Path] = []


def use_inference_cache(folder: Path) -> None:
    """Make ``folder`` the inference batch-size cache of the workflow runs from now on (conftest.py)."""
    _inference_cache[:] = [Path(folder)]


def inference_cache() -> Path:
    """This session's shared inference batch-size cache folder (``$MTL_INFERENCE_CACHE`` of every run).

    Outside pytest (no conftest), a fresh temporary folder, removed when the process exits."""
    if not _inference_cache:
        folder = Path(tempfile.mkdtemp(prefix="mtl-test-inference-cache-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _inference_cache.append(folder)
    return _inference_cache[0]


def scenario_config(name: str, overlay: dict | None = None) -> dict:
    """config.yaml with ``tests/workflow/<name>/config.yaml`` on top; a layer's `data` replaces the datasets."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for layer in (yaml.safe_load((SCENARIOS / name / "config.yaml").read_text()), overlay or {}):
        if "data" in layer:
            config["data"] = {}
        config = deep_merge(config, layer)
    return config


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_config(workdir: Path, config: dict) -> Path:
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake_command(workdir: Path, config: dict | None, *args: str, cores: int = 2) -> list[str]:
    """``python -m snakemake`` on this repository's Snakefile inside ``workdir`` (see run_snakemake)."""
    command = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(SNAKEFILE),
        "--directory", str(workdir),
        "--cores", str(cores),
        "--workflow-profile", "none",
    ]
    command += list(args)
    if config is not None:  # last: --configfile takes several values and would swallow targets
        command += ["--configfile", str(write_config(workdir, config))]
    return command


def snakemake_env(env: dict | None = None) -> dict:
    """This environment plus ``env``, with this Python's bin folder first on PATH and one inference
    batch-size cache shared by every test run of this session (the probe is measured once)."""
    run_env = {**os.environ, "MTL_INFERENCE_CACHE": str(inference_cache()), **(env or {})}
    run_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{run_env.get('PATH', '')}"
    return run_env


def run_snakemake(
    workdir: Path,
    config: dict | None,
    *args: str,
    cores: int = 2,
    timeout: int = 900,
    check: bool = True,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m snakemake`` on this repository's Snakefile inside ``workdir``.

    ``config`` replaces config.yaml entirely (written to ``workdir/config.yaml``); the default
    workflow profile is left out so a developer's local settings cannot leak into a test.
    """
    command = snakemake_command(workdir, config, *args, cores=cores)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=snakemake_env(env))
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake failed ({result.returncode}): {' '.join(command)}\n"
            f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-10000:]}"
        )
    return result


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table Snakemake prints (dry run or real), as {rule: count}."""
    counts, in_table = {}, False
    for line in output.splitlines():
        words = line.split()
        if line.startswith("Job stats"):
            in_table, counts = True, {}
        elif in_table and len(words) == 2 and words[1].isdigit():
            counts[words[0]] = int(words[1])
        elif in_table and counts and not words:
            in_table = False
    return counts


# ----------------------------------------------------------------------------- finished runs, shared


@dataclass
class FinishedRun:
    """A workflow run that has finished in ``workdir`` with ``config``: what several tests read.

    Tests read a shared run, never write to it (``changes`` lists what one wrote); a test that
    must change something works on ``copy_to(folder)``."""

    workdir: Path
    config: dict
    counts: dict[str, int]  # the jobs it ran, by rule (job_counts)
    listing: dict[str, tuple[int, int]] = field(default_factory=dict)

    def copy_to(self, dest: Path) -> FinishedRun:
        """A copy Snakemake sees as finished: modification times are kept (Snakemake reruns a job
        whose inputs are newer than its outputs) and so is .snakemake/metadata (the params, code and
        inputs each output was made with), whose records are kept per relative path."""
        shutil.copytree(self.workdir, dest, symlinks=True)
        return FinishedRun(dest, self.config, {})

    def changes(self) -> list[str]:
        """What differs from the listing taken when the run finished (empty: nobody wrote to it)."""
        now = file_listing(self.workdir)
        return sorted({path for path in self.listing.keys() | now.keys() if self.listing.get(path) != now.get(path)})


def file_listing(workdir: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime in ns)} of every file but Snakemake's own per-invocation logs."""
    return {str(path.relative_to(workdir)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in workdir.rglob("*") if path.is_file() and ".snakemake/log" not in path.as_posix()}


class StartedRun:
    """A workflow run going on in the background (``start_run``); ``finish()`` waits for it."""

    def __init__(self, workdir: Path, config: dict, targets: tuple[str, ...], cores: int):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.config = workdir, config
        self.command = snakemake_command(workdir, config, *targets, cores=cores)
        # Snakemake's output goes to a file beside the folder: a pipe nobody reads until the end would
        # fill up and stall the run. The child keeps its own handle on the file.
        self.output = workdir.parent / f"{workdir.name}.snakemake-output.txt"
        with open(self.output, "w") as output:
            self.process = subprocess.Popen(self.command, stdout=output, stderr=subprocess.STDOUT,
                                            env=snakemake_env(), start_new_session=True)

    def finish(self, timeout: int = 1800) -> FinishedRun:
        """Wait for the run; a FinishedRun, or an AssertionError with the end of its output."""
        try:
            returncode = self.process.wait(timeout=timeout)
        finally:
            self.stop()
        text = self.output.read_text()
        if returncode != 0:
            raise AssertionError(f"snakemake failed ({returncode}): {' '.join(self.command)}\n{text[-10000:]}")
        run = FinishedRun(self.workdir, self.config, job_counts(text))
        run.listing = file_listing(self.workdir)
        return run

    def stop(self) -> None:
        """Stop the run and its jobs if it still goes on (a session that never asked for it)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)  # Snakemake's own clean stop
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_run(workdir: Path, config: dict, *targets: str, cores: int = 2) -> StartedRun:
    """Start ``targets`` (default: all) in a new ``workdir`` in the background (see StartedRun)."""
    return StartedRun(workdir, config, targets or ("all",), cores)


def finish_run(workdir: Path, config: dict, *targets: str, cores: int = 2) -> FinishedRun:
    """Run ``targets`` (default: all) in a new ``workdir`` and return it as a FinishedRun."""
    return start_run(workdir, config, *targets, cores=cores).finish()
