"""Episode sampling, episode files, transforms, device choice and checkpoint RNG state."""
from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from mtl.data.episodes import EpisodeSampler, EpisodeSet, load_episodes, save_episodes
from mtl.data.transforms import DEFAULT_MEAN, DEFAULT_STD, EvalTransform, TrainTransform
from mtl.device import autocast, select_device
from mtl.errors import CheckpointError, DataError, MTLError
from mtl.rng import STREAM_VERSION, Purpose
from mtl.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint

LABELS = np.repeat(np.arange(10), 20)  # 10 classes x 20 images, class-contiguous


def same(a, b):
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("support", "query", "classes"))


def test_episode_is_fixed_by_seed_and_index():
    first = EpisodeSampler(LABELS, way=5, shot=2, query=3, seed=7)
    second = EpisodeSampler(LABELS, way=5, shot=2, query=3, seed=7)
    forward = first.sample(6)
    assert same(second.episode(5), forward[5])  # drawn first here, sixth there
    assert same(second.episode(2), forward[2])
    other = EpisodeSampler(LABELS, way=5, shot=2, query=3, seed=8).sample(6)
    assert not all(same(a, b) for a, b in zip(forward, other))


def test_episode_layout_is_class_major_and_disjoint():
    episode = EpisodeSampler(LABELS, way=5, shot=2, query=3, seed=0).episode(0)
    assert episode.support.shape == (10,) and episode.query.shape == (15,)
    assert len(set(episode.classes)) == 5
    np.testing.assert_array_equal(LABELS[episode.support], np.repeat(episode.classes, 2))
    np.testing.assert_array_equal(LABELS[episode.query], np.repeat(episode.classes, 3))
    assert not set(episode.support) & set(episode.query)
    np.testing.assert_array_equal(episode.support_targets, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])


def test_small_class_and_too_many_ways_are_refused():
    labels = LABELS[(LABELS != 3) | (np.arange(len(LABELS)) < 63)]  # class 3 keeps 3 images
    with pytest.raises(DataError, match=r"class 3 .*3 images.*shot \+ query = 5"):
        EpisodeSampler(labels, way=5, shot=2, query=3, seed=0)
    with pytest.raises(DataError, match="11-way.*10"):
        EpisodeSampler(LABELS, way=11, shot=1, query=1, seed=0)


def test_iteration_has_count():
    sampler = EpisodeSampler(LABELS, 3, 1, 1, seed=0, count=4)
    assert len(list(sampler)) == 4 == len(sampler)


def test_episode_file_roundtrip_and_checks(tmp_path):
    sampler = EpisodeSampler(LABELS, way=5, shot=1, query=4, seed=3)
    path = save_episodes(tmp_path / "ep.npz", sampler.sample(12), meta={**sampler.meta(), "split": "test.h5"})
    loaded = load_episodes(path, expect_num_images=200, expect_num_classes=10, expect_labels=LABELS)
    assert len(loaded) == 12 and loaded.meta["seed"] == 3 and loaded.meta["split"] == "test.h5"
    assert same(loaded[7], sampler.episode(7))
    assert (loaded.way, loaded.shot, loaded.n_query) == (5, 1, 4)
    with pytest.raises(DataError, match="num_images=200.*this split has 150"):
        load_episodes(path, expect_num_images=150)
    with pytest.raises(DataError, match="label"):
        load_episodes(path, expect_labels=np.roll(LABELS, 1))


