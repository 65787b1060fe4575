"""GPU slots on one machine: each concurrent GPU job claims a GPU of its own.

``snakemake --resources gpu=K`` only counts jobs, it never tells a job which GPU is its own, so K
concurrent jobs would all land on GPU 0. ``claim_device`` closes that gap: where several GPUs are
visible, each job takes a free one under an exclusive ``flock`` on a per-GPU lock file, held for
the job's life (the kernel drops it when the process dies, so a killed job frees its GPU). Where
one GPU is visible (Slurm ``--gpus=1``) it is the job's own: no lock. The device preference
itself is read as :func:`mtl.device.select_device` reads it.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from mtl.device import select_device, visible_devices_note
from mtl.errors import MTLError

log = logging.getLogger(__name__)

LOCK_DIR_ENV = "MTL_GPU_LOCK_DIR"
_UUID_PREFIXES = ("GPU-", "MIG-")


class GPUBusyError(MTLError):
    """Every visible GPU stayed claimed by another job for longer than the caller would wait."""


def parse_visible_devices(value: str | None) -> list[str] | None:
    """The GPU ids listed in a ``CUDA_VISIBLE_DEVICES`` value, as strings; None when it is unset.

    Follows CUDA's reading: "" (or only blanks) hides every GPU; ids are integers or UUIDs
    ("GPU-…", "MIG-…", kept as given); the list ends at the first entry CUDA would reject (for
    example "-1"), so "0,-1,2" makes only GPU 0 visible.
    """
    if value is None:
        return None
    ids: list[str] = []
    for entry in value.split(","):
        entry = entry.strip()
        if not (entry.isdigit() or entry.startswith(_UUID_PREFIXES)):
            break
        ids.append(str(int(entry)) if entry.isdigit() else entry)
    return ids


def visible_gpu_ids(env_value: str | None = None, count: int | None = None) -> list[str]:
    """Physical ids of the GPUs this process sees, in visible-index order (position i = ``cuda:i``).

    ``env_value`` defaults to ``$CUDA_VISIBLE_DEVICES`` and ``count`` to the number of GPUs CUDA
    reports; when the variable is unset the ids are simply 0..count-1.
    """
    if env_value is None:
        env_value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if count is None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = parse_visible_devices(env_value)
    if listed is None:
        return [str(i) for i in range(count)]
    return listed[:count]


def default_lock_dir() -> Path:
    """``$MTL_GPU_LOCK_DIR``, else ``<tempdir>/mtl-gpu-locks``: must be local to this machine."""
    configured = os.environ.get(LOCK_DIR_ENV)
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "mtl-gpu-locks"


def lock_path(lock_dir: str | os.PathLike, slot_id: str) -> Path:
    """``<lock_dir>/gpu<slot id>.lock``, with characters unsafe in a file name replaced by '_'."""
    return Path(lock_dir) / f"gpu{re.sub(r'[^A-Za-z0-9._-]', '_', slot_id)}.lock"


class SlotLock:
    """An exclusive ``flock`` on one GPU's lock file; ``release()`` (or leaving ``with``) frees it.

    The descriptor is not inherited across ``exec`` and the lock belongs to this open file, so it
    lasts exactly as long as this job holds it, and dies with the process if the job is killed.
    """

    def __init__(self, slot_id: str, path: Path, fd: int):
        self.slot_id, self.path, self._fd = slot_id, path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SlotLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"SlotLock(slot_id={self.slot_id!r}, path={str(self.path)!r}, held={self.held})"


def acquire_slot(slot_ids: Sequence[str], lock_dir: str | os.PathLike, *, start: int = 0,
                 poll: float = 0.5, timeout: float | None = None,
                 log_every: float = 60.0) -> tuple[str, SlotLock]:
    """Take the first free slot among ``slot_ids``, trying them from ``start`` round the list.

    A slot is free when nobody holds the exclusive ``flock`` on its lock file. When all are taken
    (more concurrent jobs than GPUs) this waits, polling every ``poll`` seconds and logging who
    holds them once at the start and every ``log_every`` seconds, rather than doubling up on a GPU
    silently. ``timeout`` (seconds; None waits for ever) ends the wait with GPUBusyError.
    Returns the slot id and its SlotLock (release it, or use it as a context manager).
    """
    if not slot_ids:
        raise MTLError("GPU slots: no slot ids were given; nothing to claim.")
    lock_dir = _ensure_lock_dir(Path(lock_dir))
    order = [slot_ids[(start + k) % len(slot_ids)] for k in range(len(slot_ids))]
    began = time.monotonic()
    next_log = began
    while True:
        for slot_id in order:
            held = _try_lock(slot_id, lock_dir)
            if held is not None:
                return slot_id, held
        waited = time.monotonic() - began
        if timeout is not None and waited >= timeout:
            raise GPUBusyError(
                f"GPU slots: all {len(order)} GPU(s) {', '.join(order)} stayed taken for "
                f"{waited:.0f}s (timeout {timeout:g}s); lock files in {lock_dir} are held by "
                f"{_holders(order, lock_dir)}. Run no more GPU jobs at once than there are GPUs "
                f"(snakemake --resources gpu={len(order)}), or wait for those jobs to finish."
            )
        if time.monotonic() >= next_log:
            log.warning("GPU slots: all %d GPU(s) %s are taken (%s); waited %.0fs so far, still "
                        "waiting. More GPU jobs run at once than there are GPUs: is "
                        "--resources gpu larger than %d?", len(order), ", ".join(order),
                        _holders(order, lock_dir), waited, len(order))
            next_log += log_every
        time.sleep(poll)


def _ensure_lock_dir(lock_dir: Path) -> Path:
    """Create the lock folder; a new one is world-writable and sticky like /tmp, so jobs of
    several users on one machine share the same locks."""
    if not lock_dir.is_dir():
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(lock_dir, 0o1777)
        except OSError as exc:
            raise MTLError(
                f"GPU slots: cannot create the lock folder {lock_dir} ({exc}). Set "
                f"{LOCK_DIR_ENV} to a writable folder on this machine's local disk."
            ) from exc
    return lock_dir


def _try_lock(slot_id: str, lock_dir: Path) -> SlotLock | None:
    """The slot's lock if it was free, else None; never blocks."""
    path = lock_path(lock_dir, slot_id)
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    _note_holder(fd)
    return SlotLock(slot_id, path, fd)


