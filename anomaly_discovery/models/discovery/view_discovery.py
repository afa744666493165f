"""Discovery over frozen views, with (``kind="learned"``) or without (``kind="frozen"``) training (issue 14).

``fit_view_discovery`` runs the whole method on the novel regions (and, optionally, labelled base regions):

1. the views of every region (``views``; with ``image_turns`` 4 the image view over the whole image's turns),
   with the normal images' main variation removed when normal images are given (``NuisanceProjection``), else that
   of the run's own images unless they fall into K tight groups (``frozen.own_image_projection``; K given, or a
   first estimate on the equally weighted views);
2. K: given, or estimated (``ClassSettings.k_method``, by default ``class_count``'s prediction strength, and its
   consensus where prediction strength stops at k = 2) on the image level of the equally weighted views, then again
   on the chosen weighting;
3. the view weights (``frozen.select_view_weights``: highest silhouette at K);
4. the floor: k-means on the novel regions' embeddings (or on their images', ``ClassSettings.prototype_init``); its
   centres (and the base classes' means) are the prototypes of a :class:`ViewDiscoveryModel`, whose untrained
   embedding is the floor's exactly;
5. ``learned`` only: neighbour-consistency training (``neighbour_consistency``) from there;
6. embeddings, assignments, the k-NN outlier threshold (on the held-out base crops and the novel crops, each
   leaving itself out: ``predict.assemble_artifacts``), and image labels by area-weighted merging.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import silhouette_score
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from ..localisation.regions import Region
from .amga_pooling import ViewDiscoveryModel
from .checkpoints import resume_history, save_checkpoint
from .class_count import ClassCountEstimate
from .config import DiscoveryConfig
from .data import split_base
from .frozen import (ImageSource, estimate_k, fit_projection, image_getter, image_level, kmeans,
                     own_image_projection, select_view_weights)
from .hooks import TrainHooks
from .neighbour_consistency import (CachedViews, ConsistencySettings, build_optimizer, cache_views, cached_features,
                                    embed_cached, epoch_anchors, even_batch_size, mine_neighbours,
                                    neighbours_for_set, train_epoch)
from .predict import DiscoveryArtifacts, assemble_artifacts
from .selection import SCORE_METRIC, selection_score
from .views import (VIEW_NAMES, NuisanceProjection, ViewExtractor, combine_views, extract_region_features,
                    image_features, unit_rows, view_vectors)

EQUAL_WEIGHTS = {name: 1 / len(VIEW_NAMES) for name in VIEW_NAMES}


def region_image_depths(extractor: ViewExtractor, regions: Sequence[Region], images: Mapping[str, ImageSource],
                        size: int, progress: bool = False, turns: int = 1) -> tuple[list[np.ndarray], np.ndarray]:
    """``image_features`` of the regions' whole images (each image read once, first-seen order; the turned image
    view last when ``turns`` > 1) and each region's row among them."""
    image_ids = list(dict.fromkeys(r.image_id for r in regions))
    get = image_getter(images)
    depths = image_features(extractor, (get(i) for i in image_ids), len(image_ids), size, progress=progress,
                            turns=turns)
    row = {image_id: i for i, image_id in enumerate(image_ids)}
    return depths, np.array([row[r.image_id] for r in regions], dtype=np.int64)


def region_image_vectors(extractor: ViewExtractor, regions: Sequence[Region], images: Mapping[str, ImageSource],
                         size: int, turns: int = 1) -> np.ndarray:
    """The raw image view of every region's image (each image read once)."""
    depths, rows = region_image_depths(extractor, regions, images, size, turns=turns)
    return depths[-1][rows]


@dataclass
class OwnProjection:
    """What ``own_projection_for`` decided: the projection (None: kept, or not asked for), the own images' silhouette
    and the number of groups it was measured at (None when not measured), and, with K estimated, the first estimate
    it was judged at (computed on the views as they are: step 2 starts from it when nothing was projected)."""

    projection: Optional[NuisanceProjection] = None
    silhouette: Optional[float] = None
    groups: Optional[int] = None
    first_estimate: Optional[ClassCountEstimate] = None


