"""PatchCore and PRN on one scale: their maps and image scores standardised on held-out normals, averaged.

The two detectors fail differently (PatchCore measures distance to a memory bank of normal patches, PRN learns
residuals to normal prototypes with real and simulated anomalies), so averaging their evidence can localise
better than either. Their scores live on different scales (a feature distance; a probability), so:

1. a calibration share of the normal images (``calibration_fraction``, at least ``MIN_CALIBRATION`` images,
   seeded) is held out; every member is fitted on the rest (PRN also on the real anomalies it is given);
2. each member predicts the held-out normals; in its score space (PRN's probabilities as log-odds, PatchCore's
   distances as they are) the mean and standard deviation of their pixels and of their image scores are kept;
3. at prediction, each member's map and image score are standardised by those statistics (a z-score against
   normal data, as anomalib normalises against a validation set) and the members' z-scores averaged, every kind
   of detector weighing the same (several members of one kind share its weight: PatchCore on each of
   ``patchcore_backbones``, PRN for each of ``prn_seeds``);
4. optionally, the averaged map is Gaussian-blurred (``blur_sigma``, in pixels of a 256-pixel shorter side,
   scaled to each image's own): PatchCore's maps come blurred, PRN's do not. The default, 0 (no blur), stands by
   ``benchmarks/ensemble_blur_selection.py``: on normal images with drawn defects no σ raised AUPRO by .01.

By default PatchCore runs on two ImageNet backbones, MobileNetV2 and EfficientNet-Lite0 at the same strides
(``PATCHCORE_BACKBONES``), sharing PatchCore's half: ``benchmarks/ensemble_backbones_selection.py``'s rule, fixed
before its run on normal images with simulated and drawn defects, adopted the second backbone.

Members are scored on the images' own sizes (each detector resizes its map back), so maps of different input
sizes average pixel by pixel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from .protocol import Detection

MIN_CALIBRATION = 8
CALIBRATION_FRACTION = 0.1
PROBABILITY_EPS = 1e-6
BLUR_REFERENCE_SIDE = 256
PATCHCORE_BACKBONES = ("mobilenet_v2", "efficientnet_lite0")
# Taps at MobileNetV2's strides (8 and 16) for the other backbone: the last block of each resolution
# (EfficientNet-Lite0's own default taps start at stride 4).
PATCHCORE_TAPS = {"efficientnet_lite0": (5, 11)}


@dataclass(frozen=True)
class MemberScale:
    """Mean and standard deviation of one member's pixel and image scores on held-out normal images."""

    pixel_mean: float
    pixel_std: float
    image_mean: float
    image_std: float


def to_score_space(values: np.ndarray, probabilities: bool) -> np.ndarray:
    """Log-odds of probabilities (clipped away from 0 and 1), other scores unchanged."""
    if not probabilities:
        return np.asarray(values, dtype=np.float64)
    clipped = np.clip(np.asarray(values, dtype=np.float64), PROBABILITY_EPS, 1.0 - PROBABILITY_EPS)
    return np.log(clipped) - np.log1p(-clipped)


def member_scale(detections: Sequence[Detection], probabilities: bool) -> MemberScale:
    """Statistics of a member's predictions on normal images, in its score space (step 2)."""
    pixels = np.concatenate([to_score_space(d.anomaly_map, probabilities).ravel() for d in detections])
    scores = to_score_space(np.array([d.score for d in detections]), probabilities)
    floor = np.finfo(np.float32).eps
    return MemberScale(float(pixels.mean()), max(float(pixels.std()), floor),
                       float(scores.mean()), max(float(scores.std(ddof=1)), floor))


def standardised(detection: Detection, scale: MemberScale, probabilities: bool) -> Detection:
    """One member's detection as z-scores against its normal statistics (step 3)."""
    anomaly_map = (to_score_space(detection.anomaly_map, probabilities) - scale.pixel_mean) / scale.pixel_std
    score = (to_score_space(np.array([detection.score]), probabilities)[0] - scale.image_mean) / scale.image_std
    return Detection(float(score), anomaly_map.astype(np.float32))


