"""Pre-training in several processes (gloo on the CPU) trains as one process does, and resumes.

The promise (mtl/distributed/, mtl/train/pretrain.py): N processes with the same global batch
see the same images in the same order with the same augmentation, normalise with the whole
batch's BN statistics and take the whole batch's mean gradient, so their weights equal the
one-process weights up to float rounding.

Tolerance: on this machine's CPU, after 12 SGD steps of the tiny network with uneven parts
(batches of 21 split 11/10), the largest difference from the one-process run was 1.2e-7 in a
parameter and 7.2e-7 in a BN running variance (values of order 1-4); the tests allow 1e-5.
Rounding grows with the training's own sensitivity: at lr 0.05 the same net diverges (loss 3.7 at
epoch 1) and one- and two-process runs drift apart by 1e-3 within 8 steps, as two one-process
runs with reordered sums would, so the tests train at a stable learning rate.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mtl.data.hdf5 import write_split
from mtl.distributed.launch import choose_launcher, launch, srun_command, torchrun_args
from mtl.distributed.ranks import shard
from mtl.errors import ConfigError, MTLError
from mtl.machine import cpu_model
from mtl.train.pretrain import pretrain
from tests.slurm_cluster import run_workflow_on_slurm
from tests.test_pretrain import BACKBONE
from tests.test_slurm import assert_all_remote_jobs_went_through_slurm
from tests.workflow import REPO, run_snakemake, scenario_config

TOLERANCE = 1e-5
CONFIG = {"epochs": 4, "batch_size": 21, "lr": 0.01, "num_workers": 0, "step_size": 3}


# ----------------------------------------------------------------------------- pure helpers
def test_parts_of_a_batch_cover_it_in_order_and_differ_by_at_most_one():
    for size, world in [(21, 2), (16, 4), (2, 3), (7, 1)]:
        parts = [shard(size, r, world) for r in range(world)]
        assert np.concatenate([np.arange(size)[p] for p in parts]).tolist() == list(range(size))
        lengths = [p.stop - p.start for p in parts]
        assert max(lengths) - min(lengths) <= 1
    assert [shard(2, r, 3).stop - shard(2, r, 3).start for r in range(3)] == [1, 1, 0]


def test_launcher_is_srun_only_inside_a_slurm_batch_job(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert choose_launcher("auto", {}) == "torchrun"
    assert choose_launcher("auto", {"SLURM_JOB_ID": "7"}) == "srun"
    # inside `srun --pty bash` a new step could not get the step's resources: train on this node
    assert choose_launcher("auto", {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0"}) == "torchrun"
    assert choose_launcher("torchrun", {"SLURM_JOB_ID": "7"}) == "torchrun"
    with pytest.raises(ConfigError, match="unknown launcher 'mpirun'"):
        choose_launcher("mpirun")


def test_srun_starts_one_torchrun_agent_per_node_meeting_at_a_c10d_rendezvous():
    spec = {"target": "m:f", "kwargs": {}, "device": "auto", "threads": 3, "log": None}
    command = srun_command(8, 2, spec, endpoint="node1:29400", job_id="42", threads_per_worker=3)
    assert command[:4] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1"]
    assert "--cpus-per-task=12" in command  # 4 workers per node x 3 threads
    agent = command[command.index("torch.distributed.run") + 1:]
    assert agent[:5] == ["--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
                         "--rdzv-endpoint=node1:29400", "--rdzv-id=slurm-42"]
    assert torchrun_args(2, spec)[:3] == ["--nnodes=1", "--nproc-per-node=2", "--standalone"]


def test_process_count_must_be_a_positive_integer():
    with pytest.raises(ConfigError, match=r"pretrain.gpus.*>= 1, got 0"):
        launch(print, {}, processes=0)


# ----------------------------------------------------------------------------- synchronised BN on gloo
def batchnorm_parts(out_dir: str, device) -> None:
    """Worker target: BN steps on this rank's part of two fixed batches (one part is empty)."""
    from mtl.distributed import ranks, sync_bn

    torch.manual_seed(0)
    batches = [torch.randn(2, 4, 3, 3) * 3 + 1, torch.randn(5, 4, 3, 3)]
    weights = [torch.randn_like(b) for b in batches]
    model = nn.Sequential(nn.BatchNorm2d(4))
    sync_bn.sync_batchnorm_(model, device)
    out = {}
    for step, (batch, weight) in enumerate(zip(batches, weights)):
        part = ranks.shard(len(batch))
        x = batch[part].clone().requires_grad_(True)
        y = model(x)
        (y * weight[part]).sum().backward()
        out[f"y{step}"], out[f"dx{step}"] = y.detach(), x.grad
    out["dweight"], out["dbias"] = model[0].weight.grad, model[0].bias.grad
    out["running_mean"], out["running_var"] = model[0].running_mean, model[0].running_var
    torch.save(out, Path(out_dir) / f"rank{ranks.rank()}.pt")


