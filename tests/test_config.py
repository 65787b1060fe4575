"""mtl.config: nested --config values (strings from Snakemake's parser) typed by the schema, and the
schema as the one source of every default and bound (config.yaml and the code agree with it)."""
from __future__ import annotations

import copy
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
from mtl.config import check_config, coerce_config, coerce_strings, load_schema, schema_defaults, section_schema
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


def test_config_yaml_shows_every_dataset_key():
    """A dataset key config.yaml's entries leave out (it has no value every dataset needs) appears
    in one of its commented examples, so a user finds it by reading the file."""
    text = (REPO / "config.yaml").read_text()
    stated = {key for entry in yaml.safe_load(text)["data"].values() for key in entry}
    in_examples = set(re.findall(r"^\s*#\s+(\w+):", text, flags=re.MULTILINE))
    assert set(load_schema()["$defs"]["dataset"]["properties"]) - stated - in_examples == set()


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


# ----------------------------------------------------------------------------- the check before any job
def user_config(overlay: dict | None = None, **data_entries) -> dict:
    """config.yaml as a user edits it: its datasets replaced by the digits (or ``data_entries``), ``overlay`` on top."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["data"] = data_entries or {"digits": {"source": "digits"}}
    for key, value in (overlay or {}).items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    return config


def config_problem(config: dict, **options) -> str:
    """The message of the ConfigError ``check_config`` raises for ``config``."""
    with pytest.raises(ConfigError) as error:
        check_config(config, **options)
    return str(error.value)


def test_a_valid_config_passes_with_the_defaults_snakemakes_validate_fills_in():
    """The check fills in what the schema defaults, exactly as Snakemake's own validate would."""
    config = {"data": {"digits": {"source": "digits"}}, "protocol": {"way": 3}, "threads": "2"}
    expected = {"data": {"digits": {"source": "digits"}}, "protocol": {"way": 3}, "threads": 2}
    check_config(config)
    validate(expected, str(SCHEMA))
    assert config == expected
    assert config["data"]["digits"]["checksums"] == {} and config["predict"]["method"] is None


def test_defaults_are_fresh_copies_for_each_config():
    first, second = {"data": {"a": {"source": "digits"}}}, {"data": {"b": {"source": "digits"}}}
    check_config(first), check_config(second)
    first["data"]["a"]["mirrors"]["x"] = ["http://x"]
    assert second["data"]["b"]["mirrors"] == {} and schema_defaults("pretrain")["normalize"]["std"][0] > 0


@pytest.mark.parametrize(("typo", "message"), [
    ({"protocl": {"way": 3}}, "`protocl` is not a config key at the top level: did you mean `protocol`?"),
    ({"dataa": {}}, "`dataa` is not a config key at the top level: did you mean `data`?"),
    ({"metods": ["ft"]}, "`metods` is not a config key at the top level: did you mean `methods`?"),
])
def test_a_misspelt_top_level_key_is_named_with_the_key_it_resembles(typo, message):
    assert config_problem({**user_config(), **typo}) == message


@pytest.mark.parametrize(("section", "typo", "message"), [
    ("protocol", {"wya": 3}, "`protocol.wya` is not a config key of `protocol`: did you mean `protocol.way`?"),
    ("meta", {"hard_tasks": {"fil": "skip"}},
     "`meta.hard_tasks.fil` is not a config key of `meta.hard_tasks`: did you mean `meta.hard_tasks.fill`?"),
    ("data", {"digits": {"source": "digits", "imagesize": 32}},
     "`data.digits.imagesize` is not a config key of `data.digits`: did you mean `data.digits.image_size`?"),
])
def test_a_misspelt_key_inside_a_section_is_named_with_its_full_path(section, typo, message):
    config = user_config()
    config[section] = typo if section == "data" else {**config[section], **typo}
    assert config_problem(config) == message


def test_an_unknown_key_like_no_other_lists_the_valid_ones():
    message = config_problem(user_config({"tracking": {"wandb": True}}))
    assert message == "`tracking.wandb` is not a config key of `tracking`: the keys are tensorboard"


