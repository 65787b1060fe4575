"""Download layer: verification, resume, mirrors, HTML rejection, Google Drive, Zenodo record
listings, manual files, archives.

Every network test talks to a loopback server (tests/fixtures/http_server.py); nothing here
contacts a real host.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import tarfile
import urllib.request
import zipfile
from pathlib import Path

import pytest

from mtl.data.download import (
    check_integrity,
    download_file,
    fetch_dataset,
    file_digest,
    read_sha256_record,
    safe_extract,
    verify_file,
)
# integrity is where file_digests is looked up, so the tests that forbid hashing patch it there.
from mtl.data.download import integrity
from mtl.data.download.http import GDRIVE_BASE_ENV, RESUME_ATTEMPTS
from mtl.data.download.zenodo import ZENODO_BASE_ENV, _zenodo_file
from mtl.data.sources import MINIIMAGENET, TIEREDIMAGENET, DatasetSource, RemoteArchive, RemoteFile
from mtl.errors import ConfigError, DataError
from tests.fixtures.http_server import FileServer, zenodo_record
from tests.fixtures.raw_formats import make_miniimagenet_pickles

PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes, not text, not HTML
OTHER = b"\x00not the file\xff" * 300


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def checked(name: str, urls, data: bytes = PAYLOAD) -> RemoteFile:
    """A RemoteFile with every published fact, like CIFAR-100's."""
    return RemoteFile(name, tuple(urls), md5=md5(data), sha256=sha256(data), size=len(data))


