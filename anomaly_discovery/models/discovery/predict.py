"""Labelling regions with a trained discovery model (methods.md §1 step 7): unit embeddings, assignment to the
novel prototypes with confidences, kNN / energy outlier scores, area-weighted merging per image, and the saved
:class:`DiscoveryPredictor`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..features.backbones import autocast_for
from .checkpoints import MODEL_FILE, CheckpointError, load_weights_file
from .config import DiscoveryConfig
from .data import RegionTensors, ViewCache
from .model import DiscoveryModel, build_model, normalise_images
from .outliers import energy_score, knn_distance_score
from .region_merging import ImagePrediction, default_tau, merge_by_image, novel_region_probabilities
from ..localisation.regions import Region


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
    novel classes; unit rows), the known-class reference embeddings of the kNN outlier score and its threshold
    (``None`` without a base validation set)."""

    config: DiscoveryConfig
    model: DiscoveryModel
    base_classes: list[str]
    prototypes: torch.Tensor
    reference_embeddings: torch.Tensor
    outlier_threshold: Optional[float]

    @property
    def n_base(self) -> int:
        return len(self.base_classes)

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
                "n_head_classes": self.model.head.n_classes, "outlier_threshold": self.outlier_threshold}
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
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{folder / 'model.json'} holds settings this version cannot read ({exc})") from exc
        model = build_model(config.model, meta["n_head_classes"])
        load_weights_file(folder / MODEL_FILE, model)
        return cls(config, model.eval(), meta["base_classes"], tensors["prototypes"],
                   tensors["reference_embeddings"], meta["outlier_threshold"])


@dataclass
class RegionPredictions:
    """Per region: embedding (unit), novel-class probabilities (K), cluster index, confidence, kNN outlier score
    (cosine distance to the k-th nearest known-class training crop), energy and the outlier flag."""

    embeddings: np.ndarray
    probs: np.ndarray
    clusters: np.ndarray
    confidence: np.ndarray
    outlier_score: np.ndarray
    energy: np.ndarray
    is_outlier: Optional[np.ndarray]


def score_embeddings(predictor: DiscoveryPredictor, embeddings: torch.Tensor, exclude_self: bool = False
                     ) -> RegionPredictions:
    """Assign unit embeddings to the predictor's novel classes and score them as outliers. ``exclude_self``
    skips the nearest reference (the training crops themselves are references)."""
    temperature = predictor.config.model.temperature
    logits = embeddings @ predictor.prototypes.T
    probs = novel_region_probabilities(logits, predictor.n_base, temperature)[:, predictor.n_base:]
    references = predictor.reference_embeddings
    k = min(predictor.config.classes.outlier_k + int(exclude_self), len(references))
    distance = knn_distance_score(embeddings, references, k=k)
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
