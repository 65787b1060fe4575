"""The config schema (``mtl/config.schema.yaml``) as the library reads it.

Defaults and bounds: the schema is the one statement of every key's default and bounds.
:func:`schema_defaults` gives the trainers' config dataclasses their defaults and
:func:`check_section` checks their values against the schema's types, bounds and enums, so a
library call refuses what the workflow's validation refuses.

Command-line values: Snakemake parses a nested ``--config key='{a: 2}'`` with YAML's BaseLoader, so every scalar inside
arrives as a string ('2', 'true'); validation would then refuse ``'2'`` for an integer key. This
converts such strings where the schema expects an integer, a number or a boolean, before
validation, so ``--config pretrain='{gpus: 2}'`` or ``--config protocol='{seeds: [1, 2]}'`` work as
users expect. Anything else is left for the validator to judge.

The workflow's check: :func:`check_config`, which the Snakefile calls once as it reads the config,
so every mistake stops the run before any job, a short line each (key, value, fix) instead of
a schema dump: unknown keys ("did you mean"), values the schema refuses, and what it cannot say
(an enabled dataset, its folder, predict's choices among what is trained).
"""
from __future__ import annotations

import copy
import difflib
import functools
import math
import numbers
import reprlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from mtl import transfer
from mtl.data import sources
from mtl.errors import ConfigError
from mtl.methods import NAMES, RENAMED

_TRUE, _FALSE = {"true", "True", "yes"}, {"false", "False", "no"}


def coerce_strings(value: Any, schema: Mapping, root: Mapping | None = None) -> Any:
    """``value`` with numeric/boolean strings converted where ``schema`` wants those types.

    ``root`` is the whole schema, against which local ``$ref``s (``#/$defs/...``) resolve.
    """
    root = schema if root is None else root
    schema = _resolve(schema, root)
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    if isinstance(value, str):
        return _typed(value, types)
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [coerce_strings(item, schema["items"], root) for item in value]
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {key: coerce_strings(item, properties.get(key, extra if isinstance(extra, Mapping) else {}), root)
                for key, item in value.items()}
    return value


def _resolve(schema: Mapping, root: Mapping) -> Mapping:
    reference = schema.get("$ref")
    if not isinstance(reference, str) or not reference.startswith("#/"):
        return schema
    target = root
    for part in reference[2:].split("/"):
        target = target.get(part, {})
    return target


def _typed(text: str, types: list[str]) -> Any:
    if "string" in types:
        return text
    if "integer" in types:
        try:
            return int(text)
        except ValueError:
            pass
    if "number" in types:
        try:
            return float(text)
        except ValueError:
            pass
    if "boolean" in types and text in _TRUE | _FALSE:
        return text in _TRUE
    if "null" in types and text in {"null", "~", "None"}:
        return None
    return text


