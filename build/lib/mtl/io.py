"""Atomic writes: an output either appears whole under its final name or not at all."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from mtl.errors import MTLError
from mtl.faults import fault_point

# Below this much free space, a failed write is reported as a full disk: torch.save then says only
# "unexpected pos" or "file write failed", without an errno.
LOW_SPACE_BYTES = 1 << 20


class DiskFullError(MTLError):
    """An output could not be written for lack of space (or quota); nothing was left under its name."""


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it to ``dest`` only if the block succeeds.

    The temporary file ``.<name>.tmp`` sits in the same folder so the final rename is atomic on
    POSIX. A failure removes it; a kill leaves at worst that one file, which the next write of
    ``dest`` overwrites (a fixed name, so repeated kills never pile up copies of a large output),
    never a half-written output. A write that fails for lack of space raises DiskFullError naming
    ``dest`` and the folder to free.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)  # a killed run's leftover (or a link: never write through it)
    tmp.touch()
    try:
        yield tmp
        fault_point(f"write:{dest.name}", tmp)  # test hook (mtl/faults.py); a no-op in normal use
        os.replace(tmp, dest)
    except BaseException as err:
        full = isinstance(err, Exception) and not isinstance(err, MTLError) and _disk_full(err, dest.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise DiskFullError(
                f"No space left to write {dest}: the disk holding {dest.parent} is full "
                f"({_free_bytes(dest.parent) / 2**20:.1f} MiB free now, after removing the partial copy; "
                f"{type(err).__name__}: {_first_line(err)}). Nothing was written under that name. Free space "
                "there (or move the workflow to a larger disk) and run the same command again."
            ) from err
        raise


def _disk_full(err: BaseException, folder: Path) -> bool:
    """True when ``err`` (or what it wraps) is ENOSPC/EDQUOT, or the disk is nearly full after it."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(err, (OSError, RuntimeError)) and _free_bytes(folder) < LOW_SPACE_BYTES


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else ""


def atomic_torch_save(obj, dest: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_path`, so a kill mid-write never corrupts a checkpoint.

    It writes through a file handle: given a path, torch names the archive's top folder after the
    file, so the temporary name would end up in the bytes, and the same tensors saved twice would
    differ (meta-training's resume check compares the encoder's SHA-256).
    """
    import torch

    with atomic_path(dest) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)
    return Path(dest)


CHUNK_SIZE = 1 << 20


def file_digests(path: str | os.PathLike, algorithms: Iterable[str] = ("sha256",)) -> dict[str, str]:
    """Hex digests of a file for several algorithms in one pass, read in 1 MiB chunks so
    multi-GB pickles never sit in memory."""
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            for hasher in hashers.values():
                hasher.update(chunk)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


def file_sha256(path: str | os.PathLike) -> str:
    return file_digests(path)["sha256"]