@pytest.mark.slow  # three gloo worker processes (7-9 s): out of the quick loop, in CI
def test_synchronised_batchnorm_on_gloo_equals_batchnorm_on_the_whole_batch(tmp_path):
    launch(batchnorm_parts, {"out_dir": str(tmp_path)}, processes=3, device="cpu", threads=1,
           log_path=tmp_path / "log")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(3)]

    torch.manual_seed(0)
    batches = [torch.randn(2, 4, 3, 3) * 3 + 1, torch.randn(5, 4, 3, 3)]
    weights = [torch.randn_like(b) for b in batches]
    reference = nn.BatchNorm2d(4)
    for step, (batch, weight) in enumerate(zip(batches, weights)):
        x = batch.clone().requires_grad_(True)
        y = reference(x)
        (y * weight).sum().backward()
        for name, whole in (("y", y.detach()), ("dx", x.grad)):
            joined = torch.cat([r[f"{name}{step}"] for r in ranks])
            torch.testing.assert_close(joined, whole, atol=TOLERANCE, rtol=0)
    # parameter gradients are per rank (DDP sums them); statistics are the same on every rank
    torch.testing.assert_close(sum(r["dweight"] for r in ranks), reference.weight.grad, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(sum(r["dbias"] for r in ranks), reference.bias.grad, atol=TOLERANCE, rtol=0)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], reference.running_mean, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(r["running_var"], reference.running_var, atol=TOLERANCE, rtol=0)


# ----------------------------------------------------------------------------- pre-training
def make_split(path, n_classes, per_class, seed, split):
    """Class c = a colour (the same for every seed) plus normal noise.

    Not tests/conftest.py's tiny_split, on purpose: the 1e-5 agreement below was measured on these
    images. On the AMD EPYC VM, with augmentation on, tiny_split's images (other colours, uniform
    noise) put the two-worker weights up to 1.4e-1 (a BN bias) away from one process's on 1 thread,
    while these agree to 2e-6: a max-pool near-tie flipped by summation order, as explained at
    AMD_RELATIVE_BOUND (one process on 2 threads is as far away), which these images happen not to
    hit with augmentation on (bench/distributed_agreement.py)."""
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(0).integers(0, 256, size=(n_classes, 3))
    labels = np.repeat(np.arange(n_classes), per_class)
    noise = rng.normal(0, 20, size=(len(labels), 20, 20, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    names = [f"class{c:02d}" for c in range(n_classes)]
    return write_split(path, images, labels, names, {"dataset": "toy", "split": split})


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("splits")
    return (str(make_split(folder / "train.h5", 4, 16, 1, "train")), str(make_split(folder / "val.h5", 3, 6, 2, "val")))


def pretrain_kwargs(folder: Path, splits, **config) -> dict:
    return {"train_h5": splits[0], "val_h5": splits[1], "encoder_out": str(folder / "encoder.pt"),
            "history_out": str(folder / "history.csv"), "checkpoint_dir": str(folder / "ckpt"),
            "backbone": BACKBONE, "config": {**CONFIG, **config}, "way": 3, "query": 2, "val_episodes": 4,
            "seed": 0}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, splits) -> Path:
    """The reference: the same training in this process (4 epochs of 3 batches of 21 images)."""
    folder = tmp_path_factory.mktemp("one")
    launch(pretrain, pretrain_kwargs(folder, splits), processes=1, device="cpu", threads=1)
    return folder


def final_weights(folder: Path) -> dict:
    return torch.load(folder / "ckpt" / "last.pt", weights_only=True)["trainer"]["model"]


def assert_same_weights(folder: Path, reference: Path) -> None:
    ours, theirs = final_weights(folder), final_weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=TOLERANCE, rtol=0, msg=name)