def own_projection_for(novel_image_depths: list[np.ndarray], novel: Sequence[Region],
                       novel_vectors: dict[str, np.ndarray], config: DiscoveryConfig) -> OwnProjection:
    """``frozen.own_image_projection`` over the novel regions' whole images (``region_image_depths``), at K given
    or, with ``k="auto"``, at a first estimate on the equally weighted views."""
    settings, classes, seed = config.model, config.classes, config.runtime.seed
    turned = settings.image_turns > 1
    if settings.own_projection == "never":
        return OwnProjection()
    if settings.own_projection == "always":  # K is not read
        projection, _ = own_image_projection(novel_image_depths, 0, seed, settings.nuisance_components, "always",
                                             turned)
        return OwnProjection(projection)
    first = None if classes.k != "auto" else estimate_k(
        combine_views(novel_vectors, EQUAL_WEIGHTS), novel, classes.k_max, classes.k_method, seed)
    k = int(classes.k) if first is None else first.k
    projection, strength = own_image_projection(novel_image_depths, k, seed, settings.nuisance_components, "auto",
                                                turned)
    groups = min(k, len(novel_image_depths[0]) - 1) if strength is not None else None  # image_cluster_strength's cap
    return OwnProjection(projection, strength, groups, first)


def choose_k_and_weights(vectors: dict[str, np.ndarray], novel: Sequence[Region], config: DiscoveryConfig,
                         first_estimate: Optional[ClassCountEstimate] = None):
    """(K, the class-count estimate or None, the view weights and their silhouettes) for the novel regions;
    ``first_estimate``: the estimate on these equally weighted views when already made (``own_projection_for``)."""
    classes, seed = config.classes, config.runtime.seed
    if classes.k != "auto":
        weights, scores = select_view_weights(vectors, int(classes.k), seed)
        return int(classes.k), None, weights, scores
    provisional = first_estimate or estimate_k(combine_views(vectors, EQUAL_WEIGHTS), novel, classes.k_max,
                                               classes.k_method, seed)
    weights, scores = select_view_weights(vectors, max(2, provisional.k), seed)
    estimate = estimate_k(combine_views(vectors, weights), novel, classes.k_max, classes.k_method, seed)
    return estimate.k, estimate, weights, scores


def check_novel_count(n_novel: int, k) -> None:
    """The views are chosen and the floor fitted by clustering the novel regions (k-means, silhouettes): that needs
    more regions than classes, and at least 3 with K estimated."""
    needed = 3 if k == "auto" else int(k) + 1
    if n_novel < needed:
        hint = "detect on more images" + ("" if k == "auto" else " or give a smaller k")
        raise ValueError(f"discovery with k={k} needs at least {needed} novel regions, got {n_novel}: {hint}")


def initial_prototypes(embeddings: np.ndarray, novel: Sequence[Region], base_labels: np.ndarray,
                       n_base_classes: int, k: int, seed: int, over: str = "regions") -> np.ndarray:
    """Base classes' mean embeddings, then the k-means centres of the novel embeddings (unit rows): over the
    novel regions, or (``over="images"``) over their images' area-weighted means (``frozen.image_level``), the
    regions when there are fewer images than K."""
    n_novel = len(novel)
    base = [embeddings[n_novel:][base_labels == c].mean(axis=0) for c in range(n_base_classes)]
    points = embeddings[:n_novel]
    if over == "images" and len({r.image_id for r in novel}) >= k:
        points = image_level(points, novel)
    return unit_rows(np.concatenate([np.array(base).reshape(-1, embeddings.shape[1]),
                                     kmeans(points, k, seed).cluster_centers_]))


def floor_shares(model: ViewDiscoveryModel, novel_floor: np.ndarray, n_base_classes: int) -> tuple[float, ...]:
    """The share of the novel regions each novel prototype wins in the floor's embedding (before training: the
    floor's k-means cluster sizes), the prior of the marginal term; an empty cluster keeps half a region."""
    with torch.no_grad():
        won = model.logits(torch.as_tensor(novel_floor, dtype=torch.float32))[:, n_base_classes:].argmax(1)
    counts = np.bincount(won.numpy(), minlength=model.prototypes.shape[0] - n_base_classes).astype(np.float64)
    counts = np.maximum(counts, 0.5)
    return tuple(float(c) for c in counts / counts.sum())


def label_free_scores(embeddings: torch.Tensor, model: ViewDiscoveryModel, n_novel: int, n_base_classes: int,
                      val_rows: slice, val_labels: np.ndarray) -> dict:
    """The label-free selection score (``selection``) of view models: the silhouette of the novel crops under the
    model's own assignments and the accuracy on held-out base crops."""
    with torch.no_grad():
        logits = model.logits(embeddings)
    novel = embeddings[:n_novel].numpy()
    assigned = logits[:n_novel, n_base_classes:].argmax(1).numpy()
    silhouette = (float(silhouette_score(novel, assigned, metric="cosine"))
                  if 2 <= len(np.unique(assigned)) < len(novel) else None)
    accuracy = (float((logits[val_rows, :n_base_classes].argmax(1).numpy() == val_labels).mean())
                if len(val_labels) else None)
    return {"probe_silhouette": silhouette, "probe_base_val_accuracy": accuracy,
            SCORE_METRIC: selection_score(accuracy, silhouette)}


