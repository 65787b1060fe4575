"""mtl.config: nested --config values (strings from Snakemake's parser) typed by the schema."""
from __future__ import annotations

from pathlib import Path

import yaml
from snakemake.utils import validate

from mtl.config import coerce_config, coerce_strings

SCHEMA = Path(__file__).resolve().parent.parent / "rules" / "config.schema.yaml"


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
