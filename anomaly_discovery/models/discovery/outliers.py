"""Unseen-outlier scores: how far a crop lies from every known class (issue 4 item 6; methods §2 OOD scores).

Every score is oriented **higher = more anomalous / more likely unseen**. Logit-based scores take the
head's cosine logits (``PrototypeHead``) and the same temperature as training (0.1):

* ``knn_distance_score``: cosine distance 1 − cos to the k-th nearest reference embedding (exact FAISS
  inner-product search).
* ``local_outlier_factor_score``: the local outlier factor over the k nearest references (cosine distance), which
  reads a crop's distance against how spread its known neighbours are.
* ``max_softmax_score``: 1 − max_c softmax(l/τ)_c (MSP).
* ``energy_score``: E = −τ · logsumexp_c(l_c/τ) (free energy; low for confident known crops).
* ``max_logit_score``: −max_c l_c.

``OutlierThreshold`` accepts ``accept_rate`` (95%) of known-class validation crops; ``evaluate_outlier_scores``
treats unseen crops as positives.
"""

from __future__ import annotations

from typing import Hashable, Optional, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import fpr_at_tpr, image_auroc

AGGREGATES = ("max", "mean")
OUTLIER_SCORES = ("knn", "lof")  # ClassSettings.outlier_score: knn_distance_score, local_outlier_factor_score