def closed_port_url(path: str) -> str:
    """A loopback URL nothing listens on: any attempt to use it fails at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def toy_source(files, archives=()) -> DatasetSource:
    return DatasetSource(
        name="toy", builder="toy", files=tuple(files), splits={}, archives=tuple(archives)
    )


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


@pytest.fixture
def raw_dir(tmp_path) -> Path:
    return tmp_path / "data" / "raw" / "toy"


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything opens a URL."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", refuse)


def dl(remote, dest_dir, **kwargs):
    return download_file(remote, dest_dir, progress=False, timeout=5, **kwargs)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------------------- checksums


def test_digest_and_integrity(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)
    assert file_digest(path) == sha256(PAYLOAD)
    assert file_digest(path, "md5") == md5(PAYLOAD)
    assert check_integrity(path)  # nothing known: present is enough
    assert check_integrity(
        path, md5=md5(PAYLOAD).upper(), sha256=sha256(PAYLOAD), size=len(PAYLOAD)
    )
    assert not check_integrity(path, size=len(PAYLOAD) + 1)
    assert not check_integrity(path, sha256=sha256(OTHER))
    assert not check_integrity(tmp_path / "missing.bin")


def test_verify_file_names_file_expected_and_seen(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)
    verify_file(path, md5=md5(PAYLOAD))
    with pytest.raises(DataError) as err:
        verify_file(path, md5=md5(OTHER))
    message = str(err.value)
    assert str(path) in message and md5(OTHER) in message and md5(PAYLOAD) in message
    assert "rerun" in message
    with pytest.raises(DataError, match="wrong size: expected 3 bytes, seen 10,240"):
        verify_file(path, size=3)
    with pytest.raises(DataError, match="is missing"):
        verify_file(tmp_path / "gone.bin")


# ---------------------------------------------------------------------------- download_file


def test_download_verifies_renames_and_records_sha256(server, raw_dir):
    remote = checked("data.bin", [server.add("/data.bin", PAYLOAD)])
    path = dl(remote, raw_dir)
    assert path == raw_dir / "data.bin" and path.read_bytes() == PAYLOAD
    assert (raw_dir / "data.bin.sha256").read_text() == f"{sha256(PAYLOAD)}  data.bin\n"
    assert leftovers(raw_dir) == ["data.bin", "data.bin.sha256"]


def test_download_without_published_checksum_records_what_it_saw(server, raw_dir):
    remote = RemoteFile("cache.pkl", (server.add("/plain/cache.pkl", PAYLOAD),))
    dl(remote, raw_dir)
    assert (raw_dir / "cache.pkl.sha256").read_text().split() == [sha256(PAYLOAD), "cache.pkl"]


@pytest.mark.parametrize(
    "body, content_type",
    [
        (b"<html><body>Sign in</body></html>", "text/html; charset=UTF-8"),
        (b" \r\n\t<!DOCTYPE HTML><html><title>Error</title></html>", "application/octet-stream"),
        (b"\n<HTML><body>nope</body></HTML>", "application/x-binary"),
    ],
)
def test_html_body_is_rejected_with_where_to_put_a_manual_copy(server, raw_dir, body, content_type):
    remote = RemoteFile("cache.pkl", (server.add("/cache.pkl", body, content_type=content_type),))
    with pytest.raises(DataError) as err:
        dl(remote, raw_dir)
    message = str(err.value)
    assert "cache.pkl" in message
    assert "sent an HTML page" in message and "instead of the file" in message
    assert str(Path("data/raw/toy/cache.pkl")) in message  # where to drop a hand-downloaded copy
    assert "data.toy.path" in message
    assert leftovers(raw_dir) == []


def test_truncated_download_resumes_with_range_on_rerun(server, raw_dir):
    cut = 1000
    url = server.add(
        "/big.bin", PAYLOAD, truncate_after=cut, truncate_times=RESUME_ATTEMPTS
    )
    remote = checked("big.bin", [url])
    with pytest.raises(DataError, match="rerunning resumes it") as err:
        dl(remote, raw_dir)
    assert "closed after" in str(err.value)
    part = raw_dir / "big.bin.part"
    kept = part.stat().st_size
    assert kept == cut * RESUME_ATTEMPTS
    assert not (raw_dir / "big.bin").exists()

    path = dl(remote, raw_dir)  # the rerun

    requests = server.requests_for("/big.bin")
    assert "Range" not in requests[0].headers
    assert requests[1].headers["Range"] == f"bytes={cut}-"
    assert requests[-1].headers["Range"] == f"bytes={kept}-"
    assert path.read_bytes() == PAYLOAD and not part.exists()
    verify_file(path, sha256=sha256(PAYLOAD))


def test_a_dropped_connection_is_resumed_within_the_same_call(server, raw_dir):
    remote = checked("big.bin", [server.add("/big.bin", PAYLOAD, truncate_after=4000)])
    assert dl(remote, raw_dir).read_bytes() == PAYLOAD
    first, second = server.requests_for("/big.bin")
    assert second.headers["Range"] == "bytes=4000-"


def test_server_answering_200_to_a_range_request_restarts_from_zero(server, raw_dir):
    raw_dir.mkdir(parents=True)
    (raw_dir / "big.bin.part").write_bytes(OTHER[:500])  # stale bytes from an earlier run
    remote = checked("big.bin", [server.add("/big.bin", PAYLOAD, ignore_range=True)])
    assert dl(remote, raw_dir).read_bytes() == PAYLOAD
    assert server.requests_for("/big.bin")[0].headers["Range"] == "bytes=500-"


def test_wrong_bytes_fail_the_checksum_and_leave_nothing(server, raw_dir):
    remote = RemoteFile("data.bin", (server.add("/data.bin", OTHER),), sha256=sha256(PAYLOAD))
    with pytest.raises(DataError) as err:
        dl(remote, raw_dir)
    message = str(err.value)
    assert "SHA-256" in message and sha256(PAYLOAD) in message and sha256(OTHER) in message
    assert "corrupt copy was deleted" in message
    assert leftovers(raw_dir) == []


def test_announced_size_that_differs_from_the_registry_is_refused(server, raw_dir):
    remote = RemoteFile("data.bin", (server.add("/data.bin", OTHER),), size=len(PAYLOAD))
    with pytest.raises(DataError, match=f"announces {len(OTHER):,} bytes but {len(PAYLOAD):,}"):
        dl(remote, raw_dir)
    assert leftovers(raw_dir) == []


def test_a_failing_mirror_is_logged_and_the_next_one_used(server, raw_dir, caplog):
    dead = server.add("/gone.bin", status=404)
    remote = checked("data.bin", [dead, server.add("/data.bin", PAYLOAD)])
    with caplog.at_level(logging.WARNING, logger="mtl.data.download"):
        assert dl(remote, raw_dir).read_bytes() == PAYLOAD
    assert "404" in caplog.text and dead in caplog.text


def test_every_failed_mirror_is_listed_in_one_error(server, raw_dir):
    dead, closed = server.add("/gone.bin", status=404), closed_port_url("/data.bin")
    with pytest.raises(DataError) as err:
        dl(checked("data.bin", [dead, closed]), raw_dir)
    message = str(err.value)
    assert "all 2 mirror(s) failed" in message
    assert f"{dead} -> HTTP 404" in message and f"{closed} -> cannot connect" in message
    assert f"SHA-256 {sha256(PAYLOAD)}" in message  # what was expected


# ---------------------------------------------------------------------------- Google Drive


@pytest.mark.parametrize("mode", ["confirm", "link", "direct"])
def test_google_drive_confirm_step_is_followed(server, raw_dir, mode):
    remote = checked("archive.tar.gz", [server.add_gdrive("FILEID", PAYLOAD, mode=mode)])
    assert dl(remote, raw_dir, gdrive_base=server.base).read_bytes() == PAYLOAD
    first = server.requests[0].path
    assert first.startswith("/uc?") and "export=download" in first and "id=FILEID" in first
    if mode == "confirm":  # the form's action and hidden fields, uuid included
        last = server.requests[-1].path
        assert last.startswith("/download?") and "confirm=t" in last and "uuid=" in last


def test_google_drive_base_can_come_from_the_environment(server, raw_dir, monkeypatch):
    monkeypatch.setenv(GDRIVE_BASE_ENV, server.base)
    remote = checked("archive.tar.gz", [server.add_gdrive("FILEID", PAYLOAD)])
    assert dl(remote, raw_dir).read_bytes() == PAYLOAD


def test_google_drive_quota_page_is_rejected_as_html(server, raw_dir):
    remote = checked("archive.tar.gz", [server.add_gdrive("FILEID", PAYLOAD, mode="quota")])
    with pytest.raises(DataError) as err:
        dl(remote, raw_dir, gdrive_base=server.base)
    message = str(err.value)
    assert "archive.tar.gz" in message and "sent an HTML page" in message
    assert "Quota exceeded" in message
    assert str(raw_dir / "archive.tar.gz") in message and "data.toy.path" in message
    assert leftovers(raw_dir) == []


# ---------------------------------------------------------------------------- fetch_dataset


def test_manual_folder_is_verified_and_linked_without_network(tmp_path, raw_dir, no_network):
    manual = tmp_path / "my_downloads"
    manual.mkdir()
    (manual / "a.bin").write_bytes(PAYLOAD)
    (manual / "b.bin").write_bytes(OTHER)
    source = toy_source(
        [
            checked("a.bin", [closed_port_url("/a.bin")]),
            RemoteFile("b.bin", (closed_port_url("/b.bin"),)),  # no published checksum
        ]
    )
    paths = fetch_dataset(source, raw_dir, manual_dir=manual, checksums={"b.bin": sha256(OTHER)})
    assert paths == [raw_dir / "a.bin", raw_dir / "b.bin"]
    assert paths[0].read_bytes() == PAYLOAD and paths[1].read_bytes() == OTHER
    assert paths[0].is_symlink()
    assert (raw_dir / "b.bin.sha256").read_text().split()[0] == sha256(OTHER)
    # a rerun finds everything in place
    assert fetch_dataset(source, raw_dir, manual_dir=manual) == paths


def test_manual_folder_missing_a_file_lists_what_is_expected(tmp_path, raw_dir, no_network):
    manual = tmp_path / "my_downloads"
    manual.mkdir()
    (manual / "a.bin").write_bytes(PAYLOAD)
    source = toy_source([checked("a.bin", []), checked("b.bin", [])])
    with pytest.raises(DataError) as err:
        fetch_dataset(source, raw_dir, manual_dir=manual)
    message = str(err.value)
    assert str(manual) in message and "lacks ['b.bin']" in message
    assert "'a.bin', 'b.bin'" in message and "data.toy.path" in message


def test_bad_manual_file_is_rejected_by_name(tmp_path, raw_dir, no_network):
    manual = tmp_path / "my_downloads"
    manual.mkdir()
    (manual / "a.bin").write_bytes(PAYLOAD[::-1])  # right size, wrong bytes
    with pytest.raises(DataError) as err:
        fetch_dataset(toy_source([checked("a.bin", [])]), raw_dir, manual_dir=manual)
    message = str(err.value)
    assert str(manual / "a.bin") in message
    assert f"expected {md5(PAYLOAD)}, seen {md5(PAYLOAD[::-1])}" in message
    assert not (raw_dir / "a.bin").exists()


def test_intact_files_in_dest_are_not_downloaded_again(server, raw_dir):
    raw_dir.mkdir(parents=True)
    (raw_dir / "a.bin").write_bytes(PAYLOAD)  # dropped by hand, verifies against the registry
    (raw_dir / "b.bin").write_bytes(OTHER)  # dropped by hand, nothing to verify against
    source = toy_source(
        [
            checked("a.bin", [server.add("/a.bin", PAYLOAD)]),
            RemoteFile("b.bin", (server.add("/b.bin", OTHER),)),
        ]
    )
    assert fetch_dataset(source, raw_dir, progress=False) == [raw_dir / "a.bin", raw_dir / "b.bin"]
    assert server.requests == []
    assert (raw_dir / "b.bin.sha256").read_text().split()[0] == sha256(OTHER)


def test_a_corrupt_file_in_dest_is_moved_aside_and_downloaded(server, raw_dir):
    raw_dir.mkdir(parents=True)
    (raw_dir / "a.bin").write_bytes(OTHER)
    source = toy_source([checked("a.bin", [server.add("/a.bin", PAYLOAD)])])
    assert fetch_dataset(source, raw_dir, progress=False)[0].read_bytes() == PAYLOAD
    assert (raw_dir / "a.bin.corrupt").read_bytes() == OTHER


def test_pinned_checksums_are_enforced_and_checked_for_typos(server, raw_dir):
    source = toy_source([RemoteFile("c.pkl", (server.add("/c.pkl", OTHER),))])
    with pytest.raises(ConfigError, match=r"\['c.pk'\].*Valid values are \{c.pkl"):
        fetch_dataset(source, raw_dir, checksums={"c.pk": sha256(PAYLOAD)})
    with pytest.raises(DataError, match=sha256(PAYLOAD)):
        fetch_dataset(source, raw_dir, checksums={"c.pkl": sha256(PAYLOAD)}, progress=False)
    assert leftovers(raw_dir) == []
    fetch_dataset(source, raw_dir, checksums={"c.pkl": sha256(OTHER).upper()}, progress=False)
    assert (raw_dir / "c.pkl").read_bytes() == OTHER


def tar_bytes(
    entries: dict[str, bytes], symlinks: dict[str, str] | None = None, mode="w:gz"
) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def test_archive_fallback_when_every_mirror_fails(server, raw_dir, monkeypatch):
    monkeypatch.setenv(GDRIVE_BASE_ENV, server.base)
    archive = tar_bytes(
        {"mini/cache-train.pkl": PAYLOAD, "mini/cache-validation.pkl": OTHER, "mini/junk.txt": b"x"}
    )
    files = [
        checked("cache-train.pkl", [server.add("/t", status=404)]),
        RemoteFile("cache-val.pkl", (server.add("/v", status=404),)),
    ]
    fallback = RemoteArchive(
        "mini.tar.gz",
        (server.add_gdrive("ARCHIVE", archive),),
        members={
            "cache-train.pkl": ("cache-train.pkl",),
            "cache-val.pkl": ("cache-val.pkl", "cache-validation.pkl"),
        },
        md5=md5(archive),
    )
    paths = fetch_dataset(toy_source(files, [fallback]), raw_dir, progress=False)
    assert [p.read_bytes() for p in paths] == [PAYLOAD, OTHER]
    assert (raw_dir / "cache-val.pkl.sha256").read_text().split()[0] == sha256(OTHER)
    assert not (raw_dir / "junk.txt").exists() and not (raw_dir / "mini").exists()
    # the archive was downloaded once and reused for the second file
    assert sum(r.path.startswith("/download?") for r in server.requests) == 1


def test_failed_archive_fallback_reports_both_failures(server, raw_dir, monkeypatch):
    monkeypatch.setenv(GDRIVE_BASE_ENV, server.base)
    files = [checked("cache-train.pkl", [server.add("/t", status=404)])]
    fallback = RemoteArchive(
        "mini.tar.gz",
        (server.add_gdrive("ARCHIVE", b"", mode="quota"),),
        members={"cache-train.pkl": ("cache-train.pkl",)},
    )
    with pytest.raises(DataError) as err:
        fetch_dataset(toy_source(files, [fallback]), raw_dir, progress=False)
    message = str(err.value)
    assert "HTTP 404" in message and "fallback archive mini.tar.gz failed" in message
    assert "Quota exceeded" in message


# ---------------------------------------------------------------------------- safe_extract


def test_safe_extract_tar_with_nested_dirs_and_inner_link(tmp_path):
    archive = tmp_path / "ok.tar.gz"
    archive.write_bytes(
        tar_bytes({"top/a.bin": PAYLOAD, "top/sub/b.bin": OTHER}, {"top/link": "sub/b.bin"})
    )
    out = tmp_path / "out"
    paths = safe_extract(archive, out)
    assert (out / "top" / "a.bin").read_bytes() == PAYLOAD
    assert (out / "top" / "link").read_bytes() == OTHER
    assert set(paths) == {out / "top/a.bin", out / "top/sub/b.bin", out / "top/link"}
    only = safe_extract(archive, tmp_path / "one", members=["top/a.bin"])
    assert only == [tmp_path / "one/top/a.bin"] and leftovers(tmp_path / "one") == ["top"]


@pytest.mark.parametrize(
    "entries, symlinks, member, why",
    [
        ({"fine.txt": b"1", "../evil": b"x"}, None, "../evil", "'..'"),
        ({"fine.txt": b"1", "a/../../evil": b"x"}, None, "a/../../evil", "'..'"),
        ({"fine.txt": b"1", "/tmp/abs-evil": b"x"}, None, "/tmp/abs-evil", "absolute path"),
        (
            {"fine.txt": b"1"},
            {"escape": "../../outside"},
            "escape",
            "symbolic link pointing outside",
        ),
        ({"fine.txt": b"1"}, {"etc": "/etc/passwd"}, "etc", "symbolic link pointing outside"),
    ],
)
def test_safe_extract_refuses_escaping_tar_members(tmp_path, entries, symlinks, member, why):
    archive = tmp_path / "evil.tar"
    archive.write_bytes(tar_bytes(entries, symlinks, mode="w"))
    out = tmp_path / "deep" / "out"
    with pytest.raises(DataError) as err:
        safe_extract(archive, out)
    assert f"member '{member}'" in str(err.value) and why in str(err.value)
    assert leftovers(out) == []  # nothing extracted, not even the fine member
    assert leftovers(tmp_path) == ["deep", "evil.tar"] and leftovers(tmp_path / "deep") == ["out"]


def test_safe_extract_refuses_links_escaping_through_other_links(tmp_path):
    # "up" points at the folder itself, so "up/.." is its parent, though it looks inside.
    archive = tmp_path / "sneaky.tar"
    archive.write_bytes(tar_bytes({}, {"up": ".", "x": "up/.."}, mode="w"))
    with pytest.raises(DataError, match="member '(up|x)'"):
        safe_extract(archive, tmp_path / "out")
    assert leftovers(tmp_path / "out") == []


def test_safe_extract_refuses_escaping_zip_members(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fine.txt", b"1")
        zf.writestr("../evil.txt", b"x")
    with pytest.raises(DataError, match=r"member '\.\./evil\.txt'"):
        safe_extract(archive, tmp_path / "out")
    assert leftovers(tmp_path / "out") == [] and not (tmp_path / "evil.txt").exists()
    ok = tmp_path / "ok.zip"
    with zipfile.ZipFile(ok, "w") as zf:
        zf.writestr("d/fine.txt", b"1")
    assert safe_extract(ok, tmp_path / "ok")[0].read_bytes() == b"1"


def test_safe_extract_on_a_non_archive_names_known_formats(tmp_path):
    page = tmp_path / "mini.tar.gz"
    page.write_bytes(b"<!DOCTYPE html><html>quota</html>")
    with pytest.raises(DataError, match=r"not a tar or zip archive \(known formats: .tar"):
        safe_extract(page, tmp_path / "out")
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())


def test_nothing_in_this_module_writes_outside_its_folder(server, raw_dir):
    """A failed download leaves no stray temp files anywhere near the target."""
    remote = checked("data.bin", [server.add("/data.bin", OTHER)])
    with pytest.raises(DataError):
        dl(remote, raw_dir)
    assert leftovers(raw_dir) == [] and leftovers(raw_dir.parent) == ["toy"]
    assert os.listdir(raw_dir.parent.parent) == ["raw"]


def test_a_resumed_copy_that_fails_its_checksum_is_fetched_again_from_zero(server, raw_dir):
    raw_dir.mkdir(parents=True)
    (raw_dir / "big.bin.part").write_bytes(OTHER[:700])  # stale bytes the server will extend
    remote = checked("big.bin", [server.add("/big.bin", PAYLOAD)])
    assert download_file(remote, raw_dir, timeout=5).read_bytes() == PAYLOAD  # progress bar on
    ranges = [r.headers.get("Range") for r in server.requests_for("/big.bin")]
    assert ranges == ["bytes=700-", None]


def test_a_complete_part_left_before_the_rename_needs_no_body(server, raw_dir):
    raw_dir.mkdir(parents=True)
    (raw_dir / "cache.pkl.part").write_bytes(PAYLOAD)
    remote = RemoteFile("cache.pkl", (server.add("/cache.pkl", PAYLOAD),))  # size unknown
    assert dl(remote, raw_dir).read_bytes() == PAYLOAD
    assert [r.headers["Range"] for r in server.requests] == [f"bytes={len(PAYLOAD)}-"]  # got 416


# ---------------------------------------------------------------------------- Zenodo listing

RECORD = "7978538"


def zenodo_remote(name: str = "cache.pkl", *more_urls: str, **facts) -> RemoteFile:
    """A raw file whose first mirror is a Zenodo file URL, as in the registry."""
    return RemoteFile(
        name, (f"https://zenodo.org/record/{RECORD}/files/{name}", *more_urls), **facts
    )


def zdl(remote, dest_dir, server, **kwargs):
    return dl(remote, dest_dir, zenodo_base=server.base, **kwargs)


def listing_with(server, **changes) -> dict:
    """The record's true JSON for cache.pkl = PAYLOAD, with entry fields replaced."""
    record = zenodo_record(RECORD, {"cache.pkl": PAYLOAD}, server.base)
    record["files"][0].update(changes)
    return record