def kind_weights(names: Sequence[str]) -> np.ndarray:
    """Weights summing to 1 under which every kind of member (its ``name``) weighs the same and several members of
    one kind (seeds of one detector) share that kind's weight equally."""
    counts = {name: names.count(name) for name in names}
    return np.array([1.0 / (len(counts) * counts[name]) for name in names])


def member_weights(n_members: int, weights: Sequence[float] | None) -> np.ndarray:
    """Weights summing to 1: equal when None, else the given weights (≥ 0, one above 0) normalised."""
    if weights is None:
        return np.full(n_members, 1.0 / n_members)
    values = np.asarray(weights, dtype=np.float64)
    if values.shape != (n_members,) or np.any(values < 0) or not values.sum() > 0:
        raise ValueError(f"need one weight ≥ 0 per member ({n_members}), not all 0, got {list(weights)}")
    return values / values.sum()


def average_detections(per_member: Sequence[Sequence[Detection]], weights: Sequence[float] | None = None
                       ) -> list[Detection]:
    """Pixel-wise and score-wise (weighted) mean over members of already standardised detections."""
    shares = member_weights(len(per_member), weights)
    combined = []
    for detections in zip(*per_member, strict=True):
        maps = [d.anomaly_map for d in detections]
        if len({m.shape for m in maps}) != 1:
            raise ValueError(f"members gave maps of different sizes for one image: {[m.shape for m in maps]}")
        combined.append(Detection(float(np.dot(shares, [d.score for d in detections])),
                                  np.tensordot(shares, np.stack(maps), axes=1).astype(np.float32)))
    return combined


