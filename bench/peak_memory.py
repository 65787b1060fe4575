"""Peak host memory (RSS) of each workflow rule's library call at the real dataset sizes.

Results: bench/RESULTS.md, section "Peak memory per rule". They size ``resources: mem_mb`` in
rules/*.smk and profiles/slurm/config.yaml.

    python bench/peak_memory.py                                  # everything, ~11 min on 2 cores
    python bench/peak_memory.py --steps download,build_fc100     # a subset
    python bench/peak_memory.py --workdir /tmp/pm --steps build_mini    # keep the data for later steps
    python bench/peak_memory.py --workdir /tmp/pm --steps pretrain,meta_train,evaluate --backbones resnet25
    python bench/peak_memory.py --steps build_mini --mini-format py2    # Python-2 cPickle pickles

Synthetic content, real sizes: the raw-format fixtures (tests/fixtures/raw_formats.py) write a
full-size CIFAR-100 tarball (60,000 32x32 images) and full-size miniImageNet cache pickles
(38,400 / 9,600 / 12,000 84x84 images); the miniImageNet build's HDF5 files are then the splits the
training steps read. Random pixels: memory does not depend on pixel values (only the PNG decoding
of tieredImageNet would, measured separately by bench/build_fc100.py --tiered).

How each number is taken. Every measured call runs in a fresh child process (``python
bench/peak_memory.py --child STEP ARGS``) that reports its own peak RSS. Linux keeps ru_maxrss
across fork+exec, so the children are spawned by this parent, which never imports numpy or torch
and never holds the data; data generation (and the download's HTTP server) run in children of
their own. A child splits its run into phases (wrapped library functions: each training batch or
episode, validation, embedding, ...) and reports the peak of each: ``VmHWM`` read at the end of a
phase, then reset through ``/proc/self/clear_refs``; the overall peak is the largest phase peak
(the reset also lowers ``ru_maxrss``, which is taken too, before the last phase closes). Each
child also reports its RSS right after its imports, so the memory the call itself adds can be
read off. DataLoader worker processes (pretrain,
``num_workers`` 2) are not in the parent's RSS: a thread samples them every 0.1 s (psutil) and
reports the largest sum of their USS (private memory, what a cgroup limit charges beyond the
shared pages) and the largest combined main RSS + workers' USS seen at one instant.

Training steps run the real entry points (``pretrain``, ``meta_train``, ``evaluate``) on the CPU
with their iteration counts cut: pretrain one epoch of ``--pretrain-batches`` batches of 128
(its ``steps_per_epoch`` argument) and ``--val-episodes`` validation episodes;
meta_train one epoch of ``--meta-episodes`` episodes and ``--val-episodes`` validation episodes;
evaluate on ``--val-episodes`` test episodes. Why that reaches the peak: memory in these loops is
allocated per batch/episode and freed at the next (autograd activations, one embedding batch of
256 images), optimizer state is created at the first step, and everything that grows with the
number of episodes is small and measured separately by step ``learner``: the batched base learner
(``evaluate_episodes``) over 600 episodes on (12,000 x 640) random features, plus the feature
matrix itself (U distinct images x D x 4 bytes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import context  # this checkout's mtl; light (no numpy/torch in the parent: the children's peak RSS stays theirs)

ROOT = context.ROOT

ALL_STEPS = ("download", "build_fc100", "build_mini", "episodes", "pretrain", "meta_train", "evaluate",
             "learner", "summarize")


# ============================================================================ child side
class _Probe:
    """What a child reports: peak RSS per phase, RSS after imports, and DataLoader workers' memory.

    Phases: ``mark(name)`` reads VmHWM (the peak RSS so far), files it under the phase that is
    ending, and resets the peak (``echo 5 > /proc/self/clear_refs``), so each phase gets its own
    peak. The reset also lowers ``ru_maxrss``, so the overall peak is the largest phase peak.
    """

    def __init__(self):
        self.after_imports_mb = None
        self.workers = None
        self.phase = "start"
        self.phases: list[list] = []  # [name, peak MB], consecutive repeats merged

    def imports_done(self) -> None:
        self.after_imports_mb = _status_mb("VmRSS")
        self.mark("call")

    def mark(self, name: str | None) -> None:
        peak = _status_mb("VmHWM")
        if self.phases and self.phases[-1][0] == self.phase:
            self.phases[-1][1] = max(self.phases[-1][1], peak)
        else:
            self.phases.append([self.phase, peak])
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        self.phase = name

    def around(self, owner, attribute: str, name: str) -> None:
        """Make ``owner.attribute`` (a function) a phase of its own: ``name`` while it runs, then 'after name'."""
        original = getattr(owner, attribute)

        def wrapped(*args, **kwargs):
            self.mark(name)
            try:
                return original(*args, **kwargs)
            finally:
                self.mark(f"after {name}")

        setattr(owner, attribute, wrapped)

    def before(self, owner, attribute: str, name) -> None:
        """Start a phase each time ``owner.attribute`` is called (``name``: str or callable(count))."""
        original, calls = getattr(owner, attribute), [0]

        def wrapped(*args, **kwargs):
            calls[0] += 1
            self.mark(name(calls[0]) if callable(name) else name)
            return original(*args, **kwargs)

        setattr(owner, attribute, wrapped)

    def watch_children(self) -> None:
        self.workers = _ChildSampler()
        self.workers.start()


def _status_mb(field: str, pid: str = "self") -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


class _ChildSampler:
    """Samples the memory of this process's children (DataLoader workers) every ``interval`` s."""

    def __init__(self, interval: float = 0.1):
        import threading

        import psutil

        self.me = psutil.Process()
        self.gone = (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError)
        self.interval = interval
        self.max_uss_sum = self.max_pss_sum = self.max_worker_hwm = self.max_combined = 0.0
        self.pids = set()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        uss = pss = 0.0
        for child in self.me.children(recursive=True):
            try:
                info = child.memory_full_info()
                hwm = _status_mb("VmHWM", str(child.pid))
            except self.gone:
                continue  # the worker exited between listing and reading
            self.pids.add(child.pid)
            uss += info.uss / 2**20
            pss += info.pss / 2**20
            self.max_worker_hwm = max(self.max_worker_hwm, hwm)
        main_rss = self.me.memory_info().rss / 2**20
        self.max_uss_sum = max(self.max_uss_sum, uss)
        self.max_pss_sum = max(self.max_pss_sum, pss)
        self.max_combined = max(self.max_combined, main_rss + uss)

    def report(self) -> dict:
        self.stop_event.set()
        self.thread.join()
        return {"workers_seen": len(self.pids), "workers_max_uss_sum_mb": round(self.max_uss_sum),
                "workers_max_pss_sum_mb": round(self.max_pss_sum), "worker_max_vmhwm_mb": round(self.max_worker_hwm),
                "main_rss_plus_workers_uss_max_mb": round(self.max_combined)}