@pytest.mark.parametrize(
    "url, key",
    [
        (
            "https://zenodo.org/record/7978538/files/mini-imagenet-cache-train.pkl",
            "mini-imagenet-cache-train.pkl",
        ),
        ("https://zenodo.org/records/7978538/files/a%20b.pkl?download=1", "a b.pkl"),
        ("https://zenodo.org/api/records/7978538/files/x.pkl/content", "x.pkl"),
        ("https://www.zenodo.org/records/7978538/files/x.pkl", "x.pkl"),
        ("https://example.org/record/7978538/files/x.pkl", None),
        ("https://zenodo.org/records/7978538", None),
        ("gdrive:16V_ZlkW4SsnNDtnGmaBRq2OoPmUOc5mY", None),
    ],
)
def test_zenodo_file_urls_give_record_key_and_listing_address(url, key, monkeypatch):
    monkeypatch.delenv(ZENODO_BASE_ENV, raising=False)
    found = _zenodo_file(url)
    if key is None:
        assert found is None
        return
    assert (found.record, found.key) == (RECORD, key)
    assert found.listing_url == f"https://zenodo.org/api/records/{RECORD}"
    moved = _zenodo_file(url, "http://127.0.0.1:9/")  # the tests' override moves both
    assert moved.listing_url == f"http://127.0.0.1:9/api/records/{RECORD}"
    assert moved.url.startswith("http://127.0.0.1:9/") and moved.url.endswith(
        url.split("zenodo.org")[1]
    )


