"""The encoder file format, defined once: ``{"backbone": config, "state_dict": ..., **extra}``.

``save_encoder`` writes it atomically; ``load_encoder`` rebuilds the backbone from the stored
config, loads it with ``torch.load(weights_only=True)`` (no code runs from the file) and turns
every way it can fail into a CheckpointError that names the file and says what to do.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from mtl.errors import CheckpointError, ConfigError
from mtl.io import atomic_torch_save
from mtl.models.backbone import Backbone, build_backbone, fold_scales

ENCODER_PRODUCER = "the `pretrain` rule (results/<dataset>/<backbone>/seed<N>/pretrain/encoder.pt)"
MODEL_PRODUCER = "the `meta_train` rule (results/<dataset>/<backbone>/seed<N>/<method>/<shot>shot/model.pt)"
SS_SUFFIXES = (".scale", ".shift")


def save_encoder(backbone: Backbone, path: str | os.PathLike, **extra) -> Path:
    """Write ``backbone``'s config and state (on CPU) plus ``extra`` entries to ``path`` atomically.

    ``extra`` holds plain values only (numbers, strings, lists, dicts, tensors) so the file loads
    with ``weights_only=True``; e.g. ``image_size``, ``normalize``, ``epoch``, ``val_acc``, ``learner``.
    """
    reserved = {"backbone", "state_dict"} & set(extra)
    if reserved:
        raise ValueError(f"save_encoder: {sorted(reserved)} are written from the backbone itself; "
                         "pass them under another name")
    state = {key: value.detach().cpu() for key, value in backbone.state_dict().items()}
    return atomic_torch_save({"backbone": dict(backbone.config), "state_dict": state, **extra}, path)


def load_encoder(path: str | os.PathLike, *, ss: bool = False, map_location="cpu",
                 expected: Mapping | None = None) -> Backbone:
    """Rebuild the backbone stored in ``path`` and load its weights (see :func:`load_encoder_file`)."""
    return load_encoder_file(path, ss=ss, map_location=map_location, expected=expected)[0]


def load_encoder_file(path: str | os.PathLike, *, ss: bool = False, map_location="cpu",
                      expected: Mapping | None = None, producer: str = ENCODER_PRODUCER) -> tuple[Backbone, dict]:
    """Rebuild the backbone stored in ``path``, load its weights, and return it with the file's
    other entries (image_size, normalize, learner, ...), so callers read the file once.

    ``ss=False`` returns the plain form; a file holding scale/shift (a meta-trained model) is
    folded into plain weights with :func:`fold_scales`. ``ss=True`` returns the SS form; a plain
    (pre-trained) file gets scale 1 / shift 0. ``expected`` (a backbone config), when given, must
    match the stored name and width (other keys, e.g. image_size, are ignored). The model is
    returned in train mode, like any new module. ``producer`` names what writes the file, for the
    error a missing or corrupt one raises (:data:`ENCODER_PRODUCER`, :data:`MODEL_PRODUCER`).
    """
    path = Path(path)
    payload = read_encoder_file(path, map_location, producer)
    config = stored_backbone_config(payload, path)
    if expected is not None:
        check_expected_backbone(config, expected, path)
    state = payload["state_dict"]
    has_ss = any(key.endswith(SS_SUFFIXES) for key in state)
    try:
        model = build_backbone(**config, ss=ss or has_ss)
    except ConfigError as error:
        raise CheckpointError(f"encoder {path}: cannot rebuild its backbone {config}: {error}") from error
    load_backbone_state(model, state, source=str(path))
    model = model.to(map_location) if isinstance(map_location, (str, torch.device)) else model
    extras = {key: value for key, value in payload.items() if key != "state_dict"}
    if has_ss and not ss:
        return fold_scales(model), extras
    return model, extras


def check_expected_backbone(config: dict, expected: Mapping, path: Path) -> None:
    """Refuse an encoder trained for another backbone than the one the run is configured for."""
    wanted = {"name": expected["name"], "width": float(expected.get("width", 1.0))}
    if wanted != config:
        raise CheckpointError(f"encoder {path} holds backbone {config} but {wanted} was asked for; "
                              f"rerun {ENCODER_PRODUCER} for this backbone or change the config")


def read_encoder_file(path: Path, map_location, producer: str = ENCODER_PRODUCER) -> dict:
    """``torch.load(weights_only=True)`` with errors that name the file and its producer."""
    if not path.is_file():
        raise CheckpointError(f"encoder file {path} does not exist; it is written by {producer}: "
                              "run that step first (or point the config at an existing encoder)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # corrupt, truncated or pickled with code: all unusable alike
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot read {path} ({type(error).__name__}: {first_line}); it is written by "
                              f"{producer}: delete it and rerun the workflow to rebuild it") from error
    if not isinstance(payload, dict) or "backbone" not in payload or "state_dict" not in payload:
        seen = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not an encoder file: expected a dict with 'backbone' and "
                              f"'state_dict' (as written by save_encoder), found {seen}")
    if not isinstance(payload["state_dict"], Mapping):
        raise CheckpointError(f"{path}: 'state_dict' should map parameter names to tensors, found "
                              f"{type(payload['state_dict']).__name__}")
    return payload


def stored_backbone_config(payload: dict, path: Path) -> dict:
    """The ``{"name", "width"}`` config of an encoder file (other keys there are ignored)."""
    config = payload["backbone"]
    if not isinstance(config, Mapping) or "name" not in config:
        raise CheckpointError(f"encoder {path}: 'backbone' should be a dict with 'name' and 'width', "
                              f"found {config!r}")
    try:
        width = float(config.get("width", 1.0))
    except (TypeError, ValueError):
        raise CheckpointError(f"encoder {path}: backbone width {config.get('width')!r} is not a number") from None
    return {"name": config["name"], "width": width}


def load_backbone_state(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                        source: str = "state dict") -> list[str]:
    """Load ``state_dict`` into ``model`` after checking that it fits; return the keys left at init.

    Only scale/shift may be missing, and only when the state holds none (a plain, pre-trained
    state going into the SS form). Otherwise raise CheckpointError naming ``source`` and the first
    offending key, e.g. ``layer1.0.conv1.weight: checkpoint (160, 80, 3, 3) vs model (80, 80, 3, 3)``.
    """
    model_state = model.state_dict()
    for key, value in model_state.items():
        if key in state_dict and tuple(state_dict[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source} does not fit the model {describe(model)}: {key}: checkpoint "
                f"{tuple(state_dict[key].shape)} vs model {tuple(value.shape)}; it was saved from "
                "another backbone or width (check backbone.name / backbone.width)")
    state_has_ss = any(key.endswith(SS_SUFFIXES) for key in state_dict)
    missing = [key for key in model_state if key not in state_dict
               and (state_has_ss or not key.endswith(SS_SUFFIXES))]
    unexpected = [key for key in state_dict if key not in model_state]
    if missing or unexpected:
        first = f"{missing[0]} is missing" if missing else f"{unexpected[0]} is unexpected"
        raise CheckpointError(
            f"{source} does not fit the model {describe(model)}: {first} "
            f"({len(missing)} keys missing, {len(unexpected)} unexpected; checkpoint keys start "
            f"{list(state_dict)[:3]}). Expected a backbone state dict as written by save_encoder "
            "(a classifier's state has an 'encoder.' prefix: save model.encoder instead)")
    model.load_state_dict(state_dict, strict=False)
    return [key for key in model_state if key not in state_dict]


def describe(model: torch.nn.Module) -> str:
    """``resnet12 (width 1.0, ss=False)``-style summary for error messages."""
    config = getattr(model, "config", None)
    if not config:
        return type(model).__name__
    return f"{config['name']} (width {config['width']}, ss={getattr(model, 'ss', False)})"
