"""Frozen multi-view features of regions (methods.md §5, "multi-view pooling"; issue 14).

A region is seen three ways by one frozen ImageNet backbone:

* ``region``: the feature maps of the crop at several depths (strides 8, 16, 32 and the final 1280-channel
  layer), each pooled with the Region Guidance Factor's weights softmax_j(b_j) — mostly the anomalous pixels,
  a little of the normal object, almost nothing of the background (``amga.RegionGuidanceFactor`` with its
  default factors) — each depth L2-normalised, then joined;
* ``crop``: the mean of the crop's final layer (shape and surroundings);
* ``image``: the mean of the whole image's final layer (large or diffuse defects are a property of the image),
  or with ``image_turns`` 4 that mean averaged over the image's four quarter turns (a kind of defect has no
  orientation, while ImageNet filters do: on NEU-DET's steel the turned view clustered up to .07 NMI better with K
  given, and .32 better on a long-tailed draw where it became the chosen view; it costs three more backbone passes
  per whole image, ``benchmarks/image_turns_selection.py``).

:class:`NuisanceProjection` removes from every view the directions along which *normal* images vary most (their
top principal components), when normal images are known: product variation (pose, colour, lighting) then no
longer dominates the views, and what is left is what the defect changes. The turned image view has its own
projection, fitted on the normal images' turned means (the depths' fitted on turned means and applied to the
unturned region view took a generated metal plate from .63 to .39 NMI). ``view_vectors`` gives the unit vector of
each view; ``combine_views`` joins them with weights w_v as ``[√w_v · v]``, so that the cosine of two combined
embeddings is Σ_v w_v cos_v.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..features.backbones import build_backbone, for_inference, images_to_tensor, load_weights
from ..localisation.regions import Region, regions_to_tensors
from .amga import RegionGuidanceFactor

VIEW_NAMES = ("region", "crop", "image")
REGION_TAPS = {"mobilenet_v2": (6, 13, 17), "efficientnet_lite0": (5, 11, 16), "tiny": (1, 2, 3)}
HEAD_CHANNELS = 1280
IMAGE_TURNS = (1, 4)


def _mobilenet_v2_head() -> nn.Module:
    from torchvision.models import mobilenet_v2

    from ..features.backbones import find_mobilenet_v2_weights

    model = mobilenet_v2()
    load_weights(model, find_mobilenet_v2_weights(), "torchvision mobilenet_v2")
    return model.features[18]


def _efficientnet_lite_head(variant: int) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    from ..features.backbones import find_efficientnet_lite_weights

    net = EfficientNet.from_name(f"efficientnet-lite{variant}")
    load_weights(net, find_efficientnet_lite_weights(variant), f"efficientnet_lite{variant}")
    return nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())


class ViewExtractor(nn.Module):
    """A frozen ImageNet backbone returning the maps the views pool: the region taps and the final layer (last).
    Batch norms are folded and the weights and inputs are channels-last (``for_inference``): the same maps to 1e-5,
    1.8× faster on the CPU; on the CPU the trunk runs a few images per pass (``FeatureExtractor.cpu_batch_pixels``),
    the head the whole batch."""

    def __init__(self, backbone: str = "mobilenet_v2"):
        super().__init__()
        if backbone not in REGION_TAPS:
            raise ValueError(f"views need one of the offline backbones {', '.join(REGION_TAPS)}, got {backbone!r}")
        self.backbone = backbone
        self.trunk = build_backbone(backbone, layers=REGION_TAPS[backbone])
        if backbone == "mobilenet_v2":
            self.head = _mobilenet_v2_head()
        elif backbone == "tiny":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.head = nn.Conv2d(self.trunk.channels[-1], HEAD_CHANNELS, 1)
        else:
            self.head = _efficientnet_lite_head(int(backbone[-1]))
        self.channels = (*self.trunk.channels, HEAD_CHANNELS)
        self.trunk, self.head = for_inference(self.trunk), for_inference(self.head)
        self.eval()

    def train(self, mode: bool = True) -> "ViewExtractor":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps = self.trunk(images.contiguous(memory_format=torch.channels_last))
        return [*maps, self.head(maps[-1])]


@dataclass
class RegionFeatures:
    """Raw (un-normalised) view features of N regions: ``taps`` one N×C array per depth (region view), ``crop``
    and ``image`` N×1280."""

    taps: list[np.ndarray]
    crop: np.ndarray
    image: np.ndarray

    def subset(self, index: np.ndarray) -> "RegionFeatures":
        return RegionFeatures([t[index] for t in self.taps], self.crop[index], self.image[index])


def guided_pool(maps: torch.Tensor, anomaly: torch.Tensor, objects: torch.Tensor,
                guidance: RegionGuidanceFactor) -> torch.Tensor:
    """B×C×h×w maps pooled with the weights softmax(b) of the Region Guidance Factor at the map's grid."""
    weights = torch.softmax(guidance(anomaly, objects, maps.shape[-2:]).float(), dim=1)
    return torch.einsum("bp,bcp->bc", weights, maps.flatten(2).float())


