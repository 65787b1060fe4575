"""GPU slots on one machine: concurrent GPU jobs each get their own GPU, without needing a GPU here.

Slot picking is exercised with real processes and real ``flock`` locks; ``claim_device`` on a
several-GPU box is exercised with torch.cuda's answers faked.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import time
import types

import pytest
import torch

from mtl import gpu_slots
from mtl.gpu_slots import (GPUBusyError, acquire_slot, claim_device, lock_path, parse_visible_devices,
                           visible_gpu_ids)
from mtl.errors import MTLError
from tests.fault_record import injected

SLOTS = ["0", "1", "2"]
CTX = multiprocessing.get_context("fork")
WAIT = 10  # seconds a test waits for a child before calling it hung


def hold_slot(lock_dir, start, got, release_file):
    """Child process: take a slot, report it, hold it until ``release_file`` appears.

    (A file, not a multiprocessing.Event: setting an Event hangs once a waiter has been killed.)
    """
    slot_id, lock = acquire_slot(SLOTS, lock_dir, start=start, poll=0.02)
    got.put((os.getpid(), slot_id))
    deadline = time.monotonic() + WAIT
    while not os.path.exists(release_file) and time.monotonic() < deadline:
        time.sleep(0.02)
    lock.release()


@pytest.fixture
def holders(tmp_path):
    """Start processes that each hold a slot; all are stopped at the end of the test."""
    started = []

    release_file = tmp_path / "release"

    def start(n):
        got = CTX.Queue()
        procs = [CTX.Process(target=hold_slot, args=(tmp_path, 0, got, release_file)) for _ in range(n)]
        for proc in procs:
            proc.start()
        started.extend(procs)
        slot_of = dict(got.get(timeout=WAIT) for _ in procs)  # pid -> slot id
        if set(slot_of.values()) == set(SLOTS):
            injected("every GPU slot held")  # a GPU job now has to wait (tests/test_faults.py's table)
        return procs, [slot_of[proc.pid] for proc in procs], release_file.touch

    yield start
    for proc in started:
        if proc.is_alive():
            proc.kill()
        proc.join(WAIT)


def test_concurrent_jobs_get_distinct_slots(holders):
    _, ids, release = holders(3)  # all start at slot 0, so they must step past each other
    assert sorted(ids) == SLOTS
    release()


def test_a_fourth_job_times_out_while_every_slot_is_held(tmp_path, holders, caplog):
    _, _, release = holders(3)
    with caplog.at_level(logging.WARNING, logger="mtl.gpu_slots"), \
            pytest.raises(GPUBusyError, match=r"all 3 GPU\(s\) 0, 1, 2 stayed taken") as err:
        acquire_slot(SLOTS, tmp_path, poll=0.02, timeout=0.2)
    assert "pid" in str(err.value) and str(tmp_path) in str(err.value)
    assert "--resources gpu=3" in str(err.value)
    assert "are taken" in caplog.text and "still waiting" in caplog.text
    release()


def test_a_waiting_job_takes_the_slot_a_finished_job_frees(tmp_path, holders):
    _, _, release = holders(3)
    got = CTX.Queue()
    waiter = CTX.Process(target=hold_slot, args=(tmp_path, 1, got, tmp_path / "never"))
    waiter.start()
    try:
        with pytest.raises(queue.Empty):  # it waits while every slot is held
            got.get(timeout=0.3)
        release()
        pid, slot_id = got.get(timeout=WAIT)
        assert pid == waiter.pid and slot_id in SLOTS
    finally:
        waiter.kill()
        waiter.join(WAIT)


def test_a_killed_jobs_slot_becomes_free(tmp_path, holders):
    procs, ids, release = holders(3)
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[1].join(WAIT)
    slot_id, lock = acquire_slot(SLOTS, tmp_path, poll=0.02, timeout=WAIT)
    assert slot_id == ids[1]
    lock.release()
    release()


def test_slots_are_tried_from_start_and_released_on_exit(tmp_path):
    slot_id, lock = acquire_slot(SLOTS, tmp_path, start=4)  # 4 % 3 == 1
    with lock:
        assert slot_id == "1" and lock.held
        assert lock.path == lock_path(tmp_path, "1") == tmp_path / "gpu1.lock"
        assert str(os.getpid()) in lock.path.read_text()
        again, second = acquire_slot(SLOTS, tmp_path, start=1)
        assert again == "2"
        second.release()
    assert not lock.held
    assert acquire_slot(SLOTS, tmp_path, start=1)[0] == "1"


def test_lock_file_names_are_safe_for_uuids(tmp_path):
    assert lock_path(tmp_path, "GPU-1a2b/3c").name == "gpuGPU-1a2b_3c.lock"


@pytest.mark.parametrize("value, ids", [
    (None, None),
    ("", []),
    ("  ", []),
    ("2,3", ["2", "3"]),
    (" 0, 1 ,2,3", ["0", "1", "2", "3"]),
    ("0,-1,2", ["0"]),  # CUDA stops at the first invalid entry
    ("-1", []),
    ("GPU-8c1f2d3e-aaaa,MIG-77", ["GPU-8c1f2d3e-aaaa", "MIG-77"]),
])
def test_parse_visible_devices(value, ids):
    assert parse_visible_devices(value) == ids


def test_visible_ids_map_to_visible_indices():
    assert visible_gpu_ids("2,3", count=2) == ["2", "3"]  # cuda:0 is GPU 2, cuda:1 is GPU 3
    assert visible_gpu_ids(None, count=3) == ["0", "1", "2"]
    assert visible_gpu_ids("", count=0) == []
    assert visible_gpu_ids("0,1,7", count=2) == ["0", "1"]  # CUDA saw only two of them


def test_claim_cpu_takes_no_lock(tmp_path):
    with claim_device("cpu", lock_dir=tmp_path) as dev:
        assert dev == torch.device("cpu")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less behaviour")
def test_claim_cuda_without_gpu_names_cuda_visible_devices(tmp_path):
    with pytest.raises(MTLError, match="CUDA_VISIBLE_DEVICES"):
        with claim_device("cuda", lock_dir=tmp_path):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less behaviour")
def test_claim_auto_without_gpu_falls_back_to_cpu_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mtl.device"):
        with claim_device("auto", lock_dir=tmp_path) as dev:
            assert dev.type == "cpu"
    assert "CPU" in caplog.text and "CUDA_VISIBLE_DEVICES" in caplog.text


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend torch sees ``n`` GPUs; records set_device calls. ``uuids`` fakes their UUIDs."""
    calls = []

    def install(n, uuids=None):
        current = [0]

        def set_device(i):
            calls.append(i)
            current[0] = i

        def properties(i):
            return types.SimpleNamespace(uuid=uuids[i]) if uuids else types.SimpleNamespace()

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
        monkeypatch.setattr(torch.cuda, "set_device", set_device)
        monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
        return calls

    return install


