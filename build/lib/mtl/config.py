"""Config values from the command line, typed by the schema.

Snakemake parses a nested ``--config key='{a: 2}'`` with YAML's BaseLoader, so every scalar inside
arrives as a string ('2', 'true'); validation would then refuse ``'2'`` for an integer key. This
converts such strings where the schema expects an integer, a number or a boolean, before
validation, so ``--config pretrain='{gpus: 2}'`` or ``--config protocol='{seeds: [1, 2]}'`` work as
users expect. Anything else is left for the validator to judge.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

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
