"""Mutation audit of prediction and the learners: does a fast test fail when the product code is wrong?

    .venv/bin/python bench/mutations.py                          # every mutation, the default test files
    .venv/bin/python bench/mutations.py --markdown out.md        # also write the table as Markdown
    .venv/bin/python bench/mutations.py --only predict-seeds-agreeing-inverted --tests tests/test_predict.py

Each mutation is a named edit of the product code (a file, an old text found there exactly once,
and the new text) that changes what some input gives: a wrong class order, another random stream,
another regularisation strength. The repository (tracked files and untracked ones git does not
ignore) is copied once to a temporary folder; the test files run there unmutated first (they must
pass, or the audit stops); then, one mutation at a time, the file is edited, the tests run
(``pytest -x -q -m "not slow"``: the first failure ends the run), and the file is restored. A
mutation is *caught* when a test fails (the first failing test is recorded) and *survives* when all
pass; an old text that is not found exactly once is refused before anything runs.

Every mutation here changes an output for some input (each was checked by reading the code it
edits). Left out as equivalent (no input can tell): ``read_support_folder`` listing ``files`` in the
order of its ``classes`` dict instead of ``sorted(classes)`` (the dict is filled in sorted order).
Kept, though only the scores can tell: ``linear-other-class-count-starts-*``. Any start where every
class has the same row (the mean row, zeros, the first row) gives every class the same logit and
gradient at every step, so the adapted logits differ only by a constant per query (``x . w0 + b0``)
and every probability, prediction and temperature is the same; the logits themselves are an output
(``AdaptedClassifier.logits``, evaluate's ``queries_out``), which is where a test can catch them.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import context  # first: this checkout's mtl, and the machine beside every figure

#: Fastest first (unmutated, niced, on the shared 2-core VM: 9, 12, 12, 22, 49 and 102 s): with ``-x``
#: the first failure ends a run, so a mutation the quick files catch costs seconds, not minutes.
DEFAULT_TESTS = ("tests/test_evaluate.py", "tests/test_logistic.py", "tests/test_unknown.py",
                 "tests/test_finetune.py", "tests/test_predict.py", "tests/test_learners.py")


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str


PREDICT, LEARNERS, STATS, MODEL_FILE, EVALUATE, USER_IMAGES = (
    "mtl/predict.py", "mtl/learners/", "mtl/stats.py", "mtl/model_file.py", "mtl/evaluate.py",
    "mtl/data/user_images.py")

MUTATIONS = (
    # --- mtl/predict.py: the table
    Mutation("predict-p-columns-reversed", PREDICT,
             'table[f"p_{name}"] = probs[:, c]', 'table[f"p_{name}"] = probs[:, len(self.class_names) - 1 - c]'),
    Mutation("predict-predicted-names-the-next-class", PREDICT,
             "classes = [self.class_names[i] for i in predicted]",
             "classes = [self.class_names[(i + 1) % len(self.class_names)] for i in predicted]"),
    Mutation("predict-probability-of-the-first-class", PREDICT,
             'table["probability"] = probs[rows, predicted]', 'table["probability"] = probs[rows, 0]'),
    Mutation("predict-seeds-agreeing-inverted", PREDICT,
             "(per_model_choice == predicted).sum(axis=0)", "(per_model_choice != predicted).sum(axis=0)"),
    Mutation("predict-probability-sd-population", PREDICT, ".std(axis=0, ddof=1)", ".std(axis=0, ddof=0)"),
    Mutation("predict-ensemble-is-the-first-model", PREDICT,
             "return self.per_model.mean(axis=0)", "return self.per_model[0]"),
    Mutation("predict-predicted-is-argmin", PREDICT,
             "return self.probabilities.argmax(axis=1)", "return self.probabilities.argmin(axis=1)"),
    # --- mtl/predict.py: which models and which run
    Mutation("predict-model-files-of-another-trained-on-kept", PREDICT,
             ' and h["trained_on"] == trained_on]', "]"),
    Mutation("predict-choose-run-keeps-transfer-rows", PREDICT,
             '        rows = rows[rows["trained_on"] == trained_on]', "        rows = rows"),
    Mutation("predict-choose-run-selects-by-trained-on-only", PREDICT,
             'rows = summary[summary["dataset"] == trained_on]', 'rows = summary[summary["trained_on"] == trained_on]'),
    Mutation("predict-choose-run-tie-to-the-larger-shot", PREDICT,
             "key=lambda s: (abs(s - median), s)", "key=lambda s: (abs(s - median), -s)"),
    Mutation("predict-choose-run-worst-method", PREDICT, "ascending=False", "ascending=True"),
    Mutation("predict-ensemble-of-different-kinds-accepted", PREDICT, "if len(kinds) > 1:", "if len(kinds) > 2:"),
    # --- mtl/predict.py: the learner a model adapts
    Mutation("predict-fresh-learner-of-another-seed", PREDICT,
             "model.backbone.to(device), seed=model.seed,", "model.backbone.to(device), seed=model.seed + 1,"),
    Mutation("predict-fresh-learner-from-the-calibration-stream", PREDICT,
             "model.backbone.to(device), seed=model.seed,",
             "model.backbone.to(device), seed=model.seed, "
             "purpose=__import__('mtl.rng').rng.Purpose.CALIBRATION_LEARNERS,"),
    Mutation("predict-every-support-set-starts-from-draw-0", PREDICT,
             "first_episode=episode)", "first_episode=0)"),
    Mutation("predict-temperature-ignored", PREDICT,
             "return probabilities(self.logits(images), self.temperature)",
             "return probabilities(self.logits(images))"),
    # --- mtl/predict.py: "none of these" (predict(..., unknown=threshold))
    Mutation("unknown-similarity-to-the-farthest-support-image", PREDICT,
             "(query @ support.transpose(-1, -2)).amax(dim=-1)", "(query @ support.transpose(-1, -2)).amin(dim=-1)"),
    Mutation("unknown-threshold-comparison-inverted", PREDICT,
             "return self.similarity < self.unknown", "return self.similarity > self.unknown"),
    Mutation("unknown-similarity-equal-to-the-threshold-flagged", PREDICT,
             "return self.similarity < self.unknown", "return self.similarity <= self.unknown"),
    Mutation("unknown-similarity-of-the-first-seed-only", PREDICT,
             "self.per_model_similarity.mean(axis=0)", "self.per_model_similarity[0]"),
    # --- mtl/learners/ (and the ECE's arithmetic, in mtl/stats.py)
    Mutation("linear-other-class-count-starts-from-zeros", LEARNERS + "linear.py",
             "weight, bias = weight.mean(dim=0, keepdim=True).expand(n_classes, -1), bias.mean().expand(n_classes)",
             "weight, bias = torch.zeros(n_classes, dim, device=device), torch.zeros(n_classes, device=device)"),
    Mutation("linear-other-class-count-starts-from-the-first-row", LEARNERS + "linear.py",
             "weight.mean(dim=0, keepdim=True)", "weight[:1]"),
    Mutation("linear-meta-init-ignored", LEARNERS + "linear.py", "if self.init is None:", "if True:"),
    Mutation("linear-draws-never-replayed", LEARNERS + "linear.py",
             "if self._generator is None or first < self._next:", "if self._generator is None:"),
    Mutation("linear-earlier-draws-not-skipped", LEARNERS + "linear.py",
             "fresh_init(first - self._next, n_classes, dim, generator=self._generator)", "pass"),
    Mutation("base-every-chunk-starts-from-draw-0", LEARNERS + "base.py",
             "labels, way, first_episode=first)", "labels, way, first_episode=0)"),
    Mutation("settings-meta-learned-budget-is-fts", LEARNERS + "__init__.py",
             'budget = (int(trained_info["inner"]["update_step"]), float(trained_info["inner"]["base_lr"]))',
             "budget = (100, 0.01)"),
    Mutation("prototype-distance-not-squared", LEARNERS + "prototype.py",
             "-torch.cdist(query.float(), prototypes).square()", "-torch.cdist(query.float(), prototypes)"),
    Mutation("prototype-class-sums-not-means", LEARNERS + "prototype.py",
             "support.float()) / counts.unsqueeze(1)", "support.float())"),
    Mutation("logistic-C-1.2", LEARNERS + "logistic.py", '"C": 1.0,', '"C": 1.2,'),
    Mutation("logistic-C-1.5", LEARNERS + "logistic.py", '"C": 1.0,', '"C": 1.5,'),
    Mutation("logistic-two-classes-without-doubling-C", LEARNERS + "logistic.py",
             'c = settings["C"] * (2.0 if n_classes == 2 else 1.0)', 'c = settings["C"]'),
    Mutation("logistic-features-not-normalised", LEARNERS + "logistic.py",
             'return l2_normalize(feats.detach().to("cpu", torch.float64)).numpy()',
             'return feats.detach().to("cpu", torch.float64).numpy()'),
    Mutation("logistic-probabilities-as-scores", LEARNERS + "logistic.py",
             "model.predict_log_proba(_as_numpy64(query_feats))", "model.predict_proba(_as_numpy64(query_feats))"),
    Mutation("finetune-head-of-another-seed-than-ft", LEARNERS + "finetune.py",
             "self.draws = FreshDraws(seed, purpose)", "self.draws = FreshDraws(seed + 1, purpose)"),
    Mutation("finetune-encoder-part-not-adapted", LEARNERS + "finetune.py",
             "params = {k: v - encoder_lr * g_params[k] for k, v in params.items()}",
             "params = {k: v for k, v in params.items()}"),
    Mutation("finetune-bn-in-train-mode-while-adapting", LEARNERS + "finetune.py",
             'head = _Head(backbone, scope).eval()  # functional_call', 'head = _Head(backbone, scope).train()  #'),
    Mutation("finetune-cpu-chunks-of-16", LEARNERS + "finetune.py", "CPU_MAX_CHUNK = 1\n", "CPU_MAX_CHUNK = 16\n"),
    Mutation("calibration-temperature-multiplies", LEARNERS + "calibration.py",
             "torch.softmax(logits.double() / float(temperature), dim=-1)",
             "torch.softmax(logits.double() * float(temperature), dim=-1)"),
    Mutation("calibration-ece-signed-gaps", STATS,
             'gap = np.abs(np.asarray(table["correct"]) - np.asarray(table["confidence"]))',
             'gap = np.asarray(table["correct"]) - np.asarray(table["confidence"])'),
    Mutation("calibration-temperature-never-fitted", LEARNERS + "calibration.py",
             "return float(math.exp(result.x))", "return 1.0"),
    # --- mtl/model_file.py
    Mutation("export-temperature-not-recorded", MODEL_FILE,
             '"temperature": float(metrics.get("temperature", 1.0)) if metrics else 1.0,', '"temperature": 1.0,'),
    Mutation("export-another-runs-metrics-accepted", MODEL_FILE, "    if differing:\n", "    if False:\n"),
    Mutation("export-test-time-of-ft", MODEL_FILE,
             '"test_time": learner_settings(method, info),', '"test_time": learner_settings("ft", info),'),
    Mutation("export-meta-init-as-zeros", MODEL_FILE,
             'extra["learner"] = {"weight": info["learner"]["weight"].float(),',
             'extra["learner"] = {"weight": torch.zeros_like(info["learner"]["weight"]),'),
    Mutation("read-format-1-at-temperature-2", MODEL_FILE,
             'info.setdefault("temperature", 1.0)', 'info.setdefault("temperature", 2.0)'),
    Mutation("read-newer-formats-accepted", MODEL_FILE,
             "if not isinstance(version, int) or version > FORMAT_VERSION:", "if not isinstance(version, int):"),
    # --- mtl/evaluate.py
    Mutation("evaluate-test-learners-of-another-seed", EVALUATE,
             'seed=protocol["seed"], meta_init=meta_init)', 'seed=protocol["seed"] + 1, meta_init=meta_init)'),
    Mutation("evaluate-test-learners-from-the-calibration-stream", EVALUATE,
             'seed=protocol["seed"], meta_init=meta_init)',
             'seed=protocol["seed"], meta_init=meta_init, purpose=Purpose.CALIBRATION_LEARNERS)'),
    Mutation("evaluate-metrics-record-temperature-1", EVALUATE,
             "**calibration_report(logits, targets, temperature),", "**calibration_report(logits, targets, 1.0),"),
    Mutation("evaluate-queries-file-at-temperature-1", EVALUATE,
             "write_query_scores(queries_out, logits, targets, temperature)",
             "write_query_scores(queries_out, logits, targets, 1.0)"),
    Mutation("evaluate-targets-shifted-by-one-class", EVALUATE,
             "return torch.as_tensor(relabel(way, query)).expand(episodes, -1)",
             "return torch.as_tensor((relabel(way, query) + 1) % way).expand(episodes, -1)"),
    Mutation("evaluate-accuracy-of-argmin", EVALUATE,
             "(logits.argmax(dim=-1) == targets)", "(logits.argmin(dim=-1) == targets)"),
    # --- mtl/data/user_images.py
    Mutation("support-class-names-reversed", USER_IMAGES,
             "return SupportSet(images, labels, sorted(classes), files)",
             "return SupportSet(images, labels, sorted(classes, reverse=True), files)"),
    Mutation("support-labels-counted-in-reverse-class-order", USER_IMAGES,
             "[len(classes[n]) for n in sorted(classes)]", "[len(classes[n]) for n in sorted(classes, reverse=True)]"),
    Mutation("support-one-class-accepted", USER_IMAGES, "if len(classes) < 2:", "if len(classes) < 1:"),
    Mutation("support-empty-class-accepted", USER_IMAGES, "        if not images:\n", "        if False:\n"),
    Mutation("query-last-image-of-each-chunk-dropped", USER_IMAGES,
             "yield decode_images(files[start:start + chunk], image_size, problems)",
             "yield decode_images(files[start:start + chunk - 1], image_size, problems)"),
)


def copy_repository(source: Path, target: Path) -> None:
    """The files git tracks or would track (untracked, not ignored) of ``source``, copied to ``target``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=source,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        path = source / name
        if path.is_file():  # a tracked file deleted in the working tree is left out
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / name)


