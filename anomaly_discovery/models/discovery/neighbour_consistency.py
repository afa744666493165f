"""Training the view discovery model (issue 14 item 2; methods.md §5, SCAN; §1 step 6 for the known classes).

Self-supervision on the novel crops does the work. Each region's nearest neighbours are mined once in the
floor's embedding (where similar crops are already close); every step takes a batch of novel regions in a random
cached view and, for each, one random neighbour in another random view, and minimises

    L = −mean_i log ⟨p_i, p_n(i)⟩  +  μ · L_reg^u  +  λ · L_cls^l

where p is the softmax over the *novel* prototypes only (the known-class columns take no part in it), L_reg^u the
marginal term on those columns, KL(p̄ ‖ π) (with the uniform π, the default, −H(p̄) + log K: the novel classes stay in
use; ``marginal="floor"`` takes π from the floor's cluster sizes), and L_cls^l the cross-entropy of known-class crops
over the known columns (when a base set is given). The views of a region are its un-augmented crop (view 0) and
augmented copies (paired geometry and colour, ``augment``), whose frozen feature maps are computed once (float16).
Defaults (10 neighbours, Adam, 30 epochs, the uniform prior) were chosen on NEU-DET and generated data, where a head
trained so over the floor's embedding raised NMI by .03 to .08. μ = 1 (was 4) is the pick of
``discovery_selection.py``'s part ``marginal``, which adds long-tailed draws of those tasks (μ = 4 pulls unequal
classes towards equal sizes and fell below the floor on three of five) and small sets as a guard: mean NMI .797
against .779 for μ = 4 over the ten tasks, and never more than .02 below the floor on a small set. An earlier pick
of μ = 1 was vetoed when it collapsed a 24-crop set (batch 12) to one cluster; two batching faults caused that, not
μ, and both are mended: ten neighbours per crop reach beyond a class of eight crops (two classes merged at μ = 4 as
well), so the neighbours mined are capped at half a cluster's mean size (``neighbours_for_set``; it binds only
below 20·K crops), and an epoch's crops are split into near-equal batches (``even_batch_size``), since a
remainder batch of one crop pulls its own assignment to uniform through the marginal term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..features.backbones import images_to_tensor
from ..localisation.regions import Region, regions_to_tensors
from .amga import RegionGuidanceFactor, pool_to_patch_grid
from .amga_pooling import ViewDiscoveryModel
from .augment import AugmentConfig, augment_views
from .losses import mean_entropy_regulariser
from .views import RegionFeatures, ViewExtractor, guided_pool


@dataclass
class CachedViews:
    """Frozen maps of ``n_views`` views of N regions, per depth: ``maps`` N×V×C×h×w (float16) with the anomaly
    and object maps pooled to each depth's grid (N×V×1×h×w), and each region's raw whole-image vector (N×C)."""

    maps: list[torch.Tensor]
    anomaly: list[torch.Tensor]
    objects: list[torch.Tensor]
    image: torch.Tensor

    @property
    def n_views(self) -> int:
        return self.maps[0].shape[1]

    def batch(self, index: torch.Tensor, view: torch.Tensor) -> tuple[list, list, list, torch.Tensor]:
        take = lambda tensors: [t[index, view].float() for t in tensors]  # noqa: E731
        return take(self.maps), take(self.anomaly), take(self.objects), self.image[index]


@torch.no_grad()
def cache_views(extractor: ViewExtractor, regions: Sequence[Region], image_vectors: np.ndarray, n_views: int,
                size: int, augment: AugmentConfig, seed: int, batch_size: int = 32,
                progress: bool = False) -> CachedViews:
    """The frozen depth maps of view 0 (the crop as it is) and ``n_views − 1`` augmented views of every region."""
    generator = torch.Generator().manual_seed(seed)
    depths = len(extractor.channels)
    maps, anomaly, objects = ([[] for _ in range(depths)] for _ in range(3))
    for start in tqdm(range(0, len(regions), batch_size), desc="caching views", disable=not progress):
        images, maps_u8, masks_u8 = regions_to_tensors(regions[start:start + batch_size], size)
        images, anomaly_maps, object_masks = images.float() / 255, maps_u8.float() / 255, masks_u8.float() / 255
        per_view = [[] for _ in range(depths)], [[] for _ in range(depths)], [[] for _ in range(depths)]
        for view in range(n_views):
            v_images, v_anomaly, v_objects = ((images, anomaly_maps, object_masks) if view == 0 else
                                              augment_views(images, anomaly_maps, object_masks, generator, augment))
            batch = images_to_tensor(list((v_images * 255).round().byte().permute(0, 2, 3, 1).numpy()), size)
            for depth, depth_maps in enumerate(extractor(batch)):
                grid = depth_maps.shape[-2:]
                per_view[0][depth].append(depth_maps.half())
                per_view[1][depth].append(pool_to_patch_grid(v_anomaly, grid).view(-1, 1, *grid).half())
                per_view[2][depth].append(pool_to_patch_grid(v_objects, grid).view(-1, 1, *grid).half())
        for target, source in zip((maps, anomaly, objects), per_view):
            for depth in range(depths):
                target[depth].append(torch.stack(source[depth], dim=1))
    return CachedViews([torch.cat(m) for m in maps], [torch.cat(a) for a in anomaly], [torch.cat(o) for o in objects],
                       torch.as_tensor(image_vectors, dtype=torch.float32))


@torch.no_grad()
def cached_features(cache: CachedViews, batch_size: int = 256) -> RegionFeatures:
    """The floor's features of view 0 read off the cache (the crops' depth maps pooled by the fixed Region
    Guidance Factor, the crop's mean, the image vector), so the frozen backbone runs once per view."""
    guidance = RegionGuidanceFactor("amga", learnable=False)
    taps: list[list[np.ndarray]] = [[] for _ in cache.maps]
    crops = []
    for index in torch.arange(cache.image.shape[0]).split(batch_size):
        maps, anomaly, objects, _ = cache.batch(index, torch.zeros_like(index))
        for depth, (m, a, o) in enumerate(zip(maps, anomaly, objects)):
            taps[depth].append(guided_pool(m, a, o, guidance).numpy())
        crops.append(maps[-1].mean((2, 3)).numpy())
    return RegionFeatures([np.concatenate(t) for t in taps], np.concatenate(crops), cache.image.numpy())