def test_out_of_range_index_is_refused(tmp_path):
    sampler = EpisodeSampler(LABELS, 5, 1, 2, seed=0)
    eps = EpisodeSet.from_episodes(sampler.sample(3))
    bad = EpisodeSet(eps.support.copy(), eps.query, eps.classes)
    bad.support[1, 2] = 500
    meta = {**sampler.meta(), "split": "val.h5"}
    path = save_episodes(tmp_path / "bad.npz", bad, meta)
    with pytest.raises(DataError, match=r"bad.npz.*'support'.*outside 0..199.*Delete"):
        load_episodes(path)
    with pytest.raises(DataError, match="does not exist"):
        load_episodes(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        load_episodes(tmp_path / "junk.npz")


def test_train_validation_and_test_episodes_of_one_seed_are_different_draws():
    """Meta-training's tasks, its validation episodes and the test episodes: one seed, three streams."""
    draws = {purpose: EpisodeSampler(LABELS, 5, 1, 2, seed=1, purpose=purpose).sample(20)
             for purpose in (Purpose.TRAIN_EPISODES, Purpose.VALIDATION_EPISODES, Purpose.TEST_EPISODES)}
    for a, b in itertools.combinations(draws.values(), 2):
        assert sum(same(x, y) for x, y in zip(a, b)) == 0
    assert same(EpisodeSampler(LABELS, 5, 1, 2, seed=1).episode(4), draws[Purpose.TEST_EPISODES][4])


def test_an_episode_file_of_older_random_streams_is_refused_as_stale(tmp_path):
    """A file drawn before the streams changed holds other episodes than this code draws for its seed:
    scoring new runs on it would pair them with another draw, so it must be redrawn, not used."""
    sampler = EpisodeSampler(LABELS, 5, 1, 2, seed=0)
    path = save_episodes(tmp_path / "ep.npz", sampler.sample(3), {**sampler.meta(), "split": "test.h5"})
    assert load_episodes(path).meta["stream_version"] == STREAM_VERSION
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    for old in ({k: v for k, v in meta.items() if k != "stream_version"}, {**meta, "stream_version": 1}):
        np.savez(tmp_path / "old.npz", **{**arrays, "meta": np.array(json.dumps(old))})
        with pytest.raises(DataError, match=r"old.npz was drawn with random streams version 1.*delete it"):
            load_episodes(tmp_path / "old.npz")


def test_meta_must_describe_the_draw(tmp_path):
    eps = EpisodeSampler(LABELS, 5, 1, 2, seed=0).sample(2)
    with pytest.raises(DataError, match="lacks"):
        save_episodes(tmp_path / "x.npz", eps, {"seed": 0})
    assert not (tmp_path / "x.npz").exists()


# ----------------------------------------------------------------------------- transforms
def test_eval_transform_shape_and_normalisation():
    images = np.full((2, 20, 20, 3), 128, dtype=np.uint8)
    out = EvalTransform(16)(images)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    expected = (128 / 255 - np.array(DEFAULT_MEAN)) / np.array(DEFAULT_STD)
    np.testing.assert_allclose(out.mean(dim=(0, 2, 3)).numpy(), expected, atol=1e-5)
    assert torch.equal(EvalTransform(16)(torch.from_numpy(images)), out)


def test_eval_transform_is_resize_then_centre_crop():
    """80 px: Resize(92) -> CenterCrop(80) keeps the image centre; a bright centre stays centred."""
    images = np.zeros((1, 80, 80, 3), dtype=np.uint8)
    images[:, 30:50, 30:50] = 255
    out = EvalTransform(80, mean=(0, 0, 0), std=(1, 1, 1))(images)[0, 0]
    assert out.shape == (80, 80)
    assert out[40, 40] > 0.99 and out[0, 0] < 0.01
    assert torch.allclose(out, out.flip(0), atol=1e-5) and torch.allclose(out, out.flip(1), atol=1e-5)


def test_train_transform_is_seeded_and_random_per_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 24, 24, 3), dtype=np.uint8)
    transform = TrainTransform(16)
    a = transform(images, generator=torch.Generator().manual_seed(1))
    b = transform(images, generator=torch.Generator().manual_seed(1))
    c = transform(images, generator=torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    same_images = transform(np.repeat(images[:1], 6, axis=0), generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(same_images[0], same_images[1])  # each image gets its own crop/flip


# ----------------------------------------------------------------------------- device
def test_cuda_request_without_gpu_says_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(MTLError, match=r"CUDA_VISIBLE_DEVICES=''.*device: auto"):
        select_device("cuda")
    assert select_device("auto").type == "cpu"
    assert select_device("cpu").type == "cpu"
    with pytest.raises(MTLError, match="valid device"):
        select_device("tpu")
    with autocast(torch.device("cpu")):
        assert torch.ones(2).dtype == torch.float32


# ----------------------------------------------------------------------------- checkpoint
def test_checkpoint_roundtrip_restores_rng(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_checkpoint(tmp_path / "last.pt", {"epoch": 3}, rng=capture_rng())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = torch.load(tmp_path / "last.pt", weights_only=True)  # plain values only
    restore_rng(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3
    assert load_checkpoint(tmp_path / "none.pt") is None
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"bad.pt.*delete it and rerun"):
        load_checkpoint(tmp_path / "bad.pt")


def test_write_test_episodes_from_a_split_file(tmp_path, tiny_split):
    from mtl.data.episodes import write_test_episodes

    split = tiny_split(tmp_path / "test.h5", classes=10, per_class=20, size=4)  # the labels are LABELS
    a = load_episodes(write_test_episodes(split, tmp_path / "a.npz", way=5, shot=1, query=3, count=8, seed=1),
                      expect_labels=LABELS)
    b = load_episodes(write_test_episodes(split, tmp_path / "b.npz", way=5, shot=1, query=3, count=8, seed=1))
    assert a.meta["split"] == "test.h5" and a.meta["count"] == 8
    assert a.sha256 == b.sha256 and len(a.sha256) == 64  # same draw, same file bytes
    assert same(a[3], EpisodeSampler(LABELS, 5, 1, 3, seed=1).episode(3))


def test_transforms_match_torchvision_reference_ops():
    """Eval = Resize -> CenterCrop; train's one grid_sample = resized_crop -> CenterCrop -> flip."""
    import torchvision.transforms.functional as TF

    from mtl.data.transforms import resize_shorter, resize_size, to_float_nchw

    images = np.random.default_rng(0).integers(0, 256, size=(1, 20, 20, 3), dtype=np.uint8)
    x = to_float_nchw(images)
    want = TF.center_crop(TF.resize(x, [resize_size(16)], antialias=True), [16, 16])
    torch.testing.assert_close(EvalTransform(16, (0, 0, 0), (1, 1, 1))(images), want, atol=1e-5, rtol=0)
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # smooth, so border handling is all that could differ
    transform = TrainTransform(16, (0, 0, 0), (1, 1, 1))
    resized = resize_shorter(x, resize_size(16))
    box = torch.tensor([[2, 3, 12, 14]])
    for flip in (False, True):
        grid = transform._sampling_grid(box, torch.tensor([flip]), *resized.shape[-2:])
        got = torch.nn.functional.grid_sample(resized, grid, mode="bilinear", padding_mode="border",
                                              align_corners=False)
        cropped = TF.resized_crop(resized, 2, 3, 12, 14, [transform.crop_size] * 2, antialias=False)
        want = TF.center_crop(cropped, [16, 16])
        torch.testing.assert_close(got, want.flip(-1) if flip else want, atol=1e-5, rtol=0)
