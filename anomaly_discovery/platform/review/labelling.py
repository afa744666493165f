"""How the review loop labels a region and fits its thresholds (the rules of ``loop``'s docstring).

By the model: a region the discovery model puts in one of its novel clusters, not over its outlier threshold,
takes the class that cluster stands for in the store (``model_classes``; followed through merges; ``new`` while
that class is a proposal). Every other region — a model outlier, a predictor that names no cluster, a cluster
whose class was rejected — is labelled by the index.

By the index, labelling e: k-NN score s = 1 − cos to the k-th nearest reference member, d = 1 − cos to the
nearest prototype. e is an outlier when s > t_knn and d > t_proto. A non-outlier takes the nearest prototype's
class; an outlier within ``near_radius`` of an open proposal's centroid is ``new`` (that proposal), otherwise
``unknown``.
Thresholds: t_knn and t_proto accept ``accept_rate`` of a seeded sample of reference members (leave-one-out
k-NN); the clustering cut is ``cut_margin`` × the members' mean pairwise cosine distance 1 − ‖mean‖².
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from anomaly_discovery.platform.predictor import PredictedRegion
from anomaly_discovery.platform.review.mirror import NO_ID, AssignmentMirror
from anomaly_discovery.platform.review.proposals import fit_threshold
from anomaly_discovery.platform.review.types import ClassInfo, LoopConfig, RegionLabel, Thresholds
from anomaly_discovery.platform.storage.embedding_file import EmbeddingFile
from anomaly_discovery.platform.storage.index import PrototypeIndex
from anomaly_discovery.platform.storage.models import ClassStatus

LIVE_STATUSES = (ClassStatus.KNOWN, ClassStatus.CONFIRMED, ClassStatus.PROPOSED)


def label_vectors(vectors: np.ndarray, index: PrototypeIndex, k: int, thresholds: Thresholds,
                  classes: dict[int, ClassInfo], centroids: dict[int, np.ndarray], open_proposals: dict[int, int],
                  near_radius: float) -> list[RegionLabel]:
    """Labels of unit row vectors against the classes in ``index`` and the open proposals' centroids."""
    n = len(vectors)
    knn = (index.knn_outlier_scores(vectors, k) if index.count("region") >= k
           else np.full(n, 2.0, np.float32))
    nearest_similarity, nearest = np.full(n, -1.0, np.float32), np.full(n, NO_ID, np.int64)
    if index.count("prototype"):
        similarity, ids = index.search(vectors, 1, kind="prototype")
        nearest_similarity, nearest = similarity[:, 0], ids[:, 0]
    outlier = ((knn > thresholds.knn) if thresholds.knn is not None else np.ones(n, bool)) & \
              ((1.0 - nearest_similarity > thresholds.prototype) if thresholds.prototype is not None
               else np.ones(n, bool))
    proposal_classes = [c for c in open_proposals if c in centroids]
    proposal_similarity = (vectors @ np.stack([centroids[c] for c in proposal_classes]).T
                           if proposal_classes else np.zeros((n, 0), np.float32))
    labels = []
    for i in range(n):
        if not outlier[i] and nearest[i] != NO_ID:
            info = classes[int(nearest[i])]
            labels.append(RegionLabel("class", info.name, info.id, float(knn[i]), float(nearest_similarity[i])))
            continue
        best = int(proposal_similarity[i].argmax()) if proposal_classes else -1
        if best >= 0 and 1.0 - proposal_similarity[i, best] <= near_radius:
            labels.append(RegionLabel("new", "new", proposal_classes[best], float(knn[i]),
                                      float(proposal_similarity[i, best])))
        else:
            labels.append(RegionLabel("unknown", "unknown", None, float(knn[i]), float(nearest_similarity[i])))
    return labels


def live_class(class_id: int | None, classes: dict[int, ClassInfo]) -> ClassInfo | None:
    """The live class ``class_id`` now is: itself, or the class it was merged into (repeatedly); ``None`` when
    it was rejected or no longer exists."""
    seen = set()
    while class_id is not None and class_id not in seen:
        seen.add(class_id)
        info = classes.get(class_id)
        if info is None or info.status != ClassStatus.MERGED:
            return info if info is not None and info.status in LIVE_STATUSES else None
        class_id = info.merged_into_id
    return None


def label_by_model(regions: Sequence[PredictedRegion], index_labels: Sequence[RegionLabel],
                   classes: dict[int, ClassInfo], model_classes: dict[int, int | None],
                   centroids: dict[int, np.ndarray]) -> list[RegionLabel]:
    """The model's class of each region where it gives one (module docstring), else its index label; the k-NN
    outlier score is the index's either way, the similarity the cosine to the chosen class's centroid."""
    labels = []
    for region, fallback in zip(regions, index_labels):
        info = None
        if region.class_index is not None and not region.is_outlier:
            info = live_class(model_classes.get(int(region.class_index)), classes)
        if info is None:
            labels.append(fallback)
            continue
        centre = centroids.get(info.id)
        similarity = float(np.dot(region.embedding, centre)) if centre is not None else fallback.similarity
        proposed = info.status == ClassStatus.PROPOSED
        labels.append(RegionLabel("new" if proposed else "class", "new" if proposed else info.name, info.id,
                                  fallback.outlier_score, similarity))
    return labels


def fit_thresholds(mirror: AssignmentMirror, embeddings: EmbeddingFile, index: PrototypeIndex,
                   centroids: dict[int, np.ndarray], reference_class_ids: np.ndarray,
                   config: LoopConfig) -> Thresholds:
    """t_knn, t_proto and the cut from a seeded sample of the reference classes' members (no thresholds while
    there are fewer than k + 1 members)."""
    members = np.flatnonzero(np.isin(mirror.class_id, reference_class_ids))
    members = members[mirror.embedding_id[members] >= 0]
    if members.size < config.k + 1:
        return Thresholds()
    rng = np.random.default_rng(config.seed)
    if members.size > config.threshold_sample:
        members = np.sort(rng.choice(members, config.threshold_sample, replace=False))
    embedding_ids = mirror.embedding_id[members]
    vectors = embeddings.get(embedding_ids)
    knn = index.knn_outlier_scores(vectors, config.k, exclude_ids=embedding_ids)
    centres = np.stack([centroids[int(c)] for c in mirror.class_id[members]])
    distance = 1.0 - np.sum(vectors * centres, axis=1)
    classes, sizes = np.unique(mirror.class_id[members], return_counts=True)
    spread = [1.0 - float(np.linalg.norm(embeddings.get(mirror.embedding_id[
        members[mirror.class_id[members] == c]]).mean(axis=0))) ** 2 for c in classes]
    cut = float(np.clip(config.cut_margin * np.average(spread, weights=sizes), 0.05, 0.9))
    return Thresholds(fit_threshold(knn, config.accept_rate), fit_threshold(distance, config.accept_rate), cut)