def _torch_setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch


def step_gen_cifar(a: dict, probe: _Probe) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.raw_formats import make_cifar100_tarball

    path = Path(a["raw"]) / "cifar-100-python.tar.gz"
    make_cifar100_tarball(path, images_per_class=600)
    return {"tarball_mb": round(path.stat().st_size / 1e6)}


class _PickleWith:
    """Stands in for the ``pickle`` module inside the fixture so its ``dump`` writes another format."""

    def __init__(self, fmt: str):
        import pickle

        from tests.fixtures import raw_formats

        self._pickle, self._fmt, self._py2 = pickle, fmt, raw_formats.dump_python2_pickle

    def __getattr__(self, name):
        return getattr(self._pickle, name)

    def dump(self, obj, file, protocol=None):
        if self._fmt == "py2":  # Python 2 cPickle: arrays' data as BINSTRING (read back as latin1 str)
            return self._py2(obj, file)
        return self._pickle.dump(obj, file, protocol=2)  # Python 3, protocol 2: _codecs.encode(text, latin1)


def step_gen_mini(a: dict, probe: _Probe) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.fixtures import raw_formats

    if a["format"] != "p4":
        raw_formats.pickle = _PickleWith(a["format"])
    fixture = raw_formats.make_miniimagenet_pickles(a["raw"], images_per_class=600)
    return {"images": fixture.images, "pickle_mb": {p.name: round(p.stat().st_size / 1e6) for p in fixture.files}}


