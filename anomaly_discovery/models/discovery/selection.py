"""Label-free model selection for discovery runs: the score Ray Train reports every epoch and Ray Tune ranks
trials by. It reads the held-out LABELLED BASE crops and the novel crops' embeddings under the model's own
clustering, never a label of the images being discovered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

from .config import DiscoveryConfig
from .data import RegionTensors, split_base
from .model import DiscoveryModel
from .predict import embed
from .prototypes import select_best_head
from ..localisation.regions import Region

SCORE_METRIC = "selection_score"
PROBE_LIMIT = 256


def selection_score(base_val_accuracy: Optional[float], silhouette: Optional[float]) -> float:
    """The label-free criterion trials are ranked by: mean of the held-out base-crop accuracy and the novel
    crops' silhouette clipped to [0, 1] (whichever exist; 0 when neither does)."""
    terms = [float(base_val_accuracy)] if base_val_accuracy is not None else []
    if silhouette is not None and np.isfinite(silhouette):
        terms.append(min(1.0, max(0.0, float(silhouette))))
    return float(np.mean(terms)) if terms else 0.0


@dataclass
class SelectionProbe:
    """A fixed sample of novel crops (≤ ``PROBE_LIMIT``) and the held-out base crops, scored every epoch."""

    data: RegionTensors
    n_novel: int
    n_base: int

    @classmethod
    def build(cls, config: DiscoveryConfig, novel: Sequence[Region], base: Sequence[Region]) -> "SelectionProbe":
        rng = np.random.default_rng(config.runtime.seed)
        chosen = sorted(rng.permutation(len(novel))[:PROBE_LIMIT])
        _, base_val = split_base(list(base), config.optimisation.base_val_fraction, config.runtime.seed)
        classes = sorted({r.class_name for r in base})
        regions = [novel[i] for i in chosen] + base_val[:PROBE_LIMIT]
        return cls(RegionTensors.build(regions, config.model.image_size, classes), len(chosen),
                   len(regions) - len(chosen))

    def score(self, model: DiscoveryModel, cluster_per_head: Sequence[float], n_base_classes: int, k: int | str,
              k_max: int, seed: int) -> dict:
        """Base validation accuracy (head of lowest cluster loss) and the best cosine silhouette of k-means
        on the novel embeddings (K given, or every K in 2..k_max with ``k="auto"``)."""
        device = next(model.parameters()).device
        embeddings = embed(model, self.data, torch.arange(len(self.data.labels)), None, device)
        accuracy = None
        if self.n_base:
            head = select_best_head(cluster_per_head) if cluster_per_head else 0
            logits = model.head.head_logits(embeddings[self.n_novel:].to(device), head=head).cpu()
            labels = self.data.labels[self.n_novel:]
            accuracy = float((logits[:, :n_base_classes].argmax(1) == labels).float().mean())
        silhouette = novel_silhouette(embeddings[:self.n_novel].numpy(), k, k_max, seed)
        return {"probe_base_val_accuracy": accuracy, "probe_silhouette": silhouette,
                SCORE_METRIC: selection_score(accuracy, silhouette)}


def novel_silhouette(embeddings: np.ndarray, k: int | str, k_max: int, seed: int) -> Optional[float]:
    """The best cosine silhouette of k-means with K clusters (K given, or 2..k_max); None when no K fits."""
    n = len(embeddings)
    candidates = [int(k)] if k != "auto" else range(2, k_max + 1)
    scores = []
    for n_clusters in candidates:
        if 2 <= n_clusters < n:
            labels = KMeans(n_clusters, n_init=3, random_state=seed).fit_predict(embeddings)
            if len(np.unique(labels)) >= 2:
                scores.append(float(silhouette_score(embeddings, labels, metric="cosine")))
    return max(scores) if scores else None