@torch.no_grad()
def extract_region_features(extractor: ViewExtractor, regions: Sequence[Region],
                            load_image: Callable[[str], np.ndarray], size: int = 224, batch_size: int = 32,
                            progress: bool = False, whole: Optional[np.ndarray] = None,
                            turns: int = 1) -> RegionFeatures:
    """The three views of every region; ``load_image(image_id)`` gives a region's whole image (read once per
    image, seen at ``turns`` quarter turns), unless ``whole`` already holds each region's raw image view (N×1280,
    the last array ``image_features`` gives)."""
    guidance = RegionGuidanceFactor("amga", learnable=False)
    taps, crops = [], []
    for start in tqdm(range(0, len(regions), batch_size), desc="region views", disable=not progress):
        chunk = regions[start:start + batch_size]
        images, anomaly, objects = regions_to_tensors(chunk, size)
        maps = extractor(images_to_tensor(list(images.permute(0, 2, 3, 1).numpy()), size))
        anomaly, objects = anomaly.float() / 255.0, objects.float() / 255.0
        taps.append([guided_pool(m, anomaly, objects, guidance).numpy() for m in maps])
        crops.append(maps[-1].mean((2, 3)).numpy())
    if whole is None:
        image_ids = list(dict.fromkeys(r.image_id for r in regions))
        means = image_features(extractor, (load_image(i) for i in image_ids), len(image_ids), size, batch_size,
                               progress, turns)[-1]
        row = {image_id: i for i, image_id in enumerate(image_ids)}
        whole = means[[row[r.image_id] for r in regions]]
    return RegionFeatures([np.concatenate([chunk[t] for chunk in taps]) for t in range(len(extractor.channels))],
                          np.concatenate(crops), whole)


@torch.no_grad()
def image_features(extractor: ViewExtractor, images, n_images: int, size: int = 224, batch_size: int = 32,
                   progress: bool = False, turns: int = 1) -> list[np.ndarray]:
    """Spatial means of every map of whole images (an iterable read one batch at a time): one N×C array per
    depth, the final layer last; with ``turns`` > 1, one array more: the final layer's mean averaged over the
    image's first ``turns`` quarter turns (the turned image view)."""
    if turns not in IMAGE_TURNS:
        raise ValueError(f"image turns must be one of {IMAGE_TURNS}, got {turns}")
    images = iter(images)
    channels = [*extractor.channels, extractor.channels[-1]] if turns > 1 else list(extractor.channels)
    means: list[list[np.ndarray]] = [[] for _ in channels]
    for start in tqdm(range(0, n_images, batch_size), desc="image views", disable=not progress):
        batch = images_to_tensor([next(images) for _ in range(min(batch_size, n_images - start))], size)
        for depth, maps in enumerate(extractor(batch)):
            means[depth].append(maps.mean((2, 3)).numpy())
        if turns > 1:
            turned = [extractor(torch.rot90(batch, turn, dims=(2, 3)))[-1].mean((2, 3)) for turn in range(1, turns)]
            means[-1].append(((torch.from_numpy(means[-2][-1]) + sum(turned)) / turns).numpy())
    return [np.concatenate(m) if m else np.zeros((0, c), np.float32) for m, c in zip(means, channels)]


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


@dataclass
class NuisanceProjection:
    """Per depth of the backbone: the mean and the top principal directions of normal images' features, which
    ``apply`` removes; the crop view takes the final layer's, the image view the turned image view's when there is
    one more entry than depths (``image_features`` with turns), else the final layer's too."""

    means: list[np.ndarray]
    components: list[np.ndarray]

    @classmethod
    def fit(cls, normal_features: Sequence[np.ndarray], n_components: int) -> "NuisanceProjection":
        """From ``image_features`` of the normal images; at most a quarter of a depth's channels or of the images
        are removed."""
        means, components = [], []
        for features in normal_features:
            mean = features.mean(axis=0)
            _, _, vt = np.linalg.svd(features - mean, full_matrices=False)
            keep = max(0, min(n_components, features.shape[1] // 4, len(features) // 4))
            means.append(mean.astype(np.float32))
            components.append(vt[:keep].astype(np.float32))
        return cls(means, components)

    def remove(self, features: np.ndarray, depth: int) -> np.ndarray:
        centred = features - self.means[depth]
        basis = self.components[depth]
        return centred - (centred @ basis.T) @ basis if len(basis) else centred

    def apply(self, features: RegionFeatures) -> RegionFeatures:
        last = len(features.taps) - 1
        return RegionFeatures([self.remove(t, d) for d, t in enumerate(features.taps)],
                              self.remove(features.crop, last), self.remove(features.image, len(self.means) - 1))


def view_vectors(features: RegionFeatures, projection: Optional[NuisanceProjection] = None) -> dict[str, np.ndarray]:
    """Unit vector of each view (the region view joins its depths, each L2-normalised first)."""
    if projection is not None:
        features = projection.apply(features)
    region = unit_rows(np.concatenate([unit_rows(t) for t in features.taps], axis=1))
    return {"region": region, "crop": unit_rows(features.crop), "image": unit_rows(features.image)}


def combine_views(vectors: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """``[√w_v · v]`` over the views with a positive weight (weights summing to 1 give unit rows)."""
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"view weights must give at least one view a positive weight, got {weights}")
    unknown = sorted(set(weights) - set(vectors))
    if unknown:
        raise ValueError(f"unknown view(s) {unknown}; the views are {sorted(vectors)}")
    return unit_rows(np.concatenate([np.sqrt(w) * vectors[name] for name, w in weights.items() if w > 0], axis=1))
