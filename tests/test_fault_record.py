"""The fault record's checker, on a fake fault suite run by a real pytest: a row counts as handled
only if its test passed and its injector fired; a partial run writes nothing; a doc that claims
more than the record holds is caught (tests/fault_record.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fault_record import FAULT_SUITE, RECORD, count_line, stale_claims, update_doc
from tests.workflow import REPO

# Five rows, one per way a row can end; the tests are in file order, the failing one second so
# that -x stops before the others.
FAKE_SUITE = '''
from collections import namedtuple

import pytest

from tests.fault_record import injected, injected_if

Fault = namedtuple("Fault", "stage fault sees recovers test injector")
FAULTS = [
    Fault("a", "kill", "", "", "test_injects", "kill a"),
    Fault("b", "damage", "", "", "test_fails", "damage b"),
    Fault("c", "kill", "", "", "test_stopped_injecting", "kill c"),
    Fault("d", "requeue", "", "", "test_skipped", "requeue d"),
    Fault("e", "kill in a job", "", "", "test_hook_never_fired", "hook e"),
]


def test_injects():
    injected("kill a")


def test_fails():
    injected("damage b")
    assert False, "a file was lost"


def test_stopped_injecting():
    injected("kill a")  # another row's fault: not this row's
    # (once made "kill c" happen; still passes)


def test_skipped():
    pytest.skip("needs Slurm")


def test_hook_never_fired():
    injected_if("hook e", lambda: False)  # the job never reached the fault point
'''


@pytest.fixture
def fake_suite(tmp_path) -> Path:
    """A folder with its own pytest.ini (so it is the rootdir) and a fault suite at FAULT_SUITE."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    suite = tmp_path / FAULT_SUITE
    suite.parent.mkdir(parents=True)
    suite.write_text(FAKE_SUITE)
    return tmp_path


def run_fake(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.fault_record", "-p", "no:cacheprovider",
                           "--fault-record", *args, FAULT_SUITE], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_row_is_handled_only_if_its_test_passed_and_its_injector_fired(fake_suite):
    done = run_fake(fake_suite)
    assert done.returncode == 1, done.stdout
    # the run itself fails the tests that did not inject their row's fault
    assert "FAILED tests/test_faults.py::test_stopped_injecting" in done.stdout, done.stdout
    assert "FAILED tests/test_faults.py::test_hook_never_fired" in done.stdout, done.stdout
    record = json.loads((fake_suite / RECORD).read_text())
    status = {fault["stage"]: (fault["status"], fault["why"]) for fault in record["faults"]}
    assert status["a"] == ("handled", "")
    assert status["b"][0] == "failed" and "a file was lost" in status["b"][1]
    assert status["c"][0] == "failed" and "'kill c' never fired" in status["c"][1]
    assert status["d"] == ("skipped", "needs Slurm")
    assert status["e"][0] == "failed" and "'hook e' never fired" in status["e"][1]
    assert record["tests"][f"{FAULT_SUITE}::test_stopped_injecting"]["injected"] == ["kill a"]
    assert record["cpu"] and record["python"] and record["date"]
    assert count_line(record) == (f"5 faults in the table; 4 tried on {record['date'][:10]} ({record['cpu']}), "
                                  f"1 handled, 3 failed; 1 skipped (`test_skipped`; why: `{RECORD}`).")
    assert count_line(record) in done.stdout  # the run says what it recorded


def test_a_partial_run_leaves_the_record_alone(fake_suite):
    selected = run_fake(fake_suite, "-k", "injects")
    assert selected.returncode == 4 and "needs every fault test" in selected.stderr, selected.stderr
    assert not (fake_suite / RECORD).exists()

    stopped = run_fake(fake_suite, "-x")  # stops after test_fails: the others have no outcome
    assert stopped.returncode == 1 and "fault record: not written" in stopped.stdout, stopped.stdout
    assert not (fake_suite / RECORD).exists()


#: A test's entry in the record that gives its row each status.
TEST_ENTRY = {
    "handled": lambda stage: {"outcome": "passed", "reason": "", "injected": [f"kill {stage}"]},
    "failed": lambda stage: {"outcome": "failed", "reason": "call: AssertionError: a file was lost", "injected": []},
    "skipped": lambda stage: {"outcome": "skipped", "reason": "needs Slurm", "injected": []},
}