@pytest.mark.slow  # two gloo worker processes train (8 s): out of the quick loop, in CI
def test_two_workers_train_as_one_process_does(tmp_path, splits, one_process):
    log = tmp_path / "pretrain.log"
    launch(pretrain, pretrain_kwargs(tmp_path, splits, gpus=2), processes=2, device="cpu", threads=1, log_path=log)

    assert_same_weights(tmp_path, one_process)
    encoder, reference = (torch.load(f / "encoder.pt", weights_only=True) for f in (tmp_path, one_process))
    assert encoder["epoch"] == reference["epoch"]
    for name, tensor in reference["state_dict"].items():
        torch.testing.assert_close(encoder["state_dict"][name], tensor, atol=TOLERANCE, rtol=0, msg=name)
    history, ref_history = ((f / "history.csv").read_text().splitlines() for f in (tmp_path, one_process))
    assert len(history) == len(ref_history) == 1 + CONFIG["epochs"]
    text = log.read_text()
    # both ranks log, prefixed; only rank 0 validates and reports epochs
    assert "[rank 0/2] INFO" in text and "[rank 1/2] INFO" in text
    assert len(re.findall(r"\[rank 0/2\] INFO mtl.train.pretrain: pretrain epoch", text)) == CONFIG["epochs"]
    assert "[rank 1/2] INFO mtl.train.pretrain: pretrain epoch" not in text


LAUNCH = """import json, sys
from mtl.distributed.launch import launch
from mtl.train.pretrain import pretrain
launch(pretrain, json.loads(sys.argv[1]), processes=2, device="cpu", threads=1, log_path=sys.argv[2])
"""