def train_epochs(model: ViewDiscoveryModel, cache: CachedViews, floor: np.ndarray, n_novel: int, n_base_classes: int,
                 base_labels: torch.Tensor, config: DiscoveryConfig, fingerprint: dict, hooks: TrainHooks,
                 scores: Callable[[torch.Tensor], dict], report_fn: Optional[Callable] = None,
                 novel_prior: Optional[tuple[float, ...]] = None) -> list[dict]:
    """Step 5 with epoch checkpoints (``runtime.checkpoint_dir``), resume (``runtime.resume``, refused when the
    checkpoint was written with other settings or data) and the hooks of a distributed runner."""
    optimisation, runtime = config.optimisation, config.runtime
    settings = ConsistencySettings(
        epochs=optimisation.epochs, batch_size=optimisation.batch_size, lr=optimisation.consistency_lr,
        pooling_lr=optimisation.consistency_lr / 10, entropy_weight=optimisation.consistency_entropy_weight,
        supervised_weight=optimisation.supervised_weight, n_neighbours=optimisation.neighbours,
        self_label_epochs=optimisation.self_label_epochs, seed=runtime.seed, progress=runtime.progress,
        novel_prior=novel_prior)
    n_novel_classes = model.prototypes.shape[0] - n_base_classes
    neighbours = mine_neighbours(floor[:n_novel], neighbours_for_set(settings.n_neighbours, n_novel,
                                                                     n_novel_classes))
    optimizer = build_optimizer(model, settings)
    checkpoint_dir = Path(runtime.checkpoint_dir) if runtime.checkpoint_dir else None
    history = resume_history(checkpoint_dir, model, optimizer, fingerprint) if runtime.resume else []
    wrapped = hooks.wrap_model(model)
    total = settings.epochs + settings.self_label_epochs
    bar = tqdm(range(len(history), total), desc="discovery", unit="epoch", disable=not settings.progress)
    for epoch in bar:
        started = time.perf_counter()
        loader = hooks.wrap_loader(DataLoader(TensorDataset(epoch_anchors(n_novel, settings.seed, epoch)),
                                              batch_size=even_batch_size(n_novel, settings.batch_size),
                                              shuffle=False))
        model.train()
        metrics = train_epoch(wrapped, loader, optimizer, cache, neighbours, n_novel, n_base_classes, base_labels,
                              settings, epoch)
        model.eval()
        metrics.update(scores(embed_cached(model, cache)), epoch=epoch, seconds=time.perf_counter() - started,
                       neighbours_mined=neighbours.shape[1])
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['total']:.3f}")
        saved = None
        if checkpoint_dir is not None and hooks.save_checkpoints:
            saved = save_checkpoint(checkpoint_dir, epoch, model, optimizer,
                                    {"fingerprint": fingerprint, "history": history}, runtime.keep_checkpoints)
        for callback in (hooks.report, report_fn):
            if callback is not None:
                callback(epoch, metrics, saved)
    model.eval()
    return history


