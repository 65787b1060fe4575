"""Getting raw dataset files onto disk, whole and verified, or failing with a message that says why.

Small verbs in the spirit of torchvision's ``datasets/utils.py`` (digest, check, verify, download,
extract), plus what it lacks and what users trip over most: a ``<name>.part`` temp file renamed
only once the file verifies, resume through HTTP Range, mirrors tried in order, rejection of HTML
pages saved under a data file's name (Google Drive's virus-scan and quota pages), Google Drive's
confirm step, and archive extraction that refuses members escaping the target folder.

HTTP uses only the standard library (urllib), so downloading adds no dependency.

Google Drive URLs (``gdrive:<id>``) are fetched from ``https://drive.google.com``; the
environment variable ``MTL_GDRIVE_BASE`` (or the ``gdrive_base`` argument) replaces that
address, which is how the tests point it at a loopback server.

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

MD5 and SHA-256 are computed while the bytes stream to disk, so a finished download is not read
again to verify it (a ``.part`` resumed by a later run is read once, up to where it stopped).
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import http.client
import json
import logging
import os
import posixpath
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

from mtl.data.sources import DatasetSource, RemoteArchive, RemoteFile
from mtl.errors import ConfigError, DataError
from mtl.io import atomic_path, file_digests

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
DEFAULT_GDRIVE_BASE = "https://drive.google.com"
GDRIVE_BASE_ENV = "MTL_GDRIVE_BASE"
GDRIVE_PREFIX = "gdrive:"
USER_AGENT = "mtl-fewshot-download/1.0 (python urllib)"
DEFAULT_ZENODO_BASE = "https://zenodo.org"
ZENODO_BASE_ENV = "MTL_ZENODO_BASE"
# A record's JSON is a few kB (metadata plus one entry per file); anything far larger is not one.
MAX_LISTING_BYTES = 8 << 20
# A download that stops early is resumed in the same call this many times, while it makes progress.
RESUME_ATTEMPTS = 3
# Enough of an HTML page to find Google Drive's confirm form; real pages are a few kB.
MAX_HTML_BYTES = 1 << 20
ARCHIVE_FORMATS = ".tar, .tar.gz/.tgz, .tar.bz2, .tar.xz, .zip"
# tarfile's extraction filters arrived in Python 3.11.4; () catches nothing where they are absent.
_TAR_FILTER_ERROR = getattr(tarfile, "FilterError", ())

Remote = RemoteFile | RemoteArchive


# ------------------------------------------------------------------------------ checksums


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


# ------------------------------------------------------------------------------ HTTP


class _MirrorFailed(Exception):
    """One mirror could not deliver the file; the text says why (it ends up in the user's error)."""


class _HTMLPage(_MirrorFailed):
    """The server sent an HTML page (an error, login or quota page) where the file should be."""


class _Restart(Exception):
    """The .part file was discarded (the server could not resume it); fetch again from byte 0."""


class _Truncated(_MirrorFailed):
    """The body ended before Content-Length; ``gained`` bytes were added to the .part file."""

    def __init__(self, message: str, gained: int):
        super().__init__(message)
        self.gained = gained


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


class _Digests:
    """MD5 and SHA-256 of the bytes appended to a ``.part`` file, updated as they stream in.

    ``count`` is how many bytes they cover. Before appending at ``offset``, :meth:`cover` makes
    them cover exactly the file's first ``offset`` bytes: nothing to do when this download wrote
    them, a reset at 0, a read of the file when resuming what another run (or a failed write) left.
    """

    ALGORITHMS = ("md5", "sha256")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.hashers = {name: hashlib.new(name) for name in self.ALGORITHMS}
        self.count = 0

    def update(self, chunk: bytes) -> None:
        for hasher in self.hashers.values():
            hasher.update(chunk)
        self.count += len(chunk)

    def cover(self, part: Path, offset: int) -> None:
        if self.count == offset:
            return
        self.reset()
        if offset:
            with open(part, "rb") as handle:
                while self.count < offset:
                    chunk = handle.read(min(CHUNK_SIZE, offset - self.count))
                    if not chunk:
                        break
                    self.update(chunk)

    def of(self, part: Path) -> dict[str, str]:
        """The digests when they cover the whole of ``part`` as it is now, else {} (read it)."""
        if not part.is_file() or part.stat().st_size != self.count:
            return {}
        return {name: hasher.hexdigest() for name, hasher in self.hashers.items()}


def _gdrive_base(gdrive_base: str | None) -> str:
    return (gdrive_base or os.environ.get(GDRIVE_BASE_ENV) or DEFAULT_GDRIVE_BASE).rstrip("/")


def _request(opener: urllib.request.OpenerDirector, url: str, offset: int, timeout: float):
    """Open ``url``, asking for bytes from ``offset`` on when resuming; HTTP errors raise."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)


def _is_html_type(headers) -> bool:
    return (headers.get("Content-Type") or "").split(";")[0].strip().lower() == "text/html"


def _starts_like_html(body: bytes) -> bool:
    head = body.lstrip().lstrip(b"\xef\xbb\xbf").lstrip()[:64].lower()
    return head.startswith(b"<!doctype html") or head.startswith(b"<html")


class _PageParser(HTMLParser):
    """Collects what Google Drive's interstitial pages offer: forms, confirm links, the title."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.forms: list[dict] = []
        self.confirm_links: list[str] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        attrs = {k: (v or "") for k, v in attrs}
        if tag == "form":
            self.forms.append({"action": attrs.get("action", ""), "fields": {}})
        elif tag == "input" and self.forms and attrs.get("name"):
            if attrs.get("type", "text").lower() not in ("submit", "button", "image"):
                self.forms[-1]["fields"][attrs["name"]] = attrs.get("value", "")
        elif tag == "a" and "confirm=" in attrs.get("href", ""):
            self.confirm_links.append(attrs["href"])
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def _parse_page(body: bytes) -> _PageParser:
    parser = _PageParser()
    parser.feed(body.decode("utf-8", errors="replace"))
    parser.close()
    return parser


def _html_failure(body: bytes, content_type: str | None) -> _HTMLPage:
    title = " ".join(_parse_page(body).title.split()) if body else ""
    described = f" titled '{title}'" if title else ""
    return _HTMLPage(
        f"the server sent an HTML page{described} instead of the file "
        f"(Content-Type {content_type or 'unset'}, first {len(body):,} bytes read); hosts send one "
        "for errors or sign-in, Google Drive when its download quota is exceeded"
    )


def _gdrive_confirm_url(page: _PageParser, page_url: str) -> str | None:
    """The URL behind Google Drive's "Download anyway" form or confirm link, if the page has one."""
    for form in page.forms:
        fields = dict(form["fields"])
        if "confirm" in fields or "uuid" in fields:
            fields.setdefault("confirm", "t")
            action = urllib.parse.urljoin(page_url, form["action"] or page_url)
            sep = "&" if urllib.parse.urlsplit(action).query else "?"
            return action + sep + urllib.parse.urlencode(fields)
    for href in page.confirm_links:
        return urllib.parse.urljoin(page_url, html.unescape(href))
    return None


def _open_mirror(url: str, offset: int, opener, timeout: float, gdrive_base: str | None):
    """Open a mirror; for ``gdrive:<id>`` walk through Drive's confirm page when it shows one."""
    if not url.startswith(GDRIVE_PREFIX):
        return _request(opener, url, offset, timeout)
    file_id = url[len(GDRIVE_PREFIX) :]
    page_url = f"{_gdrive_base(gdrive_base)}/uc?" + urllib.parse.urlencode(
        {"export": "download", "id": file_id}
    )
    response = _request(opener, page_url, offset, timeout)
    if not _is_html_type(response.headers):
        return response  # small files come straight away
    with response:
        body = response.read(MAX_HTML_BYTES)
        content_type = response.headers.get("Content-Type")
    confirm_url = _gdrive_confirm_url(_parse_page(body), response.geturl())
    if confirm_url is None:
        raise _html_failure(body, content_type)
    log.info("Google Drive asked to confirm the download of %s; following its form", file_id)
    return _request(opener, confirm_url, offset, timeout)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``bytes first-last/total``; None where absent or '*'."""
    match = re.fullmatch(r"\s*bytes\s+(\d+|\*)(?:-\d+)?/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    first, total = match.groups()
    return (None if first == "*" else int(first)), (None if total == "*" else int(total))


def _transfer(
    response, part: Path, offset: int, expected: _Expected, name: str, progress: bool, digests
) -> None:
    """Stream a response into ``part`` (appending at ``offset`` for a 206); raise on a bad answer."""
    status = response.status
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if status == 206:
        first, total = _content_range(response.headers.get("Content-Range"))
        if first != offset:
            log.info(
                "%s: the server resumed at byte %s, not %d; restarting from 0", name, first, offset
            )
            part.unlink(missing_ok=True)
            raise _Restart
    elif status == 200:
        if offset:
            log.info("%s: the server ignored the Range request; restarting from byte 0", name)
        offset, total = 0, length
    else:
        raise _MirrorFailed(f"unexpected HTTP status {status} {response.reason}")
    first_chunk = response.read(CHUNK_SIZE)
    if _is_html_type(response.headers) or (offset == 0 and _starts_like_html(first_chunk)):
        raise _html_failure(first_chunk, response.headers.get("Content-Type"))
    if total is not None and expected.size is not None and total != expected.size:
        raise _MirrorFailed(
            f"the server announces {total:,} bytes but {expected.size:,} are expected"
            f"{_from(expected.origin('size'))} (a different file)"
        )
    total = total if total is not None else expected.size
    digests.cover(part, offset)
    written = _stream(response, first_chunk, part, offset, total, name, progress, digests)
    if total is not None and offset + written < total:
        raise _Truncated(
            f"the connection closed after {offset + written:,} of {total:,} bytes", gained=written
        )


def _stream(
    response, first_chunk: bytes, part: Path, offset: int, total, name: str, progress: bool, digests
) -> int:
    """Append the body to ``part`` with a progress bar, hashing it on the way (``digests``);
    return the number of bytes written."""
    written = 0
    bar = tqdm(
        total=total,
        initial=offset,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=name,
        disable=None if progress else True,
        file=sys.stderr,
    )
    with bar, open(part, "ab" if offset else "wb") as out:
        chunk = first_chunk
        while chunk:
            out.write(chunk)
            digests.update(chunk)
            written += len(chunk)
            bar.update(len(chunk))
            chunk = response.read(CHUNK_SIZE)
    return written


def _fetch_from_mirror(
    url, part, expected, *, name, opener, timeout, gdrive_base, progress, digests
) -> None:
    """Bring ``part`` to the complete file from one mirror, resuming while each attempt progresses."""
    for attempt in range(1, RESUME_ATTEMPTS + 1):
        offset = part.stat().st_size if part.is_file() else 0
        if expected.size is not None and offset >= expected.size:
            if offset == expected.size:
                return  # a finished .part from an earlier run that stopped before the rename
            part.unlink()
            offset = 0
        try:
            response = _open_mirror(url, offset, opener, timeout, gdrive_base)
        except urllib.error.HTTPError as exc:
            if exc.code != 416 or not offset:
                raise
            if _content_range(exc.headers.get("Content-Range"))[1] == offset:
                return  # the .part already holds the whole file
            log.info("%s: the server cannot resume at byte %d; restarting from 0", name, offset)
            part.unlink()
            continue
        try:
            with response:
                _transfer(response, part, offset, expected, name, progress, digests)
            return
        except _Restart:
            continue
        except _Truncated as exc:
            if exc.gained == 0 or attempt == RESUME_ATTEMPTS:
                raise
            log.info("%s: %s; resuming (attempt %d)", name, exc, attempt + 1)
        except (OSError, http.client.HTTPException) as exc:
            if not part.is_file() or part.stat().st_size <= offset or attempt == RESUME_ATTEMPTS:
                raise
            log.info("%s: %s; resuming (attempt %d)", name, _describe(exc), attempt + 1)
    raise _MirrorFailed(f"gave up after {RESUME_ATTEMPTS} attempts to resume")


def _download_verified(url, part, expected, **options) -> str:
    """Fetch and verify from one mirror; a resumed copy that fails is fetched once more from 0."""
    resumed = part.is_file()
    _fetch_from_mirror(url, part, expected, **options)
    try:
        return _verify_part(part, expected, options["digests"])
    except _MirrorFailed:
        if not resumed:
            raise
        log.info(
            "%s: the resumed download did not verify; fetching it again from byte 0", part.name
        )
    _fetch_from_mirror(url, part, expected, **options)
    return _verify_part(part, expected, options["digests"])


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot connect ({exc.reason})"
    return str(exc) or type(exc).__name__


# ------------------------------------------------------------------------------ Zenodo

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


# ------------------------------------------------------------------------------ downloads


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
    MD5 in the record's listing are checked as well (see the module docstring). The observed
    SHA-256 is written to ``<name>.sha256``. ``dataset`` (default: the folder's name, as in
    ``data/raw/<dataset>``) names the config key the error messages point to. Raises one
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


def _verify_part(part: Path, expected: _Expected, digests: _Digests) -> str:
    """Check the finished .part; delete it when corrupt (a resume would only keep the bad bytes)."""
    problem, digest = _check(
        part,
        expected.md5,
        expected.sha256,
        expected.size,
        want_sha256=True,
        known=digests.of(part),
        origins=dict(expected.origins),
    )
    if problem is None:
        return digest
    part.unlink(missing_ok=True)
    raise _MirrorFailed(f"the download {problem}; the corrupt copy was deleted")


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


# ------------------------------------------------------------------------------ archives


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


# ------------------------------------------------------------------------------ datasets


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
