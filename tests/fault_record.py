"""What the fault suite really tried: a record of one run of it, and the doc's count line made from it.

The fault table (FAULTS in tests/test_faults.py, rendered in FAULT_TABLE_DOC) says what each fault
looks like and how it recovers; the line under it says how many of them were tried and handled.
That line used to be computed from the table's length, so it stayed true with every fault test
skipped or failing. Now:

- each FAULTS row names its *injector*: a label that the helper making the fault happen records
  when it has (``injected``: a truncated file, a filled disk, a config overlay that diverges) or
  that is checked once the test is over (``injected_if``: a kill through mtl/faults.py fires in a
  Snakemake job, which leaves a file behind);
- a fault test that passes without its rows' injectors firing fails (in any run);
- a recording run (``pytest --fault-record`` on every fault test; ``python -m tests.fault_record
  --run`` runs exactly those) writes RECORD: each test's outcome and the injectors that fired in
  it, and per row ``handled`` (its test passed AND its injector fired), ``failed`` (its test
  failed, or passed without injecting the fault) or ``skipped`` (with the reason); with the date,
  CPU, Python, torch and git commit of the run;
- the count line counts each row by what its test's entry says (``row_status``), never by the
  row's own ``status``: a record whose row reads "handled" while its test failed (an edited or a
  merged record) counts that row as failed, and ``stale_claims`` names the row;
- ``python -m tests.fault_record --update`` rewrites the count line of FAULT_TABLE_DOC from the
  record, and tests/test_faults.py fails while the doc's line is not the record's or the record
  misses a row of the table (``stale_claims``).

A partial run never writes the record: --fault-record refuses to start unless every fault test is
collected (a ``-k`` selection, a single file), and a run stopped before each fault test has an
outcome (``-x``, Ctrl-C) leaves the old record as it was. Merging per fault instead would let the
line add up outcomes of different commits and machines under one date, and a ``-k`` run of the
passing tests could hide a failure recorded earlier. A complete run with failures is written:
that is what the line must then say. Ordinary runs (a developer's, CI's) write nothing: the record
is committed, and a test run must not change tracked files.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FAULT_TABLE_DOC = "docs/faults.md"  # the doc whose fault table ends in the count line
FAULT_SUITE = "tests/test_faults.py"  # where FAULTS lives; a row's bare test name is a test of it
RECORD = "tests/fault_record.json"  # relative to the repository (pytest's rootdir)
INJECTED = "faults_injected"  # the user property carrying a test's fired injectors to its report
# The count line, old form ("25 faults tried, ...") or new ("25 faults in the table; ..."): the
# line --update replaces and the check reads.
COUNT_LINE = re.compile(r"^\d+ faults (?:tried|in the table)\b.*$", re.MULTILINE)

# --------------------------------------------------------------------------- the injector registry

_fired: set[str] = set()
_pending: list[tuple[str, Callable[[], bool]]] = []


def injected(label: str) -> None:
    """Called by the helper that makes a fault happen, once it has happened (in this test)."""
    _fired.add(label)


def injected_if(label: str, happened: Callable[[], bool]) -> None:
    """For a fault that happens, if at all, in another process: ``happened()`` is asked when the test ends."""
    _pending.append((label, happened))


def _start_test() -> None:
    _fired.clear()
    _pending.clear()


def _take() -> list[str]:
    """The injectors that fired in the test that just ran."""
    fired = _fired | {label for label, happened in _pending if happened()}
    _start_test()
    return sorted(fired)


# --------------------------------------------------------------------------- the table's rows


def node_id(row) -> str:
    """The pytest node id of the test a FAULTS row names (a bare name is a test of FAULT_SUITE)."""
    return row.test if "::" in row.test else f"{FAULT_SUITE}::{row.test}"


def row_key(row) -> tuple[str, str, str, str]:
    """What the record must agree on with the table, row by row."""
    return row.stage, row.fault, node_id(row), row.injector


def fault_status(injector: str, test: dict | None) -> tuple[str, str]:
    """``(status, why)`` of the row of ``injector`` from its test's entry: handled only if the test
    passed and the injector fired in it; a test that passed without injecting proves nothing about
    the row, and one with no outcome recorded proves nothing at all."""
    if test is None or test.get("outcome") is None:
        return "failed", "its test has no recorded outcome"
    if test["outcome"] != "passed":
        return ("skipped" if test["outcome"] == "skipped" else "failed"), test.get("reason", "")
    if injector not in test.get("injected", []):  # (the run already failed such a test; kept for a record read alone)
        return "failed", f"its test passed without injecting it: {not_fired([injector])}"
    return "handled", ""


def row_status(record: dict, fault: dict) -> tuple[str, str]:
    """``(status, why)`` of a row of ``record["faults"]``, from the outcome of its test in the record."""
    return fault_status(fault["injector"], record.get("tests", {}).get(fault["test"]))


def not_fired(injectors: list[str]) -> str:
    return f"{', '.join(map(repr, injectors))} never fired"


# --------------------------------------------------------------------------- the recording run


def pytest_addoption(parser) -> None:
    parser.addoption("--fault-record", action="store_true",
                     help=f"record what the fault tests tried in {RECORD} (needs every fault test selected)")


def pytest_configure(config) -> None:
    config.pluginmanager.register(FaultRecorder(config), "fault-record")


class FaultRecorder:
    """Collects each fault test's outcome and fired injectors; writes the record after a complete run."""

    def __init__(self, config):
        self.config = config
        self.enabled = config.getoption("fault_record", False)
        self.faults: list = []
        self.wanted: set[str] = set()
        self.tests: dict[str, dict] = {}
        self.started = time.monotonic()
        self.said = ""

    def pytest_collection_finish(self, session) -> None:
        suite = Path(session.config.rootpath) / FAULT_SUITE
        module = next((item.module for item in session.items
                       if getattr(item, "module", None) is not None and Path(item.path) == suite), None)
        if module is None:
            if self.enabled:
                raise pytest.UsageError(f"--fault-record: {FAULT_SUITE} is not in this run")
            return
        self.faults = list(module.FAULTS)
        self.wanted = {node_id(row) for row in self.faults}
        missing = sorted(self.wanted - {item.nodeid for item in session.items})
        if self.enabled and missing:
            raise pytest.UsageError(f"--fault-record needs every fault test; not selected: {', '.join(missing)}")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item) -> None:
        _start_test()  # what an earlier test injected is not this test's

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        try:
            return (yield)
        finally:
            fired = _take()
            if item.nodeid in self.wanted:  # carried by the report (the channel pytest keeps across processes)
                item.user_properties.append((INJECTED, fired))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        """A fault test that passes without making each of its rows' faults happen fails, in every
        run (CI's too), not only in a recording run: it no longer tries what the table says it does."""
        report = yield
        if call.when == "call" and report.passed and item.nodeid in self.wanted:
            fired = dict(report.user_properties).get(INJECTED, [])
            missing = [row.injector for row in self.faults if node_id(row) == item.nodeid and row.injector not in fired]
            if missing:
                report.outcome = "failed"
                report.longrepr = (f"passed without injecting its fault table rows: {not_fired(missing)} (the "
                                   f"helper that makes a fault happen records its injector; fired: {fired})")
        return report

    def pytest_runtest_logreport(self, report) -> None:
        if report.nodeid not in self.wanted:
            return
        test = self.tests.setdefault(report.nodeid, {"outcome": None, "reason": "", "seconds": 0.0, "injected": []})
        test["seconds"] = round(test["seconds"] + report.duration, 1)
        for name, value in report.user_properties:
            if name == INJECTED:
                test["injected"] = value
        if report.failed:
            test["outcome"], test["reason"] = "failed", failure_reason(report)
        elif report.skipped and test["outcome"] != "failed":
            test["outcome"], test["reason"] = "skipped", skip_reason(report)
        elif report.when == "call" and test["outcome"] is None:
            test["outcome"] = "passed"

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if not self.enabled or exitstatus == pytest.ExitCode.USAGE_ERROR:  # refused: the error says why
            return
        unfinished = sorted(node for node in self.wanted if self.tests.get(node, {}).get("outcome") is None)
        if exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) or unfinished:
            self.said = (f"not written (the old one stays): the run ended ({exitstatus!r}) before "
                         f"{', '.join(unfinished) or 'it finished'}")
            return
        record = self.record(time.monotonic() - self.started, session.config)
        path = Path(session.config.rootpath) / RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        self.said = f"wrote {RECORD}: {count_line(record)}"

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.said:
            terminalreporter.write_line(f"fault record: {self.said}")

    def record(self, seconds: float, config) -> dict:
        faults = []
        for row in self.faults:
            status, why = fault_status(row.injector, self.tests[node_id(row)])
            faults.append({"stage": row.stage, "fault": row.fault, "test": node_id(row), "injector": row.injector,
                           "status": status, "why": why})
        return {**machine(Path(config.rootpath)), "seconds": round(seconds), "command": " ".join(config.invocation_params.args),
                "tests": dict(sorted(self.tests.items())), "faults": faults}


