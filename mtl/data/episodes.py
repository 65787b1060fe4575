"""Few-shot episodes from small pure pieces over a split's label array.

An episode is a description (image indices into a split plus the class ids), never images, so
sampling is cheap, needs no data on disk, and can be saved: every method is scored on the *same*
saved test episodes. The pieces follow learn2learn / Torchmeta: pick classes, pick shots per
class, split support/query, relabel; `EpisodeSampler` composes them.

Episode i is fixed by ``(seed, purpose, i)`` alone (``mtl.rng.stream(seed, purpose, i)``), so it
never depends on how many episodes were drawn before or in which order; the purpose (test,
validation or training episodes) keeps the three apart for one seed.

Layout: support and query are class-major; class k of the episode (``classes[k]``) has relabelled
target k, so support targets are ``np.repeat(arange(way), shot)`` and query targets
``np.repeat(arange(way), query)``.
"""
from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mtl.errors import DataError
from mtl.io import atomic_path, file_sha256
from mtl.rng import STREAM_VERSION, Purpose, stream

EPISODE_FILE_VERSION = 1
_REDRAW = "It is written by the `episodes` rule: delete it and rerun the workflow to draw it again."
REQUIRED_META = ("way", "shot", "query", "seed", "count", "split", "num_classes", "num_images", "stream_version")


