"""Estimating the number of novel classes (``--k auto``; issue 14 item 3, methods §5 "Estimating the number of
classes").

Criteria on L2-normalised embeddings, each scoring every k in [k_min, k_max]:

* ``gap_sphere``: Tibshirani's gap statistic with k-means inertia and a reference that lives where unit embeddings
  live: Gaussian points with the data's principal spectrum (the directions holding 90% of its variance) around
  its mean direction, projected onto the sphere. The smallest k with ``Gap(k) ≥ Gap(k+1) − s_{k+1}``.
* ``eigengap``: the largest gap among the smallest eigenvalues of the normalised Laplacian of the 10-nearest-
  neighbour graph (von Luxburg 2007).
* ``prediction_strength``: Tibshirani & Walther (2005): cluster two random halves; the share of
  co-member pairs of the worst cluster of one half that the other half's centroids keep together; the largest k
  whose mean share reaches 0.6. A split whose test half has a cluster of a single point counts as not reproduced
  (a lone point has no pair to keep together): skipping such clusters over-split small sets (the quick demo's 19
  images: K = 9). The default from ``benchmarks/discovery_selection.py``'s part ``class_count_flow``, which
  estimates K as the product does (the view weights chosen at a first estimate, not at the true K): on NEU-DET and
  generated tasks, balanced and long-tailed, whole and in class subsets, 54 of 70 estimates within ±1 of the true
  count against the consensus's 49, and 45 of 70 against 40 on fresh draws (a rerun with the guard: it changed
  none of the 70 estimates and one of the fresh ones). It wins on sets of 3 to 5 classes (51 of 60 against 43)
  and loses on the whole 6- and 7-class tasks (3 of 10 against 6; NEU-DET seed 0 and the generated metal plate:
  K = 2): it leans to few classes. With many kinds expected, ``k_method="consensus"`` or K given.
* ``prediction_strength_or_consensus`` (default): prediction strength, and where it stops at the floor ``k_min``
  the consensus. Prediction strength is the reproducibility of the WORST cluster, so one kind that overlaps another
  keeps every k above 2 under the level, whatever the other kinds do: its k = 2 says less than its k = 5 (on the
  selection sets of ``class_count_flow`` it stopped at 2 on 14 of 70, 7 of which held more than 3 classes). Formed
  after that part's selection and fresh rows were read, so judged on new draws
  (``benchmarks/class_count_floor_selection.py``, rule fixed before its run): within ±1 of the true count on 52 of
  70 new estimates against prediction strength's 42 (the consensus alone: 42), and on 57 of the 70 selection
  estimates against 53; the default since.
* ``consensus``: the median of the three above, the default before: chosen when K was estimated at view weights
  picked at the true K (30 of 35 estimates within ±1 there, against 28 for gap_sphere and prediction strength,
  and 9 for the box-reference gap).
* ``gap`` (box reference), ``silhouette`` and ``prototype_wins``, the earlier criteria, kept for settings files
  that name them: the box reference lands too high, as it did on MTD.

Every criterion but ``prototype_wins`` sees only distances and cosines, so the points are first written in an
orthonormal basis of their own span when they have more dimensions than there are points (the result is the same
to rounding; k-means is several times faster).

The tests recover K on well-separated clusters on the sphere with every criterion. The criteria are written here
because scikit-learn and scipy have none of them; k-means, the silhouette, the kNN graph and its Laplacian are
theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, laplacian
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.extmath import svd_flip

METHODS = ("consensus", "gap_sphere", "eigengap", "prediction_strength", "prediction_strength_or_consensus",
           "silhouette", "gap", "prototype_wins")
CONSENSUS = ("gap_sphere", "eigengap", "prediction_strength")
PREDICTION_STRENGTH_LEVEL = 0.6
GRAPH_NEIGHBOURS = 10
SILHOUETTE_SAMPLE_LIMIT = 4000


@dataclass
class ClassCountEstimate:
    """The estimated k, the criterion value per candidate k, and the method's name.

    For ``prototype_wins`` the entry for k is the win fraction of the k-th strongest prototype group; for
    ``consensus`` the number of criteria that chose k, and ``votes`` each criterion's choice.
    """

    k: int
    scores_by_k: dict[int, float]
    method: str
    votes: dict[str, int] | None = None


def _normalised(embeddings: np.ndarray) -> np.ndarray:
    array = np.asarray(embeddings, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (N, D) array, got shape {array.shape}")
    return array / np.clip(np.linalg.norm(array, axis=1, keepdims=True), 1e-12, None)


def in_own_span(points: np.ndarray) -> np.ndarray:
    """The points in an orthonormal basis of their own span (N×min(N, D)): every distance, cosine and norm is kept,
    so every criterion but ``prototype_wins`` sees the same geometry, and k-means runs over at most N coordinates
    instead of D (4,300-dimensional view embeddings of 700 images: 6× fewer)."""
    if points.shape[1] <= points.shape[0]:
        return points
    left, singular, _ = np.linalg.svd(points, full_matrices=False)
    return left * singular


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


def _sphere_references(points: np.ndarray, n_references: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Reference sets on the sphere: Gaussian points with the data's principal spectrum (90% of its variance)
    around its mean, normalised to unit length. Each principal direction's sign follows the data (its largest
    score positive), so that the same points in any orthonormal basis get the same references. They are written
    in the orthonormal basis of those directions and the mean's part outside them (``dims`` + 1 coordinates: the
    same distances as in the data's space, and k-means on them several times faster)."""
    mean = points.mean(axis=0)
    scores, spectrum, components = np.linalg.svd(points - mean, full_matrices=False)
    _, components = svd_flip(scores, components, u_based_decision=True)  # signs from the data: rotation-invariant
    dims = int(np.searchsorted(np.cumsum(spectrum ** 2) / np.sum(spectrum ** 2), 0.9) + 1)
    scale = spectrum[:dims] / np.sqrt(len(points))
    inside = components[:dims] @ mean  # the mean in the principal directions, and its distance from their span:
    outside = np.full((len(points), 1), np.linalg.norm(mean - inside @ components[:dims]))  # an orthonormal basis
    return [_normalised(np.hstack([inside + rng.normal(size=(len(points), dims)) * scale, outside]))
            for _ in range(n_references)]


