"""New-class proposals from outlier regions (issue 6 item 3): the pure numpy / scikit-learn steps of the review loop.

All embeddings are L2-normalised rows, so cosine similarity is a dot product.

* ``prototype`` — a class prototype is the renormalised mean of its members' embeddings, p = Σ e_i / ‖Σ e_i‖.
* ``cohesion`` — mean cosine of the members to their prototype, (1/n) Σ e_i·p (1 = all identical).
* ``fit_threshold`` — the outlier threshold accepting ``accept_rate`` of known-class scores (methods §2.7).
* ``group_outliers`` — average-linkage agglomerative clustering on cosine distance, cut at ``distance_cut``
  (the cohesion cut: no merge joins two groups whose mean pairwise cosine distance exceeds it), run on at most
  ``max_points`` outliers (a seeded sample; the rest join the nearest group centre within the cut); groups
  smaller than ``min_size`` are not proposed.
* ``representatives`` — the members nearest the prototype (the crops a reviewer sees first).
* ``split_members`` — k-means sub-clustering of one class's members (the reviewer's "split").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans

from anomaly_discovery.models.discovery.outliers import OutlierThreshold


@dataclass(frozen=True)
class ProposalConfig:
    """``distance_cut``: the agglomerative cut on average cosine distance; ``min_size``: the smallest group
    proposed; ``max_points``: outliers clustered at once (the rest are attached to the groups found);
    ``n_representatives``: crops listed per proposal."""

    distance_cut: float = 0.35
    min_size: int = 3
    max_points: int = 2000
    n_representatives: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.distance_cut < 2.0:
            raise ValueError(f"distance_cut must lie in (0, 2) (cosine distance), got {self.distance_cut}")
        if self.min_size < 1 or self.max_points < 2 or self.n_representatives < 1:
            raise ValueError(f"min_size >= 1, max_points >= 2 and n_representatives >= 1 are needed, got {self}")


@dataclass(frozen=True)
class OutlierGroup:
    """Rows (into the clustered embeddings) of one proposed class, its prototype and cohesion."""

    rows: np.ndarray
    prototype: np.ndarray
    cohesion: float


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """Float32 rows scaled to unit length; a zero row is refused (it has no direction)."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (N, D) array, got shape {array.shape}")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if not np.isfinite(array).all() or (norms == 0).any():
        raise ValueError("embeddings must be finite and non-zero")
    return array / norms


def prototype(embeddings: np.ndarray) -> np.ndarray:
    """p = Σ e_i / ‖Σ e_i‖ of unit rows (the members' mean, renormalised)."""
    if len(embeddings) == 0:
        raise ValueError("a prototype needs at least one member embedding")
    total = np.asarray(embeddings, dtype=np.float64).sum(axis=0)
    norm = np.linalg.norm(total)
    if norm == 0:
        raise ValueError("the member embeddings cancel out: their mean has no direction")
    return (total / norm).astype(np.float32)


def cohesion(embeddings: np.ndarray, centre: np.ndarray) -> float:
    """Mean cosine of unit rows to a unit prototype."""
    return float(np.mean(np.asarray(embeddings, dtype=np.float32) @ centre)) if len(embeddings) else 0.0


def fit_threshold(known_scores: np.ndarray, accept_rate: float = 0.95) -> float | None:
    """Score threshold accepting ``accept_rate`` of known-class scores (``None`` without any score)."""
    scores = np.asarray(known_scores, dtype=np.float64).ravel()
    return OutlierThreshold(accept_rate).fit(scores).threshold_ if scores.size else None


def representatives(embeddings: np.ndarray, centre: np.ndarray, ids: np.ndarray, n: int) -> list[int]:
    """The ``n`` ids whose embeddings lie nearest the prototype, nearest first."""
    similarity = np.asarray(embeddings, dtype=np.float32) @ centre
    order = np.argsort(-similarity, kind="stable")[:n]
    return [int(i) for i in np.asarray(ids)[order]]


def _labels_by_agglomeration(embeddings: np.ndarray, distance_cut: float) -> np.ndarray:
    if len(embeddings) == 1:
        return np.zeros(1, dtype=np.int64)
    model = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                    distance_threshold=distance_cut)
    return model.fit_predict(embeddings).astype(np.int64)


def group_outliers(embeddings: np.ndarray, config: ProposalConfig = ProposalConfig()) -> list[OutlierGroup]:
    """Cluster unit outlier embeddings into proposal groups (largest first); see the module docstring."""
    embeddings = normalise_rows(embeddings) if len(embeddings) else np.zeros((0, 1), np.float32)
    n = len(embeddings)
    if n < config.min_size:
        return []
    rng = np.random.default_rng(config.seed)
    sample = np.sort(rng.choice(n, config.max_points, replace=False)) if n > config.max_points else np.arange(n)
    sample_labels = _labels_by_agglomeration(embeddings[sample], config.distance_cut)
    labels = np.full(n, -1, dtype=np.int64)
    labels[sample] = sample_labels
    centres = np.stack([prototype(embeddings[sample[sample_labels == g]]) for g in range(sample_labels.max() + 1)])
    rest = np.setdiff1d(np.arange(n), sample)
    if rest.size:
        similarity = embeddings[rest] @ centres.T
        nearest = similarity.argmax(axis=1)
        close = 1.0 - similarity[np.arange(rest.size), nearest] <= config.distance_cut
        labels[rest[close]] = nearest[close]
    groups = []
    for g in range(len(centres)):
        rows = np.flatnonzero(labels == g)
        if rows.size >= config.min_size:
            centre = prototype(embeddings[rows])
            groups.append(OutlierGroup(rows, centre, cohesion(embeddings[rows], centre)))
    return sorted(groups, key=lambda group: (-group.rows.size, int(group.rows[0])))


def split_members(embeddings: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means labels (0..k-1, 0 = the largest part) of one class's unit member embeddings."""
    if k < 2:
        raise ValueError(f"a split needs k >= 2 parts, got {k}")
    if len(embeddings) < k:
        raise ValueError(f"cannot split {len(embeddings)} members into k={k} parts")
    labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(np.asarray(embeddings, np.float32))
    sizes = np.bincount(labels, minlength=k)
    if (sizes == 0).any():
        raise ValueError(f"k-means found fewer than k={k} distinct parts among {len(embeddings)} members")
    rank = np.empty(k, dtype=np.int64)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(k)
    return rank[labels]
