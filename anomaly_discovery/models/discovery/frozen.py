"""Training-free discovery on frozen multi-view features (issue 14 item 1; methods.md §5): the floor every learned
model must beat, and the starting point of the learned model (``adapter``).

Per region the three views of ``views`` (mask-pooled depths, the crop's mean, the whole image's mean), with the
normal images' main directions of variation removed when normal images are known (``NuisanceProjection``), are
joined with weights w_v chosen without labels: among the 15 weightings on a quarter grid of the simplex, the one
whose k-means partition at K has the highest mean silhouette (cosine). The rule was fixed on NEU-DET (zero-shot
maps, three image subsets) and generated bottle and metal-plate defects (PatchCore maps) before any MTD run: it
chose within .08 NMI of the best weighting on every one of those tasks, where any single fixed weighting lost
about .2 on one of them (the whole image carries NEU-DET's classes, the masked crop the generated ones). Each
partition is the best of 10 k-means starts: with 4, the seed flipped near-ties on 3 of 10 tasks (on one long-tailed
NEU-DET draw between the image and the region view: floor NMI .80 or .59), with 10 on 1 (``discovery_selection``'s
part ``view_stability``). Known weakness: with nothing projected out, the whole-image view of generated bottles has
a high-silhouette partition unrelated to the defects (NMI .02, where the region view scores .49). On fresh draws no
rule was chosen on (part ``views_fresh``) the pick is within .10 of the best on 10 of 14; it misses on generated
bottles with nothing projected out again (gaps .43 and .29), a long-tailed NEU-DET draw (.28) and a long-tailed
unprojected metal plate (.11). In a scratch comparison on the selection tasks, silhouettes over K−1..K+1, on
the image level, or clustering stability mended the bottles but lost a long-tailed NEU-DET draw (.80 → .59), and
the image-level silhouette fell .05 below this rule on the fresh draws: none replaced it.

Without normal images the run's own images stand in for them (``own_image_projection``), but only when they do not
fall into K tight groups: where they do, the images' main variation is the classes themselves (NEU-DET's steel,
whose defects cover the surface: removing it took the floor from .85 to .41 NMI in a scratch run), where they do
not, it is product and lighting variation (generated bottles and plates, whose defects are local: .02 → .63 on the
bottles). The threshold (.32) lies between the two families' silhouettes on the selection tasks; on fresh draws the
rule kept every NEU-DET draw as it was and projected every generated one, the floor's mean NMI .60 → .72 and the
learned model's .63 → .75, no draw lower (``discovery_selection``'s parts ``own_projection`` and
``own_projection_fresh``).
It is a two-family rule: a data set whose whole images cluster by something other than the defect kind, with no
normal images given, would be left unprojected; ``own_projection`` (``always`` / ``never``) overrides it.
With K estimated the rule is asked at a first estimate of K on the unprojected views, and that is where it fails:
the generated bottles' images fall into three tight groups (the product's variants), the estimate lands there, and
nothing is projected (floor NMI .01 against .65 projected). Judging the images at 10 groups instead mended the
bottles but projected a long-tailed NEU-DET draw (.56 → .25) and failed its test on fresh draws
(``discovery_selection``'s part ``own_projection_k_auto``): a few tight groups of whole images may be a product's
variants or a set's few diffuse defect kinds, and nothing label-free here tells them apart. ``adisc discover`` says
so when it keeps them; K given, or ``own_projection: always``, settles it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

from anomaly_discovery.data.images import load_image

from ..localisation.regions import Region
from .class_count import ClassCountEstimate, estimate_class_count
from .views import VIEW_NAMES, NuisanceProjection, ViewExtractor, combine_views, image_features, unit_rows

ImageSource = Union[np.ndarray, str, Path]
WEIGHT_GRID = tuple({"region": r / 4, "crop": c / 4, "image": (4 - r - c) / 4}
                    for r in range(5) for c in range(5 - r))
VIEW_KMEANS_INITS = 10  # 4 let the seed flip near-ties (discovery_selection.py, part view_stability)
OWN_PROJECTION_MAX_SILHOUETTE = 0.32  # discovery_selection.py, part own_projection


def image_getter(images: Mapping[str, ImageSource]):
    """``images[image_id]`` as an array (a path is read when asked for)."""
    def get(image_id: str) -> np.ndarray:
        if image_id not in images:
            raise ValueError(f"no whole image was given for region image id {image_id!r}")
        source = images[image_id]
        return load_image(source) if isinstance(source, (str, Path)) else np.asarray(source)
    return get


def region_images(image_paths: Mapping[str, ImageSource], base: Sequence[Region] = ()) -> dict[str, ImageSource]:
    """Where every region's whole image is: the run's images by id, and base crops, whose ids are their image
    paths, by their own id (an id the run already maps keeps the run's image)."""
    return {r.image_id: r.image_id for r in base} | dict(image_paths)


def kmeans(points: np.ndarray, k: int, seed: int, n_init: int = 10) -> KMeans:
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(points)


def joined_span(grams: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """The rows of ``combine_views(vectors, weights)`` in an orthonormal basis of their span (N×N), from each
    view's Gram matrix ``V Vᵀ``: the join's Gram matrix is Σ w_v G_v with each row scaled to unit length, and
    its eigenvectors scaled by √eigenvalue keep every distance and cosine of the join (as ``in_own_span`` does
    by an SVD of the N×D join, here one N×N eigendecomposition per weighting instead)."""
    gram = sum(w * grams[name] for name, w in weights.items() if w > 0)
    scale = 1 / np.sqrt(np.clip(np.diag(gram), 1e-24, None))
    values, basis = np.linalg.eigh(gram * scale[:, None] * scale[None, :])
    return (basis * np.sqrt(np.clip(values, 0, None))).astype(np.float32)


def select_view_weights(vectors: dict[str, np.ndarray], k: int, seed: int = 0, n_init: int = VIEW_KMEANS_INITS
                        ) -> tuple[dict[str, float], dict[str, float]]:
    """The weighting of the grid whose k-means partition (k clusters, best of ``n_init`` starts) has the highest
    cosine silhouette, and the silhouette of every weighting (keyed ``region:crop:image``)."""
    scores = {}
    n_regions, n_dims = len(next(iter(vectors.values()))), sum(v.shape[1] for v in vectors.values())
    grams = ({name: v.astype(np.float64) @ v.T.astype(np.float64) for name, v in vectors.items()}
             if n_regions < n_dims else None)  # fewer regions than dimensions: cluster in their span
    for weights in WEIGHT_GRID:
        embedding = combine_views(vectors, weights) if grams is None else joined_span(grams, weights)
        labels = kmeans(embedding, k, seed, n_init=n_init).labels_
        scores[":".join(f"{weights[v]:.2f}" for v in VIEW_NAMES)] = (
            float(silhouette_score(embedding, labels, metric="cosine")) if len(set(labels)) > 1 else -1.0)
    best = max(scores, key=scores.__getitem__)
    return dict(zip(VIEW_NAMES, (float(w) for w in best.split(":")))), scores


def image_level(embeddings: np.ndarray, regions: Sequence[Region]) -> np.ndarray:
    """One unit vector per image (first-seen order): its regions' embeddings averaged with their areas."""
    rows: dict[str, list[int]] = {}
    for index, region in enumerate(regions):
        rows.setdefault(region.image_id, []).append(index)
    return unit_rows(np.stack([np.average(embeddings[index], axis=0,
                                          weights=[max(regions[i].area, 1) for i in index])
                               for index in rows.values()]))


def estimate_k(embeddings: np.ndarray, regions: Sequence[Region], k_max: int, method: str,
               seed: int) -> ClassCountEstimate:
    """K from the image-level embeddings (a class is a property of an image), capped below the image count."""
    points = image_level(embeddings, regions)
    k_max = min(k_max, len(points) - 1)
    if k_max < 2:
        return ClassCountEstimate(1, {1: 0.0}, method)
    return estimate_class_count(points, k_min=2, k_max=k_max, method=method, seed=seed)


def fit_projection(extractor: ViewExtractor, normal_images: Sequence[ImageSource], size: int, n_components: int,
                   progress: bool = False, turns: int = 1) -> Optional[NuisanceProjection]:
    """The nuisance projection of the normal images, the image view's from their means over ``turns`` quarter
    turns (None when there are no normal images or no component is asked for)."""
    if not normal_images or n_components < 1:
        return None
    loaded = (load_image(s) if isinstance(s, (str, Path)) else np.asarray(s) for s in normal_images)
    return NuisanceProjection.fit(image_features(extractor, loaded, len(normal_images), size, progress=progress,
                                                 turns=turns), n_components)


def image_cluster_strength(image_depths: Sequence[np.ndarray], k: int, seed: int = 0) -> float:
    """How tightly whole images fall into k groups: the cosine silhouette of their k-means partition (best of
    ``VIEW_KMEANS_INITS`` starts) on their per-depth spatial means, each depth centred and unit-normalised, joined."""
    points = unit_rows(np.concatenate([unit_rows(depth - depth.mean(axis=0)) for depth in image_depths], axis=1))
    k = min(k, len(points) - 1)
    if k < 2:
        return 1.0
    labels = kmeans(points, k, seed, n_init=VIEW_KMEANS_INITS).labels_
    return float(silhouette_score(points, labels, metric="cosine")) if len(set(labels)) > 1 else 1.0


def own_image_projection(image_depths: Sequence[np.ndarray], k: int, seed: int, n_components: int, mode: str,
                         turned: bool = False) -> tuple[Optional[NuisanceProjection], Optional[float]]:
    """The nuisance projection of the run's own images (``image_features``; ``turned``: its last array is the
    turned image view, which the strength, chosen on the depths alone, leaves out), for a run without normal images:
    with ``mode`` ``always``, or ``auto`` when their ``image_cluster_strength`` at k is below
    ``OWN_PROJECTION_MAX_SILHOUETTE``; ``never`` gives none. Also the strength (None when not measured)."""
    if mode == "never" or n_components < 1 or len(image_depths[0]) < 2:
        return None, None
    depths = image_depths[:-1] if turned else image_depths
    strength = image_cluster_strength(depths, k, seed) if mode == "auto" else None
    if strength is None or strength < OWN_PROJECTION_MAX_SILHOUETTE:
        return NuisanceProjection.fit(image_depths, n_components), strength
    return None, strength
