"""Meta-train: first/second-order meta-gradient, what changes, end to end, HT, resume, config."""
from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtl.data.episodes import EpisodeSampler
from mtl.data.hdf5 import HDF5Split
from mtl.data.transforms import EvalTransform
from mtl.errors import CheckpointError, ConfigError, MTLError
from mtl.models import build_backbone, freeze_for_meta, load_encoder, meta_parameters, save_encoder
from mtl.models.ss_conv import SSConv2d
from mtl.rng import Purpose
from mtl.train.checkpoint import load_checkpoint
from mtl.train.hard_tasks import HardTaskConfig, HardTaskRound, TaskStream
from mtl.train.meta import MetaConfig, MetaTrainer, meta_train, task_query_loss, train_epoch
from mtl.stop_signals import Stopped

WAY, SHOT, QUERY, SIZE = 3, 1, 2, 16


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_split):
    root = tmp_path_factory.mktemp("meta")
    # classes differ in colour, so accuracy is above chance
    train = tiny_split(root / "train.h5", classes=6, per_class=5, split="train", seed=1)
    val = tiny_split(root / "val.h5", classes=4, per_class=5, split="val", seed=2)
    torch.manual_seed(0)
    encoder = save_encoder(build_backbone("resnet12", width=0.125), root / "encoder.pt", image_size=SIZE,
                           normalize={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, epoch=1, val_acc=0.5)
    return {"train": train, "val": val, "encoder": encoder}


def tiny_config(**overrides) -> MetaConfig:
    values = {"epochs": 1, "episodes_per_epoch": 2, "update_step": 5, "step_size": 1, **overrides}
    return MetaConfig.from_dict(values)


def run(data, out, **kwargs):
    args = {"config": tiny_config(), "way": WAY, "shot": SHOT, "query": QUERY, "val_episodes": 4, "seed": 3,
            "method": "mtl", "device": "cpu", **kwargs}
    return meta_train(data["train"], data["val"], data["encoder"], model_out=out / "model.pt",
                      history_out=out / "history.csv", checkpoint_dir=out / "ckpt", **args)


def read_history(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------- meta-gradient
def reference_query_loss(model, weight, bias, support_x, query_x, steps, lr):
    """The reference's meta_forward: support graph kept, autograd inner loop, create_graph=False."""
    query_feats = model(query_x)
    support_feats = model(support_x)
    support_y = torch.arange(WAY).repeat_interleave(SHOT)
    fast = [weight, bias]
    for _ in range(steps):
        loss = F.cross_entropy(F.linear(support_feats, *fast), support_y)
        grads = torch.autograd.grad(loss, fast)
        fast = [p - lr * g for p, g in zip(fast, grads)]
    return F.cross_entropy(F.linear(query_feats, *fast), torch.arange(WAY).repeat_interleave(QUERY))


def meta_grads(loss_fn):
    torch.manual_seed(0)
    model = build_backbone("resnet12", width=0.125, ss=True)
    params = freeze_for_meta(model)
    with torch.no_grad():  # move scales off 1 so the test is not at a special point
        for p in params:
            p.mul_(1 + 0.1 * torch.randn_like(p))
    weight = torch.nn.Parameter(torch.randn(WAY, model.out_dim) * 0.1)
    bias = torch.nn.Parameter(torch.zeros(WAY))
    generator = torch.Generator().manual_seed(1)
    support_x = torch.randn(WAY * SHOT, 3, SIZE, SIZE, generator=generator)
    query_x = torch.randn(WAY * QUERY, 3, SIZE, SIZE, generator=generator)
    loss = loss_fn(model, weight, bias, support_x, query_x)
    loss.backward()
    return [p.grad.clone() for p in params] + [weight.grad.clone(), bias.grad.clone()]


def ours(first_order):
    return lambda m, w, b, s, q: task_query_loss(m, w, b, s, q, way=WAY, shot=SHOT, query=QUERY, steps=10,
                                                 lr=0.5, first_order=first_order)[0]


def test_first_order_gradient_equals_reference_with_support_graph():
    """Computing the support embedding under no_grad changes no meta-gradient (scales, BN, init)."""
    expected = meta_grads(lambda m, w, b, s, q: reference_query_loss(m, w, b, s, q, steps=10, lr=0.5))
    got = meta_grads(ours(first_order=True))
    # atol: shifts feeding a train-mode BN have a true gradient of 0 (BN removes the batch mean),
    # seen as float noise ~1e-6 in both; every other gradient here is O(1).
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=2e-5)


def test_second_order_gradient_differs():
    first = meta_grads(ours(first_order=True))
    second = meta_grads(ours(first_order=False))
    scales_first, scales_second = torch.cat([g.flatten() for g in first[:-2]]), torch.cat(
        [g.flatten() for g in second[:-2]])
    assert not torch.allclose(scales_first, scales_second, rtol=1e-3, atol=1e-6)
    assert torch.isfinite(scales_second).all()


def test_bn_statistics_see_the_query_batch_first_then_the_support_batch():
    """Reference order: running statistics after a task equal query-then-support forwards."""
    import copy

    torch.manual_seed(0)
    model = build_backbone("resnet12", width=0.125, ss=True).train()
    freeze_for_meta(model)
    query_first, support_first = copy.deepcopy(model), copy.deepcopy(model)
    support_x, query_x = torch.randn(WAY * SHOT, 3, SIZE, SIZE), torch.randn(WAY * QUERY, 3, SIZE, SIZE) + 1
    weight, bias = torch.nn.Parameter(torch.zeros(WAY, model.out_dim)), torch.nn.Parameter(torch.zeros(WAY))
    task_query_loss(model, weight, bias, support_x, query_x, way=WAY, shot=SHOT, query=QUERY, steps=2, lr=0.1,
                    first_order=True)
    with torch.no_grad():
        query_first(query_x), query_first(support_x)
        support_first(support_x), support_first(query_x)
    stats = lambda m: torch.cat([v.flatten() for k, v in m.state_dict().items() if "running" in k])  # noqa: E731
    torch.testing.assert_close(stats(model), stats(query_first))
    assert not torch.allclose(stats(model), stats(support_first))


# --------------------------------------------------------------------------- what changes
def test_meta_train_changes_only_meta_parameters_learner_init_and_bn_statistics(data):
    """Conv weights/biases stay frozen; scale/shift, BN affine and the learner init move.

    BN running statistics also change: the reference meta-trains in train mode, so each forward
    updates running_mean/var (query batch first, then support) although they are not learned.
    """
    model = load_encoder(data["encoder"], ss=True)
    config = tiny_config(episodes_per_epoch=3)
    trainer = MetaTrainer(model, way=WAY, shot=SHOT, query=QUERY, config=config, device="cpu",
                          image_size=SIZE, mean=[0.5] * 3, std=[0.25] * 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner_before = trainer.weight.detach().clone(), trainer.bias.detach().clone()
    split = HDF5Split(data["train"], in_memory=True)
    sampler = EpisodeSampler(split.labels, WAY, SHOT, QUERY, seed=0)
    stats = train_epoch(trainer, split, sampler, EvalTransform(SIZE, [0.5] * 3, [0.25] * 3), epoch=0, seed=0,
                        hard_config=None)
    assert np.isfinite(stats["meta_loss"]) and stats["hard_tasks"] == 0
    after = model.state_dict()
    meta_ids = {id(p) for p in meta_parameters(model)}
    meta_names = {n for n, p in model.named_parameters() if id(p) in meta_ids}
    for name, module in model.named_modules():
        if isinstance(module, SSConv2d):
            assert torch.equal(after[f"{name}.weight"], before[f"{name}.weight"]), name
            if module.bias is not None:
                assert torch.equal(after[f"{name}.bias"], before[f"{name}.bias"]), name
    assert all(not torch.equal(after[n], before[n]) for n in meta_names if n.endswith(".scale"))
    assert any(not torch.equal(after[n], before[n]) for n in after if n.endswith("running_mean"))
    # every BN saw 2 batches per task (query, then support), 3 tasks
    assert all(int(after[n]) - int(before[n]) == 6 for n in after if n.endswith("num_batches_tracked"))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == meta_names
    assert not torch.equal(trainer.weight.detach(), learner_before[0])
    assert not torch.equal(trainer.bias.detach(), learner_before[1])


def test_task_stream_builds_hard_tasks_from_the_failure_classes():
    labels = np.repeat(np.arange(12), 5)
    sampler = EpisodeSampler(labels, WAY, SHOT, QUERY, seed=0)
    hard = HardTaskRound(HardTaskConfig(enabled=True, normal_tasks=2, hard_tasks=1, fill="random"),
                         sampler.by_class, way=WAY, shot=SHOT, query=QUERY, seed=0, epoch=0)
    stream = TaskStream(sampler, epoch=0, tasks_per_epoch=10, hard_round=hard)
    targets = np.repeat(np.arange(WAY), QUERY)
    failures = []
    for _ in range(2):
        kind, episode = stream.next()
        predictions = targets.copy()
        predictions[targets == 1] = 0  # local class 1 fails completely
        stream.done(episode, predictions, targets)
        assert kind == "normal"
        failures.append(int(episode.classes[1]))
    kind, task = stream.next()
    assert kind == "hard" and set(failures) <= set(task.classes.tolist())
    assert stream.next()[0] == "normal" and stream.hard_count == 1


# --------------------------------------------------------------------------- end to end
def test_meta_train_writes_model_and_history(data, tmp_path):
    out = run(data, tmp_path)
    saved = torch.load(out, weights_only=True)
    assert set(saved) >= {"backbone", "state_dict", "learner", "image_size", "normalize", "protocol", "epoch",
                          "val_acc"}
    assert saved["protocol"] == {"way": WAY, "shot": SHOT, "query": QUERY, "seed": 3, "method": "mtl", "scope": "all"}
    assert saved["image_size"] == SIZE and saved["normalize"]["mean"] == [0.5] * 3
    assert saved["learner"]["weight"].shape == (WAY, 64) and saved["learner"]["bias"].shape == (WAY,)
    assert any(k.endswith(".scale") for k in saved["state_dict"])
    load_encoder(out, ss=True)  # the model file is a valid SS encoder file
    rows = read_history(tmp_path / "history.csv")
    assert list(rows[0]) == ["epoch", "meta_loss", "train_acc", "val_acc", "val_ci95", "lr", "hard_tasks", "seconds"]
    assert len(rows) == 1 and 0 <= float(rows[0]["val_acc"]) <= 1 and rows[0]["hard_tasks"] == "0"


def test_training_tasks_are_not_the_validation_episodes(data, tmp_path, monkeypatch):
    """One seed, separate streams: validated on its own training split, meta-training's tasks are
    not the episodes it validates on (they were, when both were drawn from (seed, i))."""
    import mtl.train.meta as meta_module

    drawn = []

    class Recording(EpisodeSampler):
        def episode(self, i):
            episode = super().episode(i)
            drawn.append((self.purpose, (*episode.classes, *episode.support, *episode.query)))
            return episode

    monkeypatch.setattr(meta_module, "EpisodeSampler", Recording)
    run({**data, "val": data["train"]}, tmp_path)
    train = {key for purpose, key in drawn if purpose == Purpose.TRAIN_EPISODES}
    val = {key for purpose, key in drawn if purpose == Purpose.VALIDATION_EPISODES}
    assert len(train) == 2 and len(val) == 4 and not train & val


def test_hard_task_meta_train_runs_hard_tasks(data, tmp_path):
    config = tiny_config(episodes_per_epoch=3, hard_tasks={"normal_tasks": 2, "hard_tasks": 1})
    out = run(data, tmp_path, config=config, method="mtl_ht")
    assert torch.load(out, weights_only=True)["protocol"]["method"] == "mtl_ht"
    assert read_history(tmp_path / "history.csv")[0]["hard_tasks"] == "1"  # normal, normal, hard


def test_meta_batch_averages_several_tasks_and_second_order_runs(data, tmp_path):
    run(data, tmp_path, config=tiny_config(meta_batch=2, first_order=False))
    assert np.isfinite(float(read_history(tmp_path / "history.csv")[0]["meta_loss"]))


def test_the_method_decides_the_scope_and_the_keys_its_arm_fixes(data, tmp_path):
    """meta_train reads its method's arm in the registry (mtl/methods.py), not the caller: mtl_last
    learns scales/shifts of the last block only, mtl_2nd_order trains second order whatever the
    config says, and a method that is not meta-trained is refused."""
    last = torch.load(run(data, tmp_path / "last", method="mtl_last"), weights_only=True)
    assert last["protocol"] == {"way": WAY, "shot": SHOT, "query": QUERY, "seed": 3, "method": "mtl_last",
                                "scope": "last"}
    run(data, tmp_path / "second", method="mtl_2nd_order", config=tiny_config(first_order=True))
    assert load_checkpoint(tmp_path / "second" / "ckpt" / "last.pt")["config"]["first_order"] is False
    with pytest.raises(ConfigError, match="'ft' is not meta-trained"):
        run(data, tmp_path / "ft", method="ft")


def test_resume_continues_from_saved_epoch(data, tmp_path, caplog):
    run(data, tmp_path, config=tiny_config(epochs=1))
    first = read_history(tmp_path / "history.csv")
    with caplog.at_level(logging.INFO, logger="mtl.train.meta"):
        run(data, tmp_path, config=tiny_config(epochs=2))
    assert "resuming from epoch 2" in caplog.text
    rows = read_history(tmp_path / "history.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[0] == first[0]  # epoch 1 was not rerun
    assert float(rows[1]["lr"]) == pytest.approx(0.5e-4)  # StepLR(step_size=1, gamma=0.5) state resumed


def test_sigterm_inside_a_hard_task_round_resumes_exactly(data, tmp_path, monkeypatch, caplog):
    """SIGTERM after step 2 of epoch 2, with the round's failure classes collected and its hard
    task next: the rerun continues that round and ends with the uninterrupted model, bit for bit."""
    config = tiny_config(epochs=2, episodes_per_epoch=4, hard_tasks={"normal_tasks": 2, "hard_tasks": 1})
    monkeypatch.setenv("MTL_FAULT_AT", "meta.step#6=term")
    monkeypatch.setenv("MTL_FAULT_DIR", str(tmp_path))
    with pytest.raises(Stopped, match=r"meta-training stopped by SIGTERM at epoch 2, step 2; .*last.pt holds"):
        run(data, tmp_path / "a", config=config, method="mtl_ht")
    with caplog.at_level(logging.INFO, logger="mtl.train.meta"):
        run(data, tmp_path / "a", config=config, method="mtl_ht")
    assert "resuming from epoch 2, step 2 " in caplog.text
    run(data, tmp_path / "b", config=config, method="mtl_ht")
    resumed = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    straight = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in straight["state_dict"].items())
    assert torch.equal(resumed["learner"]["weight"], straight["learner"]["weight"])
    assert read_history(tmp_path / "a" / "history.csv")[1]["hard_tasks"] == "1"


def test_a_diverging_loss_stops_meta_training_and_saves_nothing(data, tmp_path):
    with pytest.raises(MTLError, match=r"meta-training diverged at epoch 1, step 1 .*meta.base_lr \(now 1e\+38\)"):
        run(data, tmp_path, config=tiny_config(base_lr=1e38))
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "ckpt" / "last.pt").exists()


def test_resume_refuses_a_different_config(data, tmp_path):
    run(data, tmp_path, config=tiny_config(epochs=1))
    with pytest.raises(CheckpointError, match="Delete the folder"):
        run(data, tmp_path, config=tiny_config(epochs=2, base_lr=0.1))


def test_resume_refuses_a_split_rebuilt_with_other_images(data, tmp_path, tiny_split):
    """The same encoder (e.g. the ablation's random_init, which never reads the data) but a
    train.h5 rebuilt with other images of the same counts: the checkpoint is not resumed."""
    rebuilt = dict(data, train=tiny_split(tmp_path / "train.h5", classes=6, per_class=5, split="train", seed=1))
    run(rebuilt, tmp_path / "out", config=tiny_config(epochs=1))
    run(rebuilt, tmp_path / "out", config=tiny_config(epochs=2))  # same images: resumes
    tiny_split(tmp_path / "train.h5", classes=6, per_class=5, split="train", seed=9)
    with pytest.raises(CheckpointError, match=r"splits_sha256.*Delete the folder"):
        run(rebuilt, tmp_path / "out", config=tiny_config(epochs=3))


def test_missing_encoder_names_the_pretrain_rule(data, tmp_path):
    with pytest.raises(CheckpointError, match="pretrain"):
        meta_train(data["train"], data["val"], tmp_path / "nope.pt", model_out=tmp_path / "m.pt",
                   history_out=tmp_path / "h.csv", checkpoint_dir=tmp_path / "c", config=tiny_config(), way=WAY,
                   shot=SHOT, query=QUERY, val_episodes=2, seed=0, method="mtl", device="cpu")


# --------------------------------------------------------------------------- config
def test_config_defaults_are_the_reference_protocol():
    config = MetaConfig()
    assert (config.epochs, config.episodes_per_epoch, config.meta_lr, config.learner_lr) == (100, 100, 1e-4, 1e-3)
    assert (config.step_size, config.gamma, config.base_lr, config.update_step) == (10, 0.5, 0.01, 100)
    assert config.first_order and config.meta_batch == 1 and not config.hard_tasks.enabled


def test_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match=r"meta_lrr.*Valid keys.*meta_lr"):
        MetaConfig.from_dict({"meta_lrr": 1e-3})
    with pytest.raises(ConfigError, match="hard_tasks"):
        MetaConfig.from_dict({"hard_tasks": {"count": 3}})
    assert MetaConfig.from_dict({"hard_tasks": {"fill": "skip"}}).hard_tasks.fill == "skip"
