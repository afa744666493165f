"""Zero-shot detection by mutual scoring (after MuSc, Li et al., ICLR 2024), on CNN patch features.

No normal images are needed: the images of one set score each other, since most patches of most images
are normal and a defect patch is far from the patches of the other images.

1. Patch features at several neighbourhood sizes r (MuSc's local neighbourhood aggregation with multiple
   degrees): :func:`.patchcore.local_patch_features` with an r×r window, for each r in ``neighbourhoods``.
2. Mutual scoring: for a patch p of image i and every other image j, d_j(p) = min_{q ∈ j} ‖p − q‖₂. The
   patch score is the interval average of the lowest ``lowest_fraction`` (but at least ``MIN_AVERAGED``)
   of {d_j(p)}_{j ≠ i}, so that a defect shared by a few images is still far from the many without it.
3. The patch scores of the neighbourhood sizes are averaged; the image score is the mean of the top
   ``top_fraction`` of its patch scores; the map is upsampled, blurred (σ = 4 px) and resized as PatchCore's.

The cost grows with the square of the set size, so a set larger than ``max_references`` + 1 is split at
random (seeded) into near-equal groups and each image is scored against the other images of its group.

Defaults, chosen on generated data only (90-image sets, two thirds of them defective): one neighbourhood
size r = 1 (r = 3 or 5 added nothing at twice the cost), ``lowest_fraction`` .1 (AUPRO .964 against .954
at .3 and .946 at .5 on the metal plate), image score = mean of the top 1 % patches (max was up to .02 lower in
image AUROC), plain concatenated MobileNetV2 features (equal layer shares lost .004 AUPRO), and groups of
up to 65 images (AUPRO .964 with all 89 references, .961 with 32, .952 with 16). ``border_pad`` 32 (reflect
padding, see :func:`.patchcore.patch_feature_batches`), chosen on NEU-DET's boxes (25 images per class) and
generated data: without it 97% of the map peaks lay within 16 px of the border and 3% inside a box; with 16 px
78% and 20%, with 32 px 63% and 32% (48 and 64 px: 60% and 33–34% at up to twice the cost); generated data AUPRO
.973 → .977 (bottle) and .949 → .965 (metal plate).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..features.backbones import build_backbone, check_images, for_inference, resolve_device
from .protocol import Detection
from .patchcore import anomaly_maps, patch_feature_batches

MIN_AVERAGED = 3
DISTANCE_BLOCK_ELEMENTS = 2 ** 24  # patch-to-patch distances held at once (64 MiB of float32)


def reference_groups(n_images: int, max_references: int, seed: int = 0) -> list[torch.Tensor]:
    """Split image indices 0..n−1 into random near-equal groups of at most ``max_references`` + 1 images
    (and at least 2, so that every image has another to be scored against)."""
    n_groups = max(1, min(math.ceil(n_images / (max_references + 1)), n_images // 2))
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))
    return [group.sort().values for group in torch.tensor_split(order, n_groups)]


def lowest_count(n_references: int, fraction: float) -> int:
    """How many per-image distances the interval average keeps: ⌈fraction·R⌉, but at least ``MIN_AVERAGED``
    (or all R when fewer), so that in a small set a defect in two or three images still stands out."""
    return min(n_references, max(MIN_AVERAGED, math.ceil(fraction * n_references - 1e-9)))


def interval_average(distances: torch.Tensor, count: int) -> torch.Tensor:
    """Mean of the ``count`` lowest values of each row of an n×R distance matrix."""
    return torch.topk(distances, count, dim=1, largest=False).values.mean(1)


def pairwise_image_min_distances(features: torch.Tensor) -> torch.Tensor:
    """G×P×D patch features → G×P×G: entry (i, p, j) is the distance from patch p of image i to its nearest
    patch of image j. One P×P block of squared distances serves both directions (its row minima give i → j,
    its column minima j → i), so each pair of images costs one matrix product."""
    n_images, n_patches, dim = features.shape
    features = features - features.mean((0, 1))  # same distances, smaller norms: less cancellation below
    rows, columns = _augmented(features.reshape(-1, dim))
    chunk = max(1, int(math.isqrt(DISTANCE_BLOCK_ELEMENTS)) // n_patches)
    nearest = torch.empty(n_images, n_patches, n_images, device=features.device)
    for a in range(0, n_images, chunk):
        n_rows = min(chunk, n_images - a)
        block_rows = rows[a * n_patches:(a + n_rows) * n_patches]
        for b in range(a, n_images, chunk):
            n_cols = min(chunk, n_images - b)
            block = _matmul(block_rows, columns[b * n_patches:(b + n_cols) * n_patches])
            block = block.view(n_rows, n_patches, n_cols, n_patches)
            nearest[a:a + n_rows, :, b:b + n_cols] = block.amin(3)
            if b != a:
                nearest[b:b + n_cols, :, a:a + n_rows] = block.amin(1).permute(1, 2, 0)
    return nearest.clamp_(min=0.0).sqrt_()


def _augmented(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [−2x, ‖x‖², 1] and columns [y, 1, ‖y‖²], whose products are the squared distances ‖x − y‖²."""
    squared = points.pow(2).sum(1, keepdim=True)
    ones = torch.ones_like(squared)
    return torch.cat([-2.0 * points, squared, ones], 1), torch.cat([points, ones, squared], 1)