def test_every_registry_zenodo_url_names_record_7978538_and_its_file():
    for source in (MINIIMAGENET, TIEREDIMAGENET):
        for remote in source.files:
            found = _zenodo_file(remote.urls[0])
            assert found is not None and found.record == RECORD
            assert found.key == remote.urls[0].rsplit("/", 1)[1]


def test_zenodo_download_reads_the_listing_first_and_checks_its_size_and_md5(
    server, raw_dir, caplog
):
    listing_url = server.add_zenodo_record(RECORD, {"cache.pkl": PAYLOAD})
    with caplog.at_level(logging.INFO, logger="mtl.data.download"):
        path = zdl(zenodo_remote(), raw_dir, server)
    assert path.read_bytes() == PAYLOAD
    assert [r.path for r in server.requests] == [
        f"/api/records/{RECORD}",
        f"/record/{RECORD}/files/cache.pkl",
    ]
    assert f"{listing_url} lists 10,240 bytes, MD5 {md5(PAYLOAD)}" in caplog.text
    assert f"MD5 {md5(PAYLOAD)} as given by Zenodo's file listing {listing_url}" in caplog.text
    assert (raw_dir / "cache.pkl.sha256").read_text().split()[0] == sha256(PAYLOAD)
    assert leftovers(raw_dir) == ["cache.pkl", "cache.pkl.sha256"]


