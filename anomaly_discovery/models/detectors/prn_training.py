"""PRN training pieces (methods §3 steps 2, 3, 7, 8, 9): prototypes, residuals, loss, training data, loop.

The training batch is half normal images (their frozen encoder features cached once) and half anomalies
drawn by :class:`AnomalySampler` (real, extended or simulated, encoded on the fly), so normal : anomalous
is 1:1 in every epoch.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import cv2
import faiss
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from anomaly_discovery.data.images import as_rgb, load_mask
from anomaly_discovery.data.sample import Sample

from ..features.backbones import autocast_for
from .anomaly_synthesis import extend_anomaly, simulate_anomaly

ANOMALY_SOURCES = ("real", "extended", "simulated")


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Any uint8 gray/RGB image → size×size×3 uint8 (area interpolation); the one resize fit and predict share."""
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype} (shape {image.shape})")
    return cv2.resize(np.ascontiguousarray(as_rgb(image)), (size, size), interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A 2-D mask (nonzero = defect) → size×size bool (nearest neighbour)."""
    return cv2.resize((np.asarray(mask) > 0).astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0


def fit_prototypes(features: torch.Tensor, fraction: float = 0.1, seed: int = 0, n_iter: int = 20) -> torch.Tensor:
    """Step 2: K = max(1, ⌊fraction·N⌋) seeded k-means centroids of the N whole flattened maps.

    N×C×H×W → K×C×H×W (faiss k-means; with K = N the maps themselves)."""
    n = features.shape[0]
    k = max(1, int(fraction * n))
    flat = np.ascontiguousarray(features.reshape(n, -1).float().cpu().numpy())
    if k >= n:
        return features.float().cpu().clone()
    kmeans = faiss.Kmeans(flat.shape[1], k, niter=n_iter, seed=seed, verbose=False, min_points_per_centroid=1)
    kmeans.train(flat)
    return torch.from_numpy(kmeans.centroids.copy()).view(k, *features.shape[1:])


def prototype_residuals(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Step 3: R = (F − p*)², p* = argmin_k ‖F − P_k‖₂ over whole flattened maps (B×C×H×W)."""
    distances = torch.cdist(features.flatten(1).float(), prototypes.flatten(1).float())
    nearest = prototypes[distances.argmin(dim=1)]
    return (features - nearest) ** 2


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.5, gamma: float = 4.0) -> torch.Tensor:
    """FL = −α_t (1 − p_t)^γ log p_t, mean over pixels (log p_t from logits for stability)."""
    positive = target > 0.5
    log_p_t = torch.where(positive, F.logsigmoid(logits), F.logsigmoid(-logits))
    alpha_t = torch.where(positive, alpha, 1.0 - alpha)
    return (-alpha_t * (1.0 - log_p_t.exp()) ** gamma * log_p_t).mean()


def prn_loss(logits: torch.Tensor, target: torch.Tensor, focal_weight: float = 5.0, alpha: float = 0.5,
             gamma: float = 4.0) -> torch.Tensor:
    """Step 7: SmoothL1(σ(logits), M) + focal_weight · Focal(α, γ)."""
    return (F.smooth_l1_loss(torch.sigmoid(logits), target)
            + focal_weight * focal_loss(logits, target, alpha, gamma))


class AnomalySampler:
    """Draws anomalous training images at training size: real, extended or simulated (step 8).

    ``source_weights`` weighs (real, extended, simulated); sources without real anomalies drop out, so
    with none the sampler yields simulated anomalies only. ``sources_`` names the sources in use.
    """

    def __init__(self, normal_images: np.ndarray, real_images: np.ndarray, real_masks: np.ndarray,
                 foregrounds: np.ndarray | None, source_weights: Sequence[float], seed: int | Sequence[int] = 0):
        self.normal_images, self.real_images, self.real_masks = normal_images, real_images, real_masks
        self.foregrounds = foregrounds
        available = [w if (name == "simulated" or len(real_images)) else 0.0
                     for name, w in zip(ANOMALY_SOURCES, source_weights)]
        if sum(available) <= 0:
            raise ValueError(f"anomaly source weights {tuple(source_weights)} leave no usable source "
                             f"(real anomalies given: {len(real_images)})")
        self.sources_ = tuple(name for name, w in zip(ANOMALY_SOURCES, available) if w > 0)
        self.probabilities = np.asarray([w for w in available if w > 0]) / sum(available)
        self.rng = np.random.default_rng(seed)

    def draw(self) -> tuple[np.ndarray, np.ndarray, str]:
        """One (image, mask, source name)."""
        rng = self.rng
        source = self.sources_[rng.choice(len(self.sources_), p=self.probabilities)]
        target = int(rng.integers(len(self.normal_images)))
        foreground = None if self.foregrounds is None else self.foregrounds[target]
        if source == "real":
            pick = int(rng.integers(len(self.real_images)))
            return self.real_images[pick], self.real_masks[pick], source
        if source == "extended":
            pick = int(rng.integers(len(self.real_images)))
            image, mask = extend_anomaly(self.normal_images[target], self.real_images[pick], self.real_masks[pick],
                                         rng, foreground)
            if mask.any():
                return image, mask, source
        image, mask = simulate_anomaly(self.normal_images[target], rng, foreground)
        return image, mask, "simulated"


