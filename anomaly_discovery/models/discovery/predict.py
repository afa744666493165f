"""Labelling regions with a trained discovery model (methods.md §1 step 7): unit embeddings, assignment to the
novel prototypes with confidences, kNN / energy outlier scores, area-weighted merging per image, and the saved
:class:`DiscoveryPredictor`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..features.backbones import autocast_for
from .checkpoints import MODEL_FILE, CheckpointError, load_weights_file
from .config import DiscoveryConfig
from .data import RegionTensors, ViewCache
from .amga_pooling import ViewDiscoveryModel
from .model import DiscoveryModel, build_model, normalise_images
from .class_count import ClassCountEstimate
from .outliers import DistanceOutlierScorer, OutlierThreshold, energy_score, image_outlier_score
from .region_merging import ImagePrediction, default_tau, merge_by_image, novel_region_probabilities
from ..localisation.regions import Region
from .views import VIEW_NAMES, ViewExtractor


@torch.no_grad()
def embed(model: DiscoveryModel, data: RegionTensors, index: torch.Tensor, cache: Optional[ViewCache],
          device: torch.device, batch_size: int = 128) -> torch.Tensor:
    """L2-normalised features of the un-augmented crops ``index`` (cached view 0 when there is a cache)."""
    model.eval()
    out = []
    for chunk in index.split(batch_size):
        with autocast_for(device):
            if cache is not None:
                inputs, maps, masks = cache.views(chunk, torch.zeros_like(chunk), device)
                features = model.features(inputs, maps, masks, from_cnn_features=True)
            else:
                images, maps, masks = data.floats(chunk, device)
                features = model.features(normalise_images(images), maps, masks)
        out.append(F.normalize(features.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.backbone.feature_dim)


@dataclass
class DiscoveryPredictor:
    """Everything needed to label new regions: the model, the final prototypes (base classes first, then the K
    novel classes; unit rows), the known-class reference embeddings of the outlier score (``outlier_score``: the
    k-NN distance or the local outlier factor) and its threshold (``None`` without a base validation set)."""

    config: DiscoveryConfig
    model: Union[DiscoveryModel, ViewDiscoveryModel]
    base_classes: list[str]
    prototypes: torch.Tensor
    reference_embeddings: torch.Tensor
    outlier_threshold: Optional[float]

    @property
    def n_base(self) -> int:
        return len(self.base_classes)

    def outlier_scorer(self) -> DistanceOutlierScorer:
        """The configured outlier score against the reference embeddings (built once: the local outlier factor
        keeps the references' own neighbourhoods)."""
        if not hasattr(self, "_outlier_scorer"):
            classes = self.config.classes
            self._outlier_scorer = DistanceOutlierScorer(classes.outlier_score, self.reference_embeddings,
                                                         classes.outlier_k)
        return self._outlier_scorer

    def view_extractor(self) -> ViewExtractor:
        """The frozen backbone of a view model (built once, from the installed ImageNet weights)."""
        if not hasattr(self, "_extractor"):
            self._extractor = ViewExtractor(self.config.model.cnn)
        return self._extractor

    def save(self, folder: Path | str) -> Path:
        """``model.safetensors`` (weights), ``discovery.safetensors`` (prototypes, references), ``model.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                  str(folder / MODEL_FILE))
        save_file({"prototypes": self.prototypes.contiguous(),
                   "reference_embeddings": self.reference_embeddings.contiguous()},
                  str(folder / "discovery.safetensors"))
        meta = {"config": self.config.to_dict(), "base_classes": self.base_classes,
                "n_head_classes": int(self.prototypes.shape[0]), "outlier_threshold": self.outlier_threshold}
        if isinstance(self.model, ViewDiscoveryModel):
            meta["view_weights"] = dict(zip(VIEW_NAMES, (float(s) ** 2 for s in self.model.view_scale)))
            meta["projection_components"] = self.model.projection_components()
        (folder / "model.json").write_text(json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: Path | str, device: str = "cpu") -> "DiscoveryPredictor":
        folder = Path(folder)
        try:
            meta = json.loads((folder / "model.json").read_text())
            tensors = load_file(str(folder / "discovery.safetensors"))
        except (OSError, ValueError, SafetensorError) as exc:
            raise CheckpointError(f"{folder} is not a saved discovery model ({exc})") from exc
        try:
            config = DiscoveryConfig.from_dict(meta["config"]).replace(device=device, progress=False)
            if "image_turns" not in meta["config"].get("model", meta["config"]):
                config = config.replace(image_turns=1)  # saved before the image view was turned
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{folder / 'model.json'} holds settings this version cannot read ({exc})") from exc
        if config.model.uses_views:
            extractor = ViewExtractor(config.model.cnn)
            model = ViewDiscoveryModel.with_shapes(extractor.channels, meta["view_weights"],
                                                   meta["projection_components"], meta["n_head_classes"],
                                                   config.model.temperature, config.model.adapter_width)
        else:
            model = build_model(config.model, meta["n_head_classes"])
        load_weights_file(folder / MODEL_FILE, model)
        predictor = cls(config, model.eval(), meta["base_classes"], tensors["prototypes"],
                        tensors["reference_embeddings"], meta["outlier_threshold"])
        if config.model.uses_views:
            predictor._extractor = extractor
        return predictor


@dataclass
class RegionPredictions:
    """Per region: embedding (unit), novel-class probabilities (K), cluster index, confidence, outlier score
    (the configured ``outlier_score`` against the known-class training crops), energy and the outlier flag."""

    embeddings: np.ndarray
    probs: np.ndarray
    clusters: np.ndarray
    confidence: np.ndarray
    outlier_score: np.ndarray
    energy: np.ndarray
    is_outlier: Optional[np.ndarray]


def same_image_rows(regions: Sequence[Region]) -> list[np.ndarray]:
    """Per region, the rows of every region of its image (itself included)."""
    rows: dict[str, list[int]] = {}
    for index, region in enumerate(regions):
        rows.setdefault(region.image_id, []).append(index)
    return [np.array(rows[region.image_id]) for region in regions]


def score_embeddings(predictor: DiscoveryPredictor, embeddings: torch.Tensor,
                     excluded: Optional[Sequence[np.ndarray]] = None) -> RegionPredictions:
    """Assign unit embeddings to the predictor's novel classes and score them as outliers. ``excluded[i]``: the
    reference rows query i does not see (a training crop's own image, when the training crops are the queries:
    a new image has no crops among the references either)."""
    temperature = predictor.config.model.temperature
    logits = embeddings @ predictor.prototypes.T
    probs = novel_region_probabilities(logits, predictor.n_base, temperature)[:, predictor.n_base:]
    distance = predictor.outlier_scorer().score(embeddings, excluded)
    flags = None if predictor.outlier_threshold is None else distance > predictor.outlier_threshold
    return RegionPredictions(embeddings.numpy(), probs, probs.argmax(1), probs.max(1), distance,
                             energy_score(logits, temperature), flags)


def merge_images(regions: Sequence[Region], probs: np.ndarray) -> dict[str, ImagePrediction]:
    """Area-weighted merging per image with τ from each image's size (``default_tau``)."""
    merged: dict[str, ImagePrediction] = {}
    taus = np.array([default_tau(r.image_size) for r in regions])
    for tau in np.unique(taus):
        rows = np.flatnonzero(taus == tau)
        merged |= merge_by_image([regions[i].image_id for i in rows], probs[rows], [regions[i].area for i in rows],
                                 n_base=0, tau=float(tau))
    order = list(dict.fromkeys(r.image_id for r in regions))
    return {image_id: merged[image_id] for image_id in order}


@dataclass
class DiscoveryArtifacts:
    """Results of ``train_discovery``: the predictor, the novel regions' predictions (input order), image labels
    merged by area (``images[id].label`` novel class, ``.region_labels`` every region's), per-image confidence and
    outlier score, the class count (``k``, and ``k_estimated`` with the criterion per k for ``k="auto"``),
    label-free metrics and the per-epoch history."""

    predictor: DiscoveryPredictor
    regions: RegionPredictions
    image_ids: list[str]
    images: dict[str, ImagePrediction]
    image_confidence: dict[str, float]
    image_outlier_scores: dict[str, float]
    k: int
    k_estimated: Optional[int]
    k_scores: Optional[dict[int, float]]
    metrics: dict
    history: list[dict]


def run_notes(config: DiscoveryConfig, estimate: Optional[ClassCountEstimate], threshold: Optional[float]
              ) -> list[str]:
    """Warnings a user should read with the result: an estimated K at the k_max ceiling, no outlier threshold."""
    notes = []
    if estimate is not None and estimate.k >= config.classes.k_max:
        notes.append(f"the estimated K ({estimate.k}) is the ceiling k_max = {config.classes.k_max}: the "
                     f"{estimate.method} criterion found no smaller K it prefers, so there may be more classes, or no "
                     "clear grouping; raise k_max in the settings or give --k")
    if threshold is None:
        notes.append("no base validation crops: outlier scores are given but no threshold is set")
    return notes


def assemble_artifacts(config: DiscoveryConfig, model, classes: list[str], novel: Sequence[Region],
                       embeddings: torch.Tensor, n_train: int, prototypes: torch.Tensor,
                       estimate: Optional[ClassCountEstimate], history: list[dict],
                       novel_known: bool = False) -> DiscoveryArtifacts:
    """What every kind of model ends with (methods.md §1 step 7, §2 step 7): the outlier threshold that
    accepts ``outlier_accept_rate`` of the held-out base crops (rows after ``n_train``), the predictor, the novel
    regions' assignments and outlier scores, and image labels by area-weighted merging. ``embeddings`` holds every
    region's unit embedding: novel, base train, base validation. A novel crop's own score leaves out every crop of
    its image (scored as a new image would be). With ``novel_known`` (the view models, whose clusters are classes
    they know) those scores join the held-out base crops in setting the threshold, so a threshold exists without a
    base set and flags the crops farthest from all the others."""
    novel_embeddings, references, val_embeddings = embeddings[:len(novel)], embeddings[:n_train], embeddings[n_train:]
    predictor = DiscoveryPredictor(config, model, classes, prototypes, references, None)
    val_scores = predictor.outlier_scorer().score(val_embeddings) if len(val_embeddings) else np.zeros(0)
    own_image = same_image_rows(novel)
    if n_train - max((len(rows) for rows in own_image), default=0) < 1:  # one image: leave only the crop out
        own_image = [np.array([row]) for row in range(len(novel))] if n_train > 1 else None
    predictions = score_embeddings(predictor, novel_embeddings, excluded=own_image)  # flags once the threshold is set
    known_scores = (np.concatenate([val_scores, predictions.outlier_score]) if novel_known and own_image is not None
                    else val_scores)
    threshold = (OutlierThreshold(config.classes.outlier_accept_rate).fit(known_scores).threshold_
                 if len(known_scores) else None)
    predictor.outlier_threshold = threshold
    if threshold is not None:
        predictions.is_outlier = predictions.outlier_score > threshold
    images = merge_images(novel, predictions.probs)
    ids = [r.image_id for r in novel]
    metrics = {"notes": run_notes(config, estimate, threshold), "val_scores": val_scores,
               "n_clusters_used": int(len(np.unique(predictions.clusters)))}
    if estimate is not None and estimate.votes:
        metrics["k_votes"] = dict(estimate.votes)
    return DiscoveryArtifacts(
        predictor, predictions, ids, images, {i: float(p.probs.max()) for i, p in images.items()},
        image_outlier_score(ids, predictions.outlier_score, "max"), prototypes.shape[0] - len(classes),
        estimate.k if estimate else None, estimate.scores_by_k if estimate else None, metrics, history)