def failure_reason(report) -> str:
    """The first ``E`` line of a failure (the assertion's message), or its last line."""
    lines = report.longreprtext.strip().splitlines() or ["?"]
    reason = next((line[1:].strip() for line in lines if line.startswith("E ")), lines[-1])
    return f"{report.when}: {reason}"[:300]


def skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def machine(root: Path) -> dict:
    """Where and on what the run happened: the date, CPU, versions and the commit tried."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    changes = git("status", "--porcelain", "--untracked-files=no")
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
            "commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(changes) if changes is not None else None,
            "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch,
            "ci": os.environ.get("CI", "").lower() == "true", "slurm_tests": os.environ.get("MTL_TEST_SLURM") == "1"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- the doc's line


def count_line(record: dict) -> str:
    """The line under the fault table, from the record alone: each row counted by its test's outcome."""
    faults = record["faults"]
    statuses = [row_status(record, fault)[0] for fault in faults]
    count = Counter(statuses)
    line = (f"{len(faults)} faults in the table; {count['handled'] + count['failed']} tried on {record['date'][:10]} "
            f"({record['cpu']}), {count['handled']} handled, {count['failed']} failed")
    if count["skipped"]:
        tests = sorted({fault["test"].rpartition("::")[2] for fault, status in zip(faults, statuses)
                        if status == "skipped"})
        line += f"; {count['skipped']} skipped ({', '.join(f'`{test}`' for test in tests)}; why: `{RECORD}`)"
    return line + "."


