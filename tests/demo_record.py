"""The offline demo's numbers in the README and the docs: generated from one recorded run, never typed.

``tests/demo_record.json`` holds what one run of the offline demo produced (its summary.csv and
summary_per_seed.csv rows, the worked prediction example's score) and where it ran (commit, date,
CPU, torch, wall and CPU seconds). Every demo number in README.md and docs/*.md sits in a generated
block::

    <!-- demo:NAME -->
    ...
    <!-- /demo:NAME -->

and tests/test_demo_record.py fails while a block is not the rendering of the record. Commands,
from the repository root:

    python -m tests.demo_record --record --wall-s S --cpu-s S   # after the demo ran in this folder
    python -m tests.demo_record --update                        # rewrite the blocks from the record
    python -m tests.demo_record --check                         # CI: this folder's fresh demo vs the record

``--check`` (``.ci/check_demo.py`` runs it after ``.ci/run``'s demo) compares the fresh run's table,
verdicts and prediction score with the record's, digit for digit. On the machine kind the record
was made on (same CPU model name, CPU family and model, torch CPU capability and torch version) a difference fails: the
code changed the demo's numbers, so rerun the demo, ``--record`` and ``--update``, and commit. On
another machine the numbers legitimately differ (float rounding, docs/results.md), and it only
reports the difference.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
RECORD = REPO / "tests" / "demo_record.json"
#: The pages whose generated blocks come from the record.
PAGES = ("README.md", "docs/results.md", "docs/prediction.md")
BLOCK = re.compile(r"(<!-- demo:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /demo:(?P=name) -->)", re.DOTALL)
BASELINE = "ft"
#: The line of the prediction log that names the run it chose (mtl.predict).
CHOSEN = re.compile(r"predicting with (?P<method>\w+) (?P<shot>\d+)-shot")


# ----------------------------------------------------------------------------- the record
def machine() -> dict:
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""

    def field(name: str) -> str:
        found = re.search(rf"^{name}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        return found.group(1).strip() if found else "unknown"

    # VMs that share a model name can be other CPU generations (an "AMD EPYC" with AVX2 and one with
    # AVX-512 trained the demo to other numbers): family and model tell them apart
    return {"cpu": field("model name"), "cpu_generation": f"family {field('cpu family')} model {field('model')}",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "python": platform.python_version()}


def _commit(folder: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out + ("+dirty" if dirty else "")


def _rows(path: Path) -> list[dict]:
    table = pd.read_csv(path)
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in json.loads(table.to_json(orient="records"))]


def read_run(folder: Path = REPO) -> dict:
    """The numbers of the demo run whose outputs are in ``folder`` (results/)."""
    results = folder / "results"
    predictions = pd.read_csv(results / "predictions" / "digits.csv")
    truth = pd.read_csv(results / "image_folders" / "digits" / "query_truth.csv")
    merged = truth.merge(predictions, on="file", validate="one_to_one")
    summary = _rows(results / "summary.csv")
    right = merged["class"].astype(str) == merged["predicted"].astype(str)
    chosen = CHOSEN.search((folder / "logs" / "predict" / "digits.log").read_text())
    agreeing = merged["seeds_agreeing"].value_counts()
    return {
        "summary": summary,
        "per_seed": _rows(results / "summary_per_seed.csv"),
        "prediction": {"correct": int(right.sum()), "total": int(len(merged)), "way": int(summary[0]["way"]),
                       "method": chosen["method"], "shot": int(chosen["shot"]), "seeds": int(merged["seeds"].max()),
                       "seeds_agreeing": {str(k): int(agreeing[k]) for k in sorted(agreeing.index, reverse=True)},
                       "probability_right": round(float(merged.loc[right, "probability"].mean()), 4),
                       "probability_wrong": round(float(merged.loc[~right, "probability"].mean()), 4)},
    }


def write_record(wall_s: float | None, cpu_s: float | None, folder: Path = REPO) -> dict:
    record = {
        "what": "one run of the offline demo: snakemake --cores 2 --configfile configs/demo.yaml, then "
                "snakemake predict --configfile configs/demo.yaml configs/predict_demo.yaml",
        "date": datetime.date.today().isoformat(),
        "commit": _commit(folder),
        "machine": {**machine(), "cores": _cores()},
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        **read_run(folder),
    }
    RECORD.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def load_record() -> dict:
    return json.loads(RECORD.read_text())


# ----------------------------------------------------------------------------- rendering
def _pm(value, interval, signed=False) -> str:
    from mtl.results.render import plus_minus

    return plus_minus(value, interval, signed=signed)


def _summary_frame(record: dict) -> pd.DataFrame:
    return pd.DataFrame(record["summary"]).astype({"shot": int})


def render_table(record: dict) -> str:
    """The README's demo table (per seed, across seeds, vs ft) and the generated verdicts."""
    from mtl.results.render import verdict_sentences

    summary, per_seed = _summary_frame(record), pd.DataFrame(record["per_seed"])
    seeds = sorted(int(s) for s in per_seed["seed"].unique())
    lines = [f"| shot | method | per seed ({', '.join(map(str, seeds))}) | mean ± 95% over seeds "
             f"| vs {BASELINE} (points), over seeds | seeds above {BASELINE} |", "|---|---|---|---|---|---|"]
    for row in summary.itertuples(index=False):
        row = row._asdict()
        runs = per_seed[(per_seed["method"] == row["method"]) & (per_seed["shot"] == row["shot"])]
        by_seed = dict(zip(runs["seed"].astype(int), runs["accuracy"]))
        cells = ", ".join(f"{by_seed[s]:.2f}" if s in by_seed else "-" for s in seeds)
        above = row.get(f"seeds_above_{BASELINE}")
        paired = row.get(f"seeds_paired_with_{BASELINE}")
        lines.append(f"| {row['shot']} | {row['method']} | {cells} | {_pm(row['accuracy'], row['ci95'])} | "
                     f"{_pm(row[f'diff_vs_{BASELINE}'], row[f'diff_vs_{BASELINE}_ci95'], signed=True)} | "
                     f"{'' if pd.isna(above) else f'{int(above)} of {int(paired)}'} |")
    lines += ["", "Its verdicts, generated from those numbers:", ""]
    lines += [f"- {sentence}" for sentence in verdict_sentences(summary, BASELINE)]
    return "\n".join(lines) + "\n"


