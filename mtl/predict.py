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

"None of these" (off by default; ``predict(..., unknown=threshold)``): a query whose features are
unlike every support image's is reported as :data:`NONE_OF_THESE` instead of a class. The score is
the query's :func:`support_similarity` (cosine similarity of its encoder features to the most
similar support image's), averaged over the seeds' models; ``bench/unknown.py`` measured it against
the ensemble's top probability on the demo's held-out digits (docs/prediction.md).

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
import torch.nn.functional as F

from mtl.data.transforms import EvalTransform
from mtl.data.user_images import SupportSet, list_query_folder, read_query_chunks, read_support_folder
from mtl.config import check_value
from mtl.errors import ConfigError, DataError
from mtl.learners import learner_for
from mtl.methods import current_name
from mtl.learners.calibration import probabilities
from mtl.model_file import read_model_file
from mtl.models import inference_copy
from mtl.base_learner import DEFAULT_INFERENCE_BATCH_SIZE, embed_batch

log = logging.getLogger(__name__)

#: What the ``predicted`` column says of a query below the ``unknown`` threshold (a support class of
#: this name is refused while the option is on, so the column is never ambiguous).
NONE_OF_THESE = "none of these"


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
                device: torch.device | str = "cpu", unknown: float | None = None) -> Prediction:
        """Probabilities of every query image; arguments as in :meth:`SeedEnsemble.predict`."""
        return SeedEnsemble([self]).predict(support, query, inference_batch_size=inference_batch_size,
                                            device=device, unknown=unknown)


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
        # the encoder whose features support_similarity compares: the embedder itself unless the
        # learner fine-tunes (its embedder is then the frozen trunk, the identity for ``ft_all``)
        self.encoder = self.embedder if learner.frozen_features else None
        self.support_images = support.images
        support_x = self._embed(self.embedder, support.images)
        self.support_features = support_x if learner.frozen_features else None
        self.classifier = learner.fit(support_x.unsqueeze(0), torch.as_tensor(support.labels, device=device),
                                      self.n_classes, first_episode=episode)

    def _embed(self, network: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
        step = self.inference_batch_size
        chunks = [embed_batch(network, images[start:start + step], self.model.transform, self.device)
                  for start in range(0, len(images), step)]
        return torch.cat(chunks)

    def logits(self, images: np.ndarray) -> torch.Tensor:
        """(B, C) float32 scores of a batch of uint8 query images (before the temperature)."""
        return self._logits(self._embed(self.embedder, images))

    def _logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.classifier(inputs.unsqueeze(0))[0].float().cpu()

    def probabilities(self, images: np.ndarray) -> torch.Tensor:
        """(B, C) float64 calibrated class probabilities of a batch of uint8 query images."""
        return probabilities(self.logits(images), self.temperature)

    def probabilities_and_similarity(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`probabilities` and the (B,) :func:`support_similarity` of a batch of query images,
        embedded once where the learner reads the encoder's features."""
        inputs = self._embed(self.embedder, images)
        if self.encoder is None:  # a fine-tuning learner: the encoder's features come from a pass of their own
            self.encoder = inference_copy(self.model.backbone)
            self.support_features = self._embed(self.encoder, self.support_images)
        features = inputs if self.encoder is self.embedder else self._embed(self.encoder, images)
        return (probabilities(self._logits(inputs), self.temperature),
                support_similarity(features, self.support_features).cpu())


def support_similarity(query_features: torch.Tensor, support_features: torch.Tensor) -> torch.Tensor:
    """(..., Q) cosine similarity of each query's features (..., Q, D) to the most similar of the
    support images' (..., S, D), in float64: 1 for a query identical to a support image (to float
    rounding), lower the less the query looks like any of them. The score of :data:`NONE_OF_THESE`."""
    query, support = (F.normalize(x.double(), dim=-1) for x in (query_features, support_features))
    return (query @ support.transpose(-1, -2)).amax(dim=-1)


@dataclass
class Prediction:
    """Per-model probabilities (M, Q, C) of Q query images over C classes, and what they came from.

    ``unknown``: the "none of these" threshold (None: off); ``per_model_similarity`` (M, Q): each
    model's :func:`support_similarity` of every query (:meth:`SeedEnsemble.predict` computes it
    when ``unknown`` is set; a threshold without it is refused).
    """

    class_names: list[str]
    per_model: np.ndarray
    files: list[Path] | None = None
    models: list[str] | None = None
    unknown: float | None = None
    per_model_similarity: np.ndarray | None = None

    def __post_init__(self):
        check_unknown(self.unknown, self.class_names)
        if self.unknown is not None and self.per_model_similarity is None:
            raise ValueError("a Prediction with an unknown threshold needs per_model_similarity (M, Q)")

    @property
    def probabilities(self) -> np.ndarray:
        """(Q, C): the mean over the models (the seed ensemble)."""
        return self.per_model.mean(axis=0)

    @property
    def predicted(self) -> np.ndarray:
        """(Q,) index of the most probable class of every query (whether or not it is :attr:`none_of_these`)."""
        return self.probabilities.argmax(axis=1)

    @property
    def similarity(self) -> np.ndarray | None:
        """(Q,) :func:`support_similarity` averaged over the models; None where it was not computed
        (:meth:`SeedEnsemble.predict` computes it only with ``unknown`` set)."""
        return None if self.per_model_similarity is None else self.per_model_similarity.mean(axis=0)

    @property
    def none_of_these(self) -> np.ndarray:
        """(Q,) True where the query is reported as none of the support classes: its :attr:`similarity`
        is below ``unknown`` (a similarity equal to the threshold is kept); all False while off."""
        if self.unknown is None:
            return np.zeros(self.per_model.shape[1], dtype=bool)
        return self.similarity < self.unknown

    def table(self) -> pd.DataFrame:
        """One row per query: file, predicted class, its probability, how the seeds agree, then one
        probability column per class (``p_<class>``). With ``unknown`` set, ``predicted`` says
        :data:`NONE_OF_THESE` for the queries below the threshold, and two columns follow it:
        ``most_probable`` (the class, always) and ``similarity`` (the score compared)."""
        predicted, probs = self.predicted, self.probabilities
        rows = np.arange(len(predicted))
        per_model_choice = self.per_model.argmax(axis=2)  # (M, Q)
        classes = [self.class_names[i] for i in predicted]
        table = pd.DataFrame({
            "file": [p.name for p in self.files] if self.files is not None else rows,
            "predicted": np.where(self.none_of_these, NONE_OF_THESE, classes),
        })
        if self.unknown is not None:
            table["most_probable"], table["similarity"] = classes, self.similarity
        table["probability"] = probs[rows, predicted]
        # disagreement between the seeds' models: how many pick the ensemble's class, and the
        # spread of the probability they give it
        table["seeds_agreeing"] = (per_model_choice == predicted).sum(axis=0)
        table["seeds"] = len(self.per_model)
        table["probability_sd"] = (self.per_model[:, rows, predicted].std(axis=0, ddof=1)
                                   if len(self.per_model) > 1 else np.nan)
        for c, name in enumerate(self.class_names):
            table[f"p_{name}"] = probs[:, c]
        return table


def check_unknown(threshold: float | None, class_names: Sequence[str] = ()) -> None:
    """Refuse a "none of these" threshold the config schema refuses (``predict.unknown``: a cosine
    similarity, in [-1, 1]) and, while one is set, a support class that the ``predicted`` column
    could not tell from :data:`NONE_OF_THESE`."""
    if threshold is None:
        return
    check_value(threshold, "predict.unknown", name="the unknown threshold (predict.unknown, mtl-predict --unknown)")
    clashing = [name for name in class_names if name.strip().lower() == NONE_OF_THESE]
    if clashing:
        raise DataError(f"support class folder {clashing[0]!r} has the name that marks a query as none of the "
                        f"support classes ({NONE_OF_THESE!r}); rename that folder, or turn the unknown option off")


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
                device: torch.device | str = "cpu", unknown: float | None = None) -> Prediction:
        """Adapt every model to ``support`` once, then classify ``query`` in batches.

        ``support``: a folder of class folders, or a :class:`SupportSet`. ``query``: a flat folder of
        images, or a uint8 array (Q, H, W, 3) of images as the model expects them. ``unknown``: a
        threshold in [-1, 1] turns "none of these" on: a query whose :func:`support_similarity`,
        averaged over the models, is below it is reported as :data:`NONE_OF_THESE`
        (:attr:`Prediction.none_of_these`); None (the default): every query gets a class.
        """
        check_unknown(unknown)
        size = self.models[0].stored_image_size
        if not isinstance(support, SupportSet):
            support = read_support_folder(support, size)
        check_unknown(unknown, support.class_names)
        adapted = [model.adapt(support, inference_batch_size=inference_batch_size, device=device)
                   for model in self.models]
        files, chunks = _query_stream(query, size, inference_batch_size)
        per_model: list[list[torch.Tensor]] = [[] for _ in adapted]
        similarity: list[list[torch.Tensor]] = [[] for _ in adapted]
        for images in chunks:
            for probs, similar, classifier in zip(per_model, similarity, adapted):
                if unknown is None:
                    probs.append(classifier.probabilities(images))
                else:
                    p, s = classifier.probabilities_and_similarity(images)
                    probs.append(p)
                    similar.append(s)
        def stacked(parts: list[list[torch.Tensor]]) -> np.ndarray:  # per model, per chunk -> (M, Q, ...)
            return torch.stack([torch.cat(p) for p in parts]).numpy()

        return Prediction(support.class_names, stacked(per_model), files, [str(m.path) for m in self.models],
                          unknown=unknown, per_model_similarity=None if unknown is None else stacked(similarity))


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
                      device: torch.device | str = "cpu", unknown: float | None = None) -> Prediction:
    """Predict and write ``out_csv`` (one row per query image, :meth:`Prediction.table`) atomically:
    any bad input stops it before anything is written under that name. ``unknown``: as in
    :meth:`SeedEnsemble.predict`."""
    from mtl.io import atomic_path

    log.info("predicting with %r, batch %d on %s", ensemble, inference_batch_size, device)
    prediction = ensemble.predict(support, query, inference_batch_size=inference_batch_size, device=device,
                                  unknown=unknown)
    table = prediction.table()
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    agreeing = table["seeds_agreeing"]
    log.info("%s: %d query images, %d where not every seed agrees", out_csv, len(agreeing),
             int((agreeing < len(ensemble.models)).sum()))
    if unknown is not None:
        log.info("%d query images reported as %r (support similarity below %g)", int(prediction.none_of_these.sum()),
                 NONE_OF_THESE, unknown)
    return prediction


def predict_with_trained_models(model_files: Sequence, support, query, out_csv, *, trained_on: str,
                                method: str | None = None, shot: int | None = None, summary_csv=None,
                                expected_backbone: Mapping | None = None,
                                inference_batch_size: int = DEFAULT_INFERENCE_BATCH_SIZE,
                                device: torch.device | str = "cpu", unknown: float | None = None) -> Prediction:
    """The workflow's prediction: among ``model_files`` (exported models of ``trained_on``), the seeds
    of ``method`` and ``shot``; either left None is chosen from ``summary_csv`` (:func:`choose_run`).
    ``unknown``: as in :meth:`SeedEnsemble.predict`."""
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
                             device=device, unknown=unknown)
