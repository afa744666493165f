"""PRN training pieces (methods §3 steps 2, 3, 7, 8, 9): prototypes, residuals, loss, training data, loop.

The frozen encoder runs once per training image: the normal images and a pool of anomalous ones (real,
extended and simulated, drawn by :class:`AnomalySampler`) are encoded before training, and each one's
nearest prototypes are looked up then too (:class:`EncodedSet`). Every step then only runs the trainable head
on a batch that is half cached normal maps, half cached anomalies, so normal : anomalous is 1:1 in every epoch.
"""

from __future__ import annotations

import copy
import math
import time
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
PROTOTYPE_KINDS = ("patch", "image")


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Any uint8 gray/RGB image → size×size×3 uint8 (area interpolation); the one resize fit and predict share."""
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype} (shape {image.shape})")
    return cv2.resize(np.ascontiguousarray(as_rgb(image)), (size, size), interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A 2-D mask (nonzero = defect) → size×size bool (nearest neighbour)."""
    return cv2.resize((np.asarray(mask) > 0).astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0


def prepare_real_anomalies(real: Sequence[tuple[np.ndarray, np.ndarray]], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Real anomalies, (image, mask) pairs → N×size×size×3 images and N×size×size masks, each pair checked
    (a mask of its image's shape, not empty) and named by its index when refused."""
    images, masks = [], []
    for index, pair in enumerate(real):
        if len(pair) != 2:
            raise ValueError(f"real anomaly {index} must be an (image, mask) pair")
        image, mask = pair
        if np.asarray(mask).shape != image.shape[:2]:
            raise ValueError(f"real anomaly {index}: mask shape {np.asarray(mask).shape} differs from its "
                             f"image's {image.shape[:2]}")
        resized = resize_mask(mask, size)
        if not resized.any():
            raise ValueError(f"real anomaly {index} has an empty mask")
        images.append(resize_image(image, size))
        masks.append(resized)
    if not images:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), bool)
    return np.stack(images), np.stack(masks)


def fit_prototypes(features: torch.Tensor, kind: str = "patch", count: int = 1024, fraction: float = 0.1,
                   seed: int = 0, n_iter: int = 20) -> torch.Tensor:
    """Step 2: seeded k-means prototypes of one scale's N×C×H×W normal feature maps.

    ``kind`` "image" (the unofficial code): K = max(1, ⌊fraction·N⌋) centroids of the whole flattened maps,
    K×C×H×W. ``kind`` "patch": ``count`` centroids of the C-dim feature vectors at every position, K×C
    (k-means on at most 256 seeded random positions per centroid, FAISS's own cap), so that images which are
    not aligned (textures, shifted parts) still meet a prototype of their own content.
    """
    if kind not in PROTOTYPE_KINDS:
        raise ValueError(f"prototype kind must be one of {PROTOTYPE_KINDS}, got {kind!r}")
    if kind == "image":
        flat = features.reshape(features.shape[0], -1)
        k = max(1, int(fraction * features.shape[0]))
    else:
        flat = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        k = count
        if flat.shape[0] > 256 * k:
            keep = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(seed))[:256 * k]
            flat = flat[keep]
    flat = np.ascontiguousarray(flat.float().cpu().numpy())
    if k >= flat.shape[0]:
        centroids = flat.copy()
    else:
        kmeans = faiss.Kmeans(flat.shape[1], k, niter=n_iter, seed=seed, verbose=False, min_points_per_centroid=1)
        kmeans.train(flat)
        centroids = kmeans.centroids.copy()
    shape = features.shape[1:] if kind == "image" else features.shape[1:2]
    return torch.from_numpy(centroids).view(-1, *shape)


