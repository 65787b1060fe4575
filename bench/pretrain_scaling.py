"""Pre-training throughput on 1, 2, ... processes (GPUs): images/s and scaling efficiency.

    python bench/pretrain_scaling.py                      # every visible GPU count 1, 2, 4, ... (one call < 10 min)
    python bench/pretrain_scaling.py --processes 1,2      # chosen counts
    python bench/pretrain_scaling.py --cpu-dry-run        # tiny run on the CPU with gloo: checks this script (< 2 min)
    python bench/pretrain_scaling.py --processes 1 --cpu-dry-run --steps 40   # one-process CPU timing

What is timed is the pipeline's own pre-training epoch (``mtl.train.pretrain.PretrainTrainer.train_epoch``:
HDF5 reads in DataLoader workers, on-device augmentation, AMP on GPUs, synchronised BN and DDP
when N > 1), on a synthetic split of random 84x84 images written once (``--steps`` x batch
images). Each count N runs through ``mtl.distributed.launch`` exactly as the workflow does (N = 1
in this process, N > 1 with torchrun), trains epoch 1 as a warm-up (cuDNN autotuning, loader
start) and times epoch 2 on rank 0 between barriers. Same training, more hands: the global batch
stays ``--batch-size`` whatever N, so each GPU gets batch/N images (``--weak`` scales the batch
with N instead). Efficiency = images/s at N / (N x images/s at 1).

Prints CPU model, core count, torch version, GPUs and the load average beside the figures
(``bench/context.py``), then a Markdown table for bench/RESULTS.md. Figures taken while the load average exceeds the core count
are marked provisional.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# torchrun's workers import this file as a module, with the repository on their path but not bench/
# (so `from bench import context`, not `import context`)
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench import context  # noqa: E402

CLASSES = 64
STORED_SIZE = 84


def time_epoch(train_h5: str, val_h5: str, backbone: dict, config: dict, steps: int, out_json: str, device) -> None:
    """Worker target: warm-up epoch, then a timed epoch, ``steps`` batches each; rank 0 writes seconds
    and images to ``out_json``."""
    from mtl.distributed import ranks
    from mtl.train.pretrain import PretrainConfig, PretrainTrainer

    # validation is not timed: the smallest protocol will do
    trainer = PretrainTrainer(train_h5, val_h5, backbone, PretrainConfig.from_dict(config), way=5, shot=1, query=1,
                              val_episodes=1, seed=0, device=device)
    trainer.train_epoch(1, max_steps=steps)
    ranks.barrier()
    context.sync(device)
    start = time.perf_counter()
    stats = trainer.train_epoch(2, max_steps=steps)
    context.sync(device)
    ranks.barrier()  # rank 0's time includes waiting for the slowest rank
    seconds = time.perf_counter() - start
    if ranks.is_main():
        Path(out_json).write_text(json.dumps({"seconds": seconds, "images": stats["images"]}))


def measure(processes: int, args, train_h5: str, val_h5: str, scratch: Path) -> dict:
    batch = args.batch_size * (processes if args.weak else 1)
    config = {"epochs": 2, "batch_size": batch, "num_workers": args.num_workers, "augment": True,
              "gpus": processes}
    backbone = {"name": args.backbone, "width": args.width, "image_size": args.image_size}
    out = scratch / f"n{processes}.json"
    log = scratch / f"n{processes}.log"
    kwargs = {"train_h5": train_h5, "val_h5": val_h5, "backbone": backbone, "config": config, "steps": args.steps,
              "out_json": str(out)}
    started = time.perf_counter()
    try:
        if processes == 1:  # as launch(processes=1) does it, and as the code before launch existed did
            from mtl.device import select_device

            torch.set_num_threads(args.threads_per_process)
            time_epoch(**kwargs, device=select_device(args.device))
        else:
            from mtl.distributed.launch import launch

            launch(time_epoch, kwargs, processes=processes, device=args.device,
                   threads=args.threads_per_process, log_path=log)
    except Exception as err:  # report and go on: one count failing must not hide the others
        tail = log.read_text()[-3000:] if log.exists() else ""
        print(f"N={processes}: failed: {err}\n{tail}", flush=True)
        return {"processes": processes, "error": str(err)}
    result = json.loads(out.read_text())
    result.update(processes=processes, batch=batch, wall=time.perf_counter() - started,
                  images_per_s=result["images"] / result["seconds"], load=os.getloadavg()[0])
    print(f"N={processes}: {result['images']} images in {result['seconds']:.2f} s = "
          f"{result['images_per_s']:.1f} images/s (global batch {batch}; whole call {result['wall']:.0f} s; "
          f"load average {result['load']:.2f})", flush=True)
    return result


def environment(args) -> dict:
    """Versions and the host's CPU line (``context.environment``, with the load before the run), and
    every GPU the counts may use."""
    gpu = args.device != "cpu"
    env = context.environment(args.device if gpu else None)
    env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if gpu else []
    return env


def markdown(env: dict, args, results: list[dict]) -> str:
    base = next((r for r in results if r["processes"] == 1 and "error" not in r), None)
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["processes"], "-", "failed", "-", "-", "-"])
            continue
        speedup = r["images_per_s"] / base["images_per_s"] if base else float("nan")
        rows.append([r["processes"], r["batch"], f"{r['images_per_s']:.1f}", f"{speedup:.2f}x",
                     f"{speedup / r['processes']:.0%}", f"{r['load']:.2f}"])
    lines = [
        f"{', '.join(env['gpus']) or 'CPU only'}; host {env['CPU']} (before the run); Python {env['python']}; "
        f"{args.backbone} width {args.width} at {args.image_size or 'native'} px, "
        f"{'weak' if args.weak else 'global'} batch {args.batch_size}, {args.steps} steps timed, "
        f"{args.num_workers} loader workers and {args.threads_per_process} CPU thread(s) per process.",
        "",
        context.markdown_table(["processes", "global batch", "images/s", "speed-up", "efficiency", "load avg"], rows),
    ]
    if any(r.get("load", 0) > (os.cpu_count() or 1) for r in results):
        lines += ["", "Provisional: the load average exceeded the core count during the run."]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", help="comma-separated counts (default: 1, 2, 4, ... up to the visible GPUs)")
    parser.add_argument("--steps", type=int, default=60, help="batches in the timed epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--weak", action="store_true", help="global batch = batch-size x processes")
    parser.add_argument("--backbone", default="resnet12")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the backbone's)")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per process")
    parser.add_argument("--threads-per-process", type=int, default=4)
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="CPU and gloo, tiny network (width 0.125, 16 px, batch 32, 1 thread, no loader "
                             "workers) unless those options are given; default counts 1,2")
    args = parser.parse_args(argv)
    args.device = "cpu" if args.cpu_dry_run else "cuda"
    if args.cpu_dry_run:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        tiny = {"--steps": ("steps", 8), "--batch-size": ("batch_size", 32), "--width": ("width", 0.125),
                "--image-size": ("image_size", 16), "--num-workers": ("num_workers", 0),
                "--threads-per-process": ("threads_per_process", 1)}
        for flag, (name, value) in tiny.items():
            if flag not in given:
                setattr(args, name, value)
    if args.processes:
        args.counts = [int(n) for n in args.processes.split(",")]
    elif args.cpu_dry_run:
        args.counts = [1, 2]
    else:
        visible = torch.cuda.device_count()
        if visible == 0:
            parser.error("no CUDA GPU is visible; use --cpu-dry-run to check the script on the CPU")
        args.counts = [n for n in (1, 2, 4, 8, 16, 32) if n <= visible]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment(args)
    print(json.dumps(env), flush=True)
    with tempfile.TemporaryDirectory(prefix="pretrain_scaling_") as scratch:
        scratch = Path(scratch)
        stored = min(STORED_SIZE, 2 * (args.image_size or STORED_SIZE))
        largest = args.batch_size * (max(args.counts) if args.weak else 1) * args.steps
        started = time.perf_counter()
        train_h5 = str(context.write_synthetic_split(scratch / "train.h5", largest, CLASSES, stored, seed=0))
        val_h5 = str(context.write_synthetic_split(scratch / "val.h5", 5 * 4, 5, stored, seed=1))
        print(f"synthetic split: {largest} images of {stored} px in {time.perf_counter() - started:.1f} s", flush=True)
        results = [measure(n, args, train_h5, val_h5, scratch) for n in args.counts]
    print()
    print(markdown(env, args, results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    from bench.pretrain_scaling import main as _main  # workers import this module by name, not as __main__

    sys.exit(_main())