def alive(pid: int) -> bool:
    """Running and not a zombie (a container's PID 1 may never reap orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


@pytest.mark.slow
def test_two_workers_killed_mid_run_resume_with_any_process_count(tmp_path, splits, one_process):
    killed = tmp_path / "killed"
    kwargs = pretrain_kwargs(killed, splits, gpus=2)
    log = tmp_path / "first.log"
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, json.dumps(kwargs), str(log)], cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (killed / "ckpt" / "last.pt").exists() or proc.poll() is not None, 300, "a checkpoint")
        os.killpg(proc.pid, signal.SIGKILL)  # like a power loss or scancel: no clean-up runs
    finally:
        proc.wait(30)
    workers = [int(pid) for pid in re.findall(r"worker pid (\d+)", log.read_text())]
    assert len(workers) == 2
    wait_for(lambda: not any(alive(pid) for pid in workers), 30, "the orphaned workers to die with their agent")
    state = torch.load(killed / "ckpt" / "last.pt", weights_only=True)
    assert state["epochs_done"] < CONFIG["epochs"] and not (killed / "encoder.pt").exists(), (
        "the run finished: killed too late, or orphaned workers kept training")

    one = tmp_path / "resumed_by_one"
    shutil.copytree(killed / "ckpt", one / "ckpt")
    for folder, processes in ((killed, 2), (one, 1)):
        log = folder / "resume.log"
        launch(pretrain, pretrain_kwargs(folder, splits, gpus=processes), processes=processes, device="cpu",
               threads=1, log_path=log)
        assert_same_weights(folder, one_process)
    assert f"resuming from epoch {state['epochs_done'] + 1}" in (killed / "resume.log").read_text()


@pytest.mark.slow  # two gloo worker processes start and fail (4 s): out of the quick loop, in CI
def test_a_failing_worker_fails_the_launch_with_a_message_naming_the_log(tmp_path, splits):
    kwargs = pretrain_kwargs(tmp_path, splits, gpus=2)
    kwargs["backbone"] = {"name": "no-such-net"}
    log = tmp_path / "pretrain.log"
    with pytest.raises(MTLError, match=r"distributed training failed .*rank \d failed.* \[rank r/N\] lines of .*pretrain.log"):
        launch(pretrain, kwargs, processes=2, device="cpu", threads=1, log_path=log)
    assert re.search(r"\[rank \d/2\] ERROR: unknown backbone 'no-such-net'", log.read_text())


# ----------------------------------------------------------------------------- the workflow
def noisy_colour_folder(root: Path) -> Path:
    """An imagefolder tree of 20x20 PNGs, class = a colour plus Gaussian noise.

    Not the tiny scenario's digits: those are 8x8 scans upscaled, full of exactly equal pixels, so
    max-pool and ReLU ties make any change of summation order (one process with 2 threads instead
    of 1 as much as two processes) move the weights by 1e-2 within an epoch. Noisy images have far
    fewer such ties, so the comparison measures the distributed training, not the data's ties (on
    the AMD EPYC VM they still hit one near-tie: see AMD_RELATIVE_BOUND).
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes, per_class in (("train", 4, 40), ("val", 3, 12), ("test", 3, 12)):
        for c in range(classes):
            colour = rng.integers(0, 256, size=3)
            folder = root / split / f"{split}{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(colour + rng.normal(0, 20, size=(20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def toy_overlay(images: Path, **pretrain) -> dict:
    """The tiny scenario on noisy colour images, at a learning rate where training is stable
    (the scenario's 0.1 diverges on them)."""
    return {"data": {"toy": {"enabled": True, "source": "imagefolder", "path": str(images), "image_size": 16,
                             "strict_counts": False}},
            "pretrain": {"lr": 0.01, **pretrain}}


@pytest.fixture(scope="module")
def noisy_images(tmp_path_factory) -> Path:
    return noisy_colour_folder(tmp_path_factory.mktemp("toy") / "images")


@pytest.fixture(scope="module")
def one_process_encoder(tmp_path_factory, noisy_images) -> dict:
    """The workflow's encoder pre-trained by one process on this machine."""
    workdir = tmp_path_factory.mktemp("gpus1")
    run_snakemake(workdir, scenario_config("tiny", toy_overlay(noisy_images)), "all_encoders", cores=2)
    return encoder_state(workdir)


def encoder_state(workdir: Path) -> dict:
    [path] = workdir.glob("results/**/pretrain/encoder.pt")
    return torch.load(path, weights_only=True)


#: Explained 2026-12-05 (bench/distributed_agreement.py, bench/RESULTS.md): on this project's AMD
#: EPYC VM the workflow's two gloo workers end 2 epochs up to 0.6% (relative L2, per tensor) away
#: from one process on 1 thread, and so does one process on 2 threads (5.0e-3 on this test's
#: images and config, the same as the workers' 5e-3): the gap is not a sharding
#: or synchronisation defect. Summation order leaves the runs' weights ~3e-8 apart after a step;
#: where a 2x2 max-pool window holds a near-tie, that flips its winner, the gradient of the window
#: goes elsewhere (3.5e-2 relative on the replayed step) and SGD carries it on. Whether a near-tie
#: occurs depends on the images, the augmentation and the CPU's kernels (it passed at 1e-5 on the
#: Intel Xeon VM). On AMD CPUs the comparison keeps a looser bound that still catches a broken
#: launch or sharding (those move weights by far more) and reports an expected failure.
AMD_RELATIVE_BOUND = 2e-2


def relative_gap(ours: dict, theirs: dict) -> float:
    """The largest per-tensor relative L2 difference of two state dicts (float tensors of norm > 1e-3)."""
    return max(float((ours[k].float() - v.float()).norm() / v.float().norm())
               for k, v in theirs.items() if v.is_floating_point() and v.float().norm() > 1e-3)