def record_of(statuses: dict[str, str], tests: dict[str, str] | None = None) -> dict:
    """A record whose rows read ``statuses`` and whose tests ended as ``tests`` says (default: the same)."""
    tests = {**statuses, **(tests or {})}
    faults = [{"stage": stage, "fault": "kill", "test": f"{FAULT_SUITE}::test_{stage}", "injector": f"kill {stage}",
               "status": status, "why": ""} for stage, status in statuses.items()]
    return {"date": "2030-01-02T03:04Z", "cpu": "Some CPU", "faults": faults,
            "tests": {f"{FAULT_SUITE}::test_{stage}": TEST_ENTRY[ending](stage) for stage, ending in tests.items()}}


class Row:
    def __init__(self, stage: str):
        self.stage, self.fault, self.test, self.injector = stage, "kill", f"test_{stage}", f"kill {stage}"


def doc_with(line: str) -> str:
    return f"# Faults\n\n| stage | fault |\n|---|---|\n| a | kill |\n\n{line}\n\nMore text.\n"


def test_the_doc_may_claim_what_the_record_holds_and_no_more():
    record = record_of({"a": "handled", "b": "handled", "c": "skipped"})
    rows = [Row("a"), Row("b"), Row("c")]
    assert count_line(record) == ("3 faults in the table; 2 tried on 2030-01-02 (Some CPU), 2 handled, 0 failed; "
                                  f"1 skipped (`test_c`; why: `{RECORD}`).")
    assert stale_claims(doc_with(count_line(record)), record, rows) == []

    for claim in ("3 faults in the table; 3 tried on 2030-01-02 (Some CPU), 3 handled, 0 failed.",
                  "3 faults tried, 3 handled, 0 lost."):  # the line as it was, from the table's length
        assert stale_claims(doc_with(claim), record, rows), claim
    assert stale_claims(doc_with(count_line(record)), None, rows)  # no record at all


def test_a_record_older_than_the_table_is_stale():
    record = record_of({"a": "handled", "b": "handled"})
    doc = doc_with(count_line(record))
    assert any("older than the table" in problem for problem in stale_claims(doc, record, [Row("a"), Row("b"), Row("c")]))
    assert any("no longer has" in problem for problem in stale_claims(doc, record, [Row("a")]))
    moved = Row("b")
    moved.injector = "kill b elsewhere"  # the row now names another injector: its record is not about it
    assert stale_claims(doc, record, [Row("a"), moved])


def test_update_rewrites_the_count_line_only():
    record = record_of({"a": "handled", "b": "failed"})
    doc = doc_with("2 faults tried, 2 handled, 0 lost.")
    assert update_doc(doc, record) == doc_with(count_line(record))
    assert update_doc(update_doc(doc, record), record) == doc_with(count_line(record))
    with pytest.raises(ValueError, match="one fault count line"):
        update_doc("no line here", record)


def test_a_row_whose_test_failed_counts_as_failed_whatever_it_reads():
    """The line counts each row by its test's outcome in the record: a row that reads "handled"
    while its test failed (a record edited, or merged from two runs) is a failed row, and is named."""
    record = record_of({"a": "handled", "b": "handled", "c": "handled"}, tests={"b": "failed", "c": "skipped"})
    rows = [Row("a"), Row("b"), Row("c")]
    line = count_line(record)
    assert line == ("3 faults in the table; 2 tried on 2030-01-02 (Some CPU), 1 handled, 1 failed; "
                    f"1 skipped (`test_c`; why: `{RECORD}`).")
    problems = stale_claims(doc_with(line), record, rows)
    assert len(problems) == 2 and "row b / kill reads 'handled', but its test" in problems[0], problems
    assert "says 'failed' (call: AssertionError: a file was lost)" in problems[0]
    # a row whose test has no entry at all proves nothing either
    del record["tests"][f"{FAULT_SUITE}::test_a"]
    assert count_line(record).startswith("3 faults in the table; 2 tried on 2030-01-02 (Some CPU), 0 handled, 2 failed")
