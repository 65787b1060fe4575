"""Archive extraction that refuses members escaping the target folder.

Tar (any compression) and zip are read with the standard library; absolute paths, ``..`` and
links pointing outside are refused, naming the member, before anything is written.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath

from mtl.errors import DataError

ARCHIVE_FORMATS = ".tar, .tar.gz/.tgz, .tar.bz2, .tar.xz, .zip"
# tarfile's extraction filters arrived in Python 3.11.4; () catches nothing where they are absent.
_TAR_FILTER_ERROR = getattr(tarfile, "FilterError", ())


def _member_problem(name: str) -> str | None:
    """Why an archive path may not be extracted (absolute or climbing out), or None."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or PureWindowsPath(name).drive:
        return "has an absolute path"
    if ".." in PurePosixPath(posix).parts:
        return "climbs out of the target folder with '..'"
    return None


def _tar_member_problem(info: tarfile.TarInfo) -> str | None:
    problem = _member_problem(info.name)
    if problem or info.isfile() or info.isdir():
        return problem
    if info.islnk():  # hard link: the target is another archive path
        problem = _member_problem(info.linkname)
        return f"is a hard link to '{info.linkname}', which {problem}" if problem else None
    if info.issym():
        target = info.linkname.replace("\\", "/")
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(info.name), target))
        outside = target.startswith("/") or resolved == ".." or resolved.startswith("../")
        # Without tarfile's data filter (Python < 3.11.4) links through other links cannot be
        # checked at extraction time, so refuse any '..' in a link target.
        if outside or (not hasattr(tarfile, "data_filter") and ".." in target.split("/")):
            return f"is a symbolic link pointing outside the target folder ('{info.linkname}')"
        return None
    return "is a device, FIFO or other special file"


def _refuse(archive: Path, member: str, why: str) -> DataError:
    return DataError(
        f"Refusing to extract {archive}: member '{member}' {why}. Nothing was extracted. The "
        "archive is corrupt or unsafe: delete it and download it again, or unpack it yourself "
        "after checking its contents."
    )


def _select(archive: Path, names: list[str], members: Iterable[str] | None) -> list[str]:
    if members is None:
        return names
    wanted, present = list(members), set(names)
    missing = [m for m in wanted if m not in present]
    if missing:
        listing = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        raise DataError(
            f"{archive} holds no member {missing}; it holds: {listing}. The archive is not the "
            "expected one: delete it and download it again."
        )
    return wanted


def _merge_tree(stage: Path, dest_dir: Path) -> None:
    """Move everything under ``stage`` into ``dest_dir``, replacing files, merging folders."""
    for entry in stage.iterdir():
        target = dest_dir / entry.name
        if (
            entry.is_dir()
            and not entry.is_symlink()
            and target.is_dir()
            and not target.is_symlink()
        ):
            _merge_tree(entry, target)
        else:
            os.replace(entry, target)  # a folder in the way of a file (or the reverse) raises


def safe_extract(
    archive: str | os.PathLike, dest_dir: str | os.PathLike, members: Iterable[str] | None = None
) -> list[Path]:
    """Extract a tar (any compression) or zip archive, refusing members that would escape.

    Absolute paths, ``..`` components and links pointing outside ``dest_dir`` raise DataError
    naming the member before anything is written. Members are unpacked into a hidden folder
    inside ``dest_dir`` and moved into place only when the whole extraction succeeded.
    ``members`` limits extraction to those archive paths. Returns the extracted paths.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    if not archive.is_file():
        raise DataError(
            f"Archive {archive} is missing; download it first (or place it there by hand)."
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{archive.name}.extract-", dir=dest_dir))
    try:
        if tarfile.is_tarfile(archive):
            names = _extract_tar(archive, stage, members)
        elif zipfile.is_zipfile(archive):
            names = _extract_zip(archive, stage, members)
        else:
            raise DataError(
                f"Cannot extract {archive}: it is not a tar or zip archive (known formats: "
                f"{ARCHIVE_FORMATS}). It may be corrupt or an HTML page saved under the archive's "
                "name: delete it and download it again."
            )
        _merge_tree(stage, dest_dir)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise DataError(
            f"Cannot extract {archive}: {exc}. The archive is corrupt or truncated: delete it and "
            "download it again."
        ) from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [dest_dir / PurePosixPath(name) for name in names]


def _extract_tar(archive: Path, stage: Path, members: Iterable[str] | None) -> list[str]:
    with tarfile.open(archive) as tar:
        infos = tar.getmembers()
        by_name = {info.name: info for info in infos}
        selected = [by_name[n] for n in _select(archive, [i.name for i in infos], members)]
        for info in selected:
            problem = _tar_member_problem(info)
            if problem:
                raise _refuse(archive, info.name, problem)
        options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        try:
            tar.extractall(stage, members=selected, **options)
        except _TAR_FILTER_ERROR as exc:  # e.g. a link that escapes only through another link
            raise _refuse(
                archive, exc.tarinfo.name, f"was refused by tarfile's safety filter ({exc})"
            ) from exc
    return [info.name for info in selected]


def _extract_zip(archive: Path, stage: Path, members: Iterable[str] | None) -> list[str]:
    # zipfile writes symbolic-link entries as plain files, so only the member names need checking.
    with zipfile.ZipFile(archive) as zf:
        selected = _select(archive, zf.namelist(), members)
        for name in selected:
            problem = _member_problem(name)
            if problem:
                raise _refuse(archive, name, problem)
        zf.extractall(stage, members=selected)
    return selected


def _archive_names(archive: Path) -> list[str]:
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            return [info.name for info in tar.getmembers() if info.isfile()]
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            return [n for n in zf.namelist() if not n.endswith("/")]
    raise DataError(
        f"Cannot read {archive}: not a tar or zip archive (known formats: {ARCHIVE_FORMATS}). "
        "Delete it and rerun."
    )
