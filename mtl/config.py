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
"""
from __future__ import annotations

import copy
import functools
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mtl.errors import ConfigError

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
