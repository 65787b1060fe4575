"""Errors a user can act on: each message says what failed, where, and what to do."""


class MTLError(RuntimeError):
    """Base class for every error the pipeline raises on purpose."""


class DataError(MTLError):
    """A raw file, HDF5 split or episode file is missing, corrupt or not what was expected."""


class ConfigError(MTLError):
    """A configuration value is invalid or inconsistent."""


class CheckpointError(MTLError):
    """A checkpoint or encoder does not match the model it is loaded into."""
