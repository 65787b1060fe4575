"""Meta-train episode time: our first-order step vs the reference's straightforward step.

    .venv/bin/python bench/meta_episode.py                    # resnet25, width 1, 80x80, 1- and 5-shot
    .venv/bin/python bench/meta_episode.py --reps 3 --shots 1 # more repetitions, one setting
    .venv/bin/python bench/meta_episode.py --width 0.25       # quick smoke run

Both steps start from the same SS backbone, learner init and Adam state and see the same images:
  ours:      mtl.train.meta.MetaTrainer (query embedded with autograd, support under no_grad,
             batched analytic inner loop from mtl.base_learner, first-order), then Adam.
  reference: the PyTorch reference's meta_forward: support AND query embedded with autograd, inner
             loop of update_step autograd.grad calls (create_graph=False), query CE backward, Adam.
The first step of each is checked to give the same meta-gradient and the same updated meta
parameters. Reported: median wall time per episode (outer step), their ratio, our inner loop's
time and share of an episode, and the activation memory the reference keeps for the support batch.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import context  # first: this checkout's mtl, and the machine beside every figure
import torch
import torch.nn.functional as F

from mtl.models import build_backbone, freeze_for_meta, meta_parameters
from mtl.train.meta import MetaConfig, MetaTrainer, adapt_learner

WAY, QUERY = 5, 15


def reference_step(model, weight, bias, optimizer, support_x, query_x, *, shot, steps, lr, timings):
    """The reference's meta-train step, written plainly (graph on support kept, autograd inner loop).

    Also records where its time goes and how much new memory the support graph keeps alive
    (distinct storages saved for backward, model parameters excluded: mostly activations and the
    per-conv ``weight * scale`` products).
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    marks = [time.perf_counter()]
    query_feats = model(query_x)
    marks.append(time.perf_counter())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        support_feats = model(support_x)
    marks.append(time.perf_counter())
    support_y = torch.arange(WAY).repeat_interleave(shot)
    fast = [weight, bias]
    for _ in range(steps):
        loss = F.cross_entropy(F.linear(support_feats, *fast), support_y)
        grads = torch.autograd.grad(loss, fast)
        fast = [p - lr * g for p, g in zip(fast, grads)]
    marks.append(time.perf_counter())
    loss = F.cross_entropy(F.linear(query_feats, *fast), torch.arange(WAY).repeat_interleave(QUERY))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    marks.append(time.perf_counter())
    grads = [p.grad.clone() for group in optimizer.param_groups for p in group["params"]]
    resume = time.perf_counter()
    optimizer.step()
    marks.append(time.perf_counter())
    phases = [b - a for a, b in zip(marks, marks[1:])]
    phases[-1] = marks[-1] - resume  # the gradient copy for the check is not timed
    timings.append({"episode": sum(phases), "inner": phases[2], "phases": phases,
                    "support_kept_mb": sum(kept.values()) / 2**20})
    return grads


def our_step(trainer, support_x, query_x, timings):
    """MetaTrainer's outer step; the gradient copy for the check is not timed."""
    start = time.perf_counter()
    trainer.task_forward_backward(support_x, query_x)
    mid = time.perf_counter()
    grads = [p.grad.clone() for group in trainer.optimizer.param_groups for p in group["params"]]
    resume = time.perf_counter()
    trainer.optimizer_step()
    end = time.perf_counter()
    timings.append({"episode": (mid - start) + (end - resume)})
    return grads


