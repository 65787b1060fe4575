"""Classify your own images with what the workflow trained: one model, or the seed ensemble.

    import mtl
    model = mtl.load_model("results/models/digits/resnet12/mtl/5shot/seed1.pt")
    prediction = model.predict("my_support/", "my_query/")       # folders, or uint8 arrays
    ensemble = mtl.load_models("results/models/digits/resnet12/mtl/5shot/")  # every seed's file
    ensemble.predict("my_support/", "my_query/").table()          # one row per query image

A model adapts to the support set exactly as ``evaluate`` adapts it to a test episode's support
set (:mod:`mtl.methods` says how each method does), then scores every query image; the support
set is embedded once per model, the queries in batches. A seed ensemble averages the models'
probabilities: the training replicates the workflow makes anyway become a better predictor, and
how far they disagree is reported per image (``seeds_agreeing``, ``probability_sd``).

Contract (tests/test_predict.py): a saved test episode written out as a support and a query
folder gets exactly the predictions ``evaluate`` makes on that episode, for every method.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtl.data.transforms import EvalTransform
from mtl.data.user_images import SupportSet, list_query_folder, read_query_chunks, read_support_folder
from mtl.errors import ConfigError
from mtl.learners import learner_for
from mtl.methods import current_name
from mtl.learners.calibration import probabilities
from mtl.model_file import read_model_file
from mtl.models import inference_copy
from mtl.base_learner import DEFAULT_INFERENCE_BATCH_SIZE, embed_batch

log = logging.getLogger(__name__)


class FewShotModel:
    """An exported model (:mod:`mtl.model_file`), ready to adapt to a support set."""

    def __init__(self, backbone: torch.nn.Module, info: Mapping, path: Path | None = None):
        self.backbone, self.info, self.path = backbone.eval(), dict(info), path
        self.transform = EvalTransform(self.image_size, **self.info["normalize"])

    @classmethod
    def load(cls, path, *, expected_backbone: Mapping | None = None) -> FewShotModel:
        backbone, info = read_model_file(path, expected_backbone=expected_backbone)
        return cls(backbone, info, Path(path))

    method = property(lambda self: current_name(self.info["method"]))
    seed = property(lambda self: int(self.info["seed"]))
    shot = property(lambda self: int(self.info["shot"]))
    trained_on = property(lambda self: self.info["trained_on"])
    image_size = property(lambda self: int(self.info["image_size"]))
    #: the side new images are resized to before the network's own resize and crop
    stored_image_size = property(lambda self: int(self.info["stored_image_size"]))

    def __repr__(self) -> str:
        return (f"FewShotModel({self.method}, trained on {self.trained_on}, {self.shot}-shot, seed {self.seed}, "
                f"{self.info['backbone']['name']} width {self.info['backbone']['width']})")

    def adapt(self, support: SupportSet, *, inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
              device: torch.device | str = "cpu", episode: int = 0) -> AdaptedClassifier:
        """The classifier this model's method builds from ``support`` (see :class:`AdaptedClassifier`)."""
        return AdaptedClassifier(self, support, inference_batch_size=inference_batch_size,
                                 device=torch.device(device), episode=episode)

    def predict(self, support, query, *, inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
                device: torch.device | str = "cpu") -> Prediction:
        """Probabilities of every query image; ``support``/``query`` as in :meth:`SeedEnsemble.predict`."""
        return SeedEnsemble([self]).predict(support, query, inference_batch_size=inference_batch_size,
                                            device=device)


class AdaptedClassifier:
    """One model adapted to one support set: ``probabilities(images)`` for any batch of queries.

    The learner is the one :func:`mtl.learners.learner_for` builds from the model's ``test_time``
    settings, as evaluate builds it; ``episode`` picks which of the run's fresh-learner draws it
    starts from (evaluate starts test episode e from draw e; learners that draw nothing ignore it).
    """

    def __init__(self, model: FewShotModel, support: SupportSet, *, inference_batch_size: int,
                 device: torch.device, episode: int = 0):
        self.model, self.device, self.inference_batch_size = model, device, inference_batch_size
        self.n_classes = len(support.class_names)
        self.temperature = float(model.info["temperature"])
        learned = model.info.get("learner")
        learner = learner_for(model.info["test_time"], model.backbone.to(device), seed=model.seed,
                              meta_init=None if learned is None else (learned["weight"], learned["bias"]))
        self.embedder = inference_copy(learner.embedder())
        support_x = self._embed(support.images).unsqueeze(0)
        self.classifier = learner.fit(support_x, torch.as_tensor(support.labels, device=device), self.n_classes,
                                      first_episode=episode)

    def _embed(self, images: np.ndarray) -> torch.Tensor:
        step = self.inference_batch_size
        chunks = [embed_batch(self.embedder, images[start:start + step], self.model.transform, self.device)
                  for start in range(0, len(images), step)]
        return torch.cat(chunks)

    def logits(self, images: np.ndarray) -> torch.Tensor:
        """(B, C) float32 scores of a batch of uint8 query images (before the temperature)."""
        return self.classifier(self._embed(images).unsqueeze(0))[0].float().cpu()

    def probabilities(self, images: np.ndarray) -> torch.Tensor:
        """(B, C) float64 calibrated class probabilities of a batch of uint8 query images."""
        return probabilities(self.logits(images), self.temperature)


