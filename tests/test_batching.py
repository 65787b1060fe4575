"""Inference batch size: features independent of it, the probe's choice, and its cache.

The probe's logic runs on a fake clock that a fake `run_batch` advances; one test runs the real
probe once (a tiny network, a 0.3 s budget) and checks only what does not depend on the timings.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mtl.batching import (
    CACHE_ENV,
    CACHE_FILE,
    CANDIDATES,
    BatchSizeCache,
    cache_key,
    device_name,
    inference_batch_size,
    parse_setting,
    pick_batch_size,
    probe_rates,
)
from mtl.data.transforms import EvalTransform
from mtl.errors import ConfigError
from mtl.models import build_backbone, inference_copy
from mtl.base_learner import embed

# Measured max |difference| / max |feature| (CPU, 1 and 2 threads): 3e-7 - 5e-7 between batch
# sizes and between the folded channels_last copy and the plain eval-mode model. 1e-5 leaves 20x.
RELATIVE_TOLERANCE = 1e-5


def with_running_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine, so a train-mode BN or a wrong fold would show."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


def images(count: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def max_relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------- same features
def small_convnet() -> nn.Module:
    """Not one of our backbones: `inference_copy` copies it without folding, BN in eval mode."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.mark.parametrize("name", ["resnet12", "resnet25", "other module"])
def test_features_do_not_depend_on_batch_size(name):
    torch.manual_seed(0)
    model = small_convnet() if name == "other module" else build_backbone(name, width=0.125)
    encoder = with_running_stats(model).train()
    batch, transform = images(13, 32), EvalTransform(32)
    with torch.no_grad():
        expected = encoder.eval()(transform(batch))  # plain model, no folding, NCHW
    encoder.train()
    for batch_size in (1, 4, 13, 64):
        feats = embed(encoder, batch, transform, batch_size, "cpu")
        assert max_relative_diff(feats, expected) <= RELATIVE_TOLERANCE, batch_size


def test_scales_and_batchnorm_folded_copy_matches_the_meta_model_and_leaves_it_alone():
    torch.manual_seed(1)
    model = with_running_stats(build_backbone("resnet12", width=0.125, ss=True)).train()
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "scale", None) is not None:
                module.scale.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = EvalTransform(32)(images(6, 32))
    fast = inference_copy(model)
    assert model.training and model.layer1.conv1.scale.requires_grad  # untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # every BN folded
    assert not any(p.requires_grad for p in fast.parameters())
    with torch.no_grad():
        expected = model.eval()(x)
        got = fast(x.contiguous(memory_format=torch.channels_last))
    assert max_relative_diff(got, expected) <= RELATIVE_TOLERANCE


# ----------------------------------------------------------------------------- probe (fake clock)
class FakeDevice:
    """``run_batch`` on a device with a given images/s per size; advances ``now``, no real time."""

    def __init__(self, rates: dict[int, float], slow_passes: dict[int, int] | None = None):
        self.rates, self.now, self.calls = rates, 0.0, []
        self.slow_passes = dict(slow_passes or {})  # size -> passes still hit by a load spike

    def timer(self) -> float:
        return self.now

    def run_batch(self, size: int) -> None:
        self.calls.append(size)
        seconds = size / self.rates[size]
        if self.slow_passes.get(size, 0) > 0:
            self.slow_passes[size] -= 1
            seconds *= 5
        self.now += seconds


CPU_LIKE = {4: 380, 8: 400, 16: 410, 32: 395, 64: 300, 128: 220, 256: 190, 512: 150}
GPU_LIKE = {4: 800, 8: 1600, 16: 3200, 32: 6000, 64: 10000, 128: 14000, 256: 16000, 512: 16500}


def test_probe_picks_the_fastest_size():
    device = FakeDevice(CPU_LIKE)
    rates = probe_rates(device.run_batch, budget_s=30, timer=device.timer)
    assert set(rates) == set(CPU_LIKE)
    assert rates == pytest.approx(CPU_LIKE)
    assert pick_batch_size(rates) == 8  # 400 is within 5% of 410: the smaller size wins
    assert pick_batch_size(rates, tolerance=0.0) == 16
    gpu = FakeDevice(GPU_LIKE)
    assert pick_batch_size(probe_rates(gpu.run_batch, budget_s=30, timer=gpu.timer)) == 256