def _gap_sphere_scores(points: np.ndarray, ks: range, seed: int,
                       n_references: int = 5) -> tuple[dict[int, float], dict[int, float]]:
    references = _sphere_references(points, n_references, np.random.default_rng(seed))
    gaps, errors = {}, {}
    for k in ks:
        log_w = np.log(max(_kmeans(points, k, seed).inertia_, 1e-12))
        log_w_ref = np.log([max(_kmeans(reference, k, seed).inertia_, 1e-12) for reference in references])
        gaps[k] = float(log_w_ref.mean() - log_w)
        errors[k] = float(log_w_ref.std() * np.sqrt(1 + 1 / n_references))
    return gaps, errors


def _eigengaps(points: np.ndarray, ks: range) -> dict[int, float]:
    """λ_k − λ_{k−1} of the normalised Laplacian of the symmetric kNN graph (Gaussian weights, median scale). Each
    point links to its 2nd to (n+1)-th nearest other points (``kneighbors()`` already leaves the point itself out
    and the first column is dropped, as when the defaults were chosen: near-duplicate crops of one image do not
    decide the graph)."""
    n_neighbours = min(GRAPH_NEIGHBOURS, len(points) - 2)
    distances, neighbours = NearestNeighbors(n_neighbors=n_neighbours + 1, metric="cosine").fit(points).kneighbors()
    sigma = max(float(np.median(distances[:, 1:])), 1e-12)
    rows = np.repeat(np.arange(len(points)), n_neighbours)
    similarity = np.exp(-distances[:, 1:].ravel() ** 2 / (2 * sigma ** 2))
    weights = csr_matrix((similarity, (rows, neighbours[:, 1:].ravel())), shape=(len(points), len(points)))
    eigenvalues = np.sort(np.linalg.eigvalsh(laplacian(weights.maximum(weights.T), normed=True).toarray()))
    return {k: float(eigenvalues[k] - eigenvalues[k - 1]) for k in ks}