def render_run(record: dict) -> str:
    """Where and when the recorded run ran, and what it cost."""
    m = record["machine"]
    cost = ""
    if record.get("wall_s") is not None:
        minutes, seconds = divmod(round(record["wall_s"]), 60)
        cost = f": {minutes} min {seconds:02d} s wall"
        if record.get("cpu_s") is not None:
            cost += f", {round(record['cpu_s']):,} CPU s"
    return (f"Recorded on {record['date']} in a fresh clone of commit {record['commit']} on a "
            f"{m['cores']}-core {m['cpu']} VM ({m['cpu_generation']}; torch {m['torch']}, {m['cpu_capability']} "
            f"kernels){cost} ([the record](tests/demo_record.json)).\n")


def render_prediction(record: dict) -> str:
    """The worked prediction example: the run chosen, its score, the seeds' agreement, its confidence."""
    p = record["prediction"]
    counts = [(int(k), n) for k, n in p["seeds_agreeing"].items()]
    agreeing = ", ".join(f"{'all ' if k == p['seeds'] else ''}{k} for {n}" for k, n in counts)
    return (f"In the recorded demo run it chose `{p['method']}` {p['shot']}-shot and classified {p['correct']} of "
            f"{p['total']} query images correctly ({100 * p['correct'] / p['total']:.1f}%; chance "
            f"{100 / p['way']:.1f}%). The seeds' models that chose the ensemble's class: {agreeing} "
            f"images; its calibrated probability for the class it chose averaged {p['probability_right']:.2f} "
            f"where it was right and {p['probability_wrong']:.2f} where it was wrong.\n")


def render_calibration(record: dict) -> str:
    """ECE and NLL before and after each run's temperature, per method and shot (means over seeds)."""
    summary = _summary_frame(record)
    if "ece" not in summary:
        return "No calibration was measured in the recorded run.\n"
    lines = ["| shot | method | ECE (points), uncalibrated | ECE (points), calibrated, ± 95% over seeds "
             "| NLL uncalibrated | NLL calibrated |", "|---|---|---|---|---|---|"]
    for row in summary.itertuples(index=False):
        row = row._asdict()
        lines.append(f"| {row['shot']} | {row['method']} | {row['ece_uncalibrated']:.2f} | "
                     f"{_pm(row['ece'], row.get('ece_ci95'))} | {row['nll_uncalibrated']:.3f} | {row['nll']:.3f} |")
    return "\n".join(lines) + "\n"


