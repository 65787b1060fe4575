"""Backbones, the scale/shift conv, meta-phase helpers and the encoder file format.

Small widths and 16-32 px inputs everywhere except the exact shape / parameter-count checks,
which build width 1 but run only a batch of 1 at the native size.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mtl.errors import CheckpointError, ConfigError
from mtl.models import (
    PretrainClassifier,
    SSConv2d,
    build_backbone,
    fold_scales,
    freeze_for_meta,
    load_backbone_state,
    load_encoder,
    meta_parameters,
    save_encoder,
)

BACKBONES = ["resnet12", "resnet25"]
SMALL = 0.125



def images(batch: int = 4, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomize_meta_state(model: nn.Module, seed: int = 0) -> None:
    """Move scales/shifts/BN away from their init so equivalence tests test something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SSConv2d) and module.ss:
                module.scale.copy_(1 + 0.3 * torch.randn(module.scale.shape, generator=generator))
                if module.shift is not None:
                    module.shift.copy_(0.1 * torch.randn(module.shift.shape, generator=generator))
            elif isinstance(module, nn.BatchNorm2d):
                shape = module.weight.shape
                module.weight.copy_(1 + 0.2 * torch.randn(shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(shape, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
                module.running_var.copy_(1 + 0.5 * torch.rand(shape, generator=generator))


def conv_modules(model: nn.Module, *, ss: bool) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)
            and (isinstance(m, SSConv2d) and m.ss) == ss]


# ------------------------------------------------------------------ shapes and parameter counts

@pytest.fixture(scope="module")
def full_size():
    """Width-1 SS models, built once (about half a second each)."""
    torch.manual_seed(0)
    return {name: build_backbone(name, ss=True) for name in BACKBONES}


@pytest.mark.parametrize("name, native, dim", [("resnet12", 84, 512), ("resnet25", 80, 640)])
def test_native_size_and_feature_dim(full_size, name, native, dim):
    model = full_size[name].eval()
    assert model.native_size == native and model.out_dim == dim
    with torch.no_grad():
        features = model(images(batch=1, size=native))
    assert features.shape == (1, dim)
    assert torch.isfinite(features).all()


def test_resnet25_parameter_counts_match_reference(full_size):
    """36,559,040 frozen; 4,301,040 scales + 80 shifts + 20,320 BN affine (docs/reference-implementation.md)."""
    model = full_size["resnet25"]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(m, SSConv2d) and m.ss for m in convs), "every conv carries scale/shift"
    frozen = sum(p.numel() for m in convs for p in (m.weight, m.bias) if p is not None)
    scales = sum(m.scale.numel() for m in convs)
    shifts = sum(m.shift.numel() for m in convs if m.shift is not None)
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
             for p in (m.weight, m.bias))
    assert (frozen, scales, shifts, bn) == (36_559_040, 4_301_040, 80, 20_320)
    trainable = freeze_for_meta(model)
    assert sum(p.numel() for p in trainable) == 4_301_040 + 80 + 20_320
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4_321_440


def test_resnet12_parameter_counts(full_size):
    """Hand-counted from the paper's block: 3 biased 3x3 convs + 1x1 shortcut per block."""
    model = full_size["resnet12"]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    frozen = sum(p.numel() for m in convs for p in (m.weight, m.bias) if p is not None)
    scales = sum(m.scale.numel() for m in conv_modules(model, ss=True))
    shifts = sum(m.shift.numel() for m in conv_modules(model, ss=True))
    assert (frozen, scales, shifts) == (7_992_000, 868_544, 2_880)
    assert sum(p.numel() for p in meta_parameters(model)) == 868_544 + 2_880 + 7_680


@pytest.mark.parametrize("name, sizes", [("resnet12", [84, 42, 21, 10, 5]),
                                         ("resnet25", [80, 80, 40, 20, 10])])
def test_spatial_sizes_at_native_resolution(name, sizes):
    model = build_backbone(name, width=SMALL).eval()
    seen = []
    hooks = [getattr(model, layer).register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
             for layer in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, layer)]
    with torch.no_grad():
        model(images(batch=1, size=model.native_size))
    for hook in hooks:
        hook.remove()
    first = sizes[1:] if name == "resnet12" else sizes[2:]
    assert seen == first


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("size", [16, 23, 32])
def test_any_input_size_from_16(name, size):
    model = build_backbone(name, width=SMALL)
    assert model(images(batch=2, size=size)).shape == (2, model.out_dim)


def test_too_small_input_is_refused_with_its_shape():
    model = build_backbone("resnet12", width=SMALL)
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\)"):
        model(images(batch=2, size=8))


def test_width_multiplier_scales_channels_and_config_rebuilds():
    assert build_backbone("resnet12", width=SMALL).out_dim == 64
    assert build_backbone("resnet25", width=SMALL).out_dim == 80
    assert build_backbone("resnet25", width=0.001).out_dim == 1  # rounded, never below 1
    model = build_backbone("resnet25", width=0.25, ss=True)
    assert model.config == {"name": "resnet25", "width": 0.25}
    rebuilt = build_backbone(**model.config, ss=True)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}