def test_probe_stays_within_its_budget_on_a_slow_device():
    slow = {size: 20.0 for size in CPU_LIKE}  # size 4: 0.2 s a pass
    device = FakeDevice(slow)
    rates = probe_rates(device.run_batch, budget_s=1.5, timer=device.timer)
    assert set(rates) == {4, 8}  # 16 would need 2 x 0.8 s more
    assert device.calls == [4, 4, 8, 8, 8, 4]  # untimed + timed pass per size up, one timed pass down
    assert device.now <= 2 * 1.5  # the way down costs at most the timed passes of the way up


def test_probe_tries_larger_sizes_when_a_pass_costs_the_same_whatever_its_size():
    """Threads waiting for each other on a loaded machine: 0.2 s a pass at any size."""
    device = FakeDevice({size: size / 0.2 for size in CPU_LIKE})
    rates = probe_rates(device.run_batch, budget_s=1.5, timer=device.timer)
    assert set(rates) == {4, 8, 16} and pick_batch_size(rates) == 16
    assert device.now <= 2 * 1.5


def test_probe_always_measures_the_smallest_size():
    device = FakeDevice({size: 1.0 for size in CPU_LIKE})
    assert set(probe_rates(device.run_batch, budget_s=0.5, timer=device.timer)) == {4}


def test_spare_budget_retimes_and_keeps_the_best_pass():
    device = FakeDevice(CPU_LIKE, slow_passes={16: 3})  # warm-up, timed pass and the way down hit
    rates = probe_rates(device.run_batch, budget_s=30, timer=device.timer)
    assert rates[16] == pytest.approx(410)
    once = FakeDevice(CPU_LIKE, slow_passes={16: 3})
    no_spare = probe_rates(once.run_batch, candidates=[16], budget_s=0.01, timer=once.timer)
    assert no_spare[16] == pytest.approx(410 / 5)  # what the spare budget's retiming repaired


def test_a_slow_start_cannot_make_the_probe_keep_a_large_size():
    """The process's first passes run slowly (seen on an idle Xeon: 4 - 32 at half speed, 128 kept)."""
    device = FakeDevice(CPU_LIKE, slow_passes={4: 2, 8: 2, 16: 2, 32: 2})
    rates = probe_rates(device.run_batch, budget_s=3.0, timer=device.timer)  # no spare budget left
    assert set(rates) >= {4, 8, 16, 32, 64}
    assert pick_batch_size(rates) == 8  # not 64, the only size the slow start spared


def test_probe_stops_at_the_first_size_without_memory():
    device = FakeDevice(GPU_LIKE)

    def run_batch(size):
        if size >= 256:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        device.run_batch(size)

    assert max(probe_rates(run_batch, budget_s=30, timer=device.timer)) == 128


def test_pick_needs_a_measurement():
    with pytest.raises(ValueError):
        pick_batch_size({})


# ----------------------------------------------------------------------------- setting and cache
BACKBONE = {"name": "resnet12", "width": 0.25, "image_size": None}
# A developer's $MTL_INFERENCE_CACHE cannot redirect these tests' caches: conftest.py unsets it.


def test_setting_is_auto_or_a_positive_integer():
    assert parse_setting("auto") is None and parse_setting("AUTO ") is None
    assert parse_setting(32) == 32 and parse_setting("64") == 64  # from --config, values are strings
    for bad in (0, -4, "0", "fast", 1.5, True, None):
        with pytest.raises(ConfigError, match="inference.batch_size"):
            parse_setting(bad)


def test_fixed_setting_neither_probes_nor_writes(tmp_path):
    device = FakeDevice(CPU_LIKE)
    size = inference_batch_size(48, BACKBONE, "cpu", cache_dir=tmp_path, run_batch=device.run_batch,
                                timer=device.timer)
    assert size == 48 and device.calls == [] and list(tmp_path.iterdir()) == []


