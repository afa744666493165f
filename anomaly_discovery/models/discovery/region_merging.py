"""Region merging: from crop (region) predictions to one label per image (methods §1 step 7; issue 4 item 5).

Each crop k of an image has class probabilities p_k = softmax(logits/0.1) with the base-class columns
zeroed and renormalised (``novel_region_probabilities``), and an area a_k = number of mask pixels equal
to 255 in the crop. The image's probabilities are ``Σ_k α_k p_k`` with ``α_k = softmax_k(√a_k / τ)``:
large regions dominate, τ sets how strongly. An image with one crop keeps that crop's prediction.

Labels returned here are **novel-cluster indices** 0 … K−n_base−1 (head column minus ``n_base``).
"""

from __future__ import annotations

from typing import Hashable, NamedTuple, Sequence

import numpy as np
import torch

from anomaly_discovery.models.discovery.prototypes import mask_base_columns

SMALL_IMAGE_MAX_SIDE = 512
TAU_LARGE_IMAGE = 100.0
TAU_SMALL_IMAGE = 50.0


class ImagePrediction(NamedTuple):
    """An image's merged novel-cluster label and probabilities, and the label of each of its regions."""

    label: int
    probs: np.ndarray
    region_labels: list[int]


def default_tau(image_size: tuple[int, int]) -> float:
    """τ for area weighting: 50 for small images (longer side < 512 px, e.g. MTD), else 100 (e.g. MVTec AD).

    AnomalyNCD uses 100 on MVTec AD (700–1024 px) and 50 on MTD (a few hundred px); √a scales with the
    image side, so the smaller τ keeps the weights comparably sharp.
    """
    if len(image_size) != 2 or min(image_size) <= 0:
        raise ValueError(f"image_size must be a positive (height, width), got {image_size}")
    return TAU_SMALL_IMAGE if max(image_size) < SMALL_IMAGE_MAX_SIDE else TAU_LARGE_IMAGE


def novel_region_probabilities(logits: torch.Tensor | np.ndarray, n_base: int, temperature: float = 0.1) -> np.ndarray:
    """(N, K) cosine logits → (N, K) probabilities softmax(logits/τ) with base columns zeroed and renormalised."""
    tensor = torch.as_tensor(logits, dtype=torch.float64)
    if tensor.ndim != 2:
        raise ValueError(f"logits must have shape (N, K), got {tuple(tensor.shape)}")
    return mask_base_columns(torch.softmax(tensor / temperature, dim=-1), n_base).numpy()


def _area_weights(region_areas: np.ndarray, tau: float) -> np.ndarray:
    scaled = np.sqrt(region_areas) / tau
    weights = np.exp(scaled - scaled.max())
    return weights / weights.sum()


def merge_region_predictions(region_probs: np.ndarray, region_areas: Sequence[float], tau: float = 100.0) -> np.ndarray:
    """One image's (N, K) region probabilities and N areas → (K,) image probabilities Σ_k α_k p_k."""
    probs = np.asarray(region_probs, dtype=np.float64)
    areas = np.asarray(region_areas, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"region_probs must be a non-empty (N, K) array, got shape {probs.shape}")
    if areas.shape != (probs.shape[0],):
        raise ValueError(f"region_areas must have shape ({probs.shape[0]},), got {areas.shape}")
    if (areas < 0).any():
        raise ValueError(f"region_areas must be >= 0, got {areas.min()}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return _area_weights(areas, tau) @ probs


def merge_by_image(
    image_ids: Sequence[Hashable],
    region_probs: np.ndarray,
    region_areas: Sequence[float],
    n_base: int,
    tau: float = 100.0,
) -> dict[Hashable, ImagePrediction]:
    """Merge every image's regions; ``region_probs`` (N, K) are softmax probabilities over all head columns.

    Base columns are zeroed and renormalised first; the returned probabilities cover the novel columns
    only and labels are novel-cluster indices. Images keep their first-seen order.
    """
    probs = np.asarray(region_probs, dtype=np.float64)
    if probs.ndim != 2 or len(image_ids) != probs.shape[0]:
        raise ValueError(f"need one image id per row of region_probs; got {len(image_ids)} ids for shape {probs.shape}")
    areas = np.asarray(region_areas, dtype=np.float64)
    if areas.shape != (probs.shape[0],):
        raise ValueError(f"region_areas must have shape ({probs.shape[0]},), got {areas.shape}")
    novel = mask_base_columns(torch.from_numpy(probs), n_base).numpy()[:, n_base:]
    rows_by_image: dict[Hashable, list[int]] = {}
    for row, image_id in enumerate(image_ids):
        rows_by_image.setdefault(image_id, []).append(row)
    merged = {}
    for image_id, rows in rows_by_image.items():
        image_probs = merge_region_predictions(novel[rows], areas[rows], tau)
        merged[image_id] = ImagePrediction(int(image_probs.argmax()), image_probs,
                                           [int(label) for label in novel[rows].argmax(axis=1)])
    return merged