def _as_logits(logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    tensor = torch.as_tensor(logits).detach().to(torch.float64)
    if tensor.ndim != 2 or tensor.shape[1] == 0:
        raise ValueError(f"logits must have shape (N, K) with K >= 1, got {tuple(tensor.shape)}")
    return tensor


def _unit_pair(embeddings, reference_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    queries = F.normalize(torch.as_tensor(embeddings).detach().to(torch.float32), dim=-1)
    references = F.normalize(torch.as_tensor(reference_embeddings).detach().to(torch.float32), dim=-1)
    if queries.ndim != 2 or references.ndim != 2 or queries.shape[1] != references.shape[1]:
        raise ValueError(f"embeddings {tuple(queries.shape)} and reference_embeddings {tuple(references.shape)} "
                         "must be (N, D) and (M, D)")
    return queries, references


def _nearest(queries: torch.Tensor, references: torch.Tensor, k: int,
             excluded: Optional[Sequence[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) cosine distances and rows of each unit query's k nearest unit references (exact FAISS inner-product
    search), leaving out the rows ``excluded[i]`` for query i."""
    if excluded is not None and len(excluded) != len(queries):
        raise ValueError(f"excluded has {len(excluded)} entries for {len(queries)} embeddings")
    widest = max((len(rows) for rows in excluded), default=0) if excluded is not None else 0
    if not 1 <= k <= references.shape[0] - widest:
        raise ValueError(f"k must be in [1, {references.shape[0] - widest}] (the references a query may see), "
                         f"got {k}")
    if queries.shape[0] == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    index = faiss.IndexFlatIP(references.shape[1])
    index.add(np.ascontiguousarray(references.numpy()))
    similarity, rows = index.search(np.ascontiguousarray(queries.numpy()), k + widest)
    if excluded is not None:
        kept = [~np.isin(row_ids, skip) for row_ids, skip in zip(rows, excluded)]
        similarity = np.stack([row[keep][:k] for row, keep in zip(similarity, kept)])
        rows = np.stack([row[keep][:k] for row, keep in zip(rows, kept)])
    return np.clip(1.0 - similarity[:, :k], 0.0, 2.0).astype(np.float32), rows[:, :k]  # rounding: a hair below 0


def knn_distance_score(
    embeddings: torch.Tensor | np.ndarray,
    reference_embeddings: torch.Tensor | np.ndarray,
    k: int = 1,
    excluded: Optional[Sequence[np.ndarray]] = None,
) -> np.ndarray:
    """(N,) cosine distance of each embedding to its k-th nearest reference (known-class embeddings or
    prototypes), by an exact FAISS inner-product search over the unit vectors. A query that is itself in the
    reference set finds itself at distance 0, unless ``excluded[i]`` (reference rows query i must not see, e.g.
    the crops of its own image) leaves it out."""
    distances, _ = _nearest(*_unit_pair(embeddings, reference_embeddings), k, excluded)
    return distances[:, -1]


def _reference_reachability(references: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each unit reference's distance to its k-th nearest other reference and its local reachability density."""
    own_distances, own_rows = _nearest(references, references, k, [np.array([row]) for row in range(len(references))])
    k_distance = own_distances[:, -1]
    return k_distance, 1.0 / (np.maximum(k_distance[own_rows], own_distances).mean(axis=1) + 1e-10)


def _local_outlier_factor(queries: torch.Tensor, references: torch.Tensor, k: int,
                          excluded: Optional[Sequence[np.ndarray]], k_distance: np.ndarray,
                          density: np.ndarray) -> np.ndarray:
    distances, rows = _nearest(queries, references, k, excluded)
    own_density = 1.0 / (np.maximum(k_distance[rows], distances).mean(axis=1) + 1e-10)
    return (density[rows].mean(axis=1) / own_density).astype(np.float32)


def local_outlier_factor_score(
    embeddings: torch.Tensor | np.ndarray,
    reference_embeddings: torch.Tensor | np.ndarray,
    k: int = 10,
    excluded: Optional[Sequence[np.ndarray]] = None,
) -> np.ndarray:
    """(N,) local outlier factor (Breunig et al. 2000) of each embedding against the references, cosine distance:
    the references' mean local reachability density over the query's k nearest, divided by the query's own
    (reachability distance to a reference: at least that reference's own k-th neighbour distance). About 1 inside
    a known class however dense or spread it is, above 1 where a crop lies farther from its neighbours than they
    lie from theirs. Each reference's neighbours leave the reference itself out; ``excluded`` as in
    :func:`knn_distance_score`. The same numbers as scikit-learn's ``LocalOutlierFactor(novelty=True)``, which
    has no way to keep a query's own image's crops out of its neighbours."""
    queries, references = _unit_pair(embeddings, reference_embeddings)
    if not 1 <= k < references.shape[0]:
        raise ValueError(f"k must be in [1, {references.shape[0] - 1}] (a reference's other references), got {k}")
    return _local_outlier_factor(queries, references, k, excluded, *_reference_reachability(references, k))


class DistanceOutlierScorer:
    """The outlier score ``kind`` names (``OUTLIER_SCORES``) of queries against fixed references over their k
    nearest, k capped at the references a query may see; the local outlier factor's side of the references (each
    one's k-th neighbour distance and density) is searched once and kept, so scoring new crops searches only
    their own neighbours. The local outlier factor needs two references a query may see (a reference's own
    neighbour): with fewer, the k-NN distance stands in."""

    def __init__(self, kind: str, reference_embeddings: torch.Tensor | np.ndarray, k: int):
        if kind not in OUTLIER_SCORES:
            raise ValueError(f"outlier score must be one of {OUTLIER_SCORES}, got {kind!r}")
        self.kind, self.k, self.references = kind, k, reference_embeddings
        self._reachability: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def score(self, embeddings: torch.Tensor | np.ndarray,
              excluded: Optional[Sequence[np.ndarray]] = None) -> np.ndarray:
        """(N,) scores, higher = farther from the known crops; ``excluded`` as in :func:`knn_distance_score`."""
        widest = max((len(rows) for rows in excluded), default=0) if excluded is not None else 0
        seen = len(self.references) - widest
        if self.kind == "knn" or seen < 2:
            return knn_distance_score(embeddings, self.references, k=min(self.k, seen), excluded=excluded)
        queries, references = _unit_pair(embeddings, self.references)
        k = min(self.k, seen, len(references) - 1)
        if k not in self._reachability:
            self._reachability[k] = _reference_reachability(references, k)
        return _local_outlier_factor(queries, references, k, excluded, *self._reachability[k])


def max_softmax_score(logits: torch.Tensor | np.ndarray, temperature: float = 0.1) -> np.ndarray:
    """(N,) 1 − max softmax(logits/τ): 0 for a certain known crop, up to 1 − 1/K for a uniform one."""
    return (1.0 - torch.softmax(_as_logits(logits) / temperature, dim=1).max(dim=1).values).numpy()


def energy_score(logits: torch.Tensor | np.ndarray, temperature: float = 0.1) -> np.ndarray:
    """(N,) free energy −τ · logsumexp(logits/τ)."""
    return (-temperature * torch.logsumexp(_as_logits(logits) / temperature, dim=1)).numpy()


def max_logit_score(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N,) −max logit (the negated best cosine similarity for prototype logits)."""
    return (-_as_logits(logits).max(dim=1).values).numpy()


class OutlierThreshold:
    """Threshold that accepts ``accept_rate`` of known-class validation scores; higher scores are outliers."""

    def __init__(self, accept_rate: float = 0.95):
        if not 0.0 < accept_rate <= 1.0:
            raise ValueError(f"accept_rate must be in (0, 1], got {accept_rate}")
        self.accept_rate = accept_rate

    def fit(self, known_val_scores: Sequence[float] | np.ndarray) -> "OutlierThreshold":
        """Set ``threshold_`` to the ``accept_rate`` quantile (rounded up to an observed score) so that at
        least ``accept_rate`` of the known scores are ≤ it."""
        scores = np.asarray(known_val_scores, dtype=np.float64).ravel()
        if scores.size == 0 or not np.isfinite(scores).all():
            raise ValueError(f"known_val_scores must be a non-empty array of finite numbers, got {scores.size} values")
        self.threshold_ = float(np.quantile(scores, self.accept_rate, method="higher"))
        return self

    def is_outlier(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        """Boolean array: True where a score is above ``threshold_``."""
        if not hasattr(self, "threshold_"):
            raise RuntimeError("OutlierThreshold is not fitted: call fit(known_val_scores) first")
        return np.asarray(scores, dtype=np.float64) > self.threshold_


def image_outlier_score(
    image_ids: Sequence[Hashable], region_scores: Sequence[float] | np.ndarray, aggregate: str = "max"
) -> dict[Hashable, float]:
    """Per-image outlier score from its regions' scores (parallel to ``image_ids``): their max or mean."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    scores = np.asarray(region_scores, dtype=np.float64).ravel()
    if len(image_ids) != scores.size:
        raise ValueError(f"need one image id per region score; got {len(image_ids)} ids and {scores.size} scores")
    by_image: dict[Hashable, list[float]] = {}
    for image_id, score in zip(image_ids, scores):
        by_image.setdefault(image_id, []).append(float(score))
    reduce = max if aggregate == "max" else (lambda values: sum(values) / len(values))
    return {image_id: float(reduce(values)) for image_id, values in by_image.items()}


def evaluate_outlier_scores(
    scores_known: Sequence[float] | np.ndarray, scores_unseen: Sequence[float] | np.ndarray
) -> dict[str, float]:
    """AUROC and FPR95 with unseen crops as positives.

    ``auroc``: ``roc_auc_score`` (1 when every unseen score exceeds every known score). ``fpr95``: the
    fraction of known crops flagged at the strictest threshold that still flags ≥ 95% of unseen crops
    (FPR of known at 95% TPR of unseen; lower is better).
    """
    known = np.asarray(scores_known, dtype=np.float64).ravel()
    unseen = np.asarray(scores_unseen, dtype=np.float64).ravel()
    if known.size == 0 or unseen.size == 0:
        raise ValueError(f"need known and unseen scores, got {known.size} known and {unseen.size} unseen")
    truth = np.concatenate([np.zeros(known.size), np.ones(unseen.size)])
    scores = np.concatenate([known, unseen])
    return {"auroc": image_auroc(truth, scores), "fpr95": fpr_at_tpr(truth, scores, 0.95)}
