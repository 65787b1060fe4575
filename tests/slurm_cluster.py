"""A real single-node Slurm for the test suite, and a helper that runs the workflow on it.

Why a real one: the promise "the same workflow runs on a Slurm cluster with --profile
profiles/slurm" (README, "Run on a cluster") breaks in ways no mock shows: a status command that
hangs without an accounting database, a GPU request that never reaches sbatch, a job that runs the
wrong Python. So the ``slurm`` tests start munged, slurmctld and slurmd on this machine (Debian's
packages), with two fake GPUs so ``--gpus=1`` allocates and Slurm sets CUDA_VISIBLE_DEVICES.

They run only when asked (``MTL_TEST_SLURM=1``, or ``CI=true`` where they must not skip): they
need root, write /etc/slurm/slurm.conf (the plugin strips SLURM_CONF inside jobs, so the default
path is the only one that works) and start daemons. Packages are installed by .ci/run, never
here (:data:`APT_INSTALL`). Everything started is stopped by PID at the end, and config files
are put back as they were; a Slurm that was already running is used as is and left running.

Importable without pytest (``with local_slurm_cluster() as cluster: ...``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import yaml

from tests.workflow import REPO, scenario_config

SLURM_PROFILE = REPO / "profiles" / "slurm"

APT_INSTALL = "apt-get update && apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
REQUIRED_PROGRAMS = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol")
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")

SLURM_CONF = Path("/etc/slurm/slurm.conf")
GRES_CONF = Path("/etc/slurm/gres.conf")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN_DIR = Path("/run/munge")
MUNGED_PID = MUNGE_RUN_DIR / "munged.pid"
SLURM_RUN_DIR = Path("/run/slurm-mtl-test")
SLURMCTLD_PID = SLURM_RUN_DIR / "slurmctld.pid"
SLURMD_PID = SLURM_RUN_DIR / "slurmd.pid"
SLURM_LOG_DIR = Path("/var/log/slurm")
SLURMCTLD_LOG = SLURM_LOG_DIR / "slurmctld.log"
SLURMD_LOG = SLURM_LOG_DIR / "slurmd.log"
STATE_DIR = Path("/var/spool/slurmctld")
SLURMD_SPOOL = Path("/var/spool/slurmd")

FAKE_GPUS = 2
PARTITION = "debug"
# squeue forgets a finished job after MinJobAge seconds; the plugin's squeue status check needs it
# to stay visible for at least 3x its first-check delay (2 s in tests, 40 s in profiles/slurm).
MIN_JOB_AGE = 600
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0

SKIP_REASON = (
    "real-Slurm test: runs only when asked (MTL_TEST_SLURM=1, or CI=true); it needs root, writes "
    "/etc/slurm/slurm.conf and starts munged/slurmctld/slurmd"
)


class SlurmSetupError(RuntimeError):
    """The local Slurm could not be brought up; the message says which step and shows its logs."""


def slurm_tests_requested() -> bool:
    return os.environ.get("MTL_TEST_SLURM") == "1" or in_ci()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def find_program(name: str) -> str | None:
    """Like shutil.which, but also looks in the sbin folders a non-login root PATH may lack."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_DIRS))


def missing_programs() -> list[str]:
    return [name for name in REQUIRED_PROGRAMS if find_program(name) is None]


def why_unavailable() -> str | None:
    """None when a local Slurm can be started here, else the reason (for a skip or a CI failure)."""
    missing = missing_programs()
    if missing:
        return f"Slurm/munge programs not installed: {', '.join(missing)}. Install them with: {APT_INSTALL}"
    if os.geteuid() != 0:
        return "starting a local Slurm needs root (it writes /etc/slurm and /etc/munge and runs the daemons)"
    return None


# ----------------------------------------------------------------------------- the cluster


@dataclass
class Daemon:
    """A daemon this module started; stopped by its PID, never by name."""

    name: str
    pid: int


@dataclass
class SlurmCluster:
    host: str
    cpus: int
    memory_mb: int
    gpus: int
    partition: str = PARTITION
    reused: bool = False
    started: list[Daemon] = field(default_factory=list)

    def jobs_state(self, job_ids: list[str]) -> dict[str, str]:
        """Slurm state of each job (COMPLETED, FAILED, ...), from squeue (MinJobAge keeps finished ones)."""
        if not job_ids:
            return {}
        out = run(["squeue", "-h", "-t", "all", "-o", "%i %T", "-j", ",".join(job_ids)]).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())


