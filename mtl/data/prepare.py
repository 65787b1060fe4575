"""From a dataset's config entry to raw files and HDF5 splits: the two steps the workflow runs.

``fetch_raw`` gets the raw files (download, a user's folder, or an installed package) and records
what it got in a manifest; ``build_splits`` turns the files the manifest names into HDF5. The
manifest is the only declared output of the download step, so partial downloads (``.part`` files)
beside it survive a failed run and resume on the next one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from mtl.data import sources
from mtl.data.sources import DatasetSource, get_source
from mtl.errors import ConfigError, DataError
from mtl.io import atomic_path

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


def with_mirrors(source: DatasetSource, mirrors: dict[str, list[str]] | None) -> DatasetSource:
    """Put a user's mirrors (config ``data.<dataset>.mirrors``: file name -> URLs) before the registry's."""
    if not mirrors:
        return source
    known = {f.name for f in source.files}
    unknown = sorted(set(mirrors) - known)
    if unknown:
        raise ConfigError(
            f"data.{source.name}.mirrors names unknown file(s) {unknown}; "
            f"the files of {source.name} are {sorted(known)}."
        )
    files = tuple(
        dataclasses.replace(f, urls=tuple(mirrors.get(f.name, ())) + f.urls) for f in source.files
    )
    return dataclasses.replace(source, files=files)


def fetch_raw(name: str, conf: dict, raw_dir: str | Path, manifest: str | Path, *, progress: bool = True) -> Path:
    """Make the raw files of dataset ``name`` available and write ``manifest`` (JSON) naming them."""
    from mtl.data.download import fetch_dataset, read_sha256_record

    raw_dir = Path(raw_dir)
    kind = conf["source"]
    if kind in sources.SOURCES:
        source = with_mirrors(get_source(kind), conf.get("mirrors"))
        paths = fetch_dataset(
            source,
            raw_dir,
            manual_dir=conf.get("path"),
            checksums=conf.get("checksums") or {},
            progress=progress,
        )
        record = {"raw_dir": str(raw_dir.resolve()), "files": {p.name: read_sha256_record(p) for p in paths}}
    elif kind == "imagefolder":
        root = _image_folder_root(name, conf, test_only=bool(conf.get("test_only")))
        record = {"raw_dir": str(root), "files": {}}
    elif kind == "digits":
        from mtl.data.builders.digits import export_digits

        root = export_digits(raw_dir)
        record = {"raw_dir": str(Path(root).resolve()), "files": {}}
    else:
        valid = sorted(sources.SOURCES) + list(sources.LOCAL_KINDS)
        raise ConfigError(
            f"Unknown value '{kind}' for data.{name}.source. Valid values are {{{', '.join(valid)}}}."
        )
    record.update({"dataset": name, "source": kind, "manifest_version": MANIFEST_VERSION})
    with atomic_path(manifest) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    log.info("%s: raw files ready in %s", name, record["raw_dir"])
    return Path(manifest)


def build_splits(manifest: str | Path, out_dir: str | Path, *, strict_counts: bool = True,
                 image_size: int | None = None, min_images_per_class: int = 1, test_only: bool = False,
                 min_classes: int = 1) -> dict[str, Path]:
    """Build ``out_dir/{train,val,test}.h5`` from the raw files a manifest names; with
    ``test_only`` (a folder of class folders, source imagefolder), ``out_dir/test.h5`` alone.

    ``min_images_per_class`` (shot + query of the largest episode) is checked for folders of
    images (a user's own, the demo's); the published datasets' counts are checked against their
    published figures instead (600 or more per class). ``min_classes`` (``way``) is checked for a
    test-only folder.
    """
    from mtl.data.builders import build_dataset

    record = read_manifest(manifest)
    kind = record["source"]
    builder = get_source(kind).builder if kind in sources.SOURCES else kind
    options = {"image_size": image_size} if image_size else {}
    if builder in sources.LOCAL_KINDS:
        options["min_images_per_class"] = min_images_per_class
    if test_only:
        if builder != "imagefolder":
            raise ConfigError(f"data.{record['dataset']}.test_only needs source imagefolder (a folder of class "
                              f"folders), not {kind}.")
        options.update(test_only=True, min_classes=min_classes)
    return build_dataset(builder, Path(record["raw_dir"]), Path(out_dir), strict_counts=strict_counts, **options)


def read_manifest(manifest: str | Path) -> dict:
    path = Path(manifest)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(
            f"Cannot read the download manifest {path}: {err}. Delete it and rerun the download rule."
        ) from err
    if record.get("manifest_version") != MANIFEST_VERSION:
        raise DataError(
            f"{path} has manifest version {record.get('manifest_version')}, expected {MANIFEST_VERSION}. "
            "Delete it and rerun the download rule."
        )
    return record


def _image_folder_root(name: str, conf: dict, *, test_only: bool = False) -> Path:
    if not conf.get("path"):
        holding = "one folder per class" if test_only else "train/, val/ and test/"
        raise ConfigError(f"data.{name}.path is required for source imagefolder: the folder holding {holding}.")
    root = Path(conf["path"]).expanduser().resolve()
    if test_only:  # root/<class>/<image files>; the builder checks the classes
        if not root.is_dir():
            raise DataError(f"Image folder {root} (data.{name}.path) does not exist; expected "
                            "root/<class>/<image files> for a test_only dataset.")
        return root
    missing = [split for split in sources.SPLITS if not (root / split).is_dir()]
    if missing:
        raise DataError(
            f"Image folder {root} (data.{name}.path) lacks the split folder(s) {missing}; "
            "expected root/{train,val,test}/<class>/<image>."
        )
    return root
