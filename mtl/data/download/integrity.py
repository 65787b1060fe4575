"""Is a file the one expected? Size, MD5 and SHA-256 checks, and the ``<name>.sha256`` record.

What a file must match (:class:`_Expected`) comes from the dataset registry
(:mod:`mtl.data.sources`), a SHA-256 the user pinned, or a Zenodo record's listing
(:mod:`mtl.data.download.zenodo`). Nothing here touches the network.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from mtl.data.sources import RemoteArchive, RemoteFile
from mtl.errors import DataError
from mtl.io import atomic_path, file_digests

log = logging.getLogger(__name__)

Remote = RemoteFile | RemoteArchive


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks so multi-GB pickles never sit in memory."""
    return file_digests(path, [algorithm])[algorithm]


def _check(
    path: Path,
    md5: str | None,
    sha256: str | None,
    size: int | None,
    *,
    want_sha256: bool = False,
    known: dict[str, str] | None = None,
    origins: dict[str, str] | None = None,
) -> tuple[str | None, str | None]:
    """(what is wrong with ``path`` or None, its SHA-256 when computed), in one pass over the file.

    The size is checked before any hashing. ``known`` holds digests already computed for exactly
    this file (while it streamed in), which are not computed again; ``origins`` says where an
    expected value came from ("size"/"md5"/"sha256" -> text), for the message.
    """
    origins = origins or {}
    if not path.is_file():
        return "is missing", None
    seen_size = path.stat().st_size
    if size is not None and seen_size != size:
        return (
            f"has the wrong size: expected {size:,} bytes{_from(origins.get('size'))}, seen "
            f"{seen_size:,} bytes (truncated, or a different file; an HTML error page is a few kB)"
        ), None
    wanted = {k: v.lower() for k, v in {"md5": md5, "sha256": sha256}.items() if v}
    algorithms = set(wanted) | ({"sha256"} if want_sha256 else set())
    seen = {a: d for a, d in (known or {}).items() if a in algorithms}
    missing = sorted(algorithms - set(seen))
    if missing:
        seen.update(file_digests(path, missing))
    for algorithm, expected in wanted.items():
        if seen[algorithm] != expected:
            label = "MD5" if algorithm == "md5" else "SHA-256"
            return (
                f"failed its {label} check: expected {expected}{_from(origins.get(algorithm))}, "
                f"seen {seen[algorithm]}"
            ), None
    return None, seen.get("sha256")


def _from(origin: str | None) -> str:
    return f" (from {origin})" if origin else ""


def check_integrity(
    path: str | os.PathLike,
    md5: str | None = None,
    sha256: str | None = None,
    size: int | None = None,
) -> bool:
    """True when the file exists and matches every fact given; a missing file is False."""
    return _check(Path(path), md5, sha256, size)[0] is None


def verify_file(
    path: str | os.PathLike,
    md5: str | None = None,
    sha256: str | None = None,
    size: int | None = None,
) -> None:
    """Raise DataError naming the file, the expected and the seen value unless it checks out."""
    path = Path(path)
    problem, _ = _check(path, md5, sha256, size)
    if problem is not None:
        raise DataError(
            f"{path} {problem}. Delete it and rerun to download it again, or replace it with an "
            "intact copy."
        )


def _sha256_record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_sha256_record(path: Path, digest: str) -> None:
    """Record a file's SHA-256 in ``<name>.sha256`` (sha256sum format) so users can pin it later."""
    record = _sha256_record_path(path)
    if read_sha256_record(path) != digest:
        with atomic_path(record) as tmp:
            tmp.write_text(f"{digest}  {path.name}\n")


def read_sha256_record(path: str | os.PathLike) -> str | None:
    """The digest the download step recorded beside ``path`` (``<name>.sha256``), if any."""
    try:
        return _sha256_record_path(Path(path)).read_text().split()[0]
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class _Expected:
    """What the finished file must match; None means unknown. ``origins`` says where a value came
    from when that is worth telling ("size"/"md5" -> "Zenodo's file listing <url>")."""

    size: int | None
    md5: str | None
    sha256: str | None
    origins: tuple[tuple[str, str], ...] = ()

    def origin(self, fact: str) -> str | None:
        return dict(self.origins).get(fact)


def _expected_facts(remote: Remote, sha256: str | None) -> _Expected:
    """Registry facts, unless the user pinned another SHA-256: then that pin alone decides.

    A pin that differs from the registry's digest names a different file (a re-packed archive, a
    deliberate subset), whose size and MD5 the registry cannot know.
    """
    if sha256 and sha256.lower() != (remote.sha256 or "").lower():
        if remote.sha256 or remote.md5 or remote.size is not None:
            log.warning(
                "%s: the pinned SHA-256 %s differs from the registry's facts; accepting only the pinned file",
                remote.name,
                sha256,
            )
        return _Expected(size=None, md5=None, sha256=sha256.lower())
    return _Expected(size=remote.size, md5=remote.md5, sha256=remote.sha256)


def _describe_expected(expected: _Expected) -> str:
    facts = [f"{expected.size:,} bytes"] if expected.size is not None else []
    facts += [f"MD5 {expected.md5}"] if expected.md5 else []
    facts += [f"SHA-256 {expected.sha256}"] if expected.sha256 else []
    return ", ".join(facts) if facts else "no size or checksum known beforehand"