def render_seeds(record: dict) -> str:
    """Why seeds matter, on the recorded table: the single seed whose episode interval looks most
    decisive for a comparison that the seeds together call no detectable difference."""
    summary, per_seed = _summary_frame(record), pd.DataFrame(record["per_seed"])
    undecided = summary[summary["verdict"] == "no detectable difference"]
    best = None
    for row in undecided.itertuples(index=False):
        runs = per_seed[(per_seed["method"] == row.method) & (per_seed["shot"] == row.shot)].dropna(
            subset=[f"diff_vs_{BASELINE}"])
        for run in runs.itertuples(index=False):
            diff, half = getattr(run, f"diff_vs_{BASELINE}"), getattr(run, f"diff_vs_{BASELINE}_ci95")
            if abs(diff) > half and (best is None or abs(diff) / half > best[0]):
                best = (abs(diff) / half, row, run, runs)
    if best is None:
        return ("In the recorded table no single seed's episode interval excludes zero where the seeds together "
                "find no difference.\n")
    _, row, run, runs = best
    diff, half = getattr(run, f"diff_vs_{BASELINE}"), getattr(run, f"diff_vs_{BASELINE}_ci95")
    others = [f"{getattr(r, f'diff_vs_{BASELINE}'):+.2f} (seed {int(r.seed)})" for r in runs.itertuples(index=False)
              if r.seed != run.seed]
    return (f"Why seeds matter, in the recorded demo table: seed {int(run.seed)} alone puts {row.method} "
            f"{abs(diff):.2f} ± {half:.2f} points {'above' if diff > 0 else 'below'} {BASELINE} in {int(row.shot)}-shot "
            f"(`results/summary_per_seed.csv`), an episode interval that looks decisive; the other seeds put it at "
            f"{' and '.join(others)} points, and over the seeds the verdict is \"{row.verdict}\" "
            f"({_pm(getattr(row, f'diff_vs_{BASELINE}'), getattr(row, f'diff_vs_{BASELINE}_ci95'), signed=True)} "
            "points).\n")


RENDERERS = {"seeds": render_seeds, "table": render_table, "run": render_run, "prediction": render_prediction,
             "calibration": render_calibration}


def blocks(text: str) -> dict[str, str]:
    return {match["name"]: match["body"] for match in BLOCK.finditer(text)}


def update_pages(record: dict) -> list[str]:
    """Rewrite every generated block of PAGES from ``record``; returns the pages changed."""
    changed = []
    for page in PAGES:
        path = REPO / page
        text = path.read_text()
        new = BLOCK.sub(lambda m: m.group(1) + RENDERERS[m["name"]](record) + m.group(4), text)
        if new != text:
            path.write_text(new)
            changed.append(page)
    return changed


def stale_blocks(record: dict) -> list[str]:
    """The generated blocks that are not the rendering of ``record`` (and unknown block names)."""
    stale = []
    for page in PAGES:
        for name, body in blocks((REPO / page).read_text()).items():
            if name not in RENDERERS or body != RENDERERS[name](record):
                stale.append(f"{page}: demo:{name}")
    return stale


# ----------------------------------------------------------------------------- checking a fresh run
def compare_fresh_run(folder: Path = REPO) -> tuple[bool, list[str]]:
    """(same machine kind as the record, differences between this folder's demo outputs and the record)."""
    record = load_record()
    fresh = {**record, **read_run(folder)}
    differences = [f"demo:{name} differs:\n--- recorded\n{renderer(record)}--- this run\n{renderer(fresh)}"
                   for name, renderer in RENDERERS.items() if name != "run" and renderer(record) != renderer(fresh)]
    recorded, here = record["machine"], machine()
    same_kind = all(recorded.get(key) == here[key] for key in ("cpu", "cpu_generation", "cpu_capability", "torch"))
    return same_kind, differences


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--record", action="store_true", help="write the record from this folder's results/")
    action.add_argument("--update", action="store_true", help="rewrite the generated blocks from the record")
    action.add_argument("--check", action="store_true", help="compare this folder's fresh demo with the record")
    parser.add_argument("--wall-s", type=float, default=None, help="the demo's wall seconds (--record)")
    parser.add_argument("--cpu-s", type=float, default=None, help="the demo's CPU seconds, user + system (--record)")
    parser.add_argument("--folder", type=Path, default=REPO,
                        help="the checkout the demo ran in (--record, --check; default: this one)")
    args = parser.parse_args(argv)
    if args.record:
        write_record(args.wall_s, args.cpu_s, args.folder)
        print(f"wrote {RECORD.relative_to(REPO)}; now run: python -m tests.demo_record --update")
        return 0
    if args.update:
        changed = update_pages(load_record())
        print("rewrote " + (", ".join(changed) if changed else "nothing (every block is current)"))
        return 0
    same_kind, differences = compare_fresh_run(args.folder)
    if not differences:
        print("demo: this run reproduces the recorded table, verdicts, calibration and prediction digit for digit")
        return 0
    print("\n".join(differences))
    if same_kind:
        print("demo: on the machine kind of the record the numbers changed: the code moved them. Rerun the demo, "
              "then `python -m tests.demo_record --record --wall-s S --cpu-s S` and `--update`, and commit.")
        return 1
    print(f"demo: another machine kind than the record's ({load_record()['machine']} vs {machine()}): the numbers "
          "may differ by float rounding (docs/results.md); not a failure.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