def read_record(root: Path = REPO) -> dict | None:
    path = root / RECORD
    return json.loads(path.read_text()) if path.exists() else None


def stale_claims(doc: str, record: dict | None, faults: Iterable) -> list[str]:
    """What the doc claims beyond the record, or the record lacks of the table; empty when they agree."""
    if record is None:
        return [f"no {RECORD}: run `python -m tests.fault_record --run`"]
    rows = [row_key(row) for row in faults]
    recorded = [(fault["stage"], fault["fault"], fault["test"], fault["injector"]) for fault in record["faults"]]
    problems = [f"the record is older than the table: {row} was not tried" for row in rows if row not in recorded]
    problems += [f"the record tried a row the table no longer has: {row}" for row in recorded if row not in rows]
    for fault in record["faults"]:
        status, why = row_status(record, fault)
        if fault.get("status") != status:
            problems.append(f"the record's row {fault['stage']} / {fault['fault']} reads {fault.get('status')!r}, "
                            f"but its test {fault['test']} says {status!r} ({why}): the count line counts it as "
                            f"{status!r}; rerun `python -m tests.fault_record --run`")
    lines = COUNT_LINE.findall(doc)
    if lines != [count_line(record)]:
        problems.append(f"the doc's count line {lines} is not the record's {count_line(record)!r}: "
                        "run `python -m tests.fault_record --update`")
    return problems


def update_doc(doc: str, record: dict) -> str:
    """``doc`` with its one count line replaced by the record's."""
    lines = COUNT_LINE.findall(doc)
    if len(lines) != 1:
        raise ValueError(f"{FAULT_TABLE_DOC} should have one fault count line; found {lines}")
    return COUNT_LINE.sub(lambda _: count_line(record), doc)


# --------------------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fault_record", description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="store_true", help="run every fault test with --fault-record, then --update")
    parser.add_argument("--update", action="store_true", help=f"rewrite {FAULT_TABLE_DOC}'s count line from {RECORD}")
    args, pytest_args = parser.parse_known_args(argv)
    if not (args.run or args.update):
        parser.error("say --run and/or --update")
    if args.run:
        from tests.test_faults import FAULTS  # here only: it imports the workflow test helpers

        nodes = sorted({node_id(row) for row in FAULTS})
        done = subprocess.run([sys.executable, "-m", "pytest", "--fault-record", *pytest_args, *nodes], cwd=REPO)
        if done.returncode not in (0, 1):
            return done.returncode
    record = read_record()
    if record is None:
        print(f"no {RECORD}: run with --run first", file=sys.stderr)
        return 1
    doc = REPO / FAULT_TABLE_DOC
    doc.write_text(update_doc(doc.read_text(), record))
    print(f"{FAULT_TABLE_DOC}: {count_line(record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
