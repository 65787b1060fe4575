"""Transfer evaluation's configuration: test-only datasets and the `transfer` key, checked by
mtl.transfer before any job (unit tests), and what the workflow plans for them (dry runs)."""
from __future__ import annotations

import pytest

from mtl.errors import ConfigError
from mtl import transfer as roles  # not `from ... import test_only_datasets`: pytest would collect it
from mtl.transfer import check_transfer, transfer_pairs
from tests.workflow import job_counts, run_snakemake, scenario_config


def config(transfer=None, **extra_data):
    data = {
        "miniimagenet": {"enabled": True, "source": "miniimagenet"},
        "fc100": {"enabled": True, "source": "fc100"},
        "tieredimagenet": {"enabled": False, "source": "tieredimagenet"},
        "my_parts": {"enabled": True, "source": "imagefolder", "path": "/parts", "test_only": True},
        **extra_data,
    }
    return {"data": data, "transfer": transfer or {}}


def test_datasets_split_into_trained_and_test_only():
    conf = config()
    assert roles.trained_datasets(conf) == ["miniimagenet", "fc100"]
    assert roles.test_only_datasets(conf) == ["my_parts"]


def test_a_valid_transfer_is_returned_as_configured():
    transfer = check_transfer(config({"miniimagenet": ["my_parts", "fc100"], "fc100": ["miniimagenet"]}))
    assert transfer == {"miniimagenet": ["my_parts", "fc100"], "fc100": ["miniimagenet"]}
    assert transfer_pairs(transfer) == [("miniimagenet", "my_parts"), ("miniimagenet", "fc100"),
                                        ("fc100", "miniimagenet")]


@pytest.mark.parametrize("transfer, message", [
    ({"cifar": ["fc100"]}, "transfer.cifar: 'cifar' is not a dataset of `data`"),
    ({"my_parts": ["fc100"]}, "transfer.my_parts: dataset 'my_parts' is test_only, so it trains no model"),
    ({"tieredimagenet": ["fc100"]}, "transfer.tieredimagenet: dataset 'tieredimagenet' is not enabled"),
    ({"fc100": ["fc100"]}, "transfer.fc100 lists 'fc100' itself"),
    ({"fc100": ["parts"]}, "transfer.fc100: target 'parts' is not a dataset of `data`"),
    ({"fc100": ["tieredimagenet"]}, "transfer.fc100: target 'tieredimagenet' is not enabled"),
])
def test_a_misconfigured_transfer_names_the_key(transfer, message):
    with pytest.raises(ConfigError, match="1 problem") as error:
        check_transfer(config(transfer))
    assert message in str(error.value)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError, match="3 problem") as error:
        check_transfer(config({"cifar": ["fc100"], "fc100": ["fc100", "nope"]}))
    assert "transfer.cifar" in str(error.value) and "'nope'" in str(error.value)


def test_test_only_needs_an_image_folder_and_something_to_train():
    with pytest.raises(ConfigError, match=r"data.fc100.test_only is true but data.fc100.source is 'fc100'"):
        check_transfer(config(fc100={"enabled": True, "source": "fc100", "test_only": True}))
    only_tests = config()
    only_tests["data"] = {"my_parts": only_tests["data"]["my_parts"]}
    with pytest.raises(ConfigError, match="every enabled dataset is test_only"):
        check_transfer(only_tests)


def test_an_unscored_test_only_dataset_is_a_warning(caplog):
    assert check_transfer(config()) == {}
    assert "my_parts" in caplog.text and "target of no `transfer` entry" in caplog.text


# ----------------------------------------------------------------------------- dry runs
def transfer_scenario(tmp_path, transfer, seeds=(1, 2)):
    """The tiny scenario plus a test-only folder (empty here: a dry run reads no images)."""
    (tmp_path / "parts").mkdir()
    conf = scenario_config("tiny", {"protocol": {"seeds": list(seeds)}})
    conf["data"]["my_parts"] = {"source": "imagefolder", "path": "parts", "test_only": True}
    conf["transfer"] = transfer
    return conf


def test_dry_run_plans_transfer_evaluations_and_no_training_of_the_test_only_folder(tmp_path):
    result = run_snakemake(tmp_path, transfer_scenario(tmp_path, {"digits": ["my_parts"]}), "-n")
    counts = job_counts(result.stdout)
    assert counts["build_hdf5"] == 1 and counts["build_test_hdf5"] == 1 and counts["download"] == 2
    assert counts["pretrain"] == 2 and counts["meta_train"] == 2 * 2 * 2  # digits only: seeds x (mtl, mtl_ht) x shots
    assert counts["evaluate"] == counts["evaluate_transfer"] == 2 * 5 * 2  # seeds x methods x shots
    assert counts["episodes"] == 2 * 2  # digits and my_parts, each shot
    assert "results/digits/resnet12/seed2/mtl_ht/5shot/on_my_parts/metrics.json" in result.stdout
    assert "results/my_parts/resnet12" not in result.stdout


@pytest.mark.parametrize("transfer, message", [
    ({"mnist": ["my_parts"]}, "transfer.mnist: 'mnist' is not a dataset of `data`"),
    ({"my_parts": ["digits"]}, "transfer.my_parts: dataset 'my_parts' is test_only"),
])
def test_dry_run_of_a_misconfigured_transfer_fails_naming_the_key(tmp_path, transfer, message):
    result = run_snakemake(tmp_path, transfer_scenario(tmp_path, transfer), "-n", check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


@pytest.mark.parametrize("stored, model", [(32, 84), (84, 32), (8, 16)])
def test_a_target_stored_at_another_size_is_resized_to_the_models_size(stored, model):
    """Evaluation feeds every image through the model's EvalTransform (its stored image_size), so a
    target's HDF5 may hold any size, e.g. FC100's 32 px scored by an 84 px miniImageNet model."""
    import numpy as np

    from mtl.data.transforms import EvalTransform

    images = np.random.default_rng(0).integers(0, 256, (2, stored, stored, 3), dtype=np.uint8)
    assert EvalTransform(model)(images).shape == (2, 3, model, model)
