"""Training data of discovery: regions as tensors at the network's input size, the cache of frozen CNN features
of several augmented views per region (``cached_views``), the base train / validation split and the seeded
per-epoch sampling plan (novel and base crops 50/50)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .amga import pool_to_patch_grid
from .augment import augment_views
from ..features.backbones import autocast_for
from .config import DiscoveryConfig
from .model import normalise_images
from .network import HybridDiscoveryBackbone
from .losses import UNLABELLED
from ..localisation.regions import Region, regions_to_tensors


@dataclass
class RegionTensors:
    """Regions at the network's input size (uint8) with class indices (``UNLABELLED`` for novel) and scores."""

    images: torch.Tensor
    maps: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor

    @classmethod
    def build(cls, regions: Sequence[Region], size: int, classes: Sequence[str]) -> "RegionTensors":
        images, maps, masks = regions_to_tensors(regions, size)
        labels = torch.tensor([classes.index(r.class_name) if r.is_base else UNLABELLED for r in regions])
        return cls(images, maps, masks, labels, torch.tensor([r.score for r in regions], dtype=torch.float32))

    def floats(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(t[index].to(device).float().div_(255.0) for t in (self.images, self.maps, self.masks))


@dataclass
class ViewCache:
    """CNN feature maps (float16, N×V×C×h×w) and anomaly / object maps pooled to the grid (N×V×1×h×w) of
    ``V`` views per region; view 0 is the un-augmented crop."""

    features: torch.Tensor
    maps: torch.Tensor
    masks: torch.Tensor

    def views(self, index: torch.Tensor, view: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        return (self.features[index, view].to(device).float(), self.maps[index, view].to(device),
                self.masks[index, view].to(device))


def _pooled(maps: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    return pool_to_patch_grid(maps, grid_hw).view(maps.shape[0], 1, *grid_hw)


@torch.no_grad()
def build_view_cache(backbone: HybridDiscoveryBackbone, data: RegionTensors, n_views: int, config: DiscoveryConfig,
                     device: torch.device, batch_size: int = 64) -> ViewCache:
    """Compute the frozen CNN features of ``n_views`` views per region once (view 0 un-augmented)."""
    generator = torch.Generator().manual_seed(config.runtime.seed)
    grid = backbone.patch_grid((config.model.image_size, config.model.image_size))
    n = data.labels.shape[0]
    features = maps = masks = None
    bar = tqdm(total=n * n_views, desc="caching views", unit="view", disable=not config.runtime.progress)
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(n, start + batch_size))
        images, anomaly, objects = data.floats(index, torch.device("cpu"))
        for view in range(n_views):
            if view:
                view_images, view_maps, view_masks = augment_views(images, anomaly, objects, generator,
                                                                   config.optimisation.augment)
            else:
                view_images, view_maps, view_masks = images, anomaly, objects
            with autocast_for(device):
                cnn = backbone.cnn_features(normalise_images(view_images.to(device))).float()
            if features is None:
                features = torch.empty(n, n_views, *cnn.shape[1:], dtype=torch.float16)
                maps = torch.empty(n, n_views, 1, *grid)
                masks = torch.empty(n, n_views, 1, *grid)
            features[index, view] = cnn.cpu().to(torch.float16)
            maps[index, view] = _pooled(view_maps, grid)
            masks[index, view] = _pooled(view_masks, grid)
            bar.update(len(index))
    bar.close()
    return ViewCache(features, maps, masks)


def split_base(regions: Sequence[Region], fraction: float, seed: int) -> tuple[list[Region], list[Region]]:
    """Hold out about ``fraction`` of every base class's crops for validation, whole images at a time (at least one
    image of a class with ≥ 3 crops, never all its images): a held-out crop has no crop of its own image among the
    training ones, as a new image has none (its k-NN outlier score would otherwise find its sibling)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for name in sorted({r.class_name for r in regions}):
        members = [r for r in regions if r.class_name == name]
        n_val = int(round(fraction * len(members))) if fraction > 0 else 0
        n_val = max(n_val, 1) if fraction > 0 and len(members) >= 3 else n_val
        images = list(dict.fromkeys(r.image_id for r in members))
        held: set[str] = set()
        for index in rng.permutation(len(images)):
            if sum(r.image_id in held for r in members) >= n_val or len(held) == len(images) - 1:
                break
            held.add(images[index])
        val += [r for r in members if r.image_id in held]
        train += [r for r in members if r.image_id not in held]
    return train, val


def epoch_plan(n_novel: int, n_base: int, n_views: int, seed: int, epoch: int) -> torch.Tensor:
    """Rows (region index, view a, view b) of one epoch: every novel crop once and, with a base set, as many base
    crops (cycled in random order), shuffled together so batches are 50/50 on average."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    rows = torch.randperm(n_novel, generator=generator)
    if n_base:
        cycles = math.ceil(n_novel / n_base)
        base = torch.cat([torch.randperm(n_base, generator=generator) for _ in range(cycles)])[:n_novel] + n_novel
        rows = torch.cat([rows, base])[torch.randperm(2 * n_novel, generator=generator)]
    if n_views >= 2:
        first = torch.randint(0, n_views, (len(rows),), generator=generator)
        second = (first + torch.randint(1, n_views, (len(rows),), generator=generator)) % n_views
    else:
        first = second = torch.zeros(len(rows), dtype=torch.long)
    return torch.stack([rows, first, second], 1)