# ----------------------------------------------------------------------------- pure pieces
def indices_by_class(labels: np.ndarray, num_classes: int | None = None) -> list[np.ndarray]:
    """Indices of each class's images, ascending, for classes 0..num_classes-1 (labels are 0..C-1)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be a 1-D integer array, got dtype {labels.dtype} shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise DataError(f"labels must be 0..C-1, found {labels.min()}")
    num_classes = int(labels.max()) + 1 if num_classes is None and labels.size else int(num_classes or 0)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(num_classes)]


def check_class_sizes(by_class: Sequence[np.ndarray], need: int, way: int,
                      class_names: Sequence[str] | None = None) -> None:
    """Refuse splits where an episode could not be drawn: too few classes, or a class too small."""
    if way > len(by_class):
        raise DataError(f"a {way}-way episode needs at least {way} classes, but the split has {len(by_class)}; "
                        "lower `way` or use a split with more classes.")
    for c, members in enumerate(by_class):
        if len(members) < need:
            name = f" ({class_names[c]!r})" if class_names is not None else ""
            raise DataError(f"class {c}{name} has {len(members)} images, fewer than shot + query = {need}; "
                            "lower shot/query or rebuild the split with more images per class.")


def pick_classes(rng: np.random.Generator, num_classes: int, way: int) -> np.ndarray:
    """``way`` distinct class ids in random order (the order fixes the relabelling)."""
    return rng.choice(num_classes, size=way, replace=False)


def pick_shots(rng: np.random.Generator, members: np.ndarray, count: int) -> np.ndarray:
    """``count`` distinct images of one class, in random order."""
    return members[rng.choice(len(members), size=count, replace=False)]


def split_support_query(picked: np.ndarray, shot: int) -> tuple[np.ndarray, np.ndarray]:
    """(way, shot+query) picked indices -> class-major flat support (way*shot,) and query (way*query,)."""
    return picked[:, :shot].reshape(-1), picked[:, shot:].reshape(-1)


def relabel(way: int, per_class: int) -> np.ndarray:
    """Episode targets 0..way-1, class-major: ``[0]*per_class + [1]*per_class + ...``."""
    return np.repeat(np.arange(way, dtype=np.int64), per_class)


# ----------------------------------------------------------------------------- episodes
class _EpisodeShape:
    """way/shot/query and targets, read off the last axis of ``support``, ``query`` and ``classes``
    (one episode, or a stack of them)."""

    support: np.ndarray
    query: np.ndarray
    classes: np.ndarray

    @property
    def way(self) -> int:
        return self.classes.shape[-1]

    @property
    def shot(self) -> int:
        return self.support.shape[-1] // self.way

    @property
    def n_query(self) -> int:
        return self.query.shape[-1] // self.way

    @property
    def support_targets(self) -> np.ndarray:
        return relabel(self.way, self.shot)

    @property
    def query_targets(self) -> np.ndarray:
        return relabel(self.way, self.n_query)


@dataclass(frozen=True)
class Episode(_EpisodeShape):
    """One task: image indices into a split and the class ids behind targets 0..way-1."""

    support: np.ndarray  # (way*shot,) int64
    query: np.ndarray  # (way*query,) int64
    classes: np.ndarray  # (way,) int64


class EpisodeSampler:
    """Seeded N-way K-shot Q-query episodes over a split's labels; ``episode(i)`` is a pure function of
    (seed, purpose, i).

    ``purpose``: which stream of the seed the episodes come from (:class:`mtl.rng.Purpose`); the
    default is the saved test episodes. Iterating yields episodes 0, 1, 2, ... (``count`` of them, or
    forever when count is None).
    """

    def __init__(self, labels: np.ndarray, way: int, shot: int, query: int, seed: int, *,
                 count: int | None = None, class_names: Sequence[str] | None = None,
                 purpose: Purpose = Purpose.TEST_EPISODES):
        if min(way, shot) < 1 or query < 0:
            raise DataError(f"episodes need way >= 1, shot >= 1, query >= 0; "
                            f"got way={way} shot={shot} query={query}")
        self.labels = np.asarray(labels)
        self.way, self.shot, self.query, self.seed = int(way), int(shot), int(query), int(seed)
        self.count, self.purpose = count, Purpose(purpose)
        self.by_class = indices_by_class(self.labels)
        check_class_sizes(self.by_class, self.shot + self.query, self.way, class_names)

    @property
    def num_classes(self) -> int:
        return len(self.by_class)

    def episode(self, i: int) -> Episode:
        if i < 0:
            raise IndexError(f"episode index must be >= 0, got {i}")
        rng = stream(self.seed, self.purpose, i)
        classes = pick_classes(rng, self.num_classes, self.way)
        picked = np.stack([pick_shots(rng, self.by_class[c], self.shot + self.query) for c in classes])
        support, query = split_support_query(picked, self.shot)
        return Episode(support.astype(np.int64), query.astype(np.int64), classes.astype(np.int64))

    def sample(self, n: int, start: int = 0) -> list[Episode]:
        """Episodes start .. start+n-1."""
        return [self.episode(i) for i in range(start, start + n)]

    def __iter__(self) -> Iterator[Episode]:
        i = 0
        while self.count is None or i < self.count:
            yield self.episode(i)
            i += 1

    def __len__(self) -> int:
        if self.count is None:
            raise TypeError("this EpisodeSampler is endless (count=None) and has no length")
        return self.count

    def meta(self) -> dict:
        """What an episode file must record about how its episodes were drawn (add "split")."""
        return {"way": self.way, "shot": self.shot, "query": self.query, "seed": self.seed,
                "purpose": self.purpose.value, "stream_version": STREAM_VERSION,
                "num_classes": self.num_classes, "num_images": int(len(self.labels))}


@dataclass(frozen=True)
class EpisodeSet(_EpisodeShape):
    """E episodes as stacked arrays (what an episode file holds); ``set[i]`` is an `Episode`."""

    support: np.ndarray  # (E, way*shot) int64
    query: np.ndarray  # (E, way*query) int64
    classes: np.ndarray  # (E, way) int64
    meta: dict = field(default_factory=dict)
    sha256: str | None = None  # of the episode file it was loaded from: names "the same episodes"

    @classmethod
    def from_episodes(cls, episodes: Sequence[Episode], meta: dict | None = None) -> EpisodeSet:
        if not episodes:
            raise DataError("no episodes given; an episode set needs at least one")
        stack = lambda name: np.stack([getattr(e, name) for e in episodes]).astype(np.int64)  # noqa: E731
        return cls(stack("support"), stack("query"), stack("classes"), dict(meta or {}))

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, i: int) -> Episode:
        return Episode(self.support[i], self.query[i], self.classes[i])


# ----------------------------------------------------------------------------- files
def save_episodes(path: str | os.PathLike, episodes: Sequence[Episode] | EpisodeSet, meta: dict) -> Path:
    """Write episodes to an ``.npz`` (support, query, classes, meta as a JSON string), atomically.

    ``meta`` must say how the episodes were drawn: seed, split (file name), num_classes,
    num_images (``EpisodeSampler.meta()`` plus ``split``); way/shot/query/count are taken from the
    arrays and must agree with ``meta`` where it gives them.
    """
    path = Path(path)
    eps = episodes if isinstance(episodes, EpisodeSet) else EpisodeSet.from_episodes(list(episodes))
    derived = {"way": eps.way, "shot": eps.shot, "query": eps.n_query, "count": len(eps)}
    for key, value in derived.items():
        if key in meta and int(meta[key]) != value:
            raise DataError(f"episode meta says {key}={meta[key]} but the episodes have {key}={value}; "
                            f"not writing {path}")
    full = {**meta, **derived, "format_version": EPISODE_FILE_VERSION}
    missing = [k for k in REQUIRED_META if k not in full]
    if missing:
        raise DataError(f"episode meta for {path} lacks {missing}; pass EpisodeSampler.meta() plus 'split'")
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, support=eps.support.astype(np.int64), query=eps.query.astype(np.int64),
                 classes=eps.classes.astype(np.int64), meta=np.array(json.dumps(full, sort_keys=True)))
    return path


def write_test_episodes(split_path: str | os.PathLike, out_path: str | os.PathLike, *, way: int, shot: int,
                        query: int, count: int, seed: int) -> Path:
    """Draw ``count`` fixed episodes from the split file at ``split_path`` and save them to ``out_path``.

    Only the split's labels are read. Every method of a dataset/shot is then scored on this file.
    """
    from mtl.data.hdf5 import HDF5Split  # lazy: h5py is not needed to sample from a label array

    split = HDF5Split(split_path)
    sampler = EpisodeSampler(split.labels, way, shot, query, seed, class_names=split.class_names)
    meta = {**sampler.meta(), "split": Path(split_path).name, "dataset": split.attrs.get("dataset")}
    return save_episodes(out_path, sampler.sample(int(count)), meta)


def load_episodes(path: str | os.PathLike, *, expect_num_images: int | None = None,
                  expect_num_classes: int | None = None, expect_labels: np.ndarray | None = None) -> EpisodeSet:
    """Read and check an episode file against the split it will index.

    Checks: the arrays are there with the shapes the meta promises, every index is inside the
    split, and (when given) the split's image/class counts, or its labels, match the ones the
    episodes were drawn from. A mismatch means the episodes belong to another build of the data:
    the message says to delete the file so the workflow redraws it.
    """
    path = Path(path)
    eps = _read_episode_file(path)
    meta = eps.meta
    redo = f"Delete {path} so it is drawn again from the current split."
    expected = {"num_images": expect_num_images, "num_classes": expect_num_classes}
    if expect_labels is not None:
        expected["num_images"] = expected["num_images"] or len(expect_labels)
        expected["num_classes"] = expected["num_classes"] or int(np.max(expect_labels)) + 1
    for key, want in expected.items():
        if want is not None and int(meta[key]) != int(want):
            raise DataError(f"episode file {path} was drawn from a split with {key}={meta[key]}, "
                            f"but this split has {want}. {redo}")
    shapes = {"support": (meta["count"], meta["way"] * meta["shot"]),
              "query": (meta["count"], meta["way"] * meta["query"]),
              "classes": (meta["count"], meta["way"])}
    for name, shape in shapes.items():
        seen = getattr(eps, name).shape
        if seen != tuple(shape):
            raise DataError(f"episode file {path}: '{name}' has shape {seen}, "
                            f"meta promises {tuple(shape)}. {redo}")
    _check_range(path, "support", eps.support, meta["num_images"], redo)
    _check_range(path, "query", eps.query, meta["num_images"], redo)
    _check_range(path, "classes", eps.classes, meta["num_classes"], redo)
    if expect_labels is not None:
        _check_labels(path, eps, np.asarray(expect_labels), redo)
    return eps


def _read_episode_file(path: Path) -> EpisodeSet:
    if not path.is_file():
        raise DataError(f"episode file {path} does not exist; it is written by the `episodes` rule "
                        "(mtl.data.episodes.save_episodes).")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("support", "query", "classes", "meta")}
    except KeyError as err:
        raise DataError(f"episode file {path} lacks the array {err}; it is not an episode file. "
                        f"{_REDRAW}") from err
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"episode file {path} cannot be read ({type(err).__name__}: {err}). {_REDRAW}") from err
    try:
        meta = json.loads(str(arrays["meta"]))
    except json.JSONDecodeError as err:
        raise DataError(f"episode file {path} has unreadable meta ({err}); "
                        "delete it so it is drawn again.") from err
    # Before the other keys: a file from before stream_version existed lacks it and is simply stale.
    # Its episodes are not the ones this code draws for its seed, so scoring new runs on it would
    # pair them with results of another draw.
    version = meta.get("stream_version", 1)
    if version != STREAM_VERSION:
        raise DataError(f"episode file {path} was drawn with random streams version {version}, but this "
                        f"version of mtl draws version {STREAM_VERSION}. {_REDRAW}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise DataError(f"episode file {path} meta lacks {missing}; delete it so it is drawn again.")
    for name in ("support", "query", "classes"):
        if not np.issubdtype(arrays[name].dtype, np.integer) or arrays[name].ndim != 2:
            raise DataError(f"episode file {path}: '{name}' must be a 2-D integer array, "
                            f"got {arrays[name].dtype} {arrays[name].shape}; delete it so it is drawn again.")
    return EpisodeSet(arrays["support"].astype(np.int64), arrays["query"].astype(np.int64),
                      arrays["classes"].astype(np.int64), meta, file_sha256(path))


def _check_range(path: Path, name: str, values: np.ndarray, bound: int, redo: str) -> None:
    if values.size and (values.min() < 0 or values.max() >= bound):
        raise DataError(f"episode file {path}: '{name}' holds indices {values.min()}..{values.max()}, "
                        f"outside 0..{bound - 1}. {redo}")


def _check_labels(path: Path, eps: EpisodeSet, labels: np.ndarray, redo: str) -> None:
    """Each support/query image must carry the label of the class it stands for."""
    for name, per_class in (("support", eps.shot), ("query", eps.n_query)):
        want = np.repeat(eps.classes, per_class, axis=1)
        bad = np.argwhere(labels[getattr(eps, name)] != want)
        if len(bad):
            e, j = bad[0]
            raise DataError(f"episode file {path}: episode {e} {name} image {getattr(eps, name)[e, j]} has label "
                            f"{labels[getattr(eps, name)[e, j]]}, expected class {want[e, j]}. {redo}")