def test_cache_miss_probes_and_hit_reads(tmp_path):
    first = FakeDevice(CPU_LIKE)
    size = inference_batch_size("auto", BACKBONE, "cpu", cache_dir=tmp_path, run_batch=first.run_batch,
                                timer=first.timer)
    assert size == 8 and first.calls
    (key, entry), = json.loads((tmp_path / "inference_batch_size.json").read_text()).items()
    assert "1 threads" in key and "resnet12 width 0.25" in key and "84 px" in key  # native size filled in
    assert entry["batch_size"] == 8 and entry["images_per_s"]["16"] == pytest.approx(410, abs=0.1)

    again = FakeDevice(GPU_LIKE)  # a hit must not consult the device at all
    assert inference_batch_size("auto", BACKBONE, "cpu", cache_dir=tmp_path, run_batch=again.run_batch,
                                timer=again.timer) == 8
    assert again.calls == []


@pytest.mark.parametrize("change", ["width", "image_size", "name", "threads"])
def test_another_model_size_or_thread_count_is_a_miss(tmp_path, change):
    probe = FakeDevice(CPU_LIKE)
    inference_batch_size("auto", BACKBONE, "cpu", cache_dir=tmp_path, run_batch=probe.run_batch, timer=probe.timer)
    other = dict(BACKBONE)
    if change == "threads":
        torch.set_num_threads(2)  # the autouse fixture restores it
    else:
        other[change] = {"width": 1.0, "image_size": 32, "name": "resnet25"}[change]
    second = FakeDevice(GPU_LIKE)
    assert inference_batch_size("auto", other, "cpu", cache_dir=tmp_path, run_batch=second.run_batch,
                                timer=second.timer) == 256
    assert len(json.loads((tmp_path / "inference_batch_size.json").read_text())) == 2  # both kept


def test_environment_variable_replaces_the_cache_folder(tmp_path, monkeypatch):
    shared, own = tmp_path / "shared", tmp_path / "own"
    monkeypatch.setenv(CACHE_ENV, str(shared))
    probe = FakeDevice(CPU_LIKE)
    inference_batch_size("auto", BACKBONE, "cpu", cache_dir=own, run_batch=probe.run_batch, timer=probe.timer)
    assert (shared / "inference_batch_size.json").exists() and not own.exists()


def test_key_names_machine_threads_torch_model_and_size():
    key = cache_key("cpu AMD EPYC 7B13", 2, "resnet25", 0.5, 80, torch_version="2.5.1")
    assert key == "cpu AMD EPYC 7B13 | 2 threads | torch 2.5.1 | resnet25 width 0.5 | 80 px"
    assert key != cache_key("cpu Intel(R) Xeon(R) Processor", 2, "resnet25", 0.5, 80, torch_version="2.5.1")


def test_unreadable_cache_is_probed_again_and_rewritten(tmp_path, caplog):
    (tmp_path / "inference_batch_size.json").write_text("{not json")
    probe = FakeDevice(CPU_LIKE)
    with caplog.at_level(logging.WARNING, logger="mtl.batching"):
        size = inference_batch_size("auto", BACKBONE, "cpu", cache_dir=tmp_path, run_batch=probe.run_batch,
                                    timer=probe.timer)
    assert size == 8 and "unreadable" in caplog.text
    assert len(json.loads((tmp_path / "inference_batch_size.json").read_text())) == 1


def test_cache_ignores_an_entry_without_a_valid_size(tmp_path):
    cache = BatchSizeCache(tmp_path)
    cache.put("k", {"batch_size": 0})
    cache.put("j", {"batch_size": 16})
    assert cache.get("k") is None and cache.get("j") == 16 and cache.get("missing") is None


def test_the_real_embedding_probe_picks_a_candidate_and_caches_it(tmp_path, monkeypatch):
    """Once for real, on this CPU: no fake clock, no fake pass. A tiny network, a small budget."""
    import mtl.batching

    backbone = {"name": "resnet12", "width": 0.125, "image_size": 16}
    measured = []
    real_measure = mtl.batching._measure
    monkeypatch.setattr(mtl.batching, "_measure", lambda *args: measured.append(args) or real_measure(*args))
    size = inference_batch_size("auto", backbone, "cpu", cache_dir=tmp_path, budget_s=0.3)
    assert size in CANDIDATES and len(measured) == 1
    (key, entry), = json.loads((tmp_path / CACHE_FILE).read_text()).items()
    assert key == cache_key(device_name(torch.device("cpu")), torch.get_num_threads(), "resnet12", 0.125, 16)
    assert entry["batch_size"] == size and entry["budget_s"] == 0.3
    rates = {int(s): r for s, r in entry["images_per_s"].items()}
    assert 4 in rates and set(rates) <= set(CANDIDATES) and all(r > 0 for r in rates.values())
    assert size in rates  # the choice is one of the sizes measured

    def no_probe(*args, **kwargs):
        raise AssertionError("a cache hit must not probe")

    monkeypatch.setattr(mtl.batching, "_measure", no_probe)
    monkeypatch.setattr(mtl.batching, "probe_rates", no_probe)
    monkeypatch.setattr(mtl.batching, "embedding_probe", no_probe)
    assert inference_batch_size("auto", backbone, "cpu", cache_dir=tmp_path, budget_s=0.3) == size


