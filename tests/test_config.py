"""mtl.config: nested --config values (strings from Snakemake's parser) typed by the schema, and the
schema as the one source of every default and bound (config.yaml and the code agree with it)."""
from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import yaml
from snakemake_interface_common.exceptions import WorkflowError
from snakemake.utils import validate

from mtl.batching import AUTO, parse_setting
from mtl.cli import run_prediction
from mtl.config import coerce_config, coerce_strings, section_schema
from mtl.data.transforms import DEFAULT_MEAN, DEFAULT_STD
from mtl.errors import ConfigError
from mtl.evaluate import evaluate
from mtl.jobs import open_gpu_job
from mtl.train.hard_tasks import HardTaskConfig
from mtl.train.meta import MetaConfig, meta_train
from mtl.train.pretrain import PretrainConfig, pretrain

SCHEMA = Path(__file__).resolve().parent.parent / "mtl" / "config.schema.yaml"


def test_numbers_and_booleans_inside_nested_values_get_their_schema_types():
    config = {
        "protocol": {"seeds": ["1", "2"], "way": "5"},
        "pretrain": {"lr": "0.05", "nesterov": "false", "augment": "true"},
        "backbone": {"image_size": "null", "name": "resnet12", "width": "0.25"},
        "threads": "2",
    }
    coerce_config(config, SCHEMA)
    assert config["protocol"] == {"seeds": [1, 2], "way": 5}
    assert config["pretrain"] == {"lr": 0.05, "nesterov": False, "augment": True}
    assert config["backbone"] == {"image_size": None, "name": "resnet12", "width": 0.25}
    assert config["threads"] == 2


def test_values_that_do_not_parse_are_left_for_the_validator():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "name": {"type": "string"}}}
    assert coerce_strings({"n": "two", "name": "007", "other": "3"}, schema) == {"n": "two", "name": "007", "other": "3"}


def test_dataset_entries_under_additional_properties_are_typed():
    config = {"data": {"mine": {"enabled": "true", "source": "imagefolder", "image_size": "32"}}}
    coerce_config(config, SCHEMA)
    assert config["data"]["mine"] == {"enabled": True, "source": "imagefolder", "image_size": 32}


def test_tensorboard_tracking_is_off_by_default_and_switches_on_from_the_command_line():
    config = yaml.safe_load((SCHEMA.parent.parent / "config.yaml").read_text())
    assert config["tracking"] == {"tensorboard": False}
    del config["tracking"]  # a config written before the key existed
    validate(config, str(SCHEMA))
    assert config["tracking"] == {"tensorboard": False}
    switched = {"tracking": {"tensorboard": "true"}}  # --config tracking='{tensorboard: true}'
    coerce_config(switched, SCHEMA)
    assert switched["tracking"]["tensorboard"] is True


# ----------------------------------------------------------------------------- one source of defaults
REPO = SCHEMA.parent.parent
#: the config sections the library reads into dataclasses, and how it builds each from a dict
#: the one key every config needs: a dataset
DATA = {"data": {"digits": {"source": "digits"}}}
SECTIONS = {"pretrain": PretrainConfig.from_dict, "meta": MetaConfig.from_dict,
            "meta.hard_tasks": HardTaskConfig.from_dict}


def schema_filled(config: dict) -> dict:
    """``config`` with every default the schema states filled in, as the workflow's validation fills them."""
    validate(config, str(SCHEMA))
    return config


def test_config_yaml_states_every_schema_default_and_nothing_else():
    """config.yaml is the paper protocol and documents every key: outside the datasets (the user's
    choice, not defaults) each value it states is the schema's default, and it leaves none out."""
    stated = yaml.safe_load((REPO / "config.yaml").read_text())
    defaults = schema_filled({"data": stated["data"]})
    del stated["data"], defaults["data"]
    assert stated == defaults


def test_the_code_defaults_are_the_schema_defaults():
    defaults = schema_filled(dict(DATA))
    assert PretrainConfig().to_dict() == defaults["pretrain"]
    meta = MetaConfig().to_dict()
    assert meta["hard_tasks"].pop("enabled") is False  # the method switches hard tasks on, not the config
    assert meta == defaults["meta"]
    # the settings the workflow passes the library, when the library's callers pass none
    assert parse_setting(defaults["inference"]["batch_size"]) is None and AUTO == defaults["inference"]["batch_size"]
    for function in (open_gpu_job, evaluate, pretrain, meta_train, run_prediction):
        assert inspect.signature(function).parameters["device"].default == defaults["device"], function
    assert inspect.signature(run_prediction).parameters["inference_batch"].default == AUTO
    signature = inspect.signature(pretrain).parameters
    for key in ("way", "query", "val_episodes"):
        assert signature[key].default == defaults["protocol"][key], key


@pytest.mark.parametrize("section", SECTIONS)
def test_the_dataclasses_hold_exactly_the_schema_keys(section):
    """A key the schema allows but the code refuses (or the reverse) would fail a valid config."""
    build = SECTIONS[section]
    fields = {f.name for f in dataclasses.fields(build.__self__)} - {"enabled"}  # `enabled`: set by the method
    assert fields == set(section_schema(section)["properties"])


def bounded_keys():
    for section in SECTIONS:
        for key, spec in section_schema(section)["properties"].items():
            if spec.get("type") in ("integer", "number"):
                yield section, key, spec


@pytest.mark.parametrize(("section", "key", "spec"), list(bounded_keys()),
                         ids=[f"{s}.{k}" for s, k, _ in bounded_keys()])
def test_the_code_refuses_exactly_what_the_schema_refuses(section, key, spec):
    """Every bounded number: the bound itself (or just above an exclusive one) passes both the
    schema and the dataclass; just below fails both, with the key named."""
    build, name = SECTIONS[section], f"{section}.{key}"
    step = 1 if spec["type"] == "integer" else 1e-9
    if "minimum" in spec:
        allowed, refused = spec["minimum"], spec["minimum"] - step
    else:
        allowed, refused = spec["exclusiveMinimum"] + step, spec["exclusiveMinimum"]
    assert spec.get("maximum") is None and spec.get("exclusiveMaximum") is None, "add the upper bound here"

    def as_config(value):
        *parents, last = name.split(".")
        nested = {last: value}
        for parent in reversed(parents):
            nested = {parent: nested}
        return {**DATA, **nested}

    validate(as_config(allowed), str(SCHEMA))
    build({key: allowed})
    with pytest.raises(WorkflowError):
        validate(as_config(refused), str(SCHEMA))
    with pytest.raises(ConfigError, match=rf"{re.escape(name)} must be an? (integer|number)"):
        build({key: refused})


def test_enums_and_booleans_are_the_schemas():
    with pytest.raises(ConfigError, match=r"meta.hard_tasks.fill must be one of \['random', 'skip'\], got 'pad'"):
        HardTaskConfig.from_dict({"fill": "pad"})
    with pytest.raises(ConfigError, match="meta.first_order must be true or false, got 'no'"):
        MetaConfig.from_dict({"first_order": "no"})
    with pytest.raises(ConfigError, match=r"pretrain.normalize.std\[2\] must be a number > 0, got 0"):
        PretrainConfig.from_dict({"normalize": {"mean": [0, 0, 0], "std": [1, 1, 0]}})


def test_the_reference_normalisation_is_the_default_of_schema_code_and_transforms():
    """The schema's literal decimals are the reference's per-channel statistics the transforms default to."""
    assert PretrainConfig().normalize == {"mean": list(DEFAULT_MEAN), "std": list(DEFAULT_STD)}
