"""Why two gloo workers can end away from one process: a diagnosis, not a timing.

    OMP_NUM_THREADS=1 .venv/bin/python bench/distributed_agreement.py              # tiny_split's images
    OMP_NUM_THREADS=1 .venv/bin/python bench/distributed_agreement.py --images noisy

On the AMD EPYC VM, tests/test_distributed.py's two-worker pre-training ends up to 0.6% (relative
L2 of a tensor) away from one process on some images. This trains the same tiny pre-training
(tests/test_distributed.py's config: resnet12 width 0.125, 16 px, 4 epochs of 3 batches of 21
images, lr 0.01, augmentation on or off) three ways and prints how far the final weights are
apart: one process on 1 thread, one process on 2 threads, two gloo workers on 1 thread each.
Then it replays the second step of the 1- and 2-thread runs: the same augmented batch, once
under each run's weights after the first step, on 1 thread: how far those weights are apart,
how far the gradients, and which discrete choices of the forward pass differ (2x2 max-pool
winners, leaky-ReLU signs).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import context  # first: this checkout's mtl, and the machine beside every figure
import torch
import torch.nn.functional as F

from mtl.distributed.launch import launch
from mtl.train.pretrain import PretrainConfig, PretrainTrainer, lr_at, pretrain
from tests.conftest import _write_tiny_split
from tests.test_distributed import final_weights, make_split, pretrain_kwargs, relative_gap


def write_splits(folder: Path, images: str) -> tuple[str, str]:
    if images == "tiny":  # one colour per class plus uniform noise, clipped (tests/conftest.py)
        return (str(_write_tiny_split(folder / "train.h5", 4, 16, 20, split="train", seed=1)),
                str(_write_tiny_split(folder / "val.h5", 3, 6, 20, split="val", seed=2)))
    return (str(make_split(folder / "train.h5", 4, 16, 1, "train")),  # colour plus normal noise
            str(make_split(folder / "val.h5", 3, 6, 2, "val")))


def trained_weights(folder: Path, splits, processes: int, threads: int, augment: bool) -> dict:
    extra = {"gpus": processes} if processes > 1 else {}
    launch(pretrain, pretrain_kwargs(folder, splits, augment=augment, **extra), processes=processes,
           device="cpu", threads=threads, log_path=folder.parent / f"{folder.name}.log")
    return final_weights(folder)


class RecordingTrainer(PretrainTrainer):
    """Pre-training that keeps each step's augmented batch and the weights it started from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[dict] = []

    def train_step(self, images, labels, batch_size, draws=None):
        self.steps.append({"x": self.train_transform(images, device=self.device, draws=draws),
                           "y": labels.clone(), "weights": {k: v.clone() for k, v in self.model.state_dict().items()}})
        return super().train_step(images, labels, batch_size, draws)


def first_steps(splits, threads: int) -> RecordingTrainer:
    """The first two steps of epoch 1 of the tests' pre-training, in this process on ``threads``."""
    torch.set_num_threads(threads)
    run = pretrain_kwargs(Path(tempfile.mkdtemp()), splits)
    config = PretrainConfig.from_dict(run["config"])
    trainer = RecordingTrainer(run["train_h5"], run["val_h5"], run["backbone"], config, way=run["way"],
                               shot=config.val_shot, query=run["query"], val_episodes=run["val_episodes"],
                               seed=run["seed"], device="cpu")
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr_at(1, trainer.config)
    trainer.train_epoch(1, max_steps=2)
    return trainer


def forward_choices(trainer: PretrainTrainer, weights: dict, step: dict) -> tuple[dict, list, list]:
    """Gradients, max-pool winners and leaky-ReLU signs of ``step``'s batch under ``weights``."""
    trainer.model.load_state_dict(weights)
    trainer.model.train()
    trainer.model.zero_grad()
    winners, signs = [], []

    def record_winners(pool, inputs):
        winners.append(F.max_pool2d(inputs[0], pool.kernel_size, pool.stride, return_indices=True)[1])

    def record_signs(_, inputs):  # before the in-place activation overwrites its input
        signs.append(inputs[0] > 0)

    modules = list(trainer.model.modules())
    hooks = ([m.register_forward_pre_hook(record_winners) for m in modules if isinstance(m, torch.nn.MaxPool2d)]
             + [m.register_forward_pre_hook(record_signs) for m in modules if isinstance(m, torch.nn.LeakyReLU)])
    F.cross_entropy(trainer.model(step["x"]), step["y"]).backward()
    for hook in hooks:
        hook.remove()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    return grads, winners, signs


def replay_second_step(splits) -> None:
    one, two = first_steps(splits, 1), first_steps(splits, 2)
    step = one.steps[1]
    assert torch.equal(step["x"], two.steps[1]["x"]), "the augmented batches differ"
    weights_a, weights_b = step["weights"], two.steps[1]["weights"]
    apart = max(float((weights_a[k].float() - weights_b[k].float()).abs().max()) for k in weights_a)
    torch.set_num_threads(1)
    (grads_a, winners_a, signs_a), (grads_b, winners_b, signs_b) = (
        forward_choices(one, w, step) for w in (weights_a, weights_b))
    worst = max((float((grads_a[n] - grads_b[n]).norm() / grads_a[n].norm()), n)
                for n in grads_a if n.endswith("weight"))
    flipped = [int((a != b).sum()) for a, b in zip(winners_a, winners_b)]
    windows = [a.numel() for a in winners_a]
    sign_flips = sum(int((a != b).sum()) for a, b in zip(signs_a, signs_b))
    print(f"second step, same augmented batch (identical pixels), 1 thread:\n"
          f"  weights after step 1 (1-thread run vs 2-thread run): max abs difference {apart:.1e}\n"
          f"  gradients under those weights: relative L2 difference up to {worst[0]:.1e} ({worst[1]})\n"
          f"  2x2 max-pool winners that differ, per block: {flipped} of {windows}\n"
          f"  leaky-ReLU inputs that change sign: {sign_flips} of {sum(s.numel() for s in signs_a)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", choices=("tiny", "noisy"), default="tiny")
    args = parser.parse_args()
    print(context.machine_line())
    folder = Path(tempfile.mkdtemp(prefix="agreement-"))
    splits = write_splits(folder, args.images)
    for augment in (True, False):
        runs = {(processes, threads): trained_weights(folder / f"p{processes}t{threads}a{int(augment)}", splits,
                                                      processes, threads, augment)
                for processes, threads in ((1, 1), (1, 2), (2, 1))}
        print(f"{args.images} images, augmentation {'on' if augment else 'off'}, final weights, largest relative gap:\n"
              f"  one process 2 threads vs 1 thread: {relative_gap(runs[1, 2], runs[1, 1]):.1e}\n"
              f"  two workers vs one process on 1 thread: {relative_gap(runs[2, 1], runs[1, 1]):.1e}\n"
              f"  two workers vs one process on 2 threads: {relative_gap(runs[2, 1], runs[1, 2]):.1e}")
    replay_second_step(splits)


if __name__ == "__main__":
    main()
