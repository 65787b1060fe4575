"""Atomic writes, a full disk, the stop-on-signal flag and the fault-injection test hook, each alone."""
from __future__ import annotations

import errno
import os
import signal

import pytest

from mtl.faults import fault_point, parse_spec
from mtl.io import DiskFullError, atomic_path
from mtl.stop_signals import stop_on_signals, stop_requested


def test_atomic_path_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out.csv"
    with atomic_path(dest) as tmp:
        tmp.write_text("whole")
    assert dest.read_text() == "whole"
    with pytest.raises(ValueError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise ValueError("the writer failed")
    assert dest.read_text() == "whole" and sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_a_killed_writers_temporary_file_is_reused_not_piled_up(tmp_path):
    dest = tmp_path / "big.h5"
    leftover = tmp_path / ".big.h5.tmp"  # what a SIGKILL mid-write leaves
    leftover.write_bytes(b"x" * 1000)
    with atomic_path(dest) as tmp:
        assert tmp == leftover and tmp.stat().st_size == 0
        tmp.write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.h5"]


def test_no_space_left_names_the_file_and_keeps_the_previous_version(tmp_path):
    dest = tmp_path / "last.pt"
    dest.write_text("epoch 1")
    with pytest.raises(DiskFullError, match=rf"No space left to write {dest}: .*Nothing was written under "
                                            r"that name. Free space there"), atomic_path(dest) as tmp:
        tmp.write_text("epoch 2, half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert dest.read_text() == "epoch 1" and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    # torch.save's own words for it carry no errno: "No space left" in the message is enough
    with pytest.raises(DiskFullError), atomic_path(dest):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: No space left on device")


def test_other_write_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(PermissionError), atomic_path(tmp_path / "x"):
        raise PermissionError(errno.EACCES, "Permission denied")


def test_sigterm_inside_the_block_only_sets_the_flag(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals():
        assert not stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop_requested()  # and this process is still here
    assert not stop_requested() and signal.getsignal(signal.SIGTERM) is before


def test_fault_hook_is_a_no_op_without_its_variable_and_fires_once_with_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MTL_FAULT_AT", raising=False)
    fault_point("pretrain.step")  # nothing happens
    assert parse_spec("write:last.pt#2=cut") == ("write:last.pt", 2, "cut")
    with pytest.raises(ValueError, match="action one of"):
        parse_spec("pretrain.step=explode")
    (tmp_path / "release").touch()  # a stall that returns at once
    monkeypatch.setenv("MTL_FAULT_AT", "meta.step#2=stall")
    monkeypatch.setenv("MTL_FAULT_DIR", str(tmp_path))
    fault_point("meta.step")
    assert not (tmp_path / "fired").exists()  # the first time is not the second
    fault_point("meta.step")
    assert (tmp_path / "fired").exists()


def test_the_same_tensors_saved_twice_are_the_same_bytes(tmp_path):
    """Meta-training resumes only with the encoder of the same SHA-256: rewriting encoder.pt from
    the same state (a rerun) must not change its bytes, whatever the file is called."""
    import torch

    from mtl.io import atomic_torch_save, file_sha256

    first = atomic_torch_save({"weight": torch.arange(6.0)}, tmp_path / "a" / "encoder.pt")
    second = atomic_torch_save({"weight": torch.arange(6.0)}, tmp_path / "b" / "other-name.pt")
    assert file_sha256(first) == file_sha256(second)
