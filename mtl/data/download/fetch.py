"""A file from its mirrors, and every raw file of a dataset: what is fetched, kept or unpacked.

:func:`download_file` tries a file's mirrors in order (reading a Zenodo record's listing first
where the mirror is Zenodo) and renames the download into place only once it verifies;
:func:`fetch_dataset` decides, per raw file of a dataset, whether a file already present is
kept, a user's manual copy is linked, the file is downloaded, or it is taken from a fallback
archive.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import tempfile
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path, PurePosixPath

from mtl.data.download.archives import _archive_names, safe_extract
from mtl.data.download.http import _describe, _Digests, _download_verified, _MirrorFailed
from mtl.data.download.integrity import (
    Remote,
    _check,
    _describe_expected,
    _expected_facts,
    _write_sha256_record,
)
from mtl.data.download.zenodo import _with_zenodo_listing, _zenodo_file
from mtl.data.sources import DatasetSource, RemoteArchive, RemoteFile
from mtl.errors import ConfigError, DataError
from mtl.io import atomic_path

log = logging.getLogger(__name__)


def _manual_copy_advice(dest: Path, dataset: str) -> str:
    return (
        f"download it by hand (for example in a browser) and save it as "
        f"{dest}, or put it in a folder of your own and set config `data.{dataset}.path` to that "
        "folder; then rerun"
    )


def download_file(
    remote: Remote,
    dest_dir: str | os.PathLike,
    *,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60,
    gdrive_base: str | None = None,
    zenodo_base: str | None = None,
    dataset: str | None = None,
) -> Path:
    """Download ``remote`` to ``dest_dir/<name>``, trying its mirrors in order.

    The bytes go to ``<name>.part`` (resumed with HTTP Range when one is left from an earlier
    run) and are renamed to ``<name>`` only after size, MD5 and SHA-256 (``sha256`` pins one the
    registry lacks) check out; a corrupt download is deleted. From a Zenodo mirror the size and
    MD5 in the record's listing are checked as well (see :mod:`mtl.data.download.zenodo`). The
    observed SHA-256 is written to ``<name>.sha256``. ``dataset`` (default: the folder's name, as
    in ``data/raw/<dataset>``) names the config key the error messages point to. Raises one
    DataError listing every mirror and why it failed.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / remote.name
    part = dest_dir / (remote.name + ".part")
    expected = _expected_facts(remote, sha256)
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    failures = []
    digests = _Digests()
    for index, listed_url in enumerate(remote.urls, start=1):
        zenodo = _zenodo_file(listed_url, zenodo_base)
        url = zenodo.url if zenodo else listed_url
        checked = expected
        try:
            if zenodo:
                checked = _with_zenodo_listing(expected, zenodo, remote.name, opener, timeout)
            digest = _download_verified(
                url,
                part,
                checked,
                name=remote.name,
                opener=opener,
                timeout=timeout,
                gdrive_base=gdrive_base,
                progress=progress,
                digests=digests,
            )
        except (_MirrorFailed, OSError, http.client.HTTPException, ValueError) as exc:
            reason = _describe(exc)
            log.warning(
                "%s: mirror %d/%d (%s) failed: %s",
                remote.name,
                index,
                len(remote.urls),
                url,
                reason,
            )
            failures.append((url, reason))
            continue
        os.replace(part, dest)
        _write_sha256_record(dest, digest)
        md5_origin = checked.origin("md5")
        also = f"; MD5 {checked.md5} as given by {md5_origin}" if md5_origin else ""
        log.info("Downloaded %s from %s (SHA-256 %s%s)", dest, url, digest, also)
        return dest
    raise DataError(
        _all_mirrors_failed(remote, dest, part, expected, failures, dataset or dest_dir.name)
    )


def _all_mirrors_failed(remote, dest, part, expected, failures, dataset) -> str:
    lines = [
        f"Could not download {remote.name} into {dest.parent} (expected {_describe_expected(expected)}): "
        + (
            f"all {len(failures)} mirror(s) failed:"
            if failures
            else "the registry lists no mirror."
        )
    ]
    lines += [f"  {i}. {url} -> {reason}" for i, (url, reason) in enumerate(failures, start=1)]
    if part.is_file():
        lines.append(
            f"The partial download {part} ({part.stat().st_size:,} bytes) is kept; rerunning resumes it."
        )
    lines.append(f"What to do: {_manual_copy_advice(dest, dataset)}.")
    return "\n".join(lines)


def _pinned_checksums(source: DatasetSource, checksums: dict[str, str] | None) -> dict[str, str]:
    known = [f.name for f in source.files] + [a.name for a in source.archives]
    unknown = sorted(set(checksums or {}) - set(known))
    if unknown:
        raise ConfigError(
            f"Unknown file name(s) {unknown} in config `data.{source.name}.checksums`. Valid values "
            f"are {{{', '.join(known)}}}."
        )
    return {name: digest.lower() for name, digest in (checksums or {}).items()}


def _link_or_copy(src: Path, dest: Path) -> None:
    """Make ``dest`` a symlink to ``src`` (a copy where links are not allowed), atomically."""
    if dest.exists() and os.path.samefile(src, dest):
        return
    with atomic_path(dest) as tmp:
        tmp.unlink()
        try:
            tmp.symlink_to(src.resolve())
        except OSError:
            shutil.copyfile(src, tmp)