def inner_loop_time(trainer, support_x, shot, reps=15) -> float:
    """Median time of our inner loop alone on this episode's support features.

    Tiny ops: on a shared machine single calls swing from 3 to 300 ms (thread-pool waits), hence
    the median of many calls.
    """
    with torch.no_grad():
        feats = trainer.model(support_x)
    targets = torch.arange(WAY).repeat_interleave(shot)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fast_w, _ = adapt_learner(feats, targets, trainer.weight, trainer.bias, steps=trainer.config.update_step,
                                  lr=trainer.config.base_lr, first_order=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_same_step(ref_grads, our_grads, ref_params, our_params, meta_lr) -> dict:
    """Same meta-gradient (relative error) and same updated parameters after one Adam step.

    Adam's first step moves each entry by ~meta_lr * sign(grad), so entries whose true gradient is
    zero (the stem shift feeds a train-mode BN, which removes it) carry float noise (~1e-6 of the
    largest gradient) and move by an arbitrary amount in [-lr, lr] in both runs; entries with
    |g| below 1e-4 of the largest are excluded from the parameter comparison (not the gradient one).
    Tolerance 1% of one Adam step (meta_lr): float32 rounding of scales near 1 is 1.2e-7.
    """
    g_ref = torch.cat([g.flatten() for g in ref_grads])
    g_our = torch.cat([g.flatten() for g in our_grads])
    grad_rel = float((g_ref - g_our).norm() / g_ref.norm())
    p_ref = torch.cat([p.detach().flatten() for p in ref_params])
    p_our = torch.cat([p.detach().flatten() for p in our_params])
    meaningful = g_ref.abs() > 1e-4 * g_ref.abs().max()
    param_diff = float((p_ref - p_our)[meaningful].abs().max())
    assert grad_rel < 1e-3, f"meta-gradients differ: relative error {grad_rel:.2e}"
    assert param_diff <= 1e-2 * meta_lr, f"updated meta parameters differ by {param_diff:.2e}"
    return {"grad_rel_err": grad_rel, "param_max_diff": param_diff}


def bench_shot(args, shot: int) -> dict:
    torch.manual_seed(0)
    model = build_backbone(args.backbone, width=args.width, ss=True)
    config = MetaConfig(update_step=args.update_step)
    trainer = MetaTrainer(model, way=WAY, shot=shot, query=QUERY, config=config, device="cpu",
                          image_size=args.size, mean=[0.5] * 3, std=[0.25] * 3)
    ref_model = copy.deepcopy(trainer.model)
    freeze_for_meta(ref_model)
    ref_weight = torch.nn.Parameter(trainer.weight.detach().clone())
    ref_bias = torch.nn.Parameter(trainer.bias.detach().clone())
    ref_opt = torch.optim.Adam([{"params": meta_parameters(ref_model), "lr": config.meta_lr},
                                {"params": [ref_weight, ref_bias], "lr": config.learner_lr}])
    trainer.model.train()
    ref_model.train()
    generator = torch.Generator().manual_seed(shot)
    support_x = torch.randn(WAY * shot, 3, args.size, args.size, generator=generator)
    query_x = torch.randn(WAY * QUERY, 3, args.size, args.size, generator=generator)

    ref_times, our_times = [], []
    for rep in range(args.reps):
        run_reference = lambda: reference_step(  # noqa: E731
            ref_model, ref_weight, ref_bias, ref_opt, support_x, query_x, shot=shot, steps=config.update_step,
            lr=config.base_lr, timings=ref_times)
        if rep % 2 == 0:  # alternate the order so a load change on a shared machine hits both alike
            ref_grads, our_grads = run_reference(), our_step(trainer, support_x, query_x, our_times)
        else:
            our_grads = our_step(trainer, support_x, query_x, our_times)
            ref_grads = run_reference()
        if rep == 0:
            check = check_same_step(ref_grads, our_grads,
                                    [p for g in ref_opt.param_groups for p in g["params"]],
                                    [p for g in trainer.optimizer.param_groups for p in g["params"]],
                                    config.meta_lr)
        print(f"  {shot}-shot rep {rep + 1}: reference {ref_times[-1]['episode']:.2f} s, "
              f"ours {our_times[-1]['episode']:.2f} s", file=sys.stderr, flush=True)
    inner = inner_loop_time(trainer, support_x, shot)
    ref_episode = statistics.median(t["episode"] for t in ref_times)
    our_episode = statistics.median(t["episode"] for t in our_times)
    return {
        "shot": shot, "reference_s": ref_episode, "ours_s": our_episode, "ratio": ref_episode / our_episode,
        "our_inner_s": inner, "our_inner_share": inner / our_episode,
        "ref_inner_s": statistics.median(t["inner"] for t in ref_times),
        "support_kept_mb": ref_times[0]["support_kept_mb"], **check,
        "ref_phases": [statistics.median(t["phases"][i] for t in ref_times) for i in range(5)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet25")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=80)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--update-step", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(context.machine_line())
    print(f"{args.backbone} width {args.width} at {args.size}x{args.size}, {WAY}-way {QUERY}-query, "
          f"update_step {args.update_step}, {args.reps} reps")
    print(context.table_header(["shot", "reference s/episode", "ours s/episode", "speed-up", "our inner loop", "share",
                                "reference inner loop", "new memory kept by the reference's support graph",
                                "grad rel. err", "max param diff", "machine"]))
    results = []
    for shot in args.shots:
        r = bench_shot(args, shot)
        results.append(r)
        print(context.table_row([r["shot"], f"{r['reference_s']:.2f}", f"{r['ours_s']:.2f}", f"{r['ratio']:.3f}x",
                                 f"{1000 * r['our_inner_s']:.1f} ms", f"{100 * r['our_inner_share']:.2f}%",
                                 f"{1000 * r['ref_inner_s']:.1f} ms", f"{r['support_kept_mb']:.0f} MB",
                                 f"{r['grad_rel_err']:.1e}", f"{r['param_max_diff']:.1e}", context.context()]),
              flush=True)
    print("\nWhere the reference's episode goes (median s): query forward / support forward / inner loop / "
          "backward / Adam")
    for r in results:
        total = sum(r["ref_phases"])
        context.figure(f"- {r['shot']}-shot: " + " / ".join(f"{t:.2f} ({100 * t / total:.1f}%)"
                                                             for t in r["ref_phases"]))
    print(context.machine_line())

if __name__ == "__main__":
    main()