@pytest.mark.parametrize(("overlay", "key"), [({"methods": ["ft", "lr"]}, "methods"),
                                              ({"predict": {"method": "lr"}}, "predict.method")])
def test_a_renamed_method_is_refused_with_its_new_name(overlay, key):
    assert config_problem(user_config(overlay)) == (
        f"{key}: method 'lr' is now called 'logreg'; write logreg (results written under 'lr' still read as 'logreg')")


@pytest.mark.parametrize(("overlay", "message"), [
    ({"protocol": {"way": 1}}, "protocol.way is 1; it must be an integer >= 2"),
    ({"protocol": {"shots": []}}, "protocol.shots is []; it must be a list of 1 or more items, each an integer >= 1"),
    ({"protocol": {"shots": [1, "five"]}}, "protocol.shots[1] is 'five'; it must be an integer >= 1"),
    ({"backbone": {"name": "resnet13"}},
     "backbone.name is 'resnet13'; it must be one of ['resnet12', 'resnet25'] (did you mean 'resnet12'?)"),
    ({"methods": ["ft", "mtll"]}, "methods[1] is 'mtll'; it must be one of "
                                  f"{list(section_schema('methods')['items']['enum'])} (did you mean 'mtl'?)"),
    ({"predict": {"name": "my predictions"}},
     "predict.name: 'my predictions' does not match '^[A-Za-z0-9_.-]+$'"),
])
def test_a_bad_value_is_one_line_naming_the_key_the_value_and_what_it_must_be(overlay, message):
    assert config_problem(user_config(overlay)) == message


def test_a_dataset_without_its_source_names_the_sources():
    message = config_problem(user_config(mine={"path": "somewhere"}))
    assert message == ("data.mine.source is missing; it must be one of "
                       "['fc100', 'miniimagenet', 'tieredimagenet', 'imagefolder', 'digits']")


def test_every_mistake_is_listed_at_once_one_line_each():
    config = user_config({"protocol": {"way": 1}, "protocl": {}, "methods": ["lr"]})
    message = config_problem(config)
    assert message.splitlines() == [
        "3 config problems:",
        "  - `protocl` is not a config key at the top level: did you mean `protocol`?",
        "  - methods: method 'lr' is now called 'logreg'; write logreg (results written under 'lr' still read "
        "as 'logreg')",
        "  - protocol.way is 1; it must be an integer >= 2",
    ]


def test_no_enabled_dataset_is_refused():
    config = user_config(digits={"source": "digits", "enabled": False}, fc100={"source": "fc100", "enabled": False})
    assert config_problem(config) == ("no dataset is enabled (data.<name>.enabled is false for digits, fc100): "
                                      "set data.<name>.enabled: true for the dataset(s) to run")


def test_an_image_folder_needs_its_path():
    assert config_problem(user_config(mine={"source": "imagefolder", "image_size": 32})) == (
        "data.mine.path is not set: source imagefolder reads your own images; set it to the folder holding train/, "
        "val/ and test/, each with one sub-folder of images per class")


def test_an_image_folder_needs_its_image_size(tmp_path):
    assert config_problem(user_config(mine={"source": "imagefolder", "path": str(tmp_path)})) == (
        "data.mine.image_size is not set: your images are resized once, to squares of that many pixels a side, "
        "when the dataset is built; set it, e.g. 84 (resnet12's side)")
    check_config(user_config(mine={"source": "imagefolder", "path": str(tmp_path), "test_only": True},
                             digits={"source": "digits"}, ))  # a test-only folder takes the models' size


def test_a_path_that_is_not_a_folder_is_refused_relative_to_where_snakemake_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images.zip").write_bytes(b"")
    (tmp_path / "images").mkdir()
    check_config(user_config(mine={"source": "imagefolder", "path": "images", "image_size": 32}))
    assert config_problem(user_config(mine={"source": "imagefolder", "path": "imgs", "image_size": 32})) == (
        f"data.mine.path is 'imgs', which does not exist (seen from {tmp_path}); set it to the folder holding "
        "train/, val/ and test/, each with one sub-folder of images per class")
    assert "data.mine.path is 'images.zip', which is a file, not a folder" in config_problem(
        user_config(mine={"source": "imagefolder", "path": "images.zip", "image_size": 32}))
    assert config_problem(user_config(mini={"source": "miniimagenet", "path": "downloads"})).startswith(
        "data.mini.path is 'downloads', which does not exist")


