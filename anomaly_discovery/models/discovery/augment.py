"""Paired augmentations for discovery views (methods.md §1 defaults: "masks get the same geometric ops").

Batched torch on B×C×S×S tensors in [0, 1]:

* ``paired_geometric``: one random affine per sample, applied with the same sampling grid to the image
  (bilinear), the anomaly map (bilinear) and the object mask (bilinear, i.e. coverage): a random resized crop
  (area fraction ``scale``, aspect ``ratio``, always inside the input), then a horizontal / vertical flip and a
  rotation by a multiple of 90°. Output pixel centres map to input coordinates
  x_in = c + diag(w, h) · R^k · F · x_out (normalised coordinates, ``align_corners=False``), so with full scale
  the flips and rotations move pixels exactly.
* ``photometric``: on the image only, each with its own random strength per sample: brightness and contrast
  (factors in 1 ± ``brightness`` / ``contrast``), saturation (factor in ``saturation``), sharpness (blend with a
  3×3 blur, factor in ``sharpness``), Gaussian blur (probability ``blur_p``, σ in ``blur_sigma`` as a fraction
  of the side) and posterize (probability ``posterize_p`` to 5–7 bits).

Every random draw comes from the ``torch.Generator`` passed in, so views are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of the view augmentations (module docstring); the defaults follow AnomalyNCD's list."""

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: tuple[float, float] = (0.6, 1.8)
    sharpness: tuple[float, float] = (0.2, 2.0)
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.005, 0.03)
    posterize_p: float = 0.2

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"AugmentConfig.scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"AugmentConfig.ratio must satisfy 0 < low <= high, got {self.ratio}")
        for name in ("hflip", "vflip", "blur_p", "posterize_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"AugmentConfig.{name} is a probability in [0, 1], got {getattr(self, name)}")
        if not (0 <= self.brightness < 1 and 0 <= self.contrast < 1):
            raise ValueError(f"AugmentConfig.brightness and contrast must lie in [0, 1), "
                             f"got {self.brightness}, {self.contrast}")


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def random_affines(n: int, generator: torch.Generator, config: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """n×2×3 affine matrices (output → input normalised coordinates) of the paired geometric augmentation."""
    area = _uniform(n, *config.scale, generator)
    log_ratio = _uniform(n, math.log(config.ratio[0]), math.log(config.ratio[1]), generator)
    width = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)
    height = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    centre_x = (1 - width) * (2 * torch.rand(n, generator=generator) - 1)
    centre_y = (1 - height) * (2 * torch.rand(n, generator=generator) - 1)
    flip_x = torch.where(torch.rand(n, generator=generator) < config.hflip, -1.0, 1.0)
    flip_y = torch.where(torch.rand(n, generator=generator) < config.vflip, -1.0, 1.0)
    turns = torch.randint(0, 4 if config.rot90 else 1, (n,), generator=generator)
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0])[turns]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0])[turns]
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    linear = torch.diag_embed(torch.stack([width, height], -1)) @ rotation @ torch.diag_embed(
        torch.stack([flip_x, flip_y], -1))
    return torch.cat([linear, torch.stack([centre_x, centre_y], -1)[..., None]], dim=-1)


def apply_affines(tensors: list[torch.Tensor], affines: torch.Tensor) -> list[torch.Tensor]:
    """Resample every B×C×H×W tensor with the same per-sample affine grid (bilinear)."""
    reference = tensors[0]
    grid = F.affine_grid(affines.to(reference.device, reference.dtype), list(reference.shape), align_corners=False)
    return [F.grid_sample(t, grid.to(t.dtype), mode="bilinear", padding_mode="border", align_corners=False)
            for t in tensors]


def paired_geometric(images: torch.Tensor, anomaly_maps: torch.Tensor, object_masks: torch.Tensor,
                     generator: torch.Generator, config: AugmentConfig = AugmentConfig()
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same random resized crop, flips and 90° rotation on images, anomaly maps and object masks."""
    if not (images.shape[0] == anomaly_maps.shape[0] == object_masks.shape[0]
            and images.shape[-2:] == anomaly_maps.shape[-2:] == object_masks.shape[-2:]):
        raise ValueError(f"images {tuple(images.shape)}, anomaly maps {tuple(anomaly_maps.shape)} and object masks "
                         f"{tuple(object_masks.shape)} must share batch size and H×W")
    affines = random_affines(images.shape[0], generator, config)
    out_images, out_maps, out_masks = apply_affines([images, anomaly_maps, object_masks], affines)
    return out_images, out_maps.clamp(0, 1), out_masks.clamp(0, 1)


def _gray(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).view(-1, 1, 1, 1)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one σ (pixels) per sample; reflect padding."""
    batch, channels, height, width = images.shape
    radius = max(1, int(math.ceil(3 * float(sigmas.max()))))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernels = torch.exp(-0.5 * (offsets[None] / _per_sample(sigmas, images).view(-1, 1).clamp_min(1e-3)) ** 2)
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(channels, 0)
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernels[:, None, None, :],
                    groups=batch * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernels[:, None, :, None],
                    groups=batch * channels)
    return flat.view(batch, channels, height, width)


def photometric(images: torch.Tensor, generator: torch.Generator,
                config: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Colour and sharpness jitter, blur and posterize on B×3×S×S images in [0, 1] (module docstring)."""
    n = images.shape[0]
    out = images * _per_sample(_uniform(n, 1 - config.brightness, 1 + config.brightness, generator), images)
    mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * _per_sample(_uniform(n, 1 - config.contrast, 1 + config.contrast, generator), out) + mean
    gray = _gray(out)
    out = ((out - gray) * _per_sample(_uniform(n, *config.saturation, generator), out) + gray).clamp(0, 1)
    smooth = F.avg_pool2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    out = (smooth + (out - smooth) * _per_sample(_uniform(n, *config.sharpness, generator), out)).clamp(0, 1)
    blur = torch.rand(n, generator=generator) < config.blur_p
    sigmas = _uniform(n, *config.blur_sigma, generator) * images.shape[-1]
    if blur.any():
        out = torch.where(_per_sample(blur, out).bool(), gaussian_blur(out, sigmas), out)
    posterize = torch.rand(n, generator=generator) < config.posterize_p
    levels = _per_sample(2.0 ** torch.randint(5, 8, (n,), generator=generator), out)
    if posterize.any():
        out = torch.where(_per_sample(posterize, out).bool(), torch.floor(out * levels) / levels, out)
    return out


def augment_views(images: torch.Tensor, anomaly_maps: torch.Tensor, object_masks: torch.Tensor,
                  generator: torch.Generator, config: AugmentConfig = AugmentConfig()
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One augmented view of a batch: paired geometry on all three, then photometric jitter on the image."""
    images, anomaly_maps, object_masks = paired_geometric(images, anomaly_maps, object_masks, generator, config)
    return photometric(images, generator, config), anomaly_maps, object_masks