def step_build(a: dict, probe: _Probe) -> dict:
    from mtl.data.builders import build_dataset

    probe.imports_done()
    paths = build_dataset(a["kind"], Path(a["raw"]), Path(a["out"]))  # strict counts: full-size fixtures
    return {"hdf5_mb": {k: round(p.stat().st_size / 1e6) for k, p in paths.items()}}


def step_serve(a: dict, probe: _Probe) -> dict:
    """Not measured: a loopback server (its own process) holding the body; runs until stdin closes."""
    sys.path.insert(0, str(ROOT))
    from tests.fixtures.http_server import FileServer

    server = FileServer().start()
    url = server.add("/" + Path(a["body"]).name, Path(a["body"]).read_bytes())
    print(json.dumps({"url": url}), flush=True)
    sys.stdin.read()
    server.stop()
    return {}


def step_download(a: dict, probe: _Probe) -> dict:
    from mtl.data.download import download_file
    from mtl.data.sources import RemoteFile

    probe.imports_done()
    remote = RemoteFile(name=a["name"], urls=(a["url"],), sha256=a["sha256"], size=a["size"])
    path = download_file(remote, a["dest"], progress=False)
    return {"downloaded_mb": round(path.stat().st_size / 1e6)}


def step_episodes(a: dict, probe: _Probe) -> dict:
    from mtl.data.episodes import write_test_episodes

    probe.imports_done()
    write_test_episodes(a["test"], a["out"], way=5, shot=a["shot"], query=15, count=a["count"], seed=1)
    return {}


def step_pretrain(a: dict, probe: _Probe) -> dict:
    _torch_setup(a["threads"])
    from mtl.train.pretrain import PretrainConfig, PretrainTrainer, pretrain

    probe.imports_done()
    probe.before(PretrainTrainer, "train_step", lambda i: f"batch {i}")
    probe.around(PretrainTrainer, "validate", "validation")
    probe.around(PretrainTrainer, "save_encoder", "save encoder")
    probe.watch_children()
    out = Path(a["out"])
    shutil.rmtree(out / "pretrain_ckpt", ignore_errors=True)  # a checkpoint would make it resume, not train
    start = time.perf_counter()
    pretrain(a["train"], a["val"], encoder_out=out / "encoder.pt", history_out=out / "pretrain_history.csv",
             checkpoint_dir=out / "pretrain_ckpt", backbone={"name": a["backbone"], "width": 1.0, "image_size": None},
             config=PretrainConfig(epochs=1, num_workers=a["workers"]), val_episodes=a["val_episodes"], device="cpu",
             steps_per_epoch=a["batches"])
    with open(out / "pretrain_history.csv") as handle:
        history = handle.read().splitlines()
    return {"call_s": round(time.perf_counter() - start, 1), "history": history[-1]}


def step_meta_train(a: dict, probe: _Probe) -> dict:
    _torch_setup(a["threads"])
    import mtl.train.meta as meta_module
    from mtl.train.meta import MetaConfig, meta_train

    probe.imports_done()
    probe.around(meta_module, "open_split", "open_split")
    probe.before(meta_module.MetaTrainer, "task_forward_backward", lambda i: f"episode {i}")
    probe.around(meta_module.MetaTrainer, "validate", "validation")
    out = Path(a["out"])
    shutil.rmtree(out / "meta_ckpt", ignore_errors=True)
    start = time.perf_counter()
    meta_train(a["train"], a["val"], a["encoder"], model_out=out / "model.pt", history_out=out / "meta_history.csv",
               checkpoint_dir=out / "meta_ckpt", config=MetaConfig(epochs=1, episodes_per_epoch=a["episodes"]),
               way=5, shot=a["shot"], query=15, val_episodes=a["val_episodes"], seed=1, method="mtl",
               device="cpu")
    return {"call_s": round(time.perf_counter() - start, 1)}