def _open_lock_file(path: Path) -> int:
    """Open read-write (so the holder can note itself), read-only where another user owns the
    file: flock works on either."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise MTLError(f"GPU slots: cannot open the lock file {path} ({exc}). Set "
                           f"{LOCK_DIR_ENV} to a folder you can write to.") from exc
    with contextlib.suppress(OSError):
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, 0o666)  # others may lock it too, whatever this user's umask
    return fd


def _note_holder(fd: int) -> None:
    """Write who holds the lock into the file, so a waiting job can say whom it waits for."""
    note = (f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, note.encode(), 0)


def _holders(slot_ids: Sequence[str], lock_dir: Path) -> str:
    notes = []
    for slot_id in slot_ids:
        try:
            note = lock_path(lock_dir, slot_id).read_text().strip() or "unknown holder"
        except OSError:
            note = "unknown holder"
        notes.append(f"{slot_id}: {note}")
    return "; ".join(notes)


def _slot_key(visible_index: int, physical_id: str) -> str:
    """The id a GPU is locked under: its UUID where CUDA reports one, else its listed id.

    The UUID names the same card whatever the numbering: under cgroup-confined schedulers every
    job may see its GPUs as "0,1", and a card can be listed by index or by UUID.
    """
    if physical_id.startswith(_UUID_PREFIXES):
        return physical_id
    try:
        uuid = str(torch.cuda.get_device_properties(visible_index).uuid)
    except (AttributeError, RuntimeError, AssertionError):
        return physical_id
    if not uuid:
        return physical_id
    return uuid if uuid.startswith(_UUID_PREFIXES) else f"GPU-{uuid}"


@contextlib.contextmanager
def claim_device(preference: str = "auto", *, lock_dir: str | os.PathLike | None = None,
                 timeout: float | None = None, poll: float = 0.5,
                 log_every: float = 60.0) -> Iterator[torch.device]:
    """The device a GPU job runs on, its GPU reserved for the whole ``with`` block.

    - "cpu", or no GPU visible: as ``select_device`` ("cuda" is then an error, "auto" the CPU).
    - "cuda:N": that visible GPU, as the user pinned it; no lock.
    - one GPU visible (Slurm ``--gpus=1``, or a scheduler's ``CUDA_VISIBLE_DEVICES``): that GPU,
      no lock; ``CUDA_VISIBLE_DEVICES`` is never rewritten.
    - several visible: a free one among them, held under a lock in ``lock_dir`` (default
      ``$MTL_GPU_LOCK_DIR`` or ``<tempdir>/mtl-gpu-locks``), trying from ``pid % n`` so jobs
      spread; when all are taken, waits (``timeout`` seconds, None for ever: see acquire_slot).
      The claimed GPU is also made torch's current device, so plain "cuda" means it too.
    """
    device = select_device(preference)
    if device.type != "cuda" or device.index is not None:
        yield device
        return
    ids = visible_gpu_ids()
    if len(ids) <= 1:
        log.info("GPU: using the only visible GPU (physical id %s, %s); no slot lock needed.",
                 ids[0] if ids else "?", visible_devices_note())
        yield torch.device("cuda", 0)
        return
    with _claim_free_gpu(ids, lock_dir, timeout=timeout, poll=poll, log_every=log_every) as index:
        yield torch.device("cuda", index)


@contextlib.contextmanager
def _claim_free_gpu(ids: list[str], lock_dir, *, timeout, poll, log_every) -> Iterator[int]:
    """Lock a free GPU among the visible ``ids`` and make it current; yields its visible index."""
    keys = [_slot_key(i, physical) for i, physical in enumerate(ids)]
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    start = os.getpid() % len(keys)
    key, slot = acquire_slot(keys, lock_dir, start=start, poll=poll, timeout=timeout,
                             log_every=log_every)
    with slot:
        index = keys.index(key)
        log.info("GPU: took physical GPU %s%s as cuda:%d of %d visible (%s): the first free one "
                 "trying from slot %d (pid %% %d); held under %s until this job ends.",
                 ids[index], f" ({key})" if key != ids[index] else "", index, len(ids),
                 visible_devices_note(), start, len(keys), slot.path)
        previous = torch.cuda.current_device()
        torch.cuda.set_device(index)
        try:
            yield index
        finally:
            torch.cuda.set_device(previous)