def test_a_wrong_md5_in_the_listing_fails_naming_file_md5s_and_listing(server, raw_dir):
    listing_url = server.add_zenodo_record(
        RECORD, {"cache.pkl": PAYLOAD}, listing=listing_with(server, checksum="md5:" + md5(OTHER))
    )
    with pytest.raises(DataError) as err:
        zdl(zenodo_remote(), raw_dir, server)
    message = str(err.value)
    assert "Could not download cache.pkl" in message
    assert (
        f"failed its MD5 check: expected {md5(OTHER)} (from Zenodo's file listing {listing_url}), "
        f"seen {md5(PAYLOAD)}"
    ) in message
    assert "corrupt copy was deleted" in message
    assert leftovers(raw_dir) == []  # nothing under the final name, no .part either


def test_after_a_listing_mismatch_the_next_mirror_is_tried(server, raw_dir, caplog):
    server.add_zenodo_record(
        RECORD, {"cache.pkl": PAYLOAD}, listing=listing_with(server, checksum="md5:" + md5(OTHER))
    )
    remote = zenodo_remote("cache.pkl", server.add("/elsewhere/cache.pkl", PAYLOAD))
    with caplog.at_level(logging.WARNING, logger="mtl.data.download"):
        assert zdl(remote, raw_dir, server).read_bytes() == PAYLOAD
    assert "mirror 1/2" in caplog.text and f"expected {md5(OTHER)}" in caplog.text
    assert len(server.requests_for("/elsewhere/cache.pkl")) == 1


