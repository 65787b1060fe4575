"""Raw dataset files -> ``out_dir/{train,val,test}.h5``, one module per kind.

Every builder has the same signature::

    build(raw_dir, out_dir, *, strict_counts=True, **options) -> {"train": Path, "val": Path, "test": Path}

and writes each split atomically through :func:`mtl.data.hdf5.write_split` (images of a class
contiguous, labels 0..C-1 in sorted class-name order). Builders always rebuild: deciding what is
stale is the workflow's job. This module holds the registry and the dispatcher; the checks every
builder shares are in :mod:`mtl.data.builders.checks`. Builders are imported lazily, so importing
the package stays cheap.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from mtl.data.sources import SPLITS
from mtl.errors import ConfigError

BUILDERS = ("fc100", "miniimagenet", "tieredimagenet", "imagefolder", "digits")

__all__ = ["BUILDERS", "SPLITS", "build_dataset", "list_builders"]


def list_builders() -> list[str]:
    return sorted(BUILDERS)


def build_dataset(kind: str, raw_dir, out_dir, **options) -> dict[str, Path]:
    """Run the builder for ``kind`` (see :data:`BUILDERS`); options go to its ``build``."""
    if kind not in BUILDERS:
        raise ConfigError(
            f"Unknown value '{kind}' for argument kind. Valid values are {{{', '.join(list_builders())}}}."
        )
    build = importlib.import_module(f"{__name__}.{kind}").build
    accepted = [p.name for p in inspect.signature(build).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"The {kind} builder does not take the option(s) {unknown}; it accepts {accepted}. "
            f"Remove them from data.<dataset> in config.yaml."
        )
    return build(Path(raw_dir), Path(out_dir), **options)
