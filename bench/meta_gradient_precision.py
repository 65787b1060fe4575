"""How far float32 meta-train gradients are from float64 ones, on the CPU and on a GPU.

    python bench/meta_gradient_precision.py                               # CUDA machine, width 1 (< 2 min)
    OMP_NUM_THREADS=1 python bench/meta_gradient_precision.py --device cpu --width 0.125

The GPU agreement test of the first-order meta-train gradient (tests/gpu/test_agreement.py) compares
GPU float32 with CPU float32 at an L2 relative tolerance of 1e-3, and fails on an H200 (see
bench/RESULTS.md, GPU check). Whether the tolerance or the GPU path is at fault shows when each
float32 gradient is compared with a float64 one: the same task, images, backbone and learner init
as that test, with the backbone cast to float64 (the inner loop runs in float32 either way:
``adapt_linear`` computes in float32), then the loss and gradients as ``task_query_loss`` computes
them. Prints the L2 relative differences of the scale gradients and of all meta parameters +
learner init, for every pair that answers the question.
"""
from __future__ import annotations

import argparse
import copy
import time

import context  # first: this checkout's mtl (and tests), and the machine beside every figure
import torch
import torch.nn.functional as F

from mtl.data.transforms import TrainTransform
from mtl.models import build_backbone, freeze_for_meta, meta_parameters
from mtl.train.meta import adapt_learner, episode_targets, init_learner
from tests.gpu.test_agreement import (BACKBONES, BASE_LR, QUERY, SEED, SHOT, STORED_SIZE, UPDATE_STEP, WAY,
                                      flat_grad, l2_rel, strict_fp32)


def gradients(model, weight, bias, support, query, dtype, device):
    """(query loss, scale gradients, all meta + learner-init gradients) of one first-order task."""
    model = copy.deepcopy(model).to(device, dtype).train()
    freeze_for_meta(model)  # as MetaTrainer: only the meta parameters take gradients
    weight = weight.detach().to(device, dtype).requires_grad_()
    bias = bias.detach().to(device, dtype).requires_grad_()
    s, q = support.to(device, dtype), query.to(device, dtype)
    query_feats = model(q)
    with torch.no_grad():
        support_feats = model(s)
    fast_w, fast_b = adapt_learner(support_feats, episode_targets(WAY, SHOT, device), weight, bias,
                                   steps=UPDATE_STEP, lr=BASE_LR, first_order=True)
    logits = F.linear(query_feats, fast_w.to(dtype), fast_b.to(dtype))  # float32 out of the inner loop
    loss = F.cross_entropy(logits, episode_targets(WAY, QUERY, device))
    loss.backward()
    scales = [m.scale for m in model.modules() if getattr(m, "scale", None) is not None]
    return (float(loss.detach()), flat_grad(scales).double(),
            flat_grad(meta_parameters(model) + [weight, bias]).double())


def measure(name: str, width: float, device: torch.device) -> dict:
    cpu = torch.device("cpu")
    torch.manual_seed(SEED)  # the test's backbone and learner init
    model = build_backbone(name, width=width, ss=True)
    weight, bias = init_learner(WAY, model.out_dim, cpu, generator=torch.Generator().manual_seed(SEED))
    size = int(model.native_size)
    raw = context.synthetic_images(WAY * (SHOT + QUERY), STORED_SIZE, SEED + 1)
    images = TrainTransform(size)(raw, cpu, generator=torch.Generator().manual_seed(SEED))
    support, query = images[:WAY * SHOT], images[WAY * SHOT:]
    args = (model, weight, bias, support, query)
    runs = {"CPU fp64": gradients(*args, torch.float64, cpu), "CPU fp32": gradients(*args, torch.float32, cpu)}
    if device.type == "cuda":
        runs["GPU fp64"] = gradients(*args, torch.float64, device)
        with strict_fp32():
            runs["GPU fp32"] = gradients(*args, torch.float32, device)
            runs["GPU fp32 again"] = gradients(*args, torch.float32, device)
            saved = torch.backends.cudnn.deterministic
            torch.backends.cudnn.deterministic = True
            try:
                runs["GPU fp32 deterministic"] = gradients(*args, torch.float32, device)
            finally:
                torch.backends.cudnn.deterministic = saved
    return {"size": size, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--device", default="cuda", help="cuda (CPU and GPU compared) or cpu (CPU alone)")
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args()
    device = context.device_from(args)
    print(context.machine_line(device))
    pairs = [("CPU fp32", "CPU fp64"), ("GPU fp32", "CPU fp64"), ("GPU fp32", "GPU fp64"),
             ("GPU fp32 deterministic", "CPU fp64"), ("GPU fp64", "CPU fp64"), ("GPU fp32", "CPU fp32"),
             ("GPU fp32", "GPU fp32 again")]
    for name in args.backbones:
        started = time.perf_counter()
        result = measure(name, args.width, device)
        runs = result["runs"]
        context.figure(f"{name} width {args.width:g} {result['size']}px, first-order task (5-way 1-shot 15-query, "
                       f"{UPDATE_STEP} inner steps), {time.perf_counter() - started:.1f} s; L2 relative "
                       "difference, scale gradients / all meta parameters + learner init:")
        for a, b in pairs:
            if a in runs and b in runs:
                print(f"  {a:>22s} vs {b:<9s} {l2_rel(runs[b][1], runs[a][1]):.2e} / "
                      f"{l2_rel(runs[b][2], runs[a][2]):.2e}  (query loss {runs[a][0]:.7f} vs {runs[b][0]:.7f})",
                      flush=True)


if __name__ == "__main__":
    main()