def train_view_discovery(config: DiscoveryConfig, novel: Sequence[Region], base: Sequence[Region],
                         images: Mapping[str, ImageSource], normal_images: Sequence[ImageSource] = (),
                         report_fn: Optional[Callable] = None, hooks: Optional[TrainHooks] = None
                         ) -> DiscoveryArtifacts:
    """The whole method of the module docstring on ``novel`` (labels never read) and optional labelled ``base``
    regions; ``images`` maps every region's image id to its whole image (array or path)."""
    started = time.perf_counter()
    check_novel_count(len(novel), config.classes.k)
    settings, runtime = config.model, config.runtime
    base_train, base_val = split_base(list(base), config.optimisation.base_val_fraction, runtime.seed)
    classes = sorted({r.class_name for r in base})
    extractor = ViewExtractor(settings.cnn)
    projection = fit_projection(extractor, normal_images, settings.view_size, settings.nuisance_components,
                                runtime.progress, settings.image_turns)
    regions = list(novel) + base_train + base_val
    learns = settings.kind == "learned" and config.optimisation.epochs > 0
    cache = None
    depths, image_rows = region_image_depths(extractor, regions, images, settings.view_size, runtime.progress,
                                             settings.image_turns)
    if learns:
        cache = cache_views(extractor, regions, depths[-1][image_rows], config.optimisation.consistency_views,
                            settings.view_size, config.optimisation.augment, runtime.seed, progress=runtime.progress)
        features = cached_features(cache)
    else:
        features = extract_region_features(extractor, regions, image_getter(images), settings.view_size,
                                           progress=runtime.progress, whole=depths[-1][image_rows])
    vectors = view_vectors(features, projection)
    n_novel, n_train = len(novel), len(novel) + len(base_train)
    projected_by, own = ("normal images" if projection is not None else "none"), OwnProjection()
    if projection is None:
        novel_images = np.unique(image_rows[:n_novel])  # the novel regions come first: their images too
        own = own_projection_for([d[novel_images] for d in depths], novel,
                                 {v: x[:n_novel] for v, x in vectors.items()}, config)
        if own.projection is not None:
            projection, projected_by, vectors = own.projection, "own images", view_vectors(features, own.projection)
    k, estimate, weights, silhouettes = choose_k_and_weights({v: x[:n_novel] for v, x in vectors.items()}, novel,
                                                             config, own.first_estimate if own.projection is None
                                                             else None)
    floor = combine_views(vectors, weights)
    base_labels = np.array([classes.index(r.class_name) for r in base_train], dtype=np.int64)
    with torch.random.fork_rng(devices=[]):  # the attention keys' (and adapter's) initial weights follow the seed
        torch.manual_seed(runtime.seed)
        model = ViewDiscoveryModel(extractor.channels, weights, projection, len(classes) + k, settings.temperature,
                                   settings.adapter_width)
    model.init_prototypes(initial_prototypes(floor[:n_train], novel, base_labels, len(classes), k, runtime.seed,
                                             config.classes.prototype_init))
    history: list[dict] = []
    embeddings = torch.as_tensor(floor)
    val_labels = np.array([classes.index(r.class_name) for r in base_val], dtype=np.int64)

    def scores(embedded: torch.Tensor) -> dict:
        return label_free_scores(embedded, model, n_novel, len(classes), slice(n_train, None), val_labels)

    prior = floor_shares(model, floor[:n_novel], len(classes)) if config.optimisation.marginal == "floor" else None
    if learns:
        fingerprint = config.fingerprint() | {"n_novel": n_novel, "n_base": len(base), "k": k, "weights": weights}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(runtime.seed)
            history = train_epochs(model, cache, floor, n_novel, len(classes), torch.as_tensor(base_labels), config,
                                   fingerprint, hooks or TrainHooks(), scores, report_fn, prior)
        embeddings = embed_cached(model, cache)
    prototypes = F.normalize(model.prototypes.detach(), dim=1)
    artifacts = assemble_artifacts(config, model, classes, novel, embeddings.float(), n_train, prototypes, estimate,
                                   history, novel_known=True)
    val_scores = artifacts.metrics.pop("val_scores")
    artifacts.metrics |= scores(embeddings.float())
    artifacts.metrics |= {"view_weights": weights, "view_silhouettes": silhouettes, "n_novel": n_novel,
                          "nuisance_projection": projected_by, "own_images_silhouette": own.silhouette,
                          "own_images_groups": own.groups,
                          "n_base_train": len(base_train), "n_base_val": len(base_val), "marginal_prior": prior,
                          "neighbours_mined": history[-1].get("neighbours_mined") if history else None,
                          "train_seconds": time.perf_counter() - started,
                          "loss": history[-1]["total"] if history else None}
    if len(val_scores):
        artifacts.metrics["outlier_threshold"] = artifacts.predictor.outlier_threshold
        artifacts.metrics["base_val_accept_rate"] = float((val_scores <= artifacts.predictor.outlier_threshold).mean())
    used = artifacts.metrics["n_clusters_used"]
    if 2 <= used < len(novel):
        artifacts.metrics["silhouette"] = float(silhouette_score(artifacts.regions.embeddings,
                                                                 artifacts.regions.clusters, metric="cosine"))
    return artifacts


@torch.no_grad()
def embed_view_regions(model: ViewDiscoveryModel, extractor: ViewExtractor, regions: Sequence[Region],
                       images: Mapping[str, ImageSource], size: int, turns: int = 1) -> torch.Tensor:
    """Unit embeddings of new regions (view 0), the whole images read from ``images`` by image id (seen at the
    model's ``turns``)."""
    cache: CachedViews = cache_views(extractor, regions, region_image_vectors(extractor, regions, images, size, turns),
                                     1, size, None, 0)
    return embed_cached(model, cache)
