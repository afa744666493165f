"""Estimating the number of novel classes (``--k auto``; issue 4 item 4, methods §2 "Estimating K" [INFERRED]).

Three criteria, all on L2-normalised embeddings:

* ``silhouette``: k-means for every k in [k_min, k_max]; pick the k with the highest mean silhouette
  under cosine distance.
* ``gap``: Tibshirani's gap statistic with k-means inertia W_k and references drawn uniformly in the
  PCA-aligned bounding box of the data; pick the smallest k with ``Gap(k) ≥ Gap(k+1) − s_{k+1}``
  (the arg-max when no k qualifies).
* ``prototype_wins``: given the K_max prototypes of an over-clustered head, assign every embedding to
  its prototypes with ``softmax(μᵀx̂/τ)``; keep the assignments whose top probability is at least
  ``confidence``; merge prototypes whose cosine similarity is ≥ ``merge_similarity`` (connected
  components) and count each group's wins; K = number of groups that win at least
  ``min_win_fraction`` of the confident assignments (default: half the uniform share, 0.5 / K_max).

Accuracy on synthetic data, measured with this code (K ∈ {3, 5, 7}, 10 seeds each, 60 points per class,
D = 32, centres uniform on the sphere, points = normalise(centre + σ·N(0, I)), k range 2–10;
``prototype_wins`` gets the K true centres, one near-duplicate of a centre (cosine ≈ 0.96) and
random directions up to K_max = 10). Share of the 30 runs exact / within ±1:

    σ      silhouette      gap            prototype_wins
    0.1    1.00 / 1.00     1.00 / 1.00    1.00 / 1.00
    0.2    0.97 / 1.00     1.00 / 1.00    1.00 / 1.00
    0.3    0.90 / 1.00     1.00 / 1.00    1.00 / 1.00
    0.4    0.47 / 0.80     0.37 / 0.57    0.97 / 1.00
    0.5    0.20 / 0.47     0.07 / 0.33    0.67 / 0.97

With heavy overlap (σ ≥ 0.4: a point's cosine to its own centre ≈ 0.4) both embedding criteria
under-estimate K; silhouette is ~4× faster than gap (≈ 0.04 s vs 0.15 s per run of ≤ 420 points on
the 2-core CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

METHODS = ("silhouette", "gap", "prototype_wins")
SILHOUETTE_SAMPLE_LIMIT = 4000


@dataclass
class ClassCountEstimate:
    """The estimated k, the criterion value per candidate k, and the method's name.

    For ``prototype_wins`` the entry for k is the win fraction of the k-th strongest prototype group.
    """

    k: int
    scores_by_k: dict[int, float]
    method: str


def _normalised(embeddings: np.ndarray) -> np.ndarray:
    array = np.asarray(embeddings, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (N, D) array, got shape {array.shape}")
    return array / np.clip(np.linalg.norm(array, axis=1, keepdims=True), 1e-12, None)


def _kmeans(points: np.ndarray, k: int, seed: int) -> KMeans:
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit(points)


def _silhouette_scores(points: np.ndarray, ks: range, seed: int) -> dict[int, float]:
    sample = min(len(points), SILHOUETTE_SAMPLE_LIMIT)
    return {k: float(silhouette_score(points, _kmeans(points, k, seed).labels_, metric="cosine",
                                      sample_size=sample, random_state=seed))
            for k in ks}


def _gap_scores(points: np.ndarray, ks: range, seed: int,
                n_references: int = 5) -> tuple[dict[int, float], dict[int, float]]:
    """Gap(k) = mean_b log W*_kb − log W_k and its standard error s_k = sd_b · sqrt(1 + 1/B)."""
    rng = np.random.default_rng(seed)
    centred = points - points.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    rotated = centred @ components.T
    low, high = rotated.min(axis=0), rotated.max(axis=0)
    references = [rng.uniform(low, high, size=rotated.shape) @ components + points.mean(axis=0)
                  for _ in range(n_references)]
    gaps, errors = {}, {}
    for k in ks:
        log_w = np.log(max(_kmeans(points, k, seed).inertia_, 1e-12))
        log_w_ref = np.log([max(_kmeans(reference, k, seed).inertia_, 1e-12) for reference in references])
        gaps[k] = float(log_w_ref.mean() - log_w)
        errors[k] = float(log_w_ref.std() * np.sqrt(1 + 1 / n_references))
    return gaps, errors


def _choose_gap_k(gaps: dict[int, float], errors: dict[int, float]) -> int:
    ks = sorted(gaps)
    for k, k_next in zip(ks[:-1], ks[1:]):
        if gaps[k] >= gaps[k_next] - errors[k_next]:
            return k
    return max(ks, key=gaps.__getitem__)


def prototype_win_fractions(
    embeddings: np.ndarray,
    prototypes: np.ndarray,
    temperature: float = 0.1,
    confidence: float = 0.5,
    merge_similarity: float = 0.9,
) -> np.ndarray:
    """Share of confident assignments won by each prototype group, sorted from strongest to weakest."""
    points, mu = _normalised(embeddings), _normalised(prototypes)
    if mu.shape[1] != points.shape[1]:
        raise ValueError(f"prototypes have dimension {mu.shape[1]}, embeddings {points.shape[1]}")
    logits = points @ mu.T / temperature
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    confident = probs.max(axis=1) >= confidence
    if not confident.any():
        raise ValueError(f"no assignment reaches confidence {confidence} (highest top probability "
                         f"{probs.max():.3f}); lower confidence or raise the temperature")
    wins = np.bincount(probs[confident].argmax(axis=1), minlength=len(mu))
    _, group = connected_components(csr_matrix(mu @ mu.T >= merge_similarity), directed=False)
    group_wins = np.bincount(group, weights=wins)
    return np.sort(group_wins / confident.sum())[::-1]


def estimate_class_count(
    embeddings: np.ndarray,
    k_min: int = 2,
    k_max: int = 10,
    method: str = "silhouette",
    seed: int = 0,
    prototypes: np.ndarray | None = None,
    temperature: float = 0.1,
    confidence: float = 0.5,
    min_win_fraction: float | None = None,
    merge_similarity: float = 0.9,
) -> ClassCountEstimate:
    """Estimate the number of novel classes from (N, D) embeddings (see the module docstring).

    ``prototypes`` (K_max, D), the novel-class prototypes of an over-clustered head, is required by
    ``prototype_wins`` and ignored otherwise; its estimate is clipped to [k_min, k_max].
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    points = _normalised(embeddings)
    if method == "prototype_wins":
        if prototypes is None:
            raise ValueError("method='prototype_wins' needs the head's prototypes (K_max, D)")
        fractions = prototype_win_fractions(points, prototypes, temperature, confidence, merge_similarity)
        threshold = 0.5 / len(prototypes) if min_win_fraction is None else min_win_fraction
        k = int(np.clip((fractions >= threshold).sum(), k_min, k_max))
        return ClassCountEstimate(k, {rank + 1: float(f) for rank, f in enumerate(fractions)}, method)
    if method == "silhouette" and k_min < 2:
        raise ValueError(f"silhouette needs k_min >= 2, got {k_min}")
    if k_max >= len(points):
        raise ValueError(f"k_max ({k_max}) must be smaller than the number of embeddings ({len(points)})")
    ks = range(k_min, k_max + 1)
    if method == "silhouette":
        scores = _silhouette_scores(points, ks, seed)
        return ClassCountEstimate(max(ks, key=scores.__getitem__), scores, method)
    gaps, errors = _gap_scores(points, ks, seed)
    return ClassCountEstimate(_choose_gap_k(gaps, errors), gaps, method)
