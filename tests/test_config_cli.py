"""The config check as a user meets it on the command line: a dry run stops at parse time with a
few lines of ours."""
from __future__ import annotations

import pytest

from tests.workflow import run_snakemake, scenario_config


@pytest.mark.parametrize(("overlay", "message"), [
    ({"protocl": {"way": 3}}, "`protocl` is not a config key at the top level: did you mean `protocol`?"),
    ({"data": {"digits": {"source": "digits", "enabled": False}}},  # `data` replaces the scenario's datasets
     "no dataset is enabled (data.<name>.enabled is false for digits): set data.<name>.enabled: true for the "
     "dataset(s) to run"),
    ({"predict": {"shot": 3}}, "predict.shot is 3, not one of protocol.shots [1, 5] (models are trained per shot): "
                               "pick one of them, add it to protocol.shots, or null for the shot closest to your "
                               "support set"),
])
def test_a_config_mistake_stops_the_dry_run_with_one_short_message(tmp_path, overlay, message):
    """Before the check, a misspelt key printed the whole schema and config (879 lines); an
    unused dataset or shot failed only when a job ran, or trained new models."""
    result = run_snakemake(tmp_path, scenario_config("tiny", overlay), "-n", check=False)
    lines = (result.stdout + result.stderr).splitlines()
    assert result.returncode != 0
    header = next(i for i, line in enumerate(lines) if line.startswith("ConfigError in file"))
    assert lines[header + 1] == message  # ours, right under Snakemake's header
    assert all(line.startswith("  File ") for line in lines[header + 2:])  # then only the traceback's frames
    assert len(lines) < 15, "\n".join(lines)