def neighbours_for_set(n_neighbours: int, n_regions: int, k: int) -> int:
    """How many neighbours to mine: ``n_neighbours``, but at most half a cluster's mean size (n / 2K, at least 1).
    More than a cluster's size guarantees neighbours of other classes: on small sets (24 crops, K = 3) ten
    neighbours pull two classes into one, which the marginal term alone then has to undo."""
    return max(1, min(n_neighbours, n_regions // (2 * max(1, k))))


def even_batch_size(n_anchors: int, batch_size: int) -> int:
    """The batch size that splits ``n_anchors`` into as many batches as ``batch_size`` would, of near-equal sizes.
    The marginal term is a batch mean: a remainder batch of one crop (65 crops in batches of 64) pulls that crop's
    own assignment to uniform at every epoch (NEU-DET, 8 images per class: NMI .51 against .89 in two batches)."""
    return math.ceil(n_anchors / max(1, math.ceil(n_anchors / batch_size)))


def mine_neighbours(embeddings: np.ndarray, n_neighbours: int) -> torch.Tensor:
    """Indices of each row's ``n_neighbours`` most cosine-similar other rows (N×n)."""
    points = F.normalize(torch.as_tensor(embeddings, dtype=torch.float32), dim=1)
    similarity = points @ points.T
    similarity.fill_diagonal_(-2.0)
    return similarity.topk(min(n_neighbours, len(points) - 1), dim=1).indices


def neighbour_consistency_loss(anchor_probs: torch.Tensor, neighbour_probs: torch.Tensor) -> torch.Tensor:
    """SCAN's consistency: −mean_i log ⟨p_i, p_n(i)⟩ (0 when both are the same one-hot)."""
    return -torch.log((anchor_probs * neighbour_probs).sum(dim=1).clamp_min(1e-8)).mean()


@dataclass(frozen=True)
class ConsistencySettings:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-2
    pooling_lr: float = 1e-3
    entropy_weight: float = 4.0
    supervised_weight: float = 1.0
    n_neighbours: int = 10
    self_label_epochs: int = 0
    self_label_threshold: float = 0.9
    novel_prior: Optional[tuple[float, ...]] = None
    seed: int = 0
    progress: bool = False


def embed_cached(model: ViewDiscoveryModel, cache: CachedViews, view: int = 0, batch_size: int = 256) -> torch.Tensor:
    """Unit embeddings of every cached region in one view."""
    out = []
    with torch.no_grad():
        for index in torch.arange(cache.image.shape[0]).split(batch_size):
            out.append(model.embed(*cache.batch(index, torch.full_like(index, view))))
    return torch.cat(out) if out else torch.zeros(0, model.prototypes.shape[1])


def build_optimizer(model: ViewDiscoveryModel, settings: ConsistencySettings) -> torch.optim.Optimizer:
    """Adam: the prototypes at ``lr``, the AMGA pooling and the RGF factors at ``pooling_lr``."""
    return torch.optim.Adam([{"params": [model.prototypes], "lr": settings.lr},
                             {"params": [p for n, p in model.named_parameters() if n != "prototypes"],
                              "lr": settings.pooling_lr}])


def consistency_step(model, cache: CachedViews, anchors: torch.Tensor, neighbours: torch.Tensor, n_novel: int,
                     n_base_classes: int, base_labels: torch.Tensor, settings: ConsistencySettings,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The loss of one batch of novel anchors (module docstring); ``model`` may be a DDP wrapper."""
    pick = torch.randint(neighbours.shape[1], (len(anchors),), generator=generator)
    views = torch.randint(cache.n_views, (2, len(anchors)), generator=generator)
    anchor_probs = model(*cache.batch(anchors, views[0]))[:, n_base_classes:].softmax(dim=1)
    partner_probs = model(*cache.batch(neighbours[anchors, pick], views[1]))[:, n_base_classes:].softmax(dim=1)
    prior = None if settings.novel_prior is None else torch.tensor(settings.novel_prior)
    parts = {"consistency": neighbour_consistency_loss(anchor_probs, partner_probs),
             "entropy": mean_entropy_regulariser(anchor_probs, prior), "known": torch.zeros(())}
    if len(base_labels):
        rows = torch.randint(len(base_labels), (min(len(anchors), len(base_labels)),), generator=generator)
        view = torch.randint(cache.n_views, (len(rows),), generator=generator)
        logits = model(*cache.batch(n_novel + rows, view))[:, :n_base_classes]
        parts["known"] = F.cross_entropy(logits, base_labels[rows])
    parts["total"] = (parts["consistency"] + settings.entropy_weight * parts["entropy"]
                      + settings.supervised_weight * parts["known"])
    return parts


def self_label_step(model, cache: CachedViews, anchors: torch.Tensor, n_base_classes: int,
                    settings: ConsistencySettings, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """SCAN's self-labelling: the un-augmented view's confident assignments (top probability ≥ the threshold) are
    the targets of an augmented view, each class weighted by the inverse of its share of the targets."""
    with torch.no_grad():
        teacher = model(*cache.batch(anchors, torch.zeros_like(anchors)))[:, n_base_classes:].softmax(dim=1)
    confidence, targets = teacher.max(dim=1)
    keep = confidence >= settings.self_label_threshold
    view = torch.randint(cache.n_views, (len(anchors),), generator=generator)
    logits = model(*cache.batch(anchors, view))[:, n_base_classes:]
    if not keep.any():
        zero = logits.sum() * 0.0
        return {"self_label": zero, "total": zero, "confident": torch.zeros(())}
    counts = torch.bincount(targets[keep], minlength=logits.shape[1]).float()
    weights = keep.sum() / (counts.clamp_min(1.0) * (counts > 0).sum())
    loss = F.cross_entropy(logits[keep], targets[keep], weight=weights)
    return {"self_label": loss, "total": loss, "confident": keep.float().mean()}


def train_epoch(model, loader, optimizer: torch.optim.Optimizer, cache: CachedViews, neighbours: torch.Tensor,
                n_novel: int, n_base_classes: int, base_labels: torch.Tensor, settings: ConsistencySettings,
                epoch: int) -> dict:
    """One pass over the anchors the loader gives (a DataLoader over the epoch's shuffled novel indices): neighbour
    consistency for the first ``epochs`` epochs, then self-labelling."""
    generator = torch.Generator().manual_seed(settings.seed * 100_003 + epoch + 11)
    sums: dict[str, float] = {}
    steps, smallest = 0, None
    for (anchors,) in loader:
        smallest = len(anchors) if smallest is None else min(smallest, len(anchors))
        if epoch < settings.epochs:
            parts = consistency_step(model, cache, anchors.cpu(), neighbours, n_novel, n_base_classes, base_labels,
                                     settings, generator)
        else:
            parts = self_label_step(model, cache, anchors.cpu(), n_base_classes, settings, generator)
        optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        optimizer.step()
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + value.item()
        steps += 1
    return {name: value / max(1, steps) for name, value in sums.items()} | {"batches": steps,
                                                                             "smallest_batch": smallest}


def epoch_anchors(n_novel: int, seed: int, epoch: int) -> torch.Tensor:
    """The novel rows of one epoch in a seeded random order."""
    return torch.randperm(n_novel, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
