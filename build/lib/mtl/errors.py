"""Errors a user can act on: each message says what failed, where, and what to do."""


class MTLError(RuntimeError):
    """Base class for every error the pipeline raises on purpose."""


class DataError(MTLError):
    """A raw file, HDF5 split or episode file is missing, corrupt or not what was expected."""


class ConfigError(MTLError):
    """A configuration value is invalid or inconsistent."""


class CheckpointError(MTLError):
    """A checkpoint or encoder does not match the model it is loaded into."""


def check_known_keys(values: dict, dataclass_type, section: str) -> dict:
    """``values`` as a plain dict, after refusing any key ``dataclass_type`` lacks.

    A typo in a config section must stop the run with the valid keys, not silently train
    with a default.
    """
    import dataclasses

    values = dict(values or {})
    valid = [f.name for f in dataclasses.fields(dataclass_type)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in config {section}. Valid keys are {valid}.")
    return values