def test_unknown_backbone_and_bad_width_are_config_errors():
    with pytest.raises(ConfigError, match="resnet12, resnet25"):
        build_backbone("resnet18")
    with pytest.raises(ConfigError, match="width"):
        build_backbone("resnet12", width=0)



def test_no_import_cycle_between_the_model_modules():
    """The concrete backbones import the shared base (mtl.models.blocks), and the by-name factory
    (mtl.models.backbone) imports them: never the reverse, not even inside a function, where a
    cycle hides until the import order changes."""
    import ast
    from pathlib import Path

    import mtl.models

    folder = Path(mtl.models.__file__).parent
    imports = {}
    for path in folder.glob("*.py"):
        if path.stem == "__init__":
            continue  # the package collects every module; the modules never import it
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtl.models."):
                found.add(node.module.rsplit(".", 1)[1])
            elif isinstance(node, ast.ImportFrom) and node.module == "mtl.models":
                found.add("__init__")
        imports[path.stem] = found
    assert {"backbone", "blocks", "resnet12", "resnet25"} <= imports.keys()
    assert all("__init__" not in found for found in imports.values()), imports

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in imports.get(start, ()))

    cycles = sorted(name for name in imports if reaches(name, name, {name}))
    assert not cycles, f"import cycle through {cycles}: {imports}"


# ------------------------------------------------------------------ scale/shift conv

def test_ss_conv_shapes_init_and_frozen_weights():
    conv = SSConv2d(4, 6, 3, padding=1, bias=True, ss=True)
    assert conv.scale.shape == (6, 4, 1, 1) and torch.all(conv.scale == 1)
    assert conv.shift.shape == (6,) and torch.all(conv.shift == 0)
    assert not conv.weight.requires_grad and not conv.bias.requires_grad
    no_bias = SSConv2d(4, 6, 1, bias=False, ss=True)
    assert no_bias.shift is None and "shift" not in no_bias.state_dict()
    plain = SSConv2d(4, 6, 3, bias=True)
    assert set(plain.state_dict()) == {"weight", "bias"}
    assert set(conv.state_dict()) == {"weight", "bias", "scale", "shift"}


def test_ss_conv_applies_weight_times_scale_and_bias_plus_shift():
    conv = SSConv2d(2, 3, 3, padding=1, ss=True)
    with torch.no_grad():
        conv.scale.uniform_(0.5, 1.5)
        conv.shift.uniform_(-1, 1)
    x = images(batch=2, size=16)[:, :2]
    expected = nn.functional.conv2d(x, conv.weight * conv.scale, conv.bias + conv.shift, padding=1)
    assert torch.allclose(conv(x), expected)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_ss_model_equals_plain_model_at_init(name, mode):
    torch.manual_seed(1)
    plain = build_backbone(name, width=SMALL)
    randomize_meta_state(plain)  # non-trivial BN statistics for eval mode
    ss = build_backbone(name, width=SMALL, ss=True)
    ss.load_state_dict(plain.state_dict(), strict=False)
    plain.train(mode == "train")
    ss.train(mode == "train")
    x = images(size=20)
    with torch.no_grad():
        assert torch.equal(ss(x), plain(x))


@pytest.mark.parametrize("name", BACKBONES)
def test_plain_state_loads_into_ss_model_missing_only_scale_and_shift(name):
    plain = build_backbone(name, width=SMALL)
    ss = build_backbone(name, width=SMALL, ss=True)
    result = ss.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.endswith((".scale", ".shift")) for k in result.missing_keys)
    assert set(result.missing_keys) == {k for k in ss.state_dict() if k.endswith((".scale", ".shift"))}
    assert load_backbone_state(ss, plain.state_dict(), source="plain") == result.missing_keys
    for key, value in plain.state_dict().items():
        assert torch.equal(ss.state_dict()[key], value)


def test_resnet12_shortcut_conv_has_no_scale_and_stays_frozen():
    model = build_backbone("resnet12", width=SMALL, ss=True)
    shortcut = model.layer1.shortcut[0]
    assert type(shortcut) is nn.Conv2d and shortcut.bias is None
    assert not any(".shortcut.0.scale" in k or ".shortcut.0.shift" in k for k in model.state_dict())
    assert len(conv_modules(model, ss=True)) == 12 and len(conv_modules(model, ss=False)) == 4
    freeze_for_meta(model)
    assert not shortcut.weight.requires_grad
    assert model.layer1.shortcut[1].weight.requires_grad  # its BN affine is meta-trained


def test_resnet25_shift_only_on_the_biased_stem():
    model = build_backbone("resnet25", width=SMALL, ss=True)
    shifts = [k for k in model.state_dict() if k.endswith(".shift")]
    assert shifts == ["conv1.shift"]
    assert "layer1.0.downsample.0.scale" in model.state_dict()


# ------------------------------------------------------------------ meta-phase helpers

