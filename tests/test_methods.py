"""The method registry: names the config accepts, each arm's meta-training settings, and what each
arm trains (requires_grad, and what one meta-update moves) or starts from."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from mtl.errors import ConfigError
from mtl.methods import (LOGISTIC, NAMES, PRETRAINED, RANDOM_INIT, REGISTRY, current_name, get_method, meta_settings,
                         meta_trained, start_encoder)
from mtl.models import build_backbone, load_encoder, load_encoder_file, meta_parameters, save_encoder
from mtl.rng import Purpose, stream_seed
from mtl.train.meta import MetaConfig, MetaTrainer
from mtl.train.pretrain import random_encoder
from tests.workflow import REPO

WAY, SHOT, QUERY, SIZE, WIDTH = 3, 1, 2, 16, 0.125
NORMALIZE = {"mean": [0.5] * 3, "std": [0.25] * 3}
META_ARMS = ["mtl", "mtl_ht", "mtl_last", "mtl_2nd_order", "mtl_metabatch4", "mtl_no_pretrain"]


def test_the_schema_accepts_exactly_the_registry_names():
    schema = yaml.safe_load((REPO / "mtl/config.schema.yaml").read_text())
    assert schema["properties"]["methods"]["items"]["enum"] == list(NAMES)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    assert set(config["methods"]) <= set(NAMES)


def test_registry_says_which_methods_meta_train_and_from_which_encoder():
    assert meta_trained(NAMES) == META_ARMS
    assert meta_trained(["ft", "mtl_ht", "proto"]) == ["mtl_ht"]
    assert [n for n in NAMES if start_encoder(n) == RANDOM_INIT] == ["mtl_no_pretrain"]
    assert [n for n in NAMES if get_method(n).test_time.finetune] == ["ft_last", "ft_all"]
    with pytest.raises(ConfigError, match="Valid values are"):
        get_method("mtl_typo")


def test_logreg_follows_ft_and_fits_a_logistic_regression_on_the_pretrained_encoder():
    assert NAMES[:3] == ("ft", "logreg", "proto")
    logreg = get_method("logreg")
    assert logreg.start == PRETRAINED and not logreg.meta_trained
    assert logreg.test_time.learner == LOGISTIC and logreg.test_time.finetune is None and logreg.test_time.steps is None
    assert [n for n in NAMES if get_method(n).test_time.learner == LOGISTIC] == ["logreg"]
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    assert config["methods"] == ["ft", "logreg", "proto", "mtl", "mtl_ht"]


def test_the_old_name_lr_is_refused_in_a_config_and_read_as_logreg_in_results():
    with pytest.raises(ConfigError, match="'lr' is now called 'logreg'"):
        get_method("lr")
    assert current_name("lr") == "logreg" and current_name("ft") == "ft"


def test_each_arm_meta_trains_with_config_yaml_plus_only_its_own_settings():
    meta = yaml.safe_load((REPO / "config.yaml").read_text())["meta"]
    for name in META_ARMS:
        settings = MetaConfig.from_dict(meta_settings(name, meta)).to_dict()  # valid keys and values
        changed = {k: v for k, v in settings.items() if k != "hard_tasks" and meta.get(k) != v}
        expected = {"mtl_2nd_order": {"first_order": False}, "mtl_metabatch4": {"meta_batch": 4}}.get(name, {})
        assert changed == expected, name
    assert REGISTRY["mtl_ht"].meta.hard_tasks and not REGISTRY["mtl"].meta.hard_tasks
    with pytest.raises(ConfigError, match="not meta-trained"):
        meta_settings("ft_last", meta)


# --------------------------------------------------------------------------- what meta-training trains
def _trainer(name, encoder_path):
    method = get_method(name)
    model = load_encoder(encoder_path, ss=True)
    config = MetaConfig.from_dict({**meta_settings(name, {"update_step": 3, "epochs": 1}), "meta_lr": 0.05})
    return MetaTrainer(model, way=WAY, shot=SHOT, query=QUERY, config=config, device="cpu", image_size=SIZE,
                       mean=NORMALIZE["mean"], std=NORMALIZE["std"], seed=0, scope=method.meta.scope)


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory):
    torch.manual_seed(0)
    return save_encoder(build_backbone("resnet12", width=WIDTH), tmp_path_factory.mktemp("arms") / "encoder.pt",
                        image_size=SIZE, normalize=NORMALIZE)


def trainable_names(model):
    return {name for name, param in model.named_parameters() if param.requires_grad}


def test_mtl_trains_every_scale_shift_and_bn_affine_and_nothing_else(encoder_path):
    trainer = _trainer("mtl", encoder_path)
    names = trainable_names(trainer.model)
    assert all(n.endswith((".scale", ".shift")) or ".bn" in n or "shortcut.1" in n for n in names)
    assert sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) == sum(
        p.numel() for p in meta_parameters(trainer.model))
    assert not any(n.endswith(".weight") and "conv" in n for n in names)  # pre-trained convs frozen


def test_mtl_last_trains_the_last_block_only(encoder_path):
    """ResNet-12 at width 0.125: layer4 maps 32 -> 64 channels. Scales: 64x32 + 64x64 + 64x64 = 10,240;
    shifts: 3 x 64; BN affine: (bn1, bn2, bn3, shortcut BN) x 2 x 64 = 512. Total 10,944."""
    trainer = _trainer("mtl_last", encoder_path)
    names = trainable_names(trainer.model)
    assert names and all(n.startswith("layer4.") for n in names)
    assert sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) == 10_944
    assert {id(p) for p in trainer.params} == {id(p) for n, p in trainer.model.named_parameters() if n in names}


@pytest.mark.parametrize("name", ["mtl", "mtl_last"])
def test_one_meta_update_moves_only_the_arms_parameters(name, encoder_path):
    trainer = _trainer(name, encoder_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    support = torch.randn(WAY * SHOT, 3, SIZE, SIZE, generator=generator)
    query = torch.randn(WAY * QUERY, 3, SIZE, SIZE, generator=generator)
    trainer.task_forward_backward(support, query)
    trainer.optimizer_step()
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    scales = {n for n in trainable_names(trainer.model) if n.endswith(".scale")}
    assert scales <= moved <= trainable_names(trainer.model)
    if name == "mtl_last":
        assert all(n.startswith("layer4.") for n in moved)
    else:
        assert {n.split(".")[0] for n in moved} == {"layer1", "layer2", "layer3", "layer4"}


def test_no_pretrain_arm_starts_from_the_seeds_untrained_encoder(tmp_path):
    """The untrained encoder is the network pre-training of the same seed starts from."""
    backbone = {"name": "resnet12", "width": WIDTH, "image_size": SIZE}
    paths = [random_encoder(tmp_path / f"seed{s}.pt", backbone=backbone, config={"normalize": NORMALIZE}, seed=s)
             for s in (1, 1, 2)]
    torch.manual_seed(stream_seed(1, Purpose.MODEL_INIT))  # what pre-training seeds before building its backbone
    expected = build_backbone("resnet12", width=WIDTH).state_dict()
    model, info = load_encoder_file(paths[0], ss=True)  # loads into the SS form meta_train uses
    assert info["image_size"] == SIZE and info["normalize"] == NORMALIZE and info["epoch"] == 0
    first, again, other = (load_encoder(p).state_dict() for p in paths)
    for key, value in expected.items():
        torch.testing.assert_close(first[key], value)
        torch.testing.assert_close(again[key], value)
    assert not all(torch.equal(first[k], other[k]) for k in first if k.endswith("conv1.weight"))
    assert np.isnan(info["val_acc"])