def machine_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise SlurmSetupError("No MemTotal line in /proc/meminfo")


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def slurm_conf_text(host: str, cpus: int, memory_mb: int) -> str:
    """slurm.conf for one node at 127.0.0.1, no cgroups, no accounting."""
    return f"""\
# Written by tests/slurm_cluster.py for the test suite; removed (or restored) when the tests end.
ClusterName=mtltest
SlurmctldHost={host}(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={STATE_DIR}
SlurmdSpoolDir={SLURMD_SPOOL}
SlurmctldPidFile={SLURMCTLD_PID}
SlurmdPidFile={SLURMD_PID}
SlurmctldLogFile={SLURMCTLD_LOG}
SlurmdLogFile={SLURMD_LOG}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# Without it a job lacking --mem takes the whole node.
DefMemPerCPU=500
MinJobAge={MIN_JOB_AGE}
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} Gres=gpu:fake:{FAKE_GPUS} State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def gres_conf_text(host: str) -> str:
    # Any existing device files do: Slurm only hands out their indices as CUDA_VISIBLE_DEVICES.
    return f"NodeName={host} Name=gpu Type=fake File=/dev/tty[0-{FAKE_GPUS - 1}]\n"


def run(cmd: list[str], *, check: bool = True, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    program = find_program(cmd[0]) or cmd[0]
    return subprocess.run([program, *cmd[1:]], check=check, timeout=timeout, capture_output=True, text=True, **kwargs)


def munge_works() -> bool:
    try:
        cred = run(["munge", "-n"], timeout=10).stdout
        return run(["unmunge"], input=cred, timeout=10).returncode == 0
    except (subprocess.SubprocessError, OSError):
        return False


def controller_up() -> bool:
    """True when a slurmctld already answers (someone else's, or ours from before)."""
    if not SLURM_CONF.exists():
        return False
    try:
        out = run(["scontrol", "ping"], check=False, timeout=15).stdout
    except subprocess.SubprocessError:
        return False
    return " is UP" in out


def ensure_munge_key() -> None:
    if MUNGE_KEY.exists():
        return
    MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
    MUNGE_KEY.write_bytes(os.urandom(128))
    shutil.chown(MUNGE_KEY, "munge", "munge")
    MUNGE_KEY.chmod(0o400)


def start_munged() -> Daemon | None:
    """Start munged as the munge user unless one already answers; returns what was started."""
    if munge_works():
        return None
    ensure_munge_key()
    MUNGE_RUN_DIR.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_RUN_DIR, "munge", "munge")
    MUNGED_PID.unlink(missing_ok=True)
    run(["runuser", "-u", "munge", "--", find_program("munged") or "munged"])
    daemon = Daemon("munged", wait_for_pid_file(MUNGED_PID, "munged"))
    if not munge_works():
        stop_daemon(daemon)
        raise SlurmSetupError("munged started but `munge -n | unmunge` fails; see /var/log/munge/munged.log")
    return daemon


def start_slurm_daemon(name: str, args: list[str], pid_file: Path, log: Path) -> Daemon:
    """Start slurmctld or slurmd (both daemonise) and return its PID from the pid file."""
    pid_file.unlink(missing_ok=True)
    result = run([name, *args], check=False)
    if result.returncode != 0:
        raise SlurmSetupError(f"`{name} {' '.join(args)}` exited {result.returncode}: {result.stderr}{log_tail(log)}")
    return Daemon(name, wait_for_pid_file(pid_file, name, log))


def wait_for_pid_file(pid_file: Path, name: str, log: Path | None = None, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().split()[0])
            if process_is(pid, name):
                return pid
        time.sleep(0.2)
    raise SlurmSetupError(f"{name} wrote no live PID to {pid_file} within {timeout:.0f} s.{log_tail(log)}")