def test_a_size_that_differs_from_the_listing_is_refused_before_anything_is_kept(
    server, raw_dir, monkeypatch
):
    listing_url = server.add_zenodo_record(
        RECORD, {"cache.pkl": PAYLOAD}, listing=listing_with(server, size=len(PAYLOAD) + 1)
    )
    monkeypatch.setattr(integrity, "file_digests", lambda *a, **k: pytest.fail("hashed"))
    with pytest.raises(DataError) as err:
        zdl(zenodo_remote(), raw_dir, server)
    assert (
        f"announces {len(PAYLOAD):,} bytes but {len(PAYLOAD) + 1:,} are expected "
        f"(from Zenodo's file listing {listing_url})"
    ) in str(err.value)
    assert leftovers(raw_dir) == []


def test_a_listing_that_contradicts_the_registry_fails_that_mirror(server, raw_dir):
    server.add_zenodo_record(RECORD, {"cache.pkl": PAYLOAD})
    remote = zenodo_remote(md5=md5(OTHER))  # the registry expects another file
    with pytest.raises(DataError, match=f"MD5 {md5(PAYLOAD)} where the registry says {md5(OTHER)}"):
        zdl(remote, raw_dir, server)
    assert server.requests_for(f"/record/{RECORD}/files/cache.pkl") == []
    assert leftovers(raw_dir) == []