@dataclass
class Prediction:
    """Per-model probabilities (M, Q, C) of Q query images over C classes, and what they came from."""

    class_names: list[str]
    per_model: np.ndarray
    files: list[Path] | None = None
    models: list[str] | None = None

    @property
    def probabilities(self) -> np.ndarray:
        """(Q, C): the mean over the models (the seed ensemble)."""
        return self.per_model.mean(axis=0)

    @property
    def predicted(self) -> np.ndarray:
        """(Q,) index of the predicted class of every query."""
        return self.probabilities.argmax(axis=1)

    def table(self) -> pd.DataFrame:
        """One row per query: file, predicted class, its probability, how the seeds agree, then one
        probability column per class (``p_<class>``)."""
        predicted, probs = self.predicted, self.probabilities
        rows = np.arange(len(predicted))
        per_model_choice = self.per_model.argmax(axis=2)  # (M, Q)
        table = pd.DataFrame({
            "file": [p.name for p in self.files] if self.files is not None else rows,
            "predicted": [self.class_names[i] for i in predicted],
            "probability": probs[rows, predicted],
            # disagreement between the seeds' models: how many pick the ensemble's class, and the
            # spread of the probability they give it
            "seeds_agreeing": (per_model_choice == predicted).sum(axis=0),
            "seeds": len(self.per_model),
            "probability_sd": self.per_model[:, rows, predicted].std(axis=0, ddof=1)
            if len(self.per_model) > 1 else np.nan,
        })
        for c, name in enumerate(self.class_names):
            table[f"p_{name}"] = probs[:, c]
        return table


class SeedEnsemble:
    """Models of one method trained with different seeds; probabilities are averaged over them."""

    def __init__(self, models: Sequence[FewShotModel]):
        if not models:
            raise ConfigError("a seed ensemble needs at least one model file")
        kinds = {(m.method, m.trained_on, m.shot, m.stored_image_size, m.info["backbone"]["name"],
                  float(m.info["backbone"]["width"])) for m in models}
        if len(kinds) > 1:
            raise ConfigError("the models of an ensemble must share method, training data, shot, image size and "
                              f"backbone; got {sorted(kinds)}: " + ", ".join(str(m.path) for m in models))
        self.models = list(models)

    def __repr__(self) -> str:
        return f"SeedEnsemble(seeds {[m.seed for m in self.models]} of {self.models[0]!r})"

    def predict(self, support, query, *, inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
                device: torch.device | str = "cpu") -> Prediction:
        """Adapt every model to ``support`` once, then classify ``query`` in batches.

        ``support``: a folder of class folders, or a :class:`SupportSet`. ``query``: a flat folder of
        images, or a uint8 array (Q, H, W, 3) of images as the model expects them.
        """
        size = self.models[0].stored_image_size
        if not isinstance(support, SupportSet):
            support = read_support_folder(support, size)
        adapted = [model.adapt(support, inference_batch_size=inference_batch_size, device=device)
                   for model in self.models]
        files, chunks = _query_stream(query, size, inference_batch_size)
        per_model: list[list[torch.Tensor]] = [[] for _ in adapted]
        for images in chunks:
            for out, classifier in zip(per_model, adapted):
                out.append(classifier.probabilities(images))
        return Prediction(support.class_names, torch.stack([torch.cat(p) for p in per_model]).numpy(), files,
                          [str(m.path) for m in self.models])


def _query_stream(query, image_size: int,
                  inference_batch_size: int) -> tuple[list[Path] | None, Iterable[np.ndarray]]:
    # query images decoded / held per chunk: a whole number of passes or more
    step = max(inference_batch_size, 256)
    if isinstance(query, (str, Path)):
        files = list_query_folder(query)
        return files, read_query_chunks(files, image_size, chunk=step)
    images = np.asarray(query)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ConfigError(f"query images must be uint8 (Q, H, W, 3), got {images.dtype} {images.shape}")
    return None, (images[start:start + step] for start in range(0, len(images), step))