def assert_same_encoder(ours: dict, theirs: dict) -> None:
    assert ours["epoch"] == theirs["epoch"]
    try:
        for name, tensor in theirs["state_dict"].items():
            torch.testing.assert_close(ours["state_dict"][name], tensor, atol=TOLERANCE, rtol=0, msg=name)
    except AssertionError:
        if "AMD" not in cpu_model():
            raise
        worst = relative_gap(ours["state_dict"], theirs["state_dict"])
        assert worst <= AMD_RELATIVE_BOUND, f"two workers vs one process: relative difference {worst:.3g}"
        pytest.xfail(f"AMD CPU: two workers differ from one process by {worst:.2g} (relative), as one process on "
                     "2 threads does from 1 thread: a max-pool near-tie flipped by summation order; "
                     "see AMD_RELATIVE_BOUND")


@pytest.mark.slow
def test_workflow_pretrains_with_two_gloo_workers_as_with_one_process(tmp_path, noisy_images, one_process_encoder):
    """`snakemake --resources gpu=2 --config pretrain='{gpus: 2}'` on a CPU: two gloo workers
    started by torchrun write the one-process encoder."""
    run_snakemake(tmp_path, scenario_config("tiny", toy_overlay(noisy_images)), "all_encoders",
                  "--resources", "gpu=2", "--config", "pretrain={gpus: 2}", cores=4)
    log = next((tmp_path / "logs" / "pretrain").rglob("*.log")).read_text()
    assert "launching 2 workers with torchrun" in log and "[rank 1/2] INFO" in log, log[-3000:]
    assert_same_encoder(encoder_state(tmp_path), one_process_encoder)


# Two ways to ask Slurm for the processes' GPUs: the rule's own request (all GPUs of the job,
# --gpus=N), and the per-node request profiles/slurm/README.md gives for several nodes, here on
# the test cluster's one node.
SLURM_REQUESTS = {
    "gpus of the job": ({}, ["--gpus=2", "--ntasks=2"]),
    "gpus per node": ({"nodes": 1, "gpu": 0, "slurm_extra": "'--gpus-per-node=2 --ntasks-per-node=2'"},
                      ["--nodes=1", "--gpus-per-node=2", "--ntasks-per-node=2", "--ntasks=2"]),
}


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.parametrize("request_kind", list(SLURM_REQUESTS))
def test_slurm_job_of_two_tasks_pretrains_with_two_workers_started_by_srun(
        slurm_cluster, tmp_path, noisy_images, one_process_encoder, request_kind):
    """profiles/slurm with pretrain.gpus 2: one sbatch job with 2 GPUs and 2 tasks, whose script
    starts a torchrun agent with srun (c10d rendezvous on the job's node) and 2 gloo workers; the
    encoder equals the local one-process run's."""
    profile_edits, flags = SLURM_REQUESTS[request_kind]
    slurm = run_workflow_on_slurm(slurm_cluster, tmp_path / "slurm", ["all_encoders"],
                                  config=scenario_config("tiny", toy_overlay(noisy_images, gpus=2)),
                                  set_resources={"pretrain": profile_edits})
    assert_all_remote_jobs_went_through_slurm(slurm, slurm_cluster)
    [sbatch] = [line for line in slurm.output.splitlines() if "sbatch call" in line and "rule_pretrain" in line]
    assert all(flag in sbatch.split() for flag in flags) and "--ntasks-per-gpu" not in sbatch, sbatch
    log = next((slurm.workdir / "logs" / "pretrain").rglob("*.log")).read_text()
    assert "launching 2 workers with srun" in log and "--rdzv-backend=c10d" in log, log[-3000:]
    assert "[rank 0/2] INFO" in log and "[rank 1/2] INFO" in log, log[-3000:]
    assert_same_encoder(encoder_state(slurm.workdir), one_process_encoder)