@dataclass
class PRNTrainHooks:
    """Injection points of a distributed runner (Ray Train) into :func:`train_head`; the defaults are the
    single-process path. ``wrap_model`` wraps the head (e.g. ``prepare_model``); this worker trains on share
    ``rank`` of ``world_size`` of every epoch's normal images (``batch_size`` is per worker); ``on_epoch(epoch,
    metrics, state)`` runs after each epoch, ``state`` being {"head", "optimizer", "history"}, which
    ``initial_state`` takes back to resume after the epochs in its history."""

    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model
    on_epoch: Optional[Callable[[int, dict, dict], None]] = None
    rank: int = 0
    world_size: int = 1
    initial_state: Optional[dict] = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")

    @property
    def start_epoch(self) -> int:
        return 0 if self.initial_state is None else len(self.initial_state["history"])

    def sampler_seed(self, seed: int) -> int | list[int]:
        """``seed`` on the single-process path; other workers and resumed runs draw their own anomalies."""
        return seed if (self.rank, self.start_epoch) == (0, 0) else [seed, self.rank, self.start_epoch]


def train_head(head: torch.nn.Module, normal_maps: Sequence[torch.Tensor], prototypes: Sequence[torch.Tensor],
               sampler: AnomalySampler, encode: Callable[[np.ndarray], list[torch.Tensor]], *, epochs: int,
               batch_size: int, steps_per_epoch: int | None, lr: float, weight_decay: float, device: torch.device,
               seed: int = 0, progress: bool = True, loss_kwargs: dict | None = None,
               hooks: PRNTrainHooks | None = None) -> list[float]:
    """Step 9: Adam on ``prn_loss``; each batch = ⌊B/2⌋ cached normal maps + the rest sampled anomalies.

    ``normal_maps`` are the cached encoder maps of the normal images (three scales then the coarse stage);
    ``encode`` maps a uint8 N×S×S×3 batch to the same list on ``device``. ``hooks`` (see
    :class:`PRNTrainHooks`) shard, wrap, report and resume. Returns the mean loss per epoch (of this worker).
    """
    hooks = hooks or PRNTrainHooks()
    n_images = normal_maps[0].shape[0]
    n_normal = max(1, batch_size // 2)
    n_anomalous = max(1, batch_size - n_normal)
    per_step = n_normal * hooks.world_size
    steps = steps_per_epoch or math.ceil(n_images / per_step)
    rounds = math.ceil(steps * per_step / n_images)
    history: list[float] = []
    if hooks.initial_state is not None:
        head.load_state_dict(hooks.initial_state["head"])
        history = [float(loss) for loss in hooks.initial_state["history"]]
    model = hooks.wrap_model(head)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if hooks.initial_state is not None:
        optimizer.load_state_dict(hooks.initial_state["optimizer"])
    rng = np.random.default_rng(seed)
    for _ in range(hooks.start_epoch * rounds):
        rng.permutation(n_images)
    size = sampler.normal_images.shape[1]
    model.train()
    bar = tqdm(total=max(0, epochs - hooks.start_epoch) * steps, desc="PRN training", unit="step",
               disable=not progress)
    for epoch in range(hooks.start_epoch, epochs):
        order = np.concatenate([rng.permutation(n_images) for _ in range(rounds)])
        total = 0.0
        for step in range(steps):
            first = (step * hooks.world_size + hooks.rank) * n_normal
            index = torch.from_numpy(order[first:first + n_normal])
            drawn = [sampler.draw() for _ in range(n_anomalous)]
            anomalous_maps = encode(np.stack([image for image, _, _ in drawn]))
            maps = [torch.cat([cached[index].to(device), fresh]) for cached, fresh in zip(normal_maps, anomalous_maps)]
            masks = torch.zeros(n_normal + n_anomalous, 1, size, size, device=device)
            masks[n_normal:, 0] = torch.from_numpy(np.stack([mask for _, mask, _ in drawn])).to(device)
            residuals = [prototype_residuals(f, p) for f, p in zip(maps[:-1], prototypes)]
            with autocast_for(device):
                logits = model(maps[:-1], residuals, maps[-1])
            loss = prn_loss(logits.float(), masks, **(loss_kwargs or {}))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            bar.update()
        history.append(total / steps)
        bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1]:.4f}")
        if hooks.on_epoch is not None:
            state = copy.deepcopy({"head": head.state_dict(), "optimizer": optimizer.state_dict(),
                                   "history": history})
            hooks.on_epoch(epoch, {"loss": history[-1]}, state)
    bar.close()
    head.eval()
    return history


def select_real_anomalies(samples: Sequence[Sample], n: int = 10, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Pick ≤ n anomalous samples with a non-empty mask, round-robin over defect types (seeded order).

    Returns (selected, rest): ``rest`` is every other sample in the input order, for evaluation, so the
    real anomalies used for training never appear in it.
    """
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    rng = np.random.default_rng(seed)
    by_type: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        if sample.label is not None and not sample.is_normal and sample.mask_path is not None:
            by_type[sample.label].append(sample)
    queues = [[group[i] for i in rng.permutation(len(group))] for _, group in sorted(by_type.items())]
    selected: list[Sample] = []
    while len(selected) < n and any(queues):
        for queue in queues:
            while queue and len(selected) < n:
                candidate = queue.pop(0)
                if load_mask(candidate.mask_path).any():
                    selected.append(candidate)
                    break
    chosen = {id(sample) for sample in selected}
    return selected, [sample for sample in samples if id(sample) not in chosen]