@pytest.mark.parametrize("name", BACKBONES)
def test_freeze_for_meta_then_a_step_changes_only_meta_parameters(name):
    torch.manual_seed(2)
    model = build_backbone(name, width=SMALL, ss=True)
    randomize_meta_state(model)
    trainable = freeze_for_meta(model)
    ids = {id(p) for p in trainable}
    names = {n for n, p in model.named_parameters() if id(p) in ids}
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}
    bn_names = {f"{m}.{p}" for m, module in model.named_modules()
                if isinstance(module, nn.BatchNorm2d) for p in ("weight", "bias")}
    ss_names = {n for n in model.state_dict() if n.endswith((".scale", ".shift"))}
    assert names == bn_names | ss_names

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # deliberately given everything
    model.eval()  # eval: BN running statistics stay put, so only parameters can change
    loss = model(images(size=20)).pow(2).mean()
    loss.backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == names


def test_freeze_for_meta_refuses_a_plain_model():
    with pytest.raises(ValueError, match="ss=True"):
        freeze_for_meta(build_backbone("resnet25", width=SMALL))


@pytest.mark.parametrize("name", BACKBONES)
def test_fold_scales_gives_an_equivalent_plain_backbone(name):
    torch.manual_seed(3)
    ss = build_backbone(name, width=SMALL, ss=True)
    randomize_meta_state(ss)
    ss.eval()
    folded = fold_scales(ss)
    assert not folded.ss and folded.config == ss.config and not folded.training
    assert not any(k.endswith((".scale", ".shift")) for k in folded.state_dict())
    x = images(size=24)
    with torch.no_grad():
        expected = ss(x)
        assert torch.allclose(folded(x), expected, atol=1e-5)
        for param in meta_parameters(ss):  # the copy is independent of later meta updates
            param.add_(1.0)
        assert torch.allclose(folded(x), expected, atol=1e-5)


# ------------------------------------------------------------------ pre-train head

def test_pretrain_classifier_reference_head():
    backbone = build_backbone("resnet25", width=SMALL)
    model = PretrainClassifier(backbone, n_classes=7)
    assert model.encoder is backbone
    linear1, relu, linear2 = model.head
    assert (linear1.in_features, linear1.out_features) == (backbone.out_dim, 1000)
    assert isinstance(relu, nn.ReLU) and (linear2.in_features, linear2.out_features) == (1000, 7)
    assert model(images(batch=3, size=16)).shape == (3, 7)


# ------------------------------------------------------------------ encoder files

def test_save_and_load_encoder_round_trip(tmp_path):
    backbone = build_backbone("resnet12", width=SMALL)
    randomize_meta_state(backbone)
    path = save_encoder(backbone, tmp_path / "enc" / "encoder.pt", image_size=84, epoch=3)
    payload = torch.load(path, weights_only=True)
    assert payload["backbone"] == {"name": "resnet12", "width": SMALL} and payload["epoch"] == 3

    plain = load_encoder(path).eval()
    ss = load_encoder(path, ss=True).eval()
    assert not plain.ss and ss.ss
    x = images(size=16)
    with torch.no_grad():
        reference = backbone.eval()(x)
        assert torch.equal(plain(x), reference) and torch.equal(ss(x), reference)
    with pytest.raises(CheckpointError, match="resnet25"):
        load_encoder(path, expected={"name": "resnet25", "width": SMALL})


def test_meta_trained_file_loads_folded_when_plain_is_asked(tmp_path):
    ss = build_backbone("resnet25", width=SMALL, ss=True)
    randomize_meta_state(ss)
    path = save_encoder(ss.eval(), tmp_path / "model.pt", learner={"weight": torch.zeros(5, 80)})
    plain = load_encoder(path).eval()
    assert not plain.ss
    x = images(size=16)
    with torch.no_grad():
        assert torch.allclose(plain(x), ss(x), atol=1e-5)
        assert torch.equal(load_encoder(path, ss=True).eval()(x), ss(x))


def test_load_encoder_shape_mismatch_names_file_key_and_both_shapes(tmp_path):
    wide = build_backbone("resnet25", width=0.25)
    path = tmp_path / "encoder.pt"
    torch.save({"backbone": {"name": "resnet25", "width": SMALL}, "state_dict": wide.state_dict()}, path)
    with pytest.raises(CheckpointError) as error:
        load_encoder(path)
    message = str(error.value)
    assert str(path) in message
    assert "conv1.weight: checkpoint (20, 3, 3, 3) vs model (10, 3, 3, 3)" in message


def test_load_encoder_refuses_a_classifier_state(tmp_path):
    model = PretrainClassifier(build_backbone("resnet12", width=SMALL), n_classes=5)
    path = tmp_path / "classifier.pt"
    torch.save({"backbone": model.encoder.config, "state_dict": model.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"missing.*encoder\."):
        load_encoder(path)


def test_load_encoder_missing_or_unreadable_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist.*`pretrain` rule.*pretrain/encoder.pt"):
        load_encoder(tmp_path / "nowhere.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot read .*junk.pt .*`pretrain` rule.*delete it"):
        load_encoder(junk)
    not_encoder = tmp_path / "other.pt"
    torch.save({"model": {}}, not_encoder)
    with pytest.raises(CheckpointError, match="not an encoder file"):
        load_encoder(not_encoder)