def _matmul(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """rows @ columnsᵀ in float32; on the CPU through numpy's BLAS, which ran this shape 1.7× faster than
    torch's on the AMD EPYC we measured."""
    if rows.device.type == "cpu":
        return torch.from_numpy(np.matmul(rows.numpy(), columns.numpy().T))
    return rows @ columns.T


def mutual_patch_scores(features: torch.Tensor, lowest_fraction: float) -> torch.Tensor:
    """G×P×D patch features of one group → G×P mutual scores (each image against the group's others)."""
    n_images, n_patches, _ = features.shape
    if n_images < 2:
        raise ValueError(f"mutual scoring needs at least 2 images in a group, got {n_images}")
    nearest = pairwise_image_min_distances(features)
    own = torch.arange(n_images, device=features.device)
    nearest[own, :, own] = float("inf")  # never among the lowest: an image does not score itself
    count = lowest_count(n_images - 1, lowest_fraction)
    return interval_average(nearest.view(-1, n_images), count).view(n_images, n_patches)


def top_fraction_mean(patch_scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Image scores: the mean of the top ⌈fraction·P⌉ (at least one) patch scores of each B×P row."""
    count = min(patch_scores.shape[1], max(1, math.ceil(fraction * patch_scores.shape[1])))
    return torch.topk(patch_scores, count, dim=1).values.mean(1)


class MutualScoringDetector:
    """Zero-shot detector: ``predict(images)`` scores the images of the set against each other."""

    name = "zero-shot"

    def __init__(self, backbone: str = "mobilenet_v2", weights: str | Path | None = None,
                 layers: Sequence[int] | Sequence[str] | None = None, image_size: int = 256,
                 neighbourhoods: Sequence[int] = (1,), lowest_fraction: float = 0.1,
                 top_fraction: float = 0.01, max_references: int = 64, batch_size: int = 16,
                 border_pad: int = 32, device: str | None = "auto", seed: int = 0, progress: bool = True):
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {image_size}")
        if not neighbourhoods or any(r < 1 or r % 2 == 0 for r in neighbourhoods):
            raise ValueError(f"neighbourhoods must be odd sizes ≥ 1, got {tuple(neighbourhoods)}")
        for label, value in (("lowest_fraction", lowest_fraction), ("top_fraction", top_fraction)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{label} must be in (0, 1], got {value}")
        if max_references < 1:
            raise ValueError(f"max_references must be at least 1, got {max_references}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.backbone, self.weights, self.layers = backbone, weights, list(layers) if layers else None
        self.image_size, self.neighbourhoods = image_size, tuple(neighbourhoods)
        self.lowest_fraction, self.top_fraction = lowest_fraction, top_fraction
        self.max_references, self.batch_size, self.seed, self.progress = max_references, batch_size, seed, progress
        self.border_pad = border_pad
        self.device = resolve_device(device)
        self.extractor = for_inference(build_backbone(backbone, weights, self.layers)).to(self.device)

    def fit(self, normal_images: Sequence[np.ndarray] | None = None) -> "MutualScoringDetector":
        """Nothing to learn: the images of each predicted set are their own reference."""
        return self

    def predict(self, images: Sequence[np.ndarray]) -> list[Detection]:
        """Score every image against the other images of the set (at least 2 images; none gives [])."""
        images = check_images(images)
        if not images:
            return []
        if len(images) < 2:
            raise ValueError(f"zero-shot mutual scoring needs at least 2 images in the set, got {len(images)}")
        per_size: list[list[torch.Tensor]] = [[] for _ in self.neighbourhoods]
        for batch in patch_feature_batches(self.extractor, images, self.image_size, self.batch_size, self.device,
                                           self.neighbourhoods, None, self.progress, "zero-shot features",
                                           self.border_pad):
            for store, features in zip(per_size, batch):
                store.append(features)
        features = [torch.cat(store) for store in per_size]
        n_images, height, width, dim = features[0].shape
        scores = torch.zeros(n_images, height * width, device=self.device)
        groups = reference_groups(n_images, self.max_references, self.seed)
        work = [(group, size_features) for group in groups for size_features in features]
        with torch.inference_mode():
            for group, size_features in tqdm(work, desc="mutual scoring", unit="group", disable=not self.progress,
                                             leave=False):
                group_features = size_features[group.to(self.device)].reshape(len(group), height * width, dim)
                scores[group.to(self.device)] += mutual_patch_scores(group_features, self.lowest_fraction)
        scores /= len(self.neighbourhoods)
        image_scores = top_fraction_mean(scores, self.top_fraction).cpu()
        grids = scores.view(n_images, height, width)
        maps = [anomaly_map for start in range(0, n_images, self.batch_size)
                for anomaly_map in anomaly_maps(grids[start:start + self.batch_size], self.image_size,
                                                images[start:start + self.batch_size])]
        return [Detection(score=float(s), anomaly_map=m) for s, m in zip(image_scores, maps)]