def test_claim_one_visible_gpu_uses_it_as_is(tmp_path, fake_gpus, monkeypatch):
    fake_gpus(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # as Slurm --gpus=1 sets it
    with claim_device("cuda", lock_dir=tmp_path) as dev:
        assert dev == torch.device("cuda", 0)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    assert list(tmp_path.iterdir()) == []


def test_claim_among_several_gpus_skips_a_taken_one(tmp_path, fake_gpus, monkeypatch, caplog):
    calls = fake_gpus(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(gpu_slots.os, "getpid", lambda: 10)  # start at slot 10 % 2 == 0
    _, other = acquire_slot(["2"], tmp_path)  # another job holds physical GPU 2
    with caplog.at_level(logging.INFO, logger="mtl.gpu_slots"):
        with claim_device("auto", lock_dir=tmp_path) as dev:
            assert dev == torch.device("cuda", 1)
            assert (tmp_path / "gpu3.lock").exists()
            with pytest.raises(GPUBusyError):  # held by this job for the whole block
                acquire_slot(["3"], tmp_path, timeout=0)
    other.release()
    assert "physical GPU 3" in caplog.text
    assert calls == [1, 0]  # made current for the block, then restored
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    _, lock = acquire_slot(["3"], tmp_path, timeout=0)  # released on exit
    lock.release()


def test_claim_locks_gpus_by_uuid_where_cuda_reports_one(tmp_path, fake_gpus, monkeypatch):
    fake_gpus(2, uuids=["aaaa-1111", "bbbb-2222"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpu_slots.os, "getpid", lambda: 1)  # start at slot 1
    with claim_device("auto", lock_dir=tmp_path) as dev:
        assert dev == torch.device("cuda", 1)
        assert (tmp_path / "gpuGPU-bbbb-2222.lock").exists()


def test_claim_pinned_gpu_takes_no_lock(tmp_path, fake_gpus):
    fake_gpus(4)
    with claim_device("cuda:2", lock_dir=tmp_path) as dev:
        assert dev == torch.device("cuda", 2)
    assert list(tmp_path.iterdir()) == []


def test_claim_gives_up_after_timeout_when_every_gpu_is_taken(tmp_path, fake_gpus, monkeypatch):
    fake_gpus(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    _, a = acquire_slot(["0"], tmp_path)
    _, b = acquire_slot(["1"], tmp_path)
    with pytest.raises(GPUBusyError, match="--resources gpu=2"):
        with claim_device("cuda", lock_dir=tmp_path, timeout=0.1, poll=0.02):
            pass
    a.release()
    b.release()


def test_default_lock_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MTL_GPU_LOCK_DIR", str(tmp_path / "locks"))
    assert gpu_slots.default_lock_dir() == tmp_path / "locks"
    monkeypatch.delenv("MTL_GPU_LOCK_DIR")
    assert gpu_slots.default_lock_dir().name == "mtl-gpu-locks"