def process_is(pid: int, name: str) -> bool:
    """The process is alive (not a zombie) and is the named program (guards against a recycled PID)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    comm, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
    return comm == name[:15] and state not in "ZX"


def stop_daemon(daemon: Daemon) -> None:
    """SIGTERM by PID, wait, SIGKILL if it lingers. Never by name."""
    if not process_is(daemon.pid, daemon.name):
        return
    os.kill(daemon.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if not process_is(daemon.pid, daemon.name):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(daemon.pid, signal.SIGKILL)


def node_state() -> str:
    try:
        return run(["sinfo", "-h", "-o", "%T"], check=False, timeout=15).stdout.strip()
    except subprocess.SubprocessError:
        return "(sinfo timed out)"


def wait_until_idle(timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = node_state()
        if state in ("idle", "mixed", "allocated"):
            return
        time.sleep(1)
    reason = run(["sinfo", "-h", "-o", "%T %E"], check=False).stdout.strip()
    raise SlurmSetupError(
        f"The test node did not become idle within {timeout:.0f} s (sinfo: {reason or state!r})."
        f"{log_tail(SLURMCTLD_LOG)}{log_tail(SLURMD_LOG)}"
    )


def log_tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    text = "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return f"\n--- last lines of {log} ---\n{text}"


def cluster_gpus() -> int:
    """GPUs per node as sinfo reports them ('gpu:fake:2' -> 2)."""
    gres = run(["sinfo", "-h", "-o", "%G"]).stdout
    return sum(int(n) for n in re.findall(r"gpu(?::[^:,(\s]+)?:(\d+)", gres))


def describe_running_cluster() -> SlurmCluster:
    out = run(["sinfo", "-h", "-N", "-o", "%N %c %m"]).stdout.split()
    return SlurmCluster(host=out[0], cpus=int(out[1]), memory_mb=int(out[2]), gpus=cluster_gpus(), reused=True)


class ConfigFiles:
    """Writes config files and later puts back what was there (or removes them)."""

    def __init__(self) -> None:
        self.saved: dict[Path, bytes | None] = {}

    def write(self, path: Path, text: str) -> None:
        if path not in self.saved:
            self.saved[path] = path.read_bytes() if path.exists() else None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def restore(self) -> None:
        for path, content in self.saved.items():
            if content is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(content)


def cancel_jobs() -> None:
    """Cancel jobs still queued on a cluster this module started (they can only be the tests')."""
    ids = run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
    if ids:
        run(["scancel", *ids], check=False)
        time.sleep(2)


@contextlib.contextmanager
def local_slurm_cluster() -> Iterator[SlurmCluster]:
    """A running single-node Slurm with fake GPUs; stops and undoes only what it started."""
    reason = why_unavailable()
    if reason:
        raise SlurmSetupError(reason)
    started: list[Daemon] = []
    files = ConfigFiles()
    try:
        munged = start_munged()
        started += [munged] if munged else []
        if controller_up():
            cluster = describe_running_cluster()
            if cluster.gpus < 1:
                raise SlurmSetupError(
                    f"A Slurm is already running here ({SLURM_CONF}) but offers no gpu GRES; the tests need "
                    "one GPU to ask for. Stop it, or add a gpu GRES to it (see tests/slurm_cluster.py)."
                )
            wait_until_idle()
            yield cluster
            return
        host = short_hostname()
        cpus = os.cpu_count() or 1
        memory_mb = max(500, int(machine_memory_mb() * 0.9))
        files.write(SLURM_CONF, slurm_conf_text(host, cpus, memory_mb))
        files.write(GRES_CONF, gres_conf_text(host))
        for folder in (SLURM_RUN_DIR, SLURM_LOG_DIR, STATE_DIR, SLURMD_SPOOL):
            folder.mkdir(parents=True, exist_ok=True)
        # -c: start from a clean state, so a node left DOWN by an earlier run does not linger.
        started.append(start_slurm_daemon("slurmctld", ["-c"], SLURMCTLD_PID, SLURMCTLD_LOG))
        started.append(start_slurm_daemon("slurmd", [], SLURMD_PID, SLURMD_LOG))
        wait_until_idle()
        cluster = SlurmCluster(host=host, cpus=cpus, memory_mb=memory_mb, gpus=cluster_gpus(), started=started)
        try:
            yield cluster
        finally:
            cancel_jobs()
    finally:
        for daemon in reversed(started):
            stop_daemon(daemon)
        files.restore()


# ----------------------------------------------------------------------------- the workflow on it


@dataclass
class WorkflowRun:
    """What one `snakemake --profile profiles/slurm` run did."""

    returncode: int
    output: str
    workdir: Path
    # snakemake job id -> rule name, split by where the job ran
    local_jobs: dict[str, str]
    remote_jobs: dict[str, str]
    # snakemake job id -> Slurm job id
    submitted: dict[str, str]

    def explain(self) -> str:
        return f"snakemake exited {self.returncode} in {self.workdir}; its output ends:\n{self.output[-6000:]}"


def profile_for(cluster: SlurmCluster, dest: Path, set_resources: dict | None = None) -> Path:
    """profiles/slurm (plus ``set_resources``, {rule: {resource: value}}, as a user would edit
    it) with each memory and GPU request capped at what the test node has.

    A real cluster's per-rule memory does not fit a CI runner's one node, and sbatch rejects a
    request no node can satisfy (threads are capped by ``--max-threads`` in
    :func:`run_workflow_on_slurm`). Everything else (executor, status command, gpu requests,
    runtimes) is the profile as users get it.
    """
    profile = yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())
    for rule, values in (set_resources or {}).items():
        profile.setdefault("set-resources", {}).setdefault(rule, {}).update(values)
    for resources in (profile.get("set-resources") or {}).values():
        if "mem_mb" in resources:
            resources["mem_mb"] = min(int(resources["mem_mb"]), cluster.memory_mb)
        if "gpu" in resources:
            resources["gpu"] = min(int(resources["gpu"]), cluster.gpus)
    # pretrain's memory comes from the rule (8 GB per training process), beyond a small runner's node
    profile.setdefault("set-resources", {}).setdefault("pretrain", {}).setdefault("mem_mb", cluster.memory_mb // 2)
    profile["default-resources"] = [
        f"mem_mb={min(int(item.split('=')[1]), cluster.memory_mb)}" if item.startswith("mem_mb=") else item
        for item in profile.get("default-resources") or []
    ]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


def venv_env() -> dict[str, str]:
    """This Python's bin folder first on PATH (jobs inherit it: the plugin submits with --export=ALL)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", ""), *SBIN_DIRS])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_workflow_on_slurm(
    cluster: SlurmCluster,
    workdir: Path,
    targets: list[str],
    *,
    config: dict | None = None,
    extra_args: list[str] = (),
    set_resources: dict | None = None,
    timeout: int = 600,
    env: dict[str, str] | None = None,
    max_threads: int | None = None,
) -> WorkflowRun:
    """Run the workflow under profiles/slurm in ``workdir`` and say which jobs went through sbatch.

    ``config`` is the whole workflow config (default: the `tiny` scenario); ``set_resources`` is
    added to the profile (see :func:`profile_for`); ``env``, variables added to the environment
    (jobs inherit it); ``max_threads``, the CPUs a job may ask for (default: the node's). The run is
    bounded by ``timeout -s INT``: the plugin ignores SIGTERM while it waits on Slurm, and SIGINT
    makes Snakemake scancel its jobs.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config or scenario_config("tiny"), sort_keys=False))
    profile = profile_for(cluster, workdir.parent / f"{workdir.name}-profile", set_resources)
    cmd = [
        "timeout", "-s", "INT", "-k", "30", str(timeout),
        sys.executable, "-m", "snakemake",
        *targets,  # first: options such as --configfile take several values
        "--profile", str(profile),
        "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(config_path),
        "--slurm-init-seconds-before-status-checks", "2",
        "--slurm-keep-successful-logs",
        # the rules' own threads (and the profile's) may exceed the test node's CPUs
        "--max-threads", str(max_threads or cluster.cpus),
        "--verbose",
        *extra_args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env={**venv_env(), **(env or {})}, cwd=workdir, capture_output=True, text=True,
                          timeout=timeout + 60)
    output = proc.stdout + proc.stderr
    local_jobs, remote_jobs = jobs_by_place(output)
    return WorkflowRun(proc.returncode, output, workdir, local_jobs, remote_jobs, submissions(output))


JOB_HEADER = re.compile(r"^(local)?rule (\w+):\n(?:[ \t]+.*\n)*?[ \t]+jobid: (\d+)$", re.MULTILINE)
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")


def jobs_by_place(output: str) -> tuple[dict[str, str], dict[str, str]]:
    """Snakemake's job announcements: 'localrule x:' runs on the submit host, 'rule x:' on Slurm."""
    local, remote = {}, {}
    for match in JOB_HEADER.finditer(output):
        (local if match.group(1) else remote)[match.group(3)] = match.group(2)
    return local, remote


def submissions(output: str) -> dict[str, str]:
    return dict(SUBMITTED.findall(output))