def test_a_fetched_dataset_no_longer_needs_its_folder(tmp_path):
    """Its raw files were read and recorded (the download's manifest): the folder may be gone."""
    config = user_config(mine={"source": "imagefolder", "path": str(tmp_path / "gone"), "image_size": 32})
    manifest = str(tmp_path / "raw" / "{dataset}" / "manifest.json")
    assert "does not exist" in config_problem(copy.deepcopy(config), fetched_manifest=manifest)
    (tmp_path / "raw" / "mine").mkdir(parents=True)
    (tmp_path / "raw" / "mine" / "manifest.json").write_text("{}")
    check_config(config, fetched_manifest=manifest)


def test_mirrors_and_checksums_name_files_of_the_source():
    mini = {"source": "miniimagenet", "mirrors": {"mini-imagenet-cache-trian.pkl": ["https://example.org/t.pkl"]}}
    assert config_problem(user_config(mini=mini)) == (
        "data.mini.mirrors names 'mini-imagenet-cache-trian.pkl', not a raw file of source miniimagenet (its files: "
        "mini-imagenet-cache-train.pkl, mini-imagenet-cache-val.pkl, mini-imagenet-cache-test.pkl) "
        "(did you mean 'mini-imagenet-cache-train.pkl'?)")
    pinned = {"source": "miniimagenet", "checksums": {"mini-imagenet.tar.gz": "0" * 64}}  # the fallback archive
    check_config(user_config(mini=pinned))


def test_mirrors_of_a_source_that_downloads_nothing_are_refused():
    digits = {"source": "digits", "mirrors": {"digits.npz": ["https://example.org/digits.npz"]}}
    assert config_problem(user_config(digits=digits)) == (
        "data.digits.mirrors is set, but source digits downloads nothing; remove it")


def test_predict_shot_must_be_a_trained_shot():
    """Another shot would silently schedule new meta-training."""
    assert config_problem(user_config({"protocol": {"shots": [1, 5]}, "predict": {"shot": 3}})) == (
        "predict.shot is 3, not one of protocol.shots [1, 5] (models are trained per shot): pick one of them, "
        "add it to protocol.shots, or null for the shot closest to your support set")


@pytest.mark.parametrize(("method", "guess"), [("mtl_ht", ""), ("protoo", " (did you mean 'proto'?)")])
def test_predict_method_must_be_a_trained_method(method, guess):
    config = user_config({"methods": ["ft", "proto", "mtl"], "predict": {"method": method}})
    assert config_problem(config) == (
        f"predict.method is {method!r}, which `methods` does not list, so no model of it is trained: pick one of "
        f"ft, proto, mtl{guess}, add it to `methods`, or null for the best of them")


@pytest.mark.parametrize(("trained_on", "why"), [
    ("minimagenet", "is not a dataset of `data` (did you mean 'miniimagenet'?)"),
    ("fc100", "is not enabled (data.fc100.enabled is false)"),
    ("parts", "is test_only, so it trains no model"),
])
def test_predict_trained_on_must_be_a_trained_dataset(trained_on, why, tmp_path):
    config = user_config({"predict": {"trained_on": trained_on}, "transfer": {"miniimagenet": ["parts"]}},
                         miniimagenet={"source": "miniimagenet"}, fc100={"source": "fc100", "enabled": False},
                         parts={"source": "imagefolder", "path": str(tmp_path), "test_only": True})
    assert config_problem(config) == (f"predict.trained_on is {trained_on!r}, which {why}: set it to one of the "
                                      "trained datasets (miniimagenet) or null for the only one")


def test_transfer_mistakes_are_listed_with_the_others():
    config = user_config({"transfer": {"digits": ["nope"]}, "predict": {"shot": 2}})
    message = config_problem(config)
    assert message.startswith("2 config problems:\n  - predict.shot is 2")
    assert message.endswith("\n  - transfer.digits: target 'nope' is not a dataset of `data` (known: digits).")