def step_evaluate(a: dict, probe: _Probe) -> dict:
    _torch_setup(a["threads"])
    import mtl.evaluate as evaluate_module
    from mtl.data.episodes import write_test_episodes
    from mtl.evaluate import evaluate

    probe.imports_done()
    probe.around(evaluate_module, "embed_episodes", "embed")
    probe.around(evaluate_module, "evaluate_episodes", "adapt")
    out = Path(a["out"])
    episodes = write_test_episodes(a["test"], out / "eval_episodes.npz", way=5, shot=a["shot"], query=15,
                                   count=a["episodes"], seed=1)
    start = time.perf_counter()
    metrics = evaluate(a["method"], a["model"], a["test"], episodes, episodes_out=out / "eval.csv",
                       metrics_out=out / "eval.json", device="cpu",
                       protocol={"dataset": "synthetic", "backbone": a["backbone"]})
    return {"call_s": round(time.perf_counter() - start, 1), "episodes": metrics["episodes"]}


def step_learner(a: dict, probe: _Probe) -> dict:
    """The part of validation/evaluation that grows with the episode count, at full count."""
    torch = _torch_setup(a["threads"])
    import numpy as np

    from mtl.data.episodes import EpisodeSampler
    from mtl.base_learner import evaluate_episodes

    labels = np.repeat(np.arange(20), a["images"] // 20)
    episodes = EpisodeSampler(labels, 5, a["shot"], 15, 1).sample(a["episodes"])
    support, query = np.stack([e.support for e in episodes]), np.stack([e.query for e in episodes])
    features = torch.randn(len(labels), a["dim"])
    probe.imports_done()  # baseline includes the feature matrix (counted separately in the report)
    start = time.perf_counter()
    evaluate_episodes(features, (support, query), 5, a["shot"], 15, steps=100, lr=0.01,
                      generator=torch.Generator().manual_seed(1))
    return {"call_s": round(time.perf_counter() - start, 1),
            "features_mb": round(features.numel() * 4 / 2**20)}


def step_gen_results(a: dict, probe: _Probe) -> dict:
    """Synthetic results tree: every run summarize reads, with 600-episode CSVs and 100-epoch histories."""
    import numpy as np

    from mtl.results.runs import write_episode_results

    root, rng = Path(a["root"]), np.random.default_rng(0)
    files = {"metrics": [], "episodes": [], "histories": []}
    for dataset in ("fc100", "miniimagenet", "tieredimagenet"):
        history = root / dataset / "resnet12" / "pretrain" / "history.csv"
        _write_history(history, "epoch,train_loss,train_acc,val_acc,val_ci95,lr,seconds", rng)
        files["histories"].append(str(history))
        for shot in (1, 5):
            sha = f"sha-{dataset}-{shot}"
            for method in ("ft", "proto", "mtl", "mtl_ht"):
                run = root / dataset / "resnet12" / method / f"{shot}shot"
                protocol = {"dataset": dataset, "backbone": "resnet12", "method": method, "way": 5, "shot": shot,
                            "query": 15, "seed": 1, "episode_seed": 1, "episodes_file": f"{dataset}/{shot}.npz",
                            "episodes_sha256": sha}
                write_episode_results(run / "episodes.csv", run / "metrics.json",
                                      rng.integers(20, 70, 600) / 75.0, protocol)
                files["metrics"].append(str(run / "metrics.json"))
                files["episodes"].append(str(run / "episodes.csv"))
                if method.startswith("mtl"):
                    _write_history(run / "history.csv",
                                   "epoch,meta_loss,train_acc,val_acc,val_ci95,lr,hard_tasks,seconds", rng)
                    files["histories"].append(str(run / "history.csv"))
    (root / "files.json").write_text(json.dumps(files))
    return {"runs": len(files["metrics"]), "histories": len(files["histories"])}


def _write_history(path: Path, header: str, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = header.split(",")
    rows = [",".join([str(epoch)] + [f"{v:.4f}" for v in rng.random(len(columns) - 1)]) for epoch in range(1, 101)]
    path.write_text("\n".join([header, *rows]) + "\n")


def step_summarize(a: dict, probe: _Probe) -> dict:
    from mtl.report import summarize_runs

    probe.imports_done()
    root = Path(a["root"])
    files = json.loads((root / "files.json").read_text())
    summarize_runs(files["metrics"], files["episodes"], files["histories"], csv_out=root / "summary.csv",
                   per_seed_csv_out=root / "summary_per_seed.csv", md_out=root / "summary.md",
                   accuracy_plot=root / "accuracy.png", reliability_plot=root / "reliability.png",
                   history_plot=root / "training.png")
    return {}


CHILD_STEPS = {
    "gen_cifar": step_gen_cifar, "gen_mini": step_gen_mini, "build": step_build, "serve": step_serve,
    "download": step_download, "episodes": step_episodes, "pretrain": step_pretrain, "meta_train": step_meta_train,
    "evaluate": step_evaluate, "learner": step_learner, "gen_results": step_gen_results, "summarize": step_summarize,
}


def child_main(step: str, args: dict) -> None:
    import resource

    sys.path.insert(0, str(ROOT))
    probe = _Probe()
    start = time.perf_counter()
    extra = CHILD_STEPS[step](args, probe)
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    probe.mark(None)
    peak = max([ru_maxrss] + [mb for _, mb in probe.phases])
    result = {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak),
              "after_imports_mb": None if probe.after_imports_mb is None else round(probe.after_imports_mb),
              "phases_mb": [[name, round(mb)] for name, mb in probe.phases], **extra}
    if probe.workers is not None:
        result.update(probe.workers.report())
    print(json.dumps(result), flush=True)


# ============================================================================ parent side
def run_child(step: str, **args) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", step, json.dumps(args)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {step} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_download(work: Path, body_mb: int) -> dict:
    """A body_mb file through download_file from a loopback server in a third process."""
    body = work / "download" / "body.bin"
    body.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(body, "wb") as handle:  # the parent streams it: it never holds the body
        for _ in range(body_mb):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            handle.write(chunk)
    server = subprocess.Popen([sys.executable, __file__, "--child", "serve", json.dumps({"body": str(body)})],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        url = json.loads(server.stdout.readline())["url"]
        dest = work / "download" / "dest"
        shutil.rmtree(dest, ignore_errors=True)
        result = run_child("download", name="body.bin", url=url, sha256=digest.hexdigest(),
                           size=body_mb << 20, dest=str(dest))
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    shutil.rmtree(work / "download", ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, metavar=("STEP", "JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", default=",".join(ALL_STEPS), help=f"comma-separated subset of {ALL_STEPS}")
    parser.add_argument("--backbones", default="resnet12,resnet25")
    parser.add_argument("--workdir", help="keep generated data here (reused when present); default: a temp dir")
    parser.add_argument("--mini-format", choices=("p4", "p2", "py2"), default="p4",
                        help="miniImageNet pickle format for build_mini (p4: the fixture's; p2: Python 3 "
                        "protocol 2; py2: Python 2 cPickle)")
    parser.add_argument("--download-mb", type=int, default=200)
    parser.add_argument("--pretrain-batches", type=int, default=3)
    parser.add_argument("--meta-episodes", type=int, default=3)
    parser.add_argument("--val-episodes", type=int, default=4,
                        help="validation/test episodes in the training steps (>= 4 fills one 256-image embedding batch)")
    parser.add_argument("--shot", type=int, default=5, help="meta_train/evaluate shot (5 holds more images)")
    parser.add_argument("--workers", type=int, default=2, help="pretrain DataLoader workers (config default 2)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        child_main(args.child[0], json.loads(args.child[1]))
        return

    steps = args.steps.split(",")
    unknown = sorted(set(steps) - set(ALL_STEPS))
    if unknown:
        parser.error(f"unknown step(s) {unknown}; known: {ALL_STEPS}")
    temp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench-peak-memory-")
    work = Path(args.workdir or temp.name)
    work.mkdir(parents=True, exist_ok=True)
    mini = work / "mini"
    results = {"python": platform.python_version(), "machine": context.machine_line()}
    print(context.machine_line(), flush=True)

    def record(name: str, value: dict) -> None:
        results[name] = {**value, "machine": context.context()}
        print(json.dumps({name: results[name]}), flush=True)

    if "download" in steps:
        record(f"download ({args.download_mb} MB)", measure_download(work, args.download_mb))
    if "build_fc100" in steps:
        raw = work / "fc100_raw"
        gen = run_child("gen_cifar", raw=str(raw))
        record("build_hdf5 fc100", {**run_child("build", kind="fc100", raw=str(raw), out=str(work / "fc100")),
                                    "tarball_mb": gen["tarball_mb"]})
        shutil.rmtree(raw), shutil.rmtree(work / "fc100")
    if "build_mini" in steps:
        # The fixture's pickles are protocol 4 (array data as BINBYTES); --mini-format p2 / py2 measure
        # the same build on Python-3 protocol-2 / Python-2 cPickle files, into a folder then removed.
        raw, out = work / "mini_raw", mini if args.mini_format == "p4" else work / f"mini_{args.mini_format}"
        if not (out / "test.h5").exists():
            gen = run_child("gen_mini", raw=str(raw), format=args.mini_format)
            record(f"build_hdf5 miniimagenet ({args.mini_format} pickles)", {
                **run_child("build", kind="miniimagenet", raw=str(raw), out=str(out)), "pickle_mb": gen["pickle_mb"]})
            shutil.rmtree(raw)
            if out != mini:
                shutil.rmtree(out)
    common = {"threads": args.threads, "out": str(work)}
    if "episodes" in steps:
        record("episodes (600, mini test)", run_child("episodes", test=str(mini / "test.h5"), shot=args.shot, count=600,
                                                      out=str(work / "episodes.npz")))
    for backbone in args.backbones.split(","):
        out = work / backbone
        out.mkdir(exist_ok=True)
        common = {"threads": args.threads, "out": str(out)}
        if "pretrain" in steps:
            record(f"pretrain {backbone}", run_child(
                "pretrain", **common, train=str(mini / "train.h5"), val=str(mini / "val.h5"), backbone=backbone,
                batches=args.pretrain_batches, val_episodes=args.val_episodes, workers=args.workers))
        if "meta_train" in steps:
            record(f"meta_train {backbone}", run_child(
                "meta_train", **common, train=str(mini / "train.h5"), val=str(mini / "val.h5"),
                encoder=str(out / "encoder.pt"), shot=args.shot, episodes=args.meta_episodes,
                val_episodes=args.val_episodes))
        if "evaluate" in steps:
            record(f"evaluate {backbone}", run_child(
                "evaluate", **common, test=str(mini / "test.h5"), model=str(out / "model.pt"), method="mtl",
                backbone=backbone, shot=args.shot, episodes=args.val_episodes))
    if "learner" in steps:
        record("learner (600 episodes, 12,000 x 640 features)", run_child(
            "learner", threads=args.threads, images=12000, dim=640, shot=args.shot, episodes=600))
    if "summarize" in steps:
        root = work / "results"
        gen = run_child("gen_results", root=str(root))
        record(f"summarize ({gen['runs']} runs, {gen['histories']} histories)", run_child("summarize", root=str(root)))
        shutil.rmtree(root)
    print(json.dumps(results, indent=1))
    if temp is not None:
        temp.cleanup()


if __name__ == "__main__":
    main()
