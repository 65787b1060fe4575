"""The numbers users read: per-run accuracy, the across-seed summary with its intervals, paired
differences and the verdict sentences.

Pure functions over pandas/numpy (no torch, no Snakemake, no plots), in layers, each importing only
the ones before it:

- :mod:`mtl.stats`: the formulas (intervals, paired differences, verdicts), NumPy only;
- :mod:`mtl.published`: the papers' figures shown beside ours;
- :mod:`mtl.results.runs`: one run's files, and loading a set of runs;
- :mod:`mtl.results.tables`: the per-seed and across-seed tables;
- :mod:`mtl.results.render`: the verdict sentences and the written summary files.

:mod:`mtl.report` (the summarize step) uses these and :mod:`mtl.plots`.

Aggregation, in this order:
1. **per episode -> per run.** A run is one dataset x backbone x method x shot x *training seed*.
   Its accuracy is the mean over the saved test episodes with the reference code's interval
   ``1.96 * std / sqrt(n)`` (population std, ``n`` episodes). That interval covers the sampling of
   test episodes only, not the variance between training runs.
2. **per run -> across seeds.** Each training seed replicates the whole training chain. The summary
   row is the mean of the per-seed accuracies with a Student-t interval over seeds,
   ``t(0.975, n_seeds-1) * sd / sqrt(n_seeds)`` (``sd`` with ``ddof=1``). With one seed the training
   variance is unmeasured and the row says so instead of printing an interval.
3. **paired differences.** Every method and seed of a dataset/shot is scored on the *same* saved
   episodes (same ``episodes_sha256``). Per seed, ``d_s`` is the mean over episodes of method minus
   baseline (the baseline run of the *same* seed, i.e. the same pre-trained encoder); the difference
   reported is the mean of ``d_s`` with a t-interval over seeds, plus how many seeds favour each side.
   Only the seeds both the method and the baseline have are paired: their count
   (``seeds_paired_with_<baseline>``) is the ``n`` of that interval, of the verdict sentence and of
   "k of n seeds favour", and can be smaller than the method's own ``n_seeds``.

**Transfer.** A run records ``trained_on``, the dataset whose training produced its model, next to
``dataset``, the test data it was scored on (equal for in-domain runs; a metrics file written before
the key existed reads as in-domain). Rows and pairings are keyed by both: a transfer run of method m
(trained on S, tested on T) is paired with the ``ft`` run of the same S and seed on the same saved
episodes of T. Published figures are only shown for in-domain rows.

Files (one run):
  ``episodes.csv``  columns ``episode`` (index into the shared episode file), ``accuracy`` (fraction 0..1)
  ``metrics.json``  protocol + ``accuracy``/``ci95``/``std`` in % (see :data:`mtl.results.runs.METRICS_KEYS`),
                    and the calibration of the run's probabilities (``mtl.results.runs.CALIBRATION_METRICS``)

**Calibration.** Per run, ``ece`` and ``nll`` (evaluate: :mod:`mtl.learners.calibration`); across seeds,
their mean with the t-interval over seeds of step 2, like accuracy. The reliability plot pools the
runs' tables of sums per confidence bin instead (:func:`mtl.results.tables.pooled_reliability`).
"""
# The names this package had as one module, so code written against it keeps working; new code
# imports from the module that defines a name (training, for one, needs only mtl.stats).
# summarize_runs moved to mtl.report: importing it here would make the tables import the plots.
from mtl.published import REFERENCE_ACCURACIES, REFERENCE_WAY, reference_for
from mtl.results.render import FRONT_PAGE_COLUMNS, NBSP, summary_markdown, summary_rst, verdict_sentences, write_summary
from mtl.results.runs import (
    COMPARED_FIELDS, METRICS_KEYS, PROTOCOL_KEYS, ROW_KEY, RUN_KEY, TRAINED_ON, is_transfer, load_runs,
    read_csv_table, read_episode_accuracies, read_metrics, write_episode_results,
)
from mtl.results.tables import (
    BASELINE, METHOD_ORDER, build_summary, per_seed_columns, per_seed_table, summary_columns,
)
from mtl.stats import (
    INTERVAL_FORMULA, NOT_MEASURED, SEED_INTERVAL, Z_95, ci95, mean_ci95, paired_difference, summarize_accuracies,
    t_interval, verdict,
)

__all__ = [
    "BASELINE", "COMPARED_FIELDS", "FRONT_PAGE_COLUMNS", "INTERVAL_FORMULA", "METHOD_ORDER", "METRICS_KEYS", "NBSP",
    "NOT_MEASURED", "PROTOCOL_KEYS", "REFERENCE_ACCURACIES", "REFERENCE_WAY", "ROW_KEY", "RUN_KEY",
    "SEED_INTERVAL", "TRAINED_ON", "Z_95", "build_summary", "ci95", "is_transfer", "load_runs", "mean_ci95",
    "paired_difference", "per_seed_columns", "per_seed_table", "read_csv_table", "read_episode_accuracies",
    "read_metrics", "reference_for", "summarize_accuracies", "summary_columns", "summary_markdown", "summary_rst",
    "t_interval", "verdict", "verdict_sentences", "write_episode_results", "write_summary",
]
