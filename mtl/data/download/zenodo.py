"""The size and MD5 a Zenodo record lists for a file, checked on download from Zenodo.

Zenodo publishes each file's size and MD5 in its record's listing: ``GET
https://zenodo.org/api/records/<record id>`` answers JSON whose ``files`` list holds, per file,
``key`` (the file name), ``size`` (bytes) and ``checksum`` (``"md5:<hex>"``). A download from a
Zenodo file URL (``https://zenodo.org/record(s)/<id>/files/<key>``) reads that listing first and
checks the file against it: a wrong size is refused as soon as the server announces it, a wrong
MD5 deletes the download. When the listing cannot be had (offline, an API error, JSON of another
shape) the download goes on without it, as for any mirror that publishes nothing, with a warning
in the log; the SHA-256 seen is recorded either way and a user's pinned SHA-256 still applies.
``MTL_ZENODO_BASE`` (or the ``zenodo_base`` argument) replaces ``https://zenodo.org`` for both the
listing and the file, which is how the tests serve a record from a loopback server.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import os
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass

from mtl.data.download.http import USER_AGENT, _describe, _MirrorFailed, _starts_like_html
from mtl.data.download.integrity import _describe_expected, _Expected

log = logging.getLogger(__name__)

DEFAULT_ZENODO_BASE = "https://zenodo.org"
ZENODO_BASE_ENV = "MTL_ZENODO_BASE"
# A record's JSON is a few kB (metadata plus one entry per file); anything far larger is not one.
MAX_LISTING_BYTES = 8 << 20

_ZENODO_HOSTS = ("zenodo.org", "www.zenodo.org")
# /record/<id>/files/<key> (the registry's form), /records/<id>/files/<key>[?download=1] and the
# API's /api/records/<id>/files/<key>/content.
_ZENODO_FILE_PATH = re.compile(r"/(?:api/)?records?/(\d+)/files/(.+?)(?:/content)?/?")


class _ListingUnusable(Exception):
    """Zenodo's listing could not be fetched or read; the text says why (it goes to the log)."""


@dataclass(frozen=True)
class _ZenodoFile:
    """A file of a Zenodo record: where to download it and where its record's listing is."""

    record: str
    key: str
    url: str
    listing_url: str


def _zenodo_base(zenodo_base: str | None) -> str:
    return (zenodo_base or os.environ.get(ZENODO_BASE_ENV) or DEFAULT_ZENODO_BASE).rstrip("/")


def _zenodo_file(url: str, zenodo_base: str | None = None) -> _ZenodoFile | None:
    """The record id and file name behind a zenodo.org file URL (None for any other URL).

    Both the file and the listing (``<base>/api/records/<id>``) are fetched from the Zenodo base
    (``zenodo_base``, ``MTL_ZENODO_BASE`` or https://zenodo.org).
    """
    split = urllib.parse.urlsplit(url)
    if split.scheme not in ("http", "https") or (split.hostname or "") not in _ZENODO_HOSTS:
        return None
    match = _ZENODO_FILE_PATH.fullmatch(split.path)
    if not match:
        return None
    record, key = match.group(1), urllib.parse.unquote(match.group(2))
    base = _zenodo_base(zenodo_base)
    query = f"?{split.query}" if split.query else ""
    return _ZenodoFile(record, key, base + split.path + query, f"{base}/api/records/{record}")


def _zenodo_entries(listing_url: str, opener, timeout: float) -> list[dict]:
    """The ``files`` entries of a record's JSON; _ListingUnusable says why there are none."""
    request = urllib.request.Request(
        listing_url, headers={"User-Agent": USER_AGENT, "Accept": "application/json"}
    )
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read(MAX_LISTING_BYTES + 1)
    except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError is an OSError
        raise _ListingUnusable(_describe(exc)) from exc
    if len(body) > MAX_LISTING_BYTES:
        raise _ListingUnusable(f"the answer exceeds {MAX_LISTING_BYTES:,} bytes; not a record")
    try:
        record = json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError included
        kind = "an HTML page" if _starts_like_html(body[:256]) else f"not JSON ({exc})"
        raise _ListingUnusable(f"the answer is {kind}") from exc
    files = record.get("files") if isinstance(record, dict) else None
    if isinstance(files, dict):  # InvenioRDM's own serialization: {"entries": [...] or {key: ...}}
        files = files.get("entries")
        files = list(files.values()) if isinstance(files, dict) else files
    if not isinstance(files, list):
        raise _ListingUnusable("the JSON has no 'files' list")
    return [entry for entry in files if isinstance(entry, dict)]


def _zenodo_facts(zfile: _ZenodoFile, opener, timeout: float) -> tuple[int | None, str | None]:
    """(size, MD5) of ``zfile`` as its record's listing gives them; _ListingUnusable otherwise."""
    entries = _zenodo_entries(zfile.listing_url, opener, timeout)
    entry = next((e for e in entries if e.get("key") == zfile.key), None)
    if entry is None:
        keys = sorted(str(e.get("key")) for e in entries)
        raise _ListingUnusable(f"it lists no file '{zfile.key}' (it lists {keys})")
    size = entry.get("size")
    size = size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None
    checksum = entry.get("checksum")
    algorithm, _, digest = checksum.partition(":") if isinstance(checksum, str) else ("", "", "")
    md5 = digest.lower() if algorithm.lower() == "md5" else None
    md5 = md5 if md5 and re.fullmatch(r"[0-9a-f]{32}", md5) else None
    if size is None and md5 is None:
        raise _ListingUnusable(
            f"its entry for '{zfile.key}' has no usable size or MD5 (size {entry.get('size')!r}, "
            f"checksum {checksum!r})"
        )
    return size, md5


def _with_zenodo_listing(
    expected: _Expected, zfile: _ZenodoFile, name: str, opener, timeout: float
) -> _Expected:
    """``expected`` plus the size and MD5 Zenodo lists for ``zfile``: the first step of a download
    from Zenodo. An unusable listing is logged and changes nothing; a listing that contradicts the
    registry fails this mirror (the record no longer holds the file the registry describes).
    """
    try:
        size, md5 = _zenodo_facts(zfile, opener, timeout)
    except _ListingUnusable as exc:
        log.warning(
            "%s: Zenodo's file listing %s cannot be used (%s); downloading without its size and "
            "MD5 (checking: %s) and recording the SHA-256 seen",
            name,
            zfile.listing_url,
            exc,
            _describe_expected(expected),
        )
        return expected
    origin = f"Zenodo's file listing {zfile.listing_url}"
    clashes = []
    if size is not None and expected.size is not None and size != expected.size:
        clashes.append(f"{size:,} bytes where the registry says {expected.size:,}")
    if md5 and expected.md5 and md5 != expected.md5.lower():
        clashes.append(f"MD5 {md5} where the registry says {expected.md5}")
    if clashes:
        raise _MirrorFailed(
            f"{origin} gives {' and '.join(clashes)} for '{zfile.key}': the record holds another "
            "file than the one expected"
        )
    origins = dict(expected.origins)
    if size is not None and expected.size is None:
        origins["size"] = origin
    if md5 and not expected.md5:
        origins["md5"] = origin
    log.info(
        "%s: %s lists %s, MD5 %s; the download is checked against them",
        name,
        origin,
        f"{size:,} bytes" if size is not None else "no size",
        md5 or "none",
    )
    return dataclasses.replace(
        expected,
        size=expected.size if expected.size is not None else size,
        md5=expected.md5 or md5,
        origins=tuple(sorted(origins.items())),
    )