def coerce_config(config: dict, schema_path: str | Path) -> None:
    """Convert, in place, the command line's stringly-typed values of ``config`` (see module doc)."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    config.update(coerce_strings(config, schema))


# ----------------------------------------------------------------------------- defaults and bounds
#: The one statement of every config key's type, default and bounds. The dataclasses of the
#: trainers take their defaults from it and check values against it, so config.yaml, the schema
#: and the code cannot drift apart (tests/test_config.py holds config.yaml to it too).
# inside the package, so a plain (non-editable) install reads it too
SCHEMA_PATH = Path(__file__).resolve().parent / "config.schema.yaml"


@functools.cache
def load_schema() -> dict:
    """The parsed ``mtl/config.schema.yaml`` (read once per process)."""
    try:
        return yaml.safe_load(SCHEMA_PATH.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{SCHEMA_PATH} is missing: mtl reads its config defaults and bounds from the "
                          "repository's schema; install mtl from a checkout (pip install -e .)") from None


def section_schema(section: str) -> Mapping:
    """The schema of a dotted config section, e.g. ``pretrain`` or ``meta.hard_tasks``."""
    root = load_schema()
    schema: Mapping = root
    for part in section.split("."):
        schema = _resolve(_resolve(schema, root).get("properties", {}).get(part, {}), root)
        if not schema:
            raise KeyError(f"the config schema has no section {section!r}")
    return schema


def schema_defaults(section: str) -> dict:
    """``{key: default}`` of the keys of ``section`` whose schema states a default (fresh copies)."""
    properties = section_schema(section).get("properties", {})
    return {key: copy.deepcopy(spec["default"]) for key, spec in properties.items() if "default" in spec}


def check_section(values: Mapping, section: str) -> dict:
    """``values`` of config ``section`` checked against the schema's types, bounds and enums.

    Returns the values normalised (numpy integers to ``int``, numbers to ``float``: YAML reads
    ``5e-4`` without a dot as a string); a bad value is a ConfigError naming the key, the allowed
    values and the value given. Keys the schema does not describe are returned unchecked.
    """
    root = load_schema()
    properties = section_schema(section).get("properties", {})
    return {key: _checked(value, properties[key], f"{section}.{key}", root) if key in properties else value
            for key, value in values.items()}


def check_value(value: Any, key: str, *, name: str | None = None) -> Any:
    """``value`` checked against the schema of the dotted config ``key`` (e.g. ``meta.update_step``),
    for a library argument that means what that key means; the error names ``name`` (default ``key``)."""
    section, _, last = key.rpartition(".")
    return _checked(value, section_schema(section)["properties"][last], name or key, load_schema())


def _checked(value: Any, schema: Mapping, name: str, root: Mapping) -> Any:
    schema = _resolve(schema, root)
    types = schema.get("type", [])
    if not types:  # the schema says nothing of this value
        return value
    for kind in [types] if isinstance(types, str) else types:
        checked = _as_type(value, kind, schema, name, root)
        if checked is not _REFUSED and _within(checked, schema):
            return checked
    raise ConfigError(f"{name} must be {_describe(schema, root)}, got {value!r}")


_REFUSED = object()


def _as_type(value: Any, kind: str, schema: Mapping, name: str, root: Mapping) -> Any:
    if isinstance(value, bool):
        return value if kind == "boolean" else _REFUSED
    if kind == "null":
        return value if value is None else _REFUSED
    if kind == "integer":
        return int(value) if isinstance(value, numbers.Integral) else _REFUSED
    if kind == "number":
        try:
            number = float(value) if isinstance(value, (numbers.Real, str)) else math.nan
        except ValueError:
            return _REFUSED
        return number if math.isfinite(number) else _REFUSED
    if kind == "string":
        return value if isinstance(value, str) else _REFUSED
    if kind == "array" and isinstance(value, (list, tuple)):
        items = schema.get("items", {})
        return [_checked(item, items, f"{name}[{i}]", root) for i, item in enumerate(value)]
    if kind == "object" and isinstance(value, Mapping):
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties", {})
        if set(schema.get("required", [])) - set(value) or (extra is False and set(value) - set(properties)):
            return _REFUSED
        return {key: _checked(item, properties.get(key, extra if isinstance(extra, Mapping) else {}),
                              f"{name}.{key}", root) for key, item in value.items()}
    return _REFUSED


def _within(value: Any, schema: Mapping) -> bool:
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, list):
        return schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", math.inf)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return all(compare(value, schema[key]) for key, (compare, _) in _BOUNDS.items() if key in schema)
    return True


_BOUNDS = {
    "minimum": (lambda value, bound: value >= bound, ">="),
    "exclusiveMinimum": (lambda value, bound: value > bound, ">"),
    "maximum": (lambda value, bound: value <= bound, "<="),
    "exclusiveMaximum": (lambda value, bound: value < bound, "<"),
}
_NOUNS = {"integer": "an integer", "number": "a number", "boolean": "true or false", "string": "a string",
          "null": "null", "array": "a list", "object": "a mapping"}


def _describe(schema: Mapping, root: Mapping) -> str:
    """What a value must be, in words: ``an integer >= 1``, ``one of ['random', 'skip']``."""
    schema = _resolve(schema, root)
    if "enum" in schema:
        return f"one of {schema['enum']}"
    types = schema.get("type", [])
    kinds = [types] if isinstance(types, str) else list(types)
    bounds = " and ".join(f"{word} {schema[key]}" for key, (_, word) in _BOUNDS.items() if key in schema)
    text = " or ".join(_NOUNS.get(kind, kind) for kind in kinds) + (f" {bounds}" if bounds else "")
    if "array" in kinds:
        count = (f"{schema['minItems']}" if schema.get("minItems") == schema.get("maxItems")
                 else f"{schema.get('minItems', 0)} or more")
        text += f" of {count} items, each {_describe(schema.get('items', {}), root)}"
    if "object" in kinds and schema.get("required"):
        text += f" with keys {schema['required']}"
    return text


# ----------------------------------------------------------------------------- the workflow's check
def check_config(config: dict, *, fetched_manifest: str | None = None) -> None:
    """Check the workflow's ``config`` before any job runs, filling in the schema's defaults in place.

    ``--config``'s strings are typed first (:func:`coerce_config`). Then every key name (an unknown
    one gets the closest valid name, "did you mean"; a method's old name, :data:`mtl.methods.RENAMED`,
    its new one) and every value are checked against the schema; if they pass, what the schema
    cannot say is checked on the filled-in config (:func:`consistency_problems`). The mistakes found
    raise one ConfigError, a line each naming the key, the value and the fix: no schema dump.

    ``fetched_manifest`` (e.g. ``data/raw/{dataset}/manifest.json``) is where a dataset's fetched
    raw files are recorded: a dataset fetched already no longer reads its ``path``, so that folder
    may be gone.
    """
    root = load_schema()
    config.update(coerce_strings(config, root))
    problems = list(_unknown_keys(config, root, root, ())) + _renamed_methods(config) + _schema_problems(config, root)
    if not problems:
        problems = consistency_problems(config, fetched_manifest=fetched_manifest)
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else
                          f"{len(problems)} config problems:\n" + "\n".join(f"  - {line}" for line in problems))


def _dotted(path) -> str:
    """A key's place in the config as users write it: ``data.mine.path``, ``protocol.shots[0]``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _did_you_mean(value: Any, choices) -> str:
    matches = difflib.get_close_matches(str(value), [str(choice) for choice in choices], n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def _unknown_keys(value: Any, schema: Mapping, root: Mapping, path: tuple) -> Iterator[str]:
    """A line per key the schema does not allow (``additionalProperties: false``), at every depth."""
    schema = _resolve(schema, root)
    if not isinstance(value, Mapping):
        return
    properties, extra = schema.get("properties", {}), schema.get("additionalProperties", {})
    for key, item in value.items():
        if key in properties or isinstance(extra, Mapping):
            yield from _unknown_keys(item, properties.get(key, extra), root, (*path, key))
        elif extra is False:
            where = f"of `{_dotted(path)}`" if path else "at the top level"
            close = difflib.get_close_matches(str(key), list(properties), n=1)
            fix = f"did you mean `{_dotted((*path, close[0]))}`?" if close else f"the keys are {', '.join(properties)}"
            yield f"`{_dotted((*path, key))}` is not a config key {where}: {fix}"


def _renamed_methods(config: Mapping) -> list[str]:
    methods = config.get("methods")
    named = [("methods", name) for name in methods if isinstance(name, str)] if isinstance(methods, list) else []
    predict = config.get("predict")
    if isinstance(predict, Mapping) and isinstance(predict.get("method"), str):
        named.append(("predict.method", predict["method"]))
    return [f"{key}: method {name!r} is now called {RENAMED[name]!r}; write {RENAMED[name]} "
            f"(results written under {name!r} still read as {RENAMED[name]!r})"
            for key, name in named if name in RENAMED]


#: Schema keywords whose failure :func:`_describe` words as the check_section errors do.
_DESCRIBED = {"type", "enum", "minItems", "maxItems", *_BOUNDS}


def _schema_problems(config: dict, root: Mapping) -> list[str]:
    """A line per value the schema refuses, the schema's defaults filled into ``config`` meanwhile.

    Unknown keys and old method names are left to the lines of :func:`_unknown_keys` and
    :func:`_renamed_methods`, which name the fix.
    """
    problems = []
    for error in _default_filling_validator(root).iter_errors(config):
        where = _dotted(error.absolute_path)
        if error.validator == "additionalProperties" or (where.startswith("methods[") and error.instance in RENAMED):
            continue
        if error.validator == "required":
            for key in [key for key in error.validator_value if key not in error.instance]:
                spec = error.schema.get("properties", {}).get(key, {})
                problems.append(f"{_dotted((*error.absolute_path, key))} is missing; it must be "
                                f"{_describe(spec, root)}" if spec else f"{key} is missing")
        elif error.validator in _DESCRIBED:
            guess = _did_you_mean(error.instance, error.schema["enum"]) if "enum" in error.schema else ""
            problems.append(f"{where} is {_SHORT.repr(error.instance)}; it must be {_describe(error.schema, root)}"
                            f"{guess}")
        else:  # uniqueItems, pattern, minProperties: jsonschema's words, cut short
            message = error.message if len(error.message) <= 160 else error.message[:157] + "..."
            problems.append(f"{where or 'the config'}: {message}")
    return problems


_SHORT = reprlib.Repr()  # a value quoted in a problem line stays short (Python 3.11 takes no arguments here)
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 6, 4, 2


def _default_filling_validator(root: Mapping):
    """A JSON-schema validator that fills in each missing key's default (a fresh copy) before checking it,
    as Snakemake's ``validate(config, schema)`` does (the jsonschema FAQ's recipe)."""
    from jsonschema import Draft202012Validator, validators  # only the workflow's parse needs it

    check_properties = Draft202012Validator.VALIDATORS["properties"]

    def fill_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, spec in properties.items():
                if "default" in spec:
                    instance.setdefault(key, copy.deepcopy(spec["default"]))
        yield from check_properties(validator, properties, instance, schema)

    return validators.extend(Draft202012Validator, {"properties": fill_defaults})(root)


def consistency_problems(config: Mapping, *, fetched_manifest: str | None = None) -> list[str]:
    """A line per mistake the schema cannot see in a valid, filled-in ``config``.

    No dataset enabled; an enabled dataset's ``path`` missing (source imagefolder, which needs an
    ``image_size`` too) or not a folder (unless its raw files were fetched already:
    ``fetched_manifest``, see :func:`check_config`);
    ``mirrors`` or ``checksums`` that name no file of the source, or that a local source never
    reads; ``predict``'s trained_on, method and shot outside the trained datasets, ``methods`` and
    ``protocol.shots`` (which would silently train new models); the ``transfer`` section's datasets
    (:func:`mtl.transfer.transfer_problems`).
    """
    data = config["data"]
    problems = []
    if not transfer.enabled_datasets(config):
        problems.append(f"no dataset is enabled (data.<name>.enabled is false for {', '.join(data)}): set "
                        "data.<name>.enabled: true for the dataset(s) to run")
    for name in transfer.enabled_datasets(config):
        fetched = fetched_manifest is not None and Path(fetched_manifest.format(dataset=name)).is_file()
        problems += _path_problems(name, data[name], fetched) + _raw_file_problems(name, data[name])
    problems += _predict_problems(config) + transfer.transfer_problems(config)
    return problems


def _path_problems(name: str, entry: Mapping, fetched: bool) -> list[str]:
    """``path`` names an existing folder (a must for source imagefolder, which also needs
    ``image_size`` unless test_only), or is null."""
    source, path, problems = entry["source"], entry["path"], []
    if source == "imagefolder":
        holding = ("the folder holding one sub-folder of images per class" if entry["test_only"]
                   else "the folder holding train/, val/ and test/, each with one sub-folder of images per class")
        if not entry["test_only"] and entry["image_size"] is None:
            problems.append(f"data.{name}.image_size is not set: your images are resized once, to squares of that "
                            "many pixels a side, when the dataset is built; set it, e.g. 84 (resnet12's side)")
    else:
        holding = "the folder holding the raw files you downloaded yourself, or null to download them"
    if path is None:
        if source == "imagefolder":
            problems.append(f"data.{name}.path is not set: source imagefolder reads your own images; set it to "
                            f"{holding}")
    elif not fetched and not Path(path).expanduser().is_dir():
        what = ("is a file, not a folder" if Path(path).expanduser().exists()
                else f"does not exist (seen from {Path.cwd()})")
        problems.append(f"data.{name}.path is {path!r}, which {what}; set it to {holding}")
    return problems


def _raw_file_problems(name: str, entry: Mapping) -> list[str]:
    """``mirrors`` and ``checksums`` must name raw files of a registry source (the download checks
    them only when it runs, and a local source would ignore them)."""
    source = entry["source"]
    problems = []
    for key in ("mirrors", "checksums"):
        if not entry[key]:
            continue
        if source not in sources.SOURCES:
            problems.append(f"data.{name}.{key} is set, but source {source} downloads nothing; remove it")
            continue
        registry = sources.SOURCES[source]
        # a checksum may pin a last-resort archive too; mirrors are per raw file
        files = [f.name for f in registry.files] + ([a.name for a in registry.archives] if key == "checksums" else [])
        problems += [f"data.{name}.{key} names {file!r}, not a raw file of source {source} (its files: "
                     f"{', '.join(files)}){_did_you_mean(file, files)}" for file in entry[key] if file not in files]
    return problems


def _predict_problems(config: Mapping) -> list[str]:
    """``predict``'s choices must be among what the workflow trains: another value would schedule
    new training (a shot or method) or find no models (a dataset)."""
    predict, problems = config["predict"], []
    trained, chosen, methods = transfer.trained_datasets(config), predict["trained_on"], config["methods"]
    if chosen is not None and chosen not in trained:
        why = ("is test_only, so it trains no model" if config["data"].get(chosen, {}).get("test_only")
               else f"is not enabled (data.{chosen}.enabled is false)" if chosen in config["data"]
               else f"is not a dataset of `data`{_did_you_mean(chosen, trained)}")
        problems.append(f"predict.trained_on is {chosen!r}, which {why}: set it to one of the trained datasets "
                        f"({', '.join(trained) or 'none: enable one'}) or null for the only one")
    method = predict["method"]
    if method is not None and method not in methods:
        guess = "" if method in NAMES else _did_you_mean(method, methods)
        problems.append(f"predict.method is {method!r}, which `methods` does not list, so no model of it is "
                        f"trained: pick one of {', '.join(methods)}{guess}, add it to `methods`, or null for the "
                        "best of them")
    shots = config["protocol"]["shots"]
    if predict["shot"] is not None and predict["shot"] not in shots:
        problems.append(f"predict.shot is {predict['shot']}, not one of protocol.shots {shots} (models are trained "
                        f"per shot): pick one of them, add it to protocol.shots, or null for the shot closest to "
                        "your support set")
    return problems