def blurred_map(anomaly_map: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of one map (step 4): ``sigma`` pixels of a BLUR_REFERENCE_SIDE shorter side, scaled to the
    map's own shorter side (reflected borders); ``sigma`` 0 returns the map as it is."""
    if sigma < 0:
        raise ValueError(f"blur sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return anomaly_map
    scaled = sigma * min(anomaly_map.shape[:2]) / BLUR_REFERENCE_SIDE
    return cv2.GaussianBlur(np.asarray(anomaly_map, dtype=np.float32), (0, 0), scaled,
                            borderType=cv2.BORDER_REFLECT)


def patchcore_member(backbone: str, **settings):
    """A PatchCore on ``backbone`` tapped at MobileNetV2's strides (``PATCHCORE_TAPS``), other settings as given."""
    from .patchcore import PatchCoreDetector

    return PatchCoreDetector(backbone=backbone, layers=PATCHCORE_TAPS.get(backbone), **settings)


def calibration_split(n_images: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, calibration indices): a seeded ``fraction`` of the images, at least MIN_CALIBRATION."""
    n_calibration = max(MIN_CALIBRATION, int(round(n_images * fraction)))
    if n_images - n_calibration < MIN_CALIBRATION:
        raise ValueError(f"the ensemble needs at least {2 * MIN_CALIBRATION} normal images ({MIN_CALIBRATION} to "
                         f"fit on and {MIN_CALIBRATION} to calibrate the members' scales), got {n_images}")
    order = np.random.default_rng(seed).permutation(n_images)
    return np.sort(order[n_calibration:]), np.sort(order[:n_calibration])


class DetectorEnsemble:
    """PatchCore + PRN (by default, each with its own defaults), standardised on held-out normals and averaged.

    ``members`` are unfitted detectors; a member whose ``name`` is in ``probability_members`` gives
    probabilities (PRN) and is standardised in log-odds. After ``fit``: ``scales_`` (one :class:`MemberScale`
    per member) and ``n_calibration_``. ``blur_sigma``: step 4's blur of the averaged map. Without ``members``,
    ``patchcore_backbones`` (default: ``PATCHCORE_BACKBONES``) gives one PatchCore per backbone and ``prn_seeds``
    (default: ``seed`` alone) one PRN per seed. The attribute ``weights`` holds each member's share of the average
    (:func:`kind_weights`).
    """

    name = "ensemble"

    def __init__(self, members: Sequence | None = None, calibration_fraction: float = CALIBRATION_FRACTION,
                 seed: int = 0, probability_members: Sequence[str] = ("prn",), blur_sigma: float = 0.0,
                 prn_seeds: Sequence[int] | None = None, patchcore_backbones: Sequence[str] | None = None):
        if not 0.0 < calibration_fraction < 1.0:
            raise ValueError(f"calibration_fraction must lie in (0, 1), got {calibration_fraction}")
        if members is None:
            from .prn import PRNConfig, PRNDetector

            prn_seeds = (seed,) if prn_seeds is None else tuple(prn_seeds)
            backbones = PATCHCORE_BACKBONES if patchcore_backbones is None else tuple(patchcore_backbones)
            members = (*(patchcore_member(backbone, seed=seed) for backbone in backbones),
                       *(PRNDetector(PRNConfig(seed=s)) for s in prn_seeds))
        elif prn_seeds is not None or patchcore_backbones is not None:
            raise ValueError("prn_seeds and patchcore_backbones pick the default members: pass them without members")
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        if blur_sigma < 0:
            raise ValueError(f"blur_sigma must be >= 0, got {blur_sigma}")
        self.members = list(members)
        self.calibration_fraction, self.seed = calibration_fraction, seed
        self.probability_members = tuple(probability_members)
        self.blur_sigma = blur_sigma
        self.weights = kind_weights([member.name for member in self.members])

    @property
    def image_size(self) -> int:
        """The largest member input side (each member keeps its own)."""
        return max(member.image_size for member in self.members)

    def _is_probability(self, member) -> bool:
        return member.name in self.probability_members

    def fit(self, normal_images: Sequence[np.ndarray],
            real_anomalies: Sequence[tuple[np.ndarray, np.ndarray]] | None = None) -> "DetectorEnsemble":
        """Fit every member on the normal images less the calibration share, then measure their scales."""
        fit_idx, calibration_idx = calibration_split(len(normal_images), self.calibration_fraction, self.seed)
        fit_images = [normal_images[i] for i in fit_idx]
        calibration_images = [normal_images[i] for i in calibration_idx]
        for member in self.members:
            if member.name == "prn":
                member.fit(fit_images, real_anomalies=real_anomalies)
            else:
                member.fit(fit_images)
        self.scales_ = [member_scale(member.predict(calibration_images), self._is_probability(member))
                        for member in self.members]
        self.n_calibration_ = len(calibration_images)
        return self

    def predict_members(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Each member's own detections (its own scale), in member order."""
        if not hasattr(self, "scales_"):
            raise RuntimeError("DetectorEnsemble.predict called before fit")
        return [member.predict(images) for member in self.members]

    def combine(self, per_member: Sequence[Sequence[Detection]], blur_sigma: float | None = None,
                weights: Sequence[float] | None = None) -> list[Detection]:
        """Standardise each member's detections by its calibration scale, average them and blur the averaged
        maps (``blur_sigma`` and ``weights``: the ensemble's own when None; a weight of 0 leaves a member out)."""
        sigma = self.blur_sigma if blur_sigma is None else blur_sigma
        averaged = average_detections([[standardised(d, scale, self._is_probability(member)) for d in detections]
                                       for member, scale, detections in zip(self.members, self.scales_, per_member,
                                                                            strict=True)],
                                      self.weights if weights is None else weights)
        return [Detection(d.score, blurred_map(d.anomaly_map, sigma)) for d in averaged]

    def predict(self, images: Sequence[np.ndarray]) -> list[Detection]:
        """One detection per image: the weighted mean of the members' standardised maps and image scores."""
        return self.combine(self.predict_members(images))