@pytest.mark.parametrize(
    "listing, options, why",
    [
        (None, {"status": 404}, "HTTP 404"),
        (None, {"status": 503}, "HTTP 503"),
        (
            b"<!DOCTYPE html><html><title>Maintenance</title></html>",
            {"content_type": "text/html"},
            "an HTML page",
        ),
        (b'{"files": [', {}, "not JSON"),
        ({"hits": {"hits": []}}, {}, "no 'files' list"),
        (
            {"files": [{"key": "other.pkl", "size": 3, "checksum": "md5:" + "0" * 32}]},
            {},
            "lists no file 'cache.pkl'",
        ),
        (
            {"files": [{"key": "cache.pkl", "size": "big", "checksum": "sha1:abc"}]},
            {},
            "no usable size or MD5",
        ),
    ],
    ids=["404", "503", "html", "truncated-json", "no-files", "key-absent", "no-usable-facts"],
)
def test_an_unusable_listing_is_logged_and_the_download_goes_on(
    server, raw_dir, caplog, listing, options, why
):
    listing_url = server.add_zenodo_record(
        RECORD, {"cache.pkl": PAYLOAD}, listing=listing, **options
    )
    with caplog.at_level(logging.WARNING, logger="mtl.data.download"):
        assert zdl(zenodo_remote(), raw_dir, server).read_bytes() == PAYLOAD
    warning = next(r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage())
    assert f"Zenodo's file listing {listing_url} cannot be used (" in warning and why in warning
    assert "recording the SHA-256 seen" in caplog.text
    assert (raw_dir / "cache.pkl.sha256").read_text().split()[0] == sha256(PAYLOAD)