def _prediction_strengths(points: np.ndarray, ks: range, seed: int, n_splits: int = 5) -> dict[int, float]:
    """Each K's prediction strength over ``n_splits`` random halves; 0 where a half has fewer points than K, and a
    split's share 0 where a cluster of the test half holds a single point (a partition that cannot be tested is
    not reached: a lone point has no pair to keep together, and skipping it let small sets over-split)."""
    rng = np.random.default_rng(seed)
    strengths = {}
    for k in ks:
        if k > len(points) // 2:
            strengths[k] = 0.0
            continue
        shares = []
        for split in range(n_splits):
            order = rng.permutation(len(points))
            train, test = points[order[: len(points) // 2]], points[order[len(points) // 2:]]
            predicted = _kmeans(train, k, seed + split).predict(test)
            labels = _kmeans(test, k, seed + split + n_splits).labels_
            worst = 1.0
            for cluster in range(k):
                members = predicted[labels == cluster]
                if len(members) < 2:
                    worst = 0.0
                    break
                together = (members[:, None] == members[None, :]).sum() - len(members)
                worst = min(worst, together / (len(members) * (len(members) - 1)))
            shares.append(worst)
        strengths[k] = float(np.mean(shares))
    return strengths


def _estimate_by(method: str, points: np.ndarray, ks: range, seed: int) -> ClassCountEstimate:
    if method == "silhouette":
        scores = _silhouette_scores(points, ks, seed)
        return ClassCountEstimate(max(ks, key=scores.__getitem__), scores, method)
    if method == "gap":
        gaps, errors = _gap_scores(points, ks, seed)
        return ClassCountEstimate(_choose_gap_k(gaps, errors), gaps, method)
    if method == "gap_sphere":
        gaps, errors = _gap_sphere_scores(points, ks, seed)
        return ClassCountEstimate(_choose_gap_k(gaps, errors), gaps, method)
    if method == "eigengap":
        gaps = _eigengaps(points, ks)
        return ClassCountEstimate(max(ks, key=gaps.__getitem__), gaps, method)
    strengths = _prediction_strengths(points, ks, seed)
    reached = [k for k in ks if strengths[k] >= PREDICTION_STRENGTH_LEVEL]
    return ClassCountEstimate(max(reached) if reached else min(ks), strengths, method)


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
    method: str = "consensus",
    seed: int = 0,
    prototypes: np.ndarray | None = None,
    temperature: float = 0.1,
    confidence: float = 0.5,
    min_win_fraction: float | None = None,
    merge_similarity: float = 0.9,
) -> ClassCountEstimate:
    """Estimate the number of novel classes from (N, D) embeddings (see the module docstring).

    ``prototypes`` (K_max, D), the novel-class prototypes of an over-clustered head, is required by
    ``prototype_wins`` and ignored otherwise; its estimate is clipped to [k_min, k_max]. The consensus's entry per
    k is its vote count (``votes``: each criterion's k), as is ``prediction_strength_or_consensus``'s where it falls
    back to the consensus; where it does not, its entries are prediction strength's.
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
    if method in ("silhouette", "eigengap") and k_min < 2:
        raise ValueError(f"{method} needs k_min >= 2, got {k_min}")
    if k_max >= len(points):
        raise ValueError(f"k_max ({k_max}) must be smaller than the number of embeddings ({len(points)})")
    ks = range(k_min, k_max + 1)
    points = in_own_span(points)
    if method not in ("consensus", "prediction_strength_or_consensus"):
        return _estimate_by(method, points, ks, seed)
    strength = _estimate_by("prediction_strength", points, ks, seed)
    if method == "prediction_strength_or_consensus" and strength.k > k_min:
        return ClassCountEstimate(strength.k, strength.scores_by_k, method)
    votes = {name: strength.k if name == "prediction_strength" else _estimate_by(name, points, ks, seed).k
             for name in CONSENSUS}
    counts = {k: float(sum(vote == k for vote in votes.values())) for k in ks}
    return ClassCountEstimate(int(np.median(list(votes.values()))), counts, method, votes)
