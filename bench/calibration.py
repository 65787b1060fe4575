"""How far one temperature per run can calibrate, on a finished run's trained models.

For every run (seed x method x shot) of a results folder, the learner scores the run's
calibration episodes (validation classes) and the saved test episodes; then, on the test queries:

- ECE at T = 1 (the learner's own scores), at the T fitted on the validation episodes (what
  ``evaluate`` uses), and at the *oracle* T fitted on the test queries' own labels: the best any
  single temperature per run could do (for the NLL; ECE can be lower at another T);
- the accuracy on validation and on test episodes, whose gap shows the shift between the two class
  sets that a temperature fitted on the first carries to the second.

    python bench/calibration.py --root /path/to/a/demo/run --dataset digits

Reads data/<dataset>/{val,test}.h5, results/<dataset>/episodes/ and the trained files under
results/<dataset>/<backbone>/; writes nothing. Frozen-feature methods only (not ft_last/ft_all).
"""
from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import context  # first: this checkout's mtl, and the machine beside every figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="a workflow folder holding data/ and results/")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--backbone", default="resnet12")
    parser.add_argument("--methods", nargs="+", default=["ft", "logreg", "proto", "mtl", "mtl_ht"])
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--way", type=int, default=3)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--calibration-episodes", type=int, default=200)
    parser.add_argument("--episode-seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass")
    args = parser.parse_args()

    import torch

    from mtl.data.episodes import load_episodes
    from mtl.data.hdf5 import HDF5Split
    from mtl.data.transforms import EvalTransform
    from mtl.evaluate import calibration_episode_set, load_for_method, query_targets
    from mtl.learners import learner_for, learner_settings, score_episodes
    from mtl.learners.calibration import calibration_report, fit_temperature
    from mtl.rng import Purpose

    torch.set_num_threads(1)
    print(context.machine_line())
    data, results = args.root / "data" / args.dataset, args.root / "results" / args.dataset
    val, test = HDF5Split(data / "val.h5"), HDF5Split(data / "test.h5")
    print("method  shot seed | val acc test acc | T val     T oracle | ECE T=1  T val  T oracle | NLL T val  T oracle")
    means = defaultdict(list)
    for method in args.methods:
        for shot in args.shots:
            episodes = load_episodes(results / "episodes" / f"{args.way}way{shot}shot.npz")
            calibration = calibration_episode_set(val, args.way, shot, args.query,
                                                  args.calibration_episodes, args.episode_seed)
            for seed in args.seeds:
                run = results / args.backbone / f"seed{seed}"
                trained = (run / method / f"{shot}shot" / "model.pt" if method.startswith("mtl")
                           else run / "pretrain" / "encoder.pt")
                backbone, info, init = load_for_method(method, trained, torch.device("cpu"))
                settings = learner_settings(method, info)
                transform = EvalTransform(info["image_size"], **info["normalize"])

                def scores(split, episode_set, purpose):
                    learner = learner_for(settings, backbone, seed=seed, meta_init=init, purpose=purpose)
                    logits = score_episodes(learner, split, (episode_set.support, episode_set.query), transform,
                                            args.way, shot, args.query, inference_batch_size=args.batch)
                    return logits, query_targets(len(logits), args.way, args.query)

                val_logits, val_targets = scores(val, calibration, Purpose.CALIBRATION_LEARNERS)
                test_logits, test_targets = scores(test, episodes, Purpose.TEST_LEARNERS)
                t_val, t_oracle = fit_temperature(val_logits, val_targets), fit_temperature(test_logits, test_targets)
                at_val = calibration_report(test_logits, test_targets, t_val)
                at_oracle = calibration_report(test_logits, test_targets, t_oracle)
                val_acc = 100 * (val_logits.argmax(-1) == val_targets).double().mean().item()
                test_acc = 100 * (test_logits.argmax(-1) == test_targets).double().mean().item()
                row = (at_val["ece_uncalibrated"], at_val["ece"], at_oracle["ece"])
                means[method, shot].append(row)
                context.figure(f"{method:7s} {shot:4d} {seed:4d} | {val_acc:7.1f} {test_acc:8.1f} | {t_val:9.4g} "
                               f"{t_oracle:8.4g} | {row[0]:7.2f} {row[1]:6.2f} {row[2]:8.2f} | {at_val['nll']:9.3f} "
                               f"{at_oracle['nll']:8.3f}")
    print(f"\nmeans over seeds {args.seeds}: ECE (points) at T=1 / T fitted on validation / oracle T")
    for (method, shot), rows in means.items():
        cells = " / ".join(f"{statistics.mean(column):.2f}" for column in zip(*rows))
        context.figure(f"{method:7s} {shot}-shot: {cells}")


if __name__ == "__main__":
    main()