def nearest_prototypes(features: torch.Tensor, prototypes: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Step 3's p* = argmin_k ‖F − P_k‖₂: per image (B,) for whole-map prototypes, per position (B×H×W) for
    patch prototypes (exact FAISS search, ``chunk`` images at a time)."""
    if prototypes.ndim == 4:
        distances = torch.cdist(features.flatten(1).float(), prototypes.flatten(1).float().to(features.device))
        return distances.argmin(dim=1).cpu()
    batch, channels, height, width = features.shape
    index = faiss.IndexFlatL2(channels)
    index.add(np.ascontiguousarray(prototypes.float().cpu().numpy()))
    nearest = []
    for start in range(0, batch, chunk):
        queries = features[start:start + chunk].permute(0, 2, 3, 1).reshape(-1, channels).float().cpu().numpy()
        nearest.append(torch.from_numpy(index.search(np.ascontiguousarray(queries), 1)[1][:, 0]))
    return torch.cat(nearest).view(batch, height, width)


def prototype_residuals(features: torch.Tensor, prototypes: torch.Tensor,
                        nearest: torch.Tensor | None = None) -> torch.Tensor:
    """Step 3: R = (F − p*)² element-wise (B×C×H×W); ``nearest`` from :func:`nearest_prototypes` if known."""
    if nearest is None:
        nearest = nearest_prototypes(features, prototypes)
    prototypes = prototypes.to(features.device)
    chosen = prototypes[nearest.to(features.device)]
    if prototypes.ndim == 2:
        chosen = chosen.permute(0, 3, 1, 2)
    return (features.float() - chosen) ** 2


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.5, gamma: float = 4.0) -> torch.Tensor:
    """FL = −[α t (1 − p)^γ log p + (1 − α)(1 − t) p^γ log(1 − p)], mean over pixels; for a 0/1 target this is
    −α_t (1 − p_t)^γ log p_t, and a soft target t (a cell's defect fraction) weighs both terms."""
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = log_p.exp()
    positive = alpha * target * (1.0 - p) ** gamma * log_p
    negative = (1.0 - alpha) * (1.0 - target) * p ** gamma * log_not_p
    return -(positive + negative).mean()


def prn_loss(logits: torch.Tensor, target: torch.Tensor, focal_weight: float = 5.0, alpha: float = 0.5,
             gamma: float = 4.0) -> torch.Tensor:
    """Step 7: SmoothL1(σ(logits), M) + focal_weight · Focal(α, γ)."""
    return (F.smooth_l1_loss(torch.sigmoid(logits), target)
            + focal_weight * focal_loss(logits, target, alpha, gamma))


def cell_targets(masks: np.ndarray, stride: int) -> torch.Tensor:
    """N×S×S boolean masks → N×1×(S/stride)² float16 defect fraction of each cell of the finest feature grid."""
    tensor = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[:, None]
    return F.avg_pool2d(tensor, stride).half()


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

    def pool(self, size: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``size`` draws stacked: images N×S×S×3, masks N×S×S, source names."""
        drawn = [self.draw() for _ in tqdm(range(size), desc="PRN anomalies", unit="img", disable=not progress)]
        return np.stack([d[0] for d in drawn]), np.stack([d[1] for d in drawn]), [d[2] for d in drawn]


@dataclass
class EncodedSet:
    """Training images as the head sees them: the encoder's maps (three scales then the coarse stage, float16,
    on the CPU), each scale's nearest-prototype indices and the per-cell defect fractions of the finest scale."""

    maps: list[torch.Tensor]
    nearest: list[torch.Tensor]
    targets: torch.Tensor

    def __len__(self) -> int:
        return self.targets.shape[0]

    def batch(self, index: torch.Tensor, prototypes: Sequence[torch.Tensor], device: torch.device):
        """(features, residuals, coarse map, targets) of the images at ``index``, float32 on ``device``."""
        maps = [m[index].to(device).float() for m in self.maps]
        residuals = [prototype_residuals(f, p, n[index]) for f, p, n in zip(maps, prototypes, self.nearest)]
        return maps[:-1], residuals, maps[-1], self.targets[index].to(device).float()


def joined(first: tuple, second: tuple) -> tuple:
    """Two :meth:`EncodedSet.batch` results as one batch (lists joined scale by scale)."""
    return tuple([torch.cat(pair) for pair in zip(a, b)] if isinstance(a, list) else torch.cat([a, b])
                 for a, b in zip(first, second))


@dataclass
class PRNTrainHooks:
    """Injection points of a distributed runner (Ray Train) into :func:`train_head`; the defaults are the
    single-process path. ``wrap_model`` wraps the head (e.g. ``prepare_model``); this worker trains on share
    ``rank`` of ``world_size`` of every epoch's normal images (``batch_size`` is per worker); ``on_epoch(epoch,
    metrics, state)`` runs after each epoch, ``state`` being {"head", "optimizer", "scheduler", "history"}, which
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


def train_head(head: torch.nn.Module, normal: EncodedSet, anomalous: EncodedSet, prototypes: Sequence[torch.Tensor],
               *, epochs: int, batch_size: int, steps_per_epoch: int | None, lr: float, weight_decay: float,
               device: torch.device, seed: int = 0, progress: bool = True, loss_kwargs: dict | None = None,
               hooks: PRNTrainHooks | None = None) -> list[float]:
    """Step 9: Adam on ``prn_loss`` with a cosine learning-rate decay over all steps; each batch is ⌊B/2⌋ cached
    normal images (an epoch passes over them once) and the rest drawn from the cached anomalies.

    ``hooks`` (see :class:`PRNTrainHooks`) shard, wrap, report and resume; the normal images' order and the
    anomalies drawn depend on (seed, epoch) only, so a resumed run sees what the uninterrupted one would.
    Returns the mean loss per epoch (of this worker). ``on_epoch``'s metrics hold the loss and ``seconds``, the
    training time so far (time spent inside ``on_epoch`` itself not counted).
    """
    hooks = hooks or PRNTrainHooks()
    n_images = len(normal)
    n_normal = max(1, batch_size // 2)
    n_anomalous = max(1, batch_size - n_normal)
    per_step = n_normal * hooks.world_size
    steps = steps_per_epoch or math.ceil(n_images / per_step)
    rounds = math.ceil(steps * per_step / n_images)
    history: list[float] = []
    model = hooks.wrap_model(head)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps, eta_min=lr * 1e-2)
    if hooks.initial_state is not None:
        head.load_state_dict(hooks.initial_state["head"])
        optimizer.load_state_dict(hooks.initial_state["optimizer"])
        schedule.load_state_dict(hooks.initial_state["scheduler"])
        history = [float(loss) for loss in hooks.initial_state["history"]]
    bar = tqdm(total=max(0, epochs - hooks.start_epoch) * steps, desc="PRN training", unit="step",
               disable=not progress)
    seconds = 0.0
    for epoch in range(hooks.start_epoch, epochs):
        started = time.perf_counter()
        model.train()
        order = np.concatenate([np.random.default_rng([seed, epoch, r]).permutation(n_images) for r in range(rounds)])
        draws = np.random.default_rng([seed, epoch, hooks.world_size, hooks.rank])
        total = 0.0
        for step in range(steps):
            first = (step * hooks.world_size + hooks.rank) * n_normal
            picks = torch.from_numpy(draws.integers(len(anomalous), size=n_anomalous))
            features, residuals, coarse, targets = joined(
                normal.batch(torch.from_numpy(order[first:first + n_normal]), prototypes, device),
                anomalous.batch(picks, prototypes, device))
            with autocast_for(device):
                logits = model(features, residuals, coarse)
            loss = prn_loss(logits.float(), targets, **(loss_kwargs or {}))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach())
            bar.update()
        history.append(total / steps)
        seconds += time.perf_counter() - started
        bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1]:.4f}")
        if hooks.on_epoch is not None:
            state = copy.deepcopy({"head": head.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": schedule.state_dict(), "history": history})
            hooks.on_epoch(epoch, {"loss": history[-1], "seconds": seconds}, state)
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