def _use_manual_files(source, dest_dir: Path, manual_dir: Path, pinned) -> list[Path]:
    """Verify every raw file in the user's folder and link it into ``dest_dir``; no network."""
    names = [f.name for f in source.files]
    missing = [n for n in names if not (manual_dir / n).is_file()]
    if missing:
        lacks = "does not exist" if not manual_dir.is_dir() else f"lacks {missing}"
        raise DataError(
            f"The manual folder {manual_dir} (config `data.{source.name}.path`) {lacks}. "
            f"Expected files: {names}. Put them there under exactly these names, or set "
            f"`data.{source.name}.path` to null to download them."
        )
    paths = []
    for remote in source.files:
        src = manual_dir / remote.name
        problem, digest = _check_remote(src, remote, pinned)
        if problem:
            raise DataError(
                f"{src} (from the manual folder set by `data.{source.name}.path`) {problem}. "
                "Replace it with an intact copy; for a file with no published checksum, fix or "
                f"remove its entry in `data.{source.name}.checksums`."
            )
        dest = dest_dir / remote.name
        _link_or_copy(src, dest)
        _write_sha256_record(dest, digest)
        paths.append(dest)
    return paths


def _check_remote(path: Path, remote: Remote, pinned: dict[str, str]) -> tuple[str | None, str | None]:
    """:func:`_check` against what the registry, or the user's pin, says ``remote`` must be."""
    expected = _expected_facts(remote, pinned.get(remote.name))
    return _check(path, expected.md5, expected.sha256, expected.size, want_sha256=True)


def _accept_existing(dest: Path, remote: Remote, pinned: dict[str, str]) -> bool:
    """True when a file already at ``dest`` (downloaded or dropped by hand) verifies.

    A file that fails is moved to ``<name>.corrupt`` so nothing unverified stays under the name.
    """
    if not dest.is_file():
        return False
    problem, digest = _check_remote(dest, remote, pinned)
    if problem is None:
        _write_sha256_record(dest, digest)
        log.info("%s is already present and verifies; skipping its download", dest)
        return True
    aside = dest.with_name(dest.name + ".corrupt")
    log.warning("%s %s; moving it to %s and downloading it again", dest, problem, aside)
    os.replace(dest, aside)
    return False


def _ensure(remote: Remote, dest_dir: Path, pinned, dataset: str, progress: bool) -> Path:
    dest = dest_dir / remote.name
    if _accept_existing(dest, remote, pinned):
        return dest
    return download_file(
        remote, dest_dir, sha256=pinned.get(remote.name), progress=progress, dataset=dataset
    )


def _from_archive(
    remote: RemoteFile, archive: RemoteArchive, dest_dir, pinned, dataset, progress
) -> Path:
    """Download ``archive`` (kept for the next file) and place the member that is ``remote``."""
    archive_path = _ensure(archive, dest_dir, pinned, dataset, progress)
    accepted = set(archive.members[remote.name])
    advice = _manual_copy_advice(dest_dir / remote.name, dataset)
    with tempfile.TemporaryDirectory(prefix=f".{remote.name}.", dir=dest_dir) as tmp:
        names = _archive_names(archive_path)
        matches = sorted((n for n in names if PurePosixPath(n).name in accepted), key=len)
        if not matches:
            raise DataError(
                f"{archive_path} holds none of {sorted(accepted)} (needed as {remote.name}). The "
                f"archive is not the expected one: delete it and rerun, or {advice}."
            )
        extracted = safe_extract(archive_path, tmp, members=[matches[0]])[0]
        problem, digest = _check_remote(extracted, remote, pinned)
        if problem:
            raise DataError(
                f"{remote.name}, extracted from {archive_path} (member '{matches[0]}'), {problem}. "
                f"Delete the archive and rerun, or {advice}."
            )
        dest = dest_dir / remote.name
        os.replace(extracted, dest)
    _write_sha256_record(dest, digest)
    log.info("Placed %s from archive %s (member '%s')", dest, archive_path, matches[0])
    return dest



def _fetch_file(remote: RemoteFile, source, dest_dir: Path, pinned, progress: bool) -> Path:
    try:
        return _ensure(remote, dest_dir, pinned, source.name, progress)
    except DataError as file_error:
        errors = [str(file_error)]
        for archive in (a for a in source.archives if remote.name in a.members):
            log.warning(
                "Every mirror of %s failed; trying the archive %s", remote.name, archive.name
            )
            try:
                return _from_archive(remote, archive, dest_dir, pinned, source.name, progress)
            except DataError as archive_error:
                errors.append(
                    f"The fallback archive {archive.name} failed as well:\n{archive_error}"
                )
        if len(errors) == 1:
            raise
        raise DataError("\n".join(errors)) from file_error


def fetch_dataset(
    source: DatasetSource,
    dest_dir: str | os.PathLike,
    *,
    manual_dir: str | os.PathLike | None = None,
    checksums: dict[str, str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Make every raw file of ``source`` present and verified in ``dest_dir``; return their paths.

    With ``manual_dir`` the files must already be there: they are verified and linked (or
    copied) into ``dest_dir`` without touching the network. Otherwise a file already in
    ``dest_dir`` that verifies is kept (one dropped by hand included; with no known checksum it
    is accepted and its SHA-256 recorded), and the rest are downloaded, falling back to an
    archive from ``source.archives`` when every mirror of a file fails. ``checksums`` maps raw
    file names to SHA-256 digests pinned by the user (config ``data.<name>.checksums``).
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    pinned = _pinned_checksums(source, checksums)
    if manual_dir is not None:
        return _use_manual_files(source, dest_dir, Path(manual_dir), pinned)
    return [_fetch_file(remote, source, dest_dir, pinned, progress) for remote in source.files]