def test_invenio_files_entries_shape_is_read_too(server, raw_dir):
    entries = {
        "cache.pkl": {"key": "cache.pkl", "size": len(PAYLOAD), "checksum": "md5:" + md5(OTHER)}
    }
    server.add_zenodo_record(
        RECORD, {"cache.pkl": PAYLOAD}, listing={"files": {"entries": entries}}
    )
    with pytest.raises(DataError, match=f"expected {md5(OTHER)} \\(from Zenodo's file listing"):
        zdl(zenodo_remote(), raw_dir, server)


def test_offline_zenodo_logs_the_missing_listing_then_fails_as_before(raw_dir, caplog):
    base = closed_port_url("")
    with caplog.at_level(logging.WARNING, logger="mtl.data.download"):
        with pytest.raises(DataError) as err:
            dl(zenodo_remote(), raw_dir, zenodo_base=base)
    assert f"{base}/api/records/{RECORD} cannot be used (cannot connect" in caplog.text
    assert f"{base}/record/{RECORD}/files/cache.pkl -> cannot connect" in str(err.value)


@pytest.mark.parametrize("listing_works", [True, False], ids=["listing", "no-listing"])
def test_config_checksums_apply_with_or_without_the_listing(
    server, raw_dir, monkeypatch, listing_works
):
    monkeypatch.setenv(ZENODO_BASE_ENV, server.base)
    server.add_zenodo_record(RECORD, {"cache.pkl": PAYLOAD}, status=200 if listing_works else 500)
    source = toy_source([zenodo_remote()])
    with pytest.raises(DataError, match=f"SHA-256 check: expected {sha256(OTHER)}"):
        fetch_dataset(source, raw_dir, checksums={"cache.pkl": sha256(OTHER)}, progress=False)
    assert leftovers(raw_dir) == []
    paths = fetch_dataset(source, raw_dir, checksums={"cache.pkl": sha256(PAYLOAD)}, progress=False)
    assert paths[0].read_bytes() == PAYLOAD


def test_a_right_pin_does_not_excuse_a_wrong_listed_md5(server, raw_dir, monkeypatch):
    monkeypatch.setenv(ZENODO_BASE_ENV, server.base)
    server.add_zenodo_record(
        RECORD, {"cache.pkl": PAYLOAD}, listing=listing_with(server, checksum="md5:" + md5(OTHER))
    )
    with pytest.raises(DataError, match="MD5 check"):
        fetch_dataset(
            toy_source([zenodo_remote()]),
            raw_dir,
            checksums={"cache.pkl": sha256(PAYLOAD)},
            progress=False,
        )
    assert leftovers(raw_dir) == []


def test_registry_miniimagenet_downloads_are_checked_against_a_zenodo_listing(
    tmp_path, server, monkeypatch, caplog
):
    mini = make_miniimagenet_pickles(
        tmp_path / "src",
        images_per_class=1,
        classes={"train": 2, "val": 2, "test": 2},
        image_size=8,
    )
    served = {  # the record's file names; Zenodo spells the validation split out
        url.rsplit("/", 1)[1]: (mini.path / remote.name).read_bytes()
        for remote in MINIIMAGENET.files
        for url in remote.urls
    }
    assert "mini-imagenet-cache-validation.pkl" in served
    server.add_zenodo_record(RECORD, served)
    monkeypatch.setenv(ZENODO_BASE_ENV, server.base)
    monkeypatch.setenv(GDRIVE_BASE_ENV, closed_port_url(""))  # never needed
    raw = tmp_path / "raw"
    with caplog.at_level(logging.INFO, logger="mtl.data.download"):
        paths = fetch_dataset(MINIIMAGENET, raw, progress=False)
    assert [p.name for p in paths] == [f.name for f in MINIIMAGENET.files]
    assert all(p.read_bytes() == (mini.path / p.name).read_bytes() for p in paths)
    assert len(server.requests_for(f"/api/records/{RECORD}")) == 3
    assert caplog.text.count("as given by Zenodo's file listing") == 3


def test_a_fresh_download_is_hashed_while_it_streams(server, raw_dir, monkeypatch):
    monkeypatch.setattr(integrity, "file_digests", lambda *a, **k: pytest.fail("read again"))
    remote = checked("data.bin", [server.add("/data.bin", PAYLOAD, truncate_after=3000)])
    assert dl(remote, raw_dir).read_bytes() == PAYLOAD  # resumed once within the call
    assert read_sha256_record(raw_dir / "data.bin") == sha256(PAYLOAD)