def load_model(path, *, expected_backbone: Mapping | None = None) -> FewShotModel:
    """One exported model file (see :mod:`mtl.model_file`)."""
    return FewShotModel.load(path, expected_backbone=expected_backbone)


def load_models(paths, *, expected_backbone: Mapping | None = None) -> SeedEnsemble:
    """A seed ensemble from model files, or from a folder holding them (``seed*.pt``)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise ConfigError(f"model path {path} does not exist; the workflow writes exported models to "
                              "results/models/<dataset>/<backbone>/<method>/<shot>shot/seed<N>.pt")
        files += sorted(path.glob("seed*.pt")) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"no model files (seed*.pt) in {', '.join(map(str, paths))}; the workflow writes them "
                          "to results/models/<dataset>/<backbone>/<method>/<shot>shot/")
    return SeedEnsemble([load_model(f, expected_backbone=expected_backbone) for f in files])


def choose_run(summary: pd.DataFrame, trained_on: str, support_counts: Sequence[int], *,
               method: str | None = None, shot: int | None = None) -> tuple[str, int]:
    """(method, shot) to predict with: the trained shot closest to the support's median images per
    class (ties: the smaller), and the method with the best across-seed accuracy there, in-domain."""
    summary = summary.assign(method=summary["method"].map(current_name))  # an older summary's names
    rows = summary[summary["dataset"] == trained_on]
    if "trained_on" in rows:
        rows = rows[rows["trained_on"] == trained_on]
    if rows.empty:
        raise ConfigError(f"results/summary.csv has no rows of dataset '{trained_on}'; train it first "
                          f"(datasets there: {sorted(summary['dataset'].unique())})")
    if shot is None:
        median = float(np.median(support_counts))
        shot = min(sorted(rows["shot"].unique()), key=lambda s: (abs(s - median), s))
    rows = rows[rows["shot"] == int(shot)]
    if method is None:
        if rows.empty:
            raise ConfigError(f"no {shot}-shot rows of '{trained_on}' in results/summary.csv")
        method = str(rows.sort_values("accuracy", ascending=False, kind="stable").iloc[0]["method"])
    return method, int(shot)


def write_predictions(ensemble: SeedEnsemble, support, query, out_csv, *,
                      inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
                      device: torch.device | str = "cpu") -> Prediction:
    """Predict and write ``out_csv`` (one row per query image, :meth:`Prediction.table`) atomically:
    any bad input stops it before anything is written under that name."""
    from mtl.io import atomic_path

    log.info("predicting with %r, batch %d on %s", ensemble, inference_batch_size, device)
    prediction = ensemble.predict(support, query, inference_batch_size=inference_batch_size, device=device)
    table = prediction.table()
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    agreeing = table["seeds_agreeing"]
    log.info("%s: %d query images, %d where not every seed agrees", out_csv, len(agreeing),
             int((agreeing < len(ensemble.models)).sum()))
    return prediction


def predict_with_trained_models(model_files: Sequence, support, query, out_csv, *, trained_on: str,
                                method: str | None = None, shot: int | None = None, summary_csv=None,
                                expected_backbone: Mapping | None = None,
                                inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
                                device: torch.device | str = "cpu") -> Prediction:
    """The workflow's prediction: among ``model_files`` (exported models of ``trained_on``), the seeds
    of ``method`` and ``shot``; either left None is chosen from ``summary_csv`` (:func:`choose_run`)."""
    from mtl.model_file import peek_model_file

    headers = {Path(f): peek_model_file(f) for f in model_files}
    sizes = {h["stored_image_size"] for h in headers.values()}
    if len(sizes) != 1:
        raise ConfigError(f"the models of {trained_on} were trained on images of several sizes {sorted(sizes)}")
    support_set = read_support_folder(support, sizes.pop())
    if method is None or shot is None:
        from mtl.results.runs import read_csv_table

        summary = read_csv_table(summary_csv, "summary", "run the workflow (snakemake) first")
        method, shot = choose_run(summary, trained_on, support_set.counts(), method=method, shot=shot)
        log.info("predicting with %s %d-shot: the best across-seed accuracy of %s for the shot closest to the "
                 "support set's %s images per class", method, shot, trained_on, support_set.counts())
    chosen = [f for f, h in headers.items()
              if current_name(h["method"]) == method and int(h["shot"]) == int(shot) and h["trained_on"] == trained_on]
    if not chosen:
        raise ConfigError(f"no exported model of {trained_on} {method} {shot}-shot among {len(headers)} files")
    ensemble = load_models(chosen, expected_backbone=expected_backbone)
    return write_predictions(ensemble, support_set, query, out_csv, inference_batch_size=inference_batch_size,
                             device=device)
