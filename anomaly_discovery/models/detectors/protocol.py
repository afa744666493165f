"""The one interface every anomaly detector follows (scikit-learn style).

``fit(normal_images) -> self`` learns from defect-free images (a no-op for detectors that need none);
``predict(images) -> list[Detection]`` gives each image a score and an anomaly map at the image's own
resolution. Images are uint8 arrays, H×W×3 (RGB) or H×W (gray), of any size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Detection:
    """An image-level anomaly score and a float32 anomaly map of the image's (H, W)."""

    score: float
    anomaly_map: np.ndarray


@runtime_checkable
class Detector(Protocol):
    name: str

    def fit(self, normal_images: Sequence[np.ndarray]) -> "Detector": ...

    def predict(self, images: Sequence[np.ndarray]) -> list[Detection]: ...


def resize_map(anomaly_map: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a 2-D map to ``size`` = (H, W); returns float32 numpy."""
    tensor = torch.as_tensor(anomaly_map, dtype=torch.float32)
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor.reshape(size).cpu().numpy()
    resized = F.interpolate(tensor[None, None], size=size, mode="bilinear", align_corners=False)
    return resized[0, 0].cpu().numpy()