def test_workflow_runs_share_a_cache_folder_new_each_session(tmp_path_factory, monkeypatch):
    """tests/workflow.py's cache for every snakemake run of this session: under this session's
    pytest folder (so never an entry left by an earlier run), whatever $MTL_INFERENCE_CACHE says."""
    import tempfile

    from tests.workflow import inference_cache, snakemake_env

    folder = inference_cache()
    assert folder.is_relative_to(tmp_path_factory.getbasetemp())
    assert folder != Path(tempfile.gettempdir()) / "mtl-test-inference-cache"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.getbasetemp().parent / "elsewhere"))
    assert snakemake_env()[CACHE_ENV] == str(folder) == snakemake_env({"OTHER": "1"})[CACHE_ENV]


# ----------------------------------------------------------------------------- every inference pass
@pytest.fixture
def embed_batch_sizes(monkeypatch):
    """The batch size of every `embed` call (all inference passes go through it)."""
    import mtl.base_learner as learner

    seen, original = [], learner.embed

    def spy(encoder, images, transform, inference_batch_size=64, *args, **kwargs):
        seen.append(inference_batch_size)
        return original(encoder, images, transform, inference_batch_size, *args, **kwargs)

    monkeypatch.setattr(learner, "embed", spy)
    return seen


def test_every_inference_pass_uses_the_given_batch_size_with_the_same_results(tmp_path, embed_batch_sizes, tiny_split):
    import csv

    from mtl.data.episodes import write_test_episodes
    from mtl.evaluate import evaluate
    from mtl.train.meta import MetaConfig, meta_train
    from mtl.train.pretrain import PretrainConfig, pretrain

    # classes differ in colour: accuracies above chance, so a changed feature would show
    train = tiny_split(tmp_path / "train.h5", classes=4, per_class=12, split="train", seed=1, noise=60)
    val = tiny_split(tmp_path / "val.h5", classes=4, per_class=8, split="val", seed=2, noise=60)
    episodes = write_test_episodes(val, tmp_path / "episodes.npz", way=3, shot=1, query=3, count=8, seed=5)
    protocol = {"way": 3, "query": 3, "val_episodes": 8, "seed": 0}
    results = {}
    for batch in (3, 64):
        out = tmp_path / f"batch{batch}"
        embed_batch_sizes.clear()
        encoder = pretrain(train, val, encoder_out=out / "encoder.pt", history_out=out / "pretrain.csv",
                           checkpoint_dir=out / "ckpt", device="cpu", inference_batch_size=batch,
                           backbone={"name": "resnet12", "width": 0.125, "image_size": 16},
                           config=PretrainConfig.from_dict({"epochs": 1, "batch_size": 16, "num_workers": 0}),
                           **protocol)
        meta_train(train, val, encoder, model_out=out / "model.pt", history_out=out / "meta.csv",
                   checkpoint_dir=out / "mckpt", shot=1, method="mtl", device="cpu", inference_batch_size=batch,
                   config=MetaConfig.from_dict({"epochs": 1, "episodes_per_epoch": 1, "update_step": 5}),
                   **protocol)
        evaluate("ft", encoder, val, episodes, episodes_out=out / "episodes.csv", metrics_out=out / "metrics.json",
                 protocol={"dataset": "toy", "backbone": "resnet12", "seed": 0}, inference_batch_size=batch,
                 device="cpu")
        assert embed_batch_sizes == [batch] * 3  # pre-train validation, meta-validation, meta-test
        results[batch] = [[row[key] for row in csv.DictReader(open(out / name)) for key in keys]
                          for name, keys in (("pretrain.csv", ["val_acc"]), ("meta.csv", ["val_acc"]),
                                             ("episodes.csv", ["accuracy"]))]
    assert results[3] == results[64]