def check_applies(root: Path, mutation: Mutation) -> None:
    count = (root / mutation.file).read_text().count(mutation.old)
    if count != 1:
        raise SystemExit(f"mutation {mutation.name}: its old text is found {count} times in {mutation.file} "
                         f"(needs exactly once): {mutation.old!r}")


def run_tests(root: Path, tests: Sequence[str], timeout: float) -> tuple[str, str, float]:
    """(``passed``/``failed``/``error``, the first failing test or the error's last line, seconds)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # a mutated file's bytecode must not outlive it
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                           *tests], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - started
    if done.returncode == 0:
        return "passed", "", seconds
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.MULTILINE)
    if done.returncode == 1 and failed:
        return "failed", failed[0], seconds
    tail = (done.stdout + done.stderr).strip().splitlines() or ["?"]
    return "error", f"exit {done.returncode}: {tail[-1][:160]}", seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS), help="test files to run per mutation")
    parser.add_argument("--only", nargs="+", help="names of the mutations to try (default: all)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one test run may take")
    args = parser.parse_args()
    mutations = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations {sorted(unknown)}")
    if len({m.name for m in MUTATIONS}) != len(MUTATIONS):
        raise SystemExit("two mutations share a name")
    print(context.machine_line(), flush=True)
    print(f"{len(mutations)} mutations; tests: {' '.join(args.tests)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="mutations-") as folder:
        root = Path(folder)
        copy_repository(context.ROOT, root)
        for mutation in mutations:
            check_applies(root, mutation)
        imported = subprocess.run([sys.executable, "-c", "import mtl; print(mtl.__file__)"], cwd=root,
                                  capture_output=True, text=True, check=True).stdout.strip()
        if not Path(imported).is_relative_to(root):  # an installed mtl would hide every mutation
            raise SystemExit(f"the tests would import {imported}, not the copy's mtl in {root}")
        outcome, detail, seconds = run_tests(root, args.tests, args.timeout)
        if outcome != "passed":
            raise SystemExit(f"the tests fail without any mutation ({detail}); fix them first")
        print(f"unmutated: passed in {seconds:.0f} s", flush=True)
        rows = []
        for number, mutation in enumerate(mutations, 1):
            path = root / mutation.file
            original = path.read_text()
            path.write_text(original.replace(mutation.old, mutation.new))
            try:
                outcome, detail, seconds = run_tests(root, args.tests, args.timeout)
            finally:
                path.write_text(original)
            result = {"passed": "**survived**", "failed": "caught", "error": "caught (error)"}[outcome]
            rows.append((number, f"`{mutation.name}`", f"`{mutation.file}`", result, f"`{detail}`" if detail else "",
                         f"{seconds:.0f}"))
            print(context.table_row(rows[-1]), flush=True)
    survived = sum(row[3] == "**survived**" for row in rows)
    table = context.markdown_table(("#", "mutation", "file", "result", "first failing test", "s"), rows)
    summary = f"{len(rows) - survived} of {len(rows)} mutations caught, {survived} survived."
    print(f"\n{table}\n\n{summary}\n{context.machine_line()}")
    if args.markdown:
        args.markdown.write_text(f"{table}\n\n{summary}\n")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
