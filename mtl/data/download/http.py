"""One file from one mirror over HTTP: resume, retries, HTML pages refused, Google Drive.

The bytes go to a ``<name>.part`` file, resumed through HTTP Range when an earlier attempt (or
run) left one, and are checked before the caller renames them into place. An HTML page saved
under a data file's name (Google Drive's virus-scan and quota pages, a host's error or sign-in
page) is refused, and Google Drive's confirm step is followed.

HTTP uses only the standard library (urllib), so downloading adds no dependency.

Google Drive URLs (``gdrive:<id>``) are fetched from ``https://drive.google.com``; the
environment variable ``MTL_GDRIVE_BASE`` (or the ``gdrive_base`` argument) replaces that
address, which is how the tests point it at a loopback server.

MD5 and SHA-256 are computed while the bytes stream to disk, so a finished download is not read
again to verify it (a ``.part`` resumed by a later run is read once, up to where it stopped).
"""

from __future__ import annotations

import hashlib
import html
import http.client
import logging
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

from tqdm import tqdm

from mtl.data.download.integrity import _check, _Expected, _from

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
DEFAULT_GDRIVE_BASE = "https://drive.google.com"
GDRIVE_BASE_ENV = "MTL_GDRIVE_BASE"
GDRIVE_PREFIX = "gdrive:"
USER_AGENT = "mtl-fewshot-download/1.0 (python urllib)"
# A download that stops early is resumed in the same call this many times, while it makes progress.
RESUME_ATTEMPTS = 3
# Enough of an HTML page to find Google Drive's confirm form; real pages are a few kB.
MAX_HTML_BYTES = 1 << 20


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
