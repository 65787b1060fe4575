"""Transfer evaluation: which datasets train models, which are only tested, and which trained
dataset is scored on which other datasets (config ``transfer:``).

A dataset entry with ``test_only: true`` is a folder of images ``root/<class>/<image files>``
(source ``imagefolder``) with no train/val split: only its ``test.h5`` is built, it is never
pre-trained or meta-trained, and it is scored only as a transfer target. ``transfer`` maps a
trained dataset to the datasets its models are scored on, on each target's own saved test
episodes (the same file every source uses, so the rows pair).

Pure functions over the validated config (no torch, no Snakemake): the Snakefile's config check
(:func:`mtl.config.check_config`) lists :func:`transfer_problems` with the config's other
mistakes at parse time, so a misconfiguration stops the run before any job, with the key to fix.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

from mtl.errors import ConfigError

log = logging.getLogger(__name__)

#: The only source a test-only entry may have: a folder of class folders on disk.
TEST_ONLY_SOURCE = "imagefolder"


def enabled_datasets(config: Mapping) -> list[str]:
    return [name for name, entry in config["data"].items() if entry.get("enabled", True)]


def test_only_datasets(config: Mapping) -> list[str]:
    """Enabled datasets that are only scored (``test_only: true``), in config order."""
    return [name for name in enabled_datasets(config) if config["data"][name].get("test_only", False)]


def trained_datasets(config: Mapping) -> list[str]:
    """Enabled datasets that are pre-trained, meta-trained and scored in-domain, in config order."""
    test_only = set(test_only_datasets(config))
    return [name for name in enabled_datasets(config) if name not in test_only]


def check_transfer(config: Mapping) -> dict[str, list[str]]:
    """Validate ``data.<name>.test_only`` and ``transfer``; return ``{source: [targets]}`` as configured.

    Raises one ConfigError listing every problem of :func:`transfer_problems`.
    """
    problems = transfer_problems(config)
    if problems:
        listing = "\n".join(f"  - {line}" for line in problems)
        raise ConfigError(f"config `data`/`transfer` has {len(problems)} problem(s):\n{listing}")
    transfer = config.get("transfer") or {}
    test_only = test_only_datasets(config)
    unused = sorted(set(test_only) - {t for targets in transfer.values() for t in targets})
    if unused:
        log.warning("test-only dataset(s) %s are the target of no `transfer` entry: nothing scores them "
                    "(add e.g. transfer: {<trained dataset>: [%s]}).", ", ".join(unused), unused[0])
    return {source: list(targets) for source, targets in transfer.items()}


def transfer_problems(config: Mapping) -> list[str]:
    """A line per problem of ``data.<name>.test_only`` and ``transfer``, each naming the key to change.

    A test-only entry whose source is not ``imagefolder``; all enabled datasets test-only; a
    ``transfer`` source that is unknown, disabled or test-only; a target that is unknown, disabled
    or the source itself. (That a target has at least ``protocol.way`` classes is checked when its
    data are built.)
    """
    data = config["data"]
    enabled = enabled_datasets(config)
    test_only = test_only_datasets(config)
    problems = []
    for name in test_only:
        source = data[name]["source"]
        if source != TEST_ONLY_SOURCE:
            problems.append(
                f"data.{name}.test_only is true but data.{name}.source is {source!r}: a test-only dataset is a "
                f"folder of images root/<class>/<image files> (source: {TEST_ONLY_SOURCE}, path: the folder). "
                f"Set test_only: false to train and test {name}."
            )
    if enabled and len(test_only) == len(enabled):
        problems.append(
            f"every enabled dataset is test_only ({', '.join(test_only)}): nothing would be trained. Enable a "
            "dataset with train/val/test splits (data.<name>.enabled: true) to train the models they are scored with."
        )
    transfer = config.get("transfer") or {}
    for source, targets in transfer.items():
        where = f"transfer.{source}"
        if source not in data:
            problems.append(f"{where}: {source!r} is not a dataset of `data` (known: {', '.join(data)}).")
        elif source not in enabled:
            problems.append(f"{where}: dataset {source!r} is not enabled (data.{source}.enabled is false); "
                            "only an enabled, trained dataset has models to transfer.")
        elif source in test_only:
            problems.append(f"{where}: dataset {source!r} is test_only, so it trains no model; list it as a "
                            "target of a trained dataset instead.")
        for target in targets:
            if target == source:
                problems.append(f"{where} lists {source!r} itself: its in-domain rows are scored anyway; "
                                "list other datasets.")
            elif target not in data:
                problems.append(f"{where}: target {target!r} is not a dataset of `data` "
                                f"(known: {', '.join(data)}).")
            elif target not in enabled:
                problems.append(f"{where}: target {target!r} is not enabled (data.{target}.enabled is false).")
    return problems


def transfer_pairs(transfer: Mapping[str, list[str]]) -> list[tuple[str, str]]:
    """``(trained_on, target)`` pairs in config order."""
    return [(source, target) for source, targets in transfer.items() for target in targets]
