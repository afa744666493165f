"""Discovery training (methods.md §1 steps 5–7, §2): AMGA backbone + projector + multi-head cosine prototypes.

``train_discovery(config, novel, base)`` is a plain function (no globals; Ray Train wraps it through
:class:`TrainHooks`). Every epoch draws two views of each crop, balances base and novel crops 50/50 when a base
set is given, and minimises ``total_discovery_loss`` (SupCon + CE on base crops; InfoNCE, cross-view
self-distillation with the teacher-temperature staircase, mean-entropy and prototype separation on novel crops;
base columns masked in the teacher; optional pseudo-label correction by region score). The head with the
lowest mean cluster loss in the last epoch is kept.

Speed: when the patch embedding is frozen (the hybrid with ``trainable_cnn_stages=0``) the CNN feature map of
``cached_views`` views per crop is computed once (view 0 un-augmented, the others paired augmentations) and
every step trains the transformer and heads on a random pair of cached views (``forward_from_cnn_features``,
identical to the full forward on the same view).

Reproducibility: each epoch's sampling and augmentation come from a generator seeded by (seed, epoch), so a
run resumed from its epoch checkpoint (safetensors weights, optimizer state read with ``weights_only=True``,
JSON history) ends with exactly the same weights as an uninterrupted one.

After training (``train_discovery``): unit embeddings of every novel crop, the best head's prototypes (with
``k="auto"``: K estimated on the embeddings and the novel prototypes replaced by k-means centres), assignments
and confidences, image labels by area-weighted merging, kNN / energy outlier scores with the threshold that
accepts 95% of held-out base crops, and metrics that read no label of the discovered images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

from .amga import pool_to_patch_grid
from .augment import AugmentConfig, augment_views
from .backbones import IMAGENET_MEAN, IMAGENET_STD, autocast_for, resolve_device
from .class_count import ClassCountEstimate, estimate_class_count
from .discovery_net import DEFAULT_VIT, DiscoveryBackbone, HybridDiscoveryBackbone, hybrid_amga, vit_with_amga
from .losses import (UNLABELLED, DiscoveryLossWeights, hard_label_ratio_schedule, teacher_temperature_schedule,
                     total_discovery_loss)
from .outliers import OutlierThreshold, energy_score, image_outlier_score, knn_distance_score
from .prototypes import ProjectionHead, PrototypeHead
from .region_merging import ImagePrediction, default_tau, merge_by_image, novel_region_probabilities
from .regions import Region, regions_to_tensors

CHECKPOINT_PREFIX = "epoch_"
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "state.json"
RESULT_FIELDS = ("progress", "checkpoint_dir", "resume", "keep_checkpoints", "device")


@dataclass
class DiscoveryConfig:
    """Settings of ``train_discovery``. Defaults chosen on SYNTHETIC data only (generator, seed 0; see the
    platform report / docs/benchmarks.md): image_size 128, depth 4, embed_dim 192, 30 epochs, SGD lr 0.05
    (momentum 0.9, cosine to lr·1e-3), batch 64, 6 cached views, τ_t 0.07 → 0.04, PLC off (it pulls
    weakly scored crops of real defects into one cluster when no normal crops are among them).

    ``k``: number of novel classes, or ``"auto"`` (train ``k_max`` prototypes, estimate K with ``k_method``
    on the learned embeddings, relabel by k-means with K clusters).
    """

    k: int | str = "auto"
    k_max: int = 10
    k_method: str = "silhouette"
    assign: str = "kmeans"
    backbone: str = "hybrid"
    cnn: str = "mobilenet_v2"
    cnn_weights: Optional[str] = None
    vit_model: str = DEFAULT_VIT
    vit_weights: Optional[str] = None
    trainable_blocks: int = 1
    embed_dim: int = 192
    depth: int = 4
    attention_heads: int = 3
    n_guided_blocks: Optional[int] = None
    trainable_cnn_stages: int = 0
    guidance: str = "amga"
    image_size: int = 128
    guided_pooling: bool = True
    projection_hidden: int = 1024
    projection_dim: int = 256
    n_heads: int = 4
    temperature: float = 0.1
    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-5
    min_lr_ratio: float = 1e-3
    teacher_temperature: tuple[float, float] = (0.07, 0.04)
    supervised_weight: float = 0.3
    entropy_weight: float = 4.0
    separation_weight: float = 0.1
    pseudo_label_correction: bool = False
    hard_label_start: Optional[float] = None
    cached_views: int = 6
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    base_val_fraction: float = 0.15
    outlier_k: int = 5
    outlier_accept_rate: float = 0.95
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    checkpoint_dir: Optional[str] = None
    resume: bool = False
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v
                                            for k, v in self.augment.items()})
        self.teacher_temperature = tuple(self.teacher_temperature)
        if not (self.k == "auto" or (isinstance(self.k, int) and self.k >= 1)):
            raise ValueError(f"k must be a positive integer or 'auto', got {self.k!r}")
        if self.k == "auto" and self.k_max < 2:
            raise ValueError(f"k_max must be at least 2 with k='auto', got {self.k_max}")
        for name, allowed in (("backbone", ("hybrid", "vit")), ("optimizer", ("sgd", "adamw")),
                              ("guidance", ("none", "hard", "amga")),
                              ("k_method", ("silhouette", "gap", "prototype_wins")),
                              ("assign", ("head", "kmeans"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "image_size", "n_heads", "depth", "outlier_k", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (contrastive pairs), got {self.batch_size}")
        if self.cached_views == 1 or self.cached_views < 0:
            raise ValueError(f"cached_views must be 0 (augment online) or at least 2, got {self.cached_views}")
        if not 0 <= self.base_val_fraction < 1:
            raise ValueError(f"base_val_fraction must lie in [0, 1), got {self.base_val_fraction}")

    @property
    def n_novel_prototypes(self) -> int:
        return self.k_max if self.k == "auto" else int(self.k)

    @property
    def uses_cache(self) -> bool:
        """Cached views need a frozen patch embedding: the hybrid backbone with a frozen CNN."""
        return self.cached_views >= 2 and self.backbone == "hybrid" and self.trainable_cnn_stages == 0

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change results (compared when resuming)."""
        values = dataclasses.asdict(self)
        return json.loads(json.dumps({k: v for k, v in values.items() if k not in RESULT_FIELDS}))


@dataclass
class TrainHooks:
    """Injection points for a distributed runner (Ray Train): ``wrap_model`` (e.g. prepare_model),
    ``wrap_loader`` (e.g. prepare_data_loader), ``report(epoch, metrics, checkpoint_dir)`` after each epoch's
    checkpoint, and ``save_checkpoints`` (False on non-chief workers). The defaults are the single-process path."""

    wrap_model: Callable[[nn.Module], nn.Module] = lambda model: model
    wrap_loader: Callable[[DataLoader], DataLoader] = lambda loader: loader
    report: Optional[Callable[[int, dict, Optional[Path]], None]] = None
    save_checkpoints: bool = True


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or written with other settings; the message names it."""


def forward_from_cnn_features(backbone: HybridDiscoveryBackbone, features: torch.Tensor,
                              anomaly_maps: Optional[torch.Tensor], object_masks: Optional[torch.Tensor]
                              ) -> torch.Tensor:
    """The hybrid's forward from its (frozen) CNN feature map B×C×h×w on: projection, CLS and position
    embeddings, guided blocks, norm → CLS (B×D). Maps may already be pooled to the h×w grid."""
    patches = backbone.proj(features)
    grid_hw = (patches.shape[-2], patches.shape[-1])
    tokens = torch.cat([backbone.cls_token.expand(patches.shape[0], -1, -1), patches.flatten(2).transpose(1, 2)], 1)
    tokens = tokens + resample_abs_pos_embed(backbone.pos_embed, new_size=grid_hw, old_size=backbone.reference_grid,
                                             num_prefix_tokens=1)
    bias = backbone.cls_bias(anomaly_maps, object_masks, grid_hw, tokens.shape[1])
    first_guided = len(backbone.blocks) - backbone.n_guided_blocks
    for index, block in enumerate(backbone.blocks):
        tokens = block(tokens, cls_bias=bias if index >= first_guided else None)
    return backbone.norm(tokens)[:, 0]


class GuidedPooling(nn.Module):
    """Skip path of the hybrid: the CNN patch features averaged with the weights softmax_j(b_j) of the Region
    Guidance Factor's bias (the CLS attention row that a zero query would give: mean pooling for ``none``,
    mask pooling for ``hard``, ρ-weighted pooling for ``amga``), projected to D and layer-normalised."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, cnn_features: torch.Tensor, patch_bias: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(patch_bias.float(), dim=1).to(cnn_features.dtype)
        return self.norm(self.proj(torch.einsum("bp,bcp->bc", weights, cnn_features.flatten(2))))


class DiscoveryModel(nn.Module):
    """Backbone → (feature, projection z, cosine logits of every head, prototypes).

    With the hybrid and ``guided_pooling`` the feature is ``GuidedPooling(CNN) + g·CLS`` with a learnable gate g
    starting at 0 (ReZero): training starts from ImageNet features pooled over the guided region, and the
    randomly initialised AMGA transformer adds to them as far as it helps (measured on synthetic data: the
    transformer alone, trained on a few hundred crops, clusters far worse than the pooled features).
    """

    def __init__(self, backbone: DiscoveryBackbone, n_classes: int, config: DiscoveryConfig):
        super().__init__()
        self.backbone = backbone
        self.projector = ProjectionHead(backbone.feature_dim, config.projection_hidden, config.projection_dim)
        self.head = PrototypeHead(backbone.feature_dim, n_classes, config.n_heads, config.temperature)
        self.pooling = None
        if isinstance(backbone, HybridDiscoveryBackbone) and config.guided_pooling:
            self.pooling = GuidedPooling(backbone.proj.in_channels, backbone.feature_dim)
            self.cls_gate = nn.Parameter(torch.zeros(()))

    def features(self, inputs: torch.Tensor, anomaly_maps: torch.Tensor, object_masks: torch.Tensor,
                 from_cnn_features: bool = False) -> torch.Tensor:
        """B×D features of images (or, with ``from_cnn_features``, of cached CNN feature maps)."""
        if not isinstance(self.backbone, HybridDiscoveryBackbone):
            return self.backbone(inputs, anomaly_maps, object_masks)
        cnn = inputs if from_cnn_features else self.backbone.cnn_features(inputs)
        cls = forward_from_cnn_features(self.backbone, cnn, anomaly_maps, object_masks)
        if self.pooling is None:
            return cls
        grid_hw = (cnn.shape[-2], cnn.shape[-1])
        bias = self.backbone.guidance(anomaly_maps, object_masks, grid_hw)
        return self.pooling(cnn, bias) + self.cls_gate * cls

    def forward(self, inputs: torch.Tensor, anomaly_maps: torch.Tensor, object_masks: torch.Tensor,
                from_cnn_features: bool = False) -> tuple[torch.Tensor, ...]:
        features = self.features(inputs, anomaly_maps, object_masks, from_cnn_features)
        return features, self.projector(features), self.head(features), self.head.prototypes()


def build_model(config: DiscoveryConfig, n_classes: int) -> DiscoveryModel:
    """The backbone named by ``config`` (offline hybrid, or a timm ViT from ``vit_weights``) with its heads."""
    if config.backbone == "hybrid":
        backbone = hybrid_amga(cnn=config.cnn, cnn_weights=config.cnn_weights, embed_dim=config.embed_dim,
                               depth=config.depth, n_heads=config.attention_heads,
                               n_guided_blocks=config.n_guided_blocks, trainable_cnn_stages=config.trainable_cnn_stages,
                               guidance=config.guidance, img_size=config.image_size)
    else:
        backbone = vit_with_amga(config.vit_model, config.vit_weights,
                                 n_guided_blocks=9 if config.n_guided_blocks is None else config.n_guided_blocks,
                                 trainable_blocks=config.trainable_blocks, guidance=config.guidance)
    return DiscoveryModel(backbone, n_classes, config)


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB → ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


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
    generator = torch.Generator().manual_seed(config.seed)
    grid = backbone.patch_grid((config.image_size, config.image_size))
    n = data.labels.shape[0]
    features = maps = masks = None
    bar = tqdm(total=n * n_views, desc="caching views", unit="view", disable=not config.progress)
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(n, start + batch_size))
        images, anomaly, objects = data.floats(index, torch.device("cpu"))
        for view in range(n_views):
            if view:
                view_images, view_maps, view_masks = augment_views(images, anomaly, objects, generator, config.augment)
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
    """Hold out ``fraction`` of every base class (at least one crop of a class with ≥ 3) for validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for name in sorted({r.class_name for r in regions}):
        members = [r for r in regions if r.class_name == name]
        order = rng.permutation(len(members))
        n_val = int(round(fraction * len(members))) if fraction > 0 else 0
        n_val = max(n_val, 1) if fraction > 0 and len(members) >= 3 else n_val
        val += [members[i] for i in order[:n_val]]
        train += [members[i] for i in order[n_val:]]
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


def learning_rate(config: DiscoveryConfig, step: int, total_steps: int) -> float:
    """Cosine schedule from ``lr`` to ``lr·min_lr_ratio`` over all steps."""
    low = config.lr * config.min_lr_ratio
    return low + 0.5 * (config.lr - low) * (1 + math.cos(math.pi * step / max(1, total_steps)))


def build_optimizer(model: nn.Module, config: DiscoveryConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over the trainable parameters; no weight decay on biases, norms and tokens."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 or name.endswith(("cls_token", "pos_embed")) else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


def _unwrapped(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def save_checkpoint(folder: Path, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    keep: int) -> Path:
    """Write ``epoch_NNNN/`` (weights as safetensors, optimizer state, JSON state) atomically; prune old ones."""
    folder = Path(folder)
    target = folder / f"{CHECKPOINT_PREFIX}{epoch:04d}"
    partial = folder / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in _unwrapped(model).state_dict().items()}
    save_file(weights, str(partial / MODEL_FILE))
    torch.save(optimizer.state_dict(), partial / OPTIMIZER_FILE)
    (partial / STATE_FILE).write_text(json.dumps(state | {"epoch": epoch}, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    partial.replace(target)
    for old in sorted(folder.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(folder: Path | str | None) -> Optional[Path]:
    """The newest complete ``epoch_NNNN`` folder, or ``None``."""
    if folder is None or not Path(folder).is_dir():
        return None
    complete = [p for p in Path(folder).glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()]
    return max(complete, default=None)


def load_weights_file(path: Path, model: nn.Module) -> None:
    """Strictly load a safetensors weights file; a corrupt or foreign file is a CheckpointError naming it."""
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"weights file {path} is corrupt or unreadable ({exc})") from exc
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights file {path} does not fit this model ({str(exc).splitlines()[0]})") from exc


def load_checkpoint(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Load weights (and optimizer state) from a checkpoint folder; a corrupt or foreign file is a
    CheckpointError naming it. Returns the JSON state."""
    path = Path(path)
    for name in (STATE_FILE, MODEL_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except ValueError as exc:
        raise CheckpointError(f"checkpoint state {path / STATE_FILE} is not valid JSON ({exc})") from exc
    load_weights_file(path / MODEL_FILE, _unwrapped(model))
    if optimizer is not None:
        try:
            optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=True))
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"optimizer state {path / OPTIMIZER_FILE} is corrupt or does not fit ({exc})") \
                from exc
    return state


@dataclass
class TrainedModel:
    """What the training loop hands to the results stage."""

    model: DiscoveryModel
    classes: list[str]
    data: RegionTensors
    cache: Optional[ViewCache]
    n_novel: int
    n_base_train: int
    history: list[dict]
    seconds: float


def _train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, data: RegionTensors,
                 cache: Optional[ViewCache], config: DiscoveryConfig, epoch: int, step: int, total_steps: int,
                 n_base: int, device: torch.device) -> tuple[dict, int]:
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch + 7)
    weights = DiscoveryLossWeights(config.supervised_weight, config.entropy_weight, config.separation_weight)
    tau_t = teacher_temperature_schedule(epoch, config.epochs, *config.teacher_temperature,
                                         n_values=min(10, max(1, round(0.8 * config.epochs))))
    ratio = 0.0 if config.hard_label_start is None else hard_label_ratio_schedule(epoch, config.epochs,
                                                                                     config.hard_label_start)
    sums: dict[str, float] = {}
    cluster_sum, novel_count, n_batches = None, 0, 0
    model.train()
    for (plan,) in loader:
        plan = plan.cpu()
        index = plan[:, 0]
        if cache is not None:
            first, second = cache.views(index, plan[:, 1], device), cache.views(index, plan[:, 2], device)
            inputs, maps, masks = (torch.cat([a, b]) for a, b in zip(first, second))
        else:
            images, anomaly, objects = data.floats(index, torch.device("cpu"))
            views = [augment_views(images, anomaly, objects, generator, config.augment) for _ in range(2)]
            inputs, maps, masks = (torch.cat([a, b]).to(device) for a, b in zip(*views))
            inputs = normalise_images(inputs)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step, total_steps)
        with autocast_for(device):
            _, projections, logits, prototypes = model(inputs, maps, masks, from_cnn_features=cache is not None)
        parts = total_discovery_loss(
            projections.float(), logits.float(), data.labels[index].to(device), n_base, tau_t,
            prototypes=prototypes.float(), region_scores=data.scores[index].to(device), weights=weights,
            student_temperature=config.temperature, pseudo_label_correction=config.pseudo_label_correction,
            hard_label_ratio=ratio)
        optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        optimizer.step()
        step += 1
        n_batches += 1
        for key in ("total", "rep", "rep_base", "cls_base", "cls_novel", "reg_novel", "sep"):
            sums[key] = sums.get(key, 0.0) + parts[key].item()
        novel = int(parts["n_novel"])
        weighted = parts["cluster_per_head"].cpu().double() * novel
        cluster_sum = weighted if cluster_sum is None else cluster_sum + weighted
        novel_count += novel
    metrics = {key: value / max(1, n_batches) for key, value in sums.items()}
    metrics["cluster_per_head"] = (cluster_sum / max(1, novel_count)).tolist() if cluster_sum is not None else []
    metrics.update(teacher_temperature=tau_t, lr=learning_rate(config, step, total_steps), batches=n_batches)
    return metrics, step


def _check_inputs(novel: Sequence[Region], base: Optional[Sequence[Region]]) -> None:
    if not novel:
        raise ValueError("train_discovery needs at least one novel region")
    if any(r.is_base for r in novel):
        raise ValueError("novel regions must not carry a class_name (their labels are never used)")
    if base and any(not r.is_base for r in base):
        raise ValueError("every base region needs its class_name")


def fit_discovery_model(config: DiscoveryConfig, novel: Sequence[Region], base: Sequence[Region],
                        hooks: TrainHooks, report_fn: Optional[Callable] = None) -> TrainedModel:
    """The training loop: data tensors, view cache, epochs with checkpoints, resume, head selection."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    base_train, base_val = split_base(base, config.base_val_fraction, config.seed)
    classes = sorted({r.class_name for r in base})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config, len(classes) + config.n_novel_prototypes).to(device)
    regions = list(novel) + base_train + base_val
    data = RegionTensors.build(regions, config.image_size, classes)
    cache = None
    if config.uses_cache:
        cache = build_view_cache(model.backbone, data, config.cached_views, config, device)
    optimizer = build_optimizer(model, config)
    history: list[dict] = []
    checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    fingerprint = config.fingerprint() | {"n_novel": len(novel), "n_base": len(base)}
    latest = latest_checkpoint(checkpoint_dir) if config.resume else None
    if latest is not None:
        state = load_checkpoint(latest, model, optimizer)
        if state.get("fingerprint") != fingerprint:
            changed = sorted(k for k in fingerprint if state.get("fingerprint", {}).get(k) != fingerprint[k])
            raise CheckpointError(f"checkpoint {latest} was written with other settings or data "
                                  f"(differs in: {', '.join(changed)}); use a fresh checkpoint_dir")
        history = state["history"]
    wrapped = hooks.wrap_model(model)
    if config.compile and device.type == "cuda":
        wrapped = torch.compile(wrapped)
    steps_per_epoch = None
    bar = tqdm(range(len(history), config.epochs), desc="discovery", unit="epoch", disable=not config.progress)
    for epoch in bar:
        epoch_started = time.perf_counter()
        plan = epoch_plan(len(novel), len(base_train), config.cached_views if cache is not None else 0,
                          config.seed, epoch)
        loader = hooks.wrap_loader(DataLoader(TensorDataset(plan), batch_size=config.batch_size, shuffle=False,
                                              drop_last=len(plan) >= 2 * config.batch_size))
        steps_per_epoch = steps_per_epoch or len(loader)
        metrics, _ = _train_epoch(wrapped, loader, optimizer, data, cache, config, epoch, epoch * steps_per_epoch,
                                  config.epochs * steps_per_epoch, len(classes), device)
        metrics.update(epoch=epoch, seconds=time.perf_counter() - epoch_started)
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['total']:.3f}")
        saved = None
        if checkpoint_dir is not None and hooks.save_checkpoints:
            saved = save_checkpoint(checkpoint_dir, epoch, model, optimizer,
                                    {"fingerprint": fingerprint, "history": history}, config.keep_checkpoints)
        for callback in (hooks.report, report_fn):
            if callback is not None:
                callback(epoch, metrics, saved)
    if history and history[-1]["cluster_per_head"]:
        model.head.select_best_head(history[-1]["cluster_per_head"])
    model.eval()
    return TrainedModel(model, classes, data, cache, len(novel), len(base_train), history,
                        time.perf_counter() - started)


@torch.no_grad()
def embed(model: DiscoveryModel, data: RegionTensors, index: torch.Tensor, cache: Optional[ViewCache],
          device: torch.device, batch_size: int = 128) -> torch.Tensor:
    """L2-normalised features of the un-augmented crops ``index`` (cached view 0 when there is a cache)."""
    model.eval()
    out = []
    for chunk in index.split(batch_size):
        with autocast_for(device):
            if cache is not None:
                inputs, maps, masks = cache.views(chunk, torch.zeros_like(chunk), device)
                features = model.features(inputs, maps, masks, from_cnn_features=True)
            else:
                images, maps, masks = data.floats(chunk, device)
                features = model.features(normalise_images(images), maps, masks)
        out.append(F.normalize(features.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.backbone.feature_dim)


@dataclass
class DiscoveryPredictor:
    """Everything needed to label new regions: the model, the final prototypes (base classes first, then the K
    novel classes; unit rows), the known-class reference embeddings of the kNN outlier score and its threshold
    (``None`` without a base validation set)."""

    config: DiscoveryConfig
    model: DiscoveryModel
    base_classes: list[str]
    prototypes: torch.Tensor
    reference_embeddings: torch.Tensor
    outlier_threshold: Optional[float]

    @property
    def n_base(self) -> int:
        return len(self.base_classes)

    def save(self, folder: Path | str) -> Path:
        """``model.safetensors`` (weights), ``discovery.safetensors`` (prototypes, references), ``model.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                  str(folder / MODEL_FILE))
        save_file({"prototypes": self.prototypes.contiguous(),
                   "reference_embeddings": self.reference_embeddings.contiguous()}, str(folder / "discovery.safetensors"))
        meta = {"config": self.config.fingerprint(), "base_classes": self.base_classes,
                "n_head_classes": self.model.head.n_classes, "outlier_threshold": self.outlier_threshold}
        (folder / "model.json").write_text(json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: Path | str, device: str = "cpu") -> "DiscoveryPredictor":
        folder = Path(folder)
        try:
            meta = json.loads((folder / "model.json").read_text())
            tensors = load_file(str(folder / "discovery.safetensors"))
        except (OSError, ValueError, SafetensorError) as exc:
            raise CheckpointError(f"{folder} is not a saved discovery model ({exc})") from exc
        config = DiscoveryConfig(**(meta["config"] | {"device": device, "progress": False}))
        model = build_model(config, meta["n_head_classes"])
        load_weights_file(folder / MODEL_FILE, model)
        return cls(config, model.eval(), meta["base_classes"], tensors["prototypes"],
                   tensors["reference_embeddings"], meta["outlier_threshold"])


@dataclass
class RegionPredictions:
    """Per region: embedding (unit), novel-class probabilities (K), cluster index, confidence, kNN outlier score
    (cosine distance to the k-th nearest known-class training crop), energy and the outlier flag."""

    embeddings: np.ndarray
    probs: np.ndarray
    clusters: np.ndarray
    confidence: np.ndarray
    outlier_score: np.ndarray
    energy: np.ndarray
    is_outlier: Optional[np.ndarray]


def score_embeddings(predictor: DiscoveryPredictor, embeddings: torch.Tensor, exclude_self: bool = False
                     ) -> RegionPredictions:
    """Assign unit embeddings to the predictor's novel classes and score them as outliers. ``exclude_self``
    skips the nearest reference (the training crops themselves are references)."""
    temperature = predictor.config.temperature
    logits = embeddings @ predictor.prototypes.T
    probs = novel_region_probabilities(logits, predictor.n_base, temperature)[:, predictor.n_base:]
    references = predictor.reference_embeddings
    k = min(predictor.config.outlier_k + int(exclude_self), len(references))
    distance = knn_distance_score(embeddings, references, k=k)
    flags = None if predictor.outlier_threshold is None else distance > predictor.outlier_threshold
    return RegionPredictions(embeddings.numpy(), probs, probs.argmax(1), probs.max(1), distance,
                             energy_score(logits, temperature), flags)


@torch.no_grad()
def predict_regions(artifacts: "DiscoveryArtifacts | DiscoveryPredictor", regions: Sequence[Region]
                    ) -> RegionPredictions:
    """Label new regions with a trained model: cluster, confidence, outlier scores (full forward, no cache)."""
    predictor = artifacts.predictor if isinstance(artifacts, DiscoveryArtifacts) else artifacts
    if not regions:
        raise ValueError("predict_regions: no regions")
    device = next(predictor.model.parameters()).device
    data = RegionTensors.build([dataclasses.replace(r, class_name=None) for r in regions],
                               predictor.config.image_size, predictor.base_classes)
    embeddings = embed(predictor.model, data, torch.arange(len(regions)), None, device)
    return score_embeddings(predictor, embeddings)


@dataclass
class DiscoveryArtifacts:
    """Results of ``train_discovery``: the predictor, the novel regions' predictions (input order), image labels
    merged by area (``images[id].label`` novel class, ``.region_labels`` every region's), per-image confidence and
    outlier score, the class count (``k``, and ``k_estimated`` with the criterion per k for ``k="auto"``),
    label-free metrics and the per-epoch history."""

    predictor: DiscoveryPredictor
    regions: RegionPredictions
    image_ids: list[str]
    images: dict[str, ImagePrediction]
    image_confidence: dict[str, float]
    image_outlier_scores: dict[str, float]
    k: int
    k_estimated: Optional[int]
    k_scores: Optional[dict[int, float]]
    metrics: dict
    history: list[dict]


def novel_prototypes(trained: TrainedModel, embeddings: np.ndarray, config: DiscoveryConfig
                     ) -> tuple[torch.Tensor, Optional[ClassCountEstimate]]:
    """The best head's prototypes, base first. With ``assign="kmeans"`` (or ``k="auto"``, which estimates K on
    the embeddings first) the novel prototypes are the unit k-means centres of the novel embeddings."""
    prototypes = trained.model.head.prototypes()[int(trained.model.head.best_head)].detach().cpu()
    n_base = len(trained.classes)
    estimate = None
    k = config.n_novel_prototypes
    if config.k == "auto":
        k_max = min(config.k_max, len(embeddings) - 1)
        estimate = (ClassCountEstimate(1, {1: 0.0}, config.k_method) if k_max < 2 else
                    estimate_class_count(embeddings, k_min=2, k_max=k_max, method=config.k_method, seed=config.seed,
                                         prototypes=prototypes[n_base:].numpy(), temperature=config.temperature))
        k = estimate.k
    elif config.assign == "head" or k > len(embeddings):
        return prototypes, None
    centres = KMeans(k, n_init=10, random_state=config.seed).fit(embeddings).cluster_centers_
    novel = F.normalize(torch.from_numpy(centres).float(), dim=-1)
    return torch.cat([prototypes[:n_base], novel]), estimate


def merge_images(regions: Sequence[Region], probs: np.ndarray) -> dict[str, ImagePrediction]:
    """Area-weighted merging per image with τ from each image's size (``default_tau``)."""
    merged: dict[str, ImagePrediction] = {}
    taus = np.array([default_tau(r.image_size) for r in regions])
    for tau in np.unique(taus):
        rows = np.flatnonzero(taus == tau)
        merged |= merge_by_image([regions[i].image_id for i in rows], probs[rows], [regions[i].area for i in rows],
                                 n_base=0, tau=float(tau))
    order = list(dict.fromkeys(r.image_id for r in regions))
    return {image_id: merged[image_id] for image_id in order}


def label_free_metrics(trained: TrainedModel, predictions: RegionPredictions, val_embeddings: torch.Tensor,
                       val_scores: np.ndarray, threshold: Optional[float]) -> dict:
    """Metrics that read no label of the discovered images: final losses, base validation accuracy, silhouette."""
    last = trained.history[-1] if trained.history else {}
    metrics: dict[str, Any] = {"loss": last.get("total"), "cluster_loss_per_head": last.get("cluster_per_head"),
                               "best_head": int(trained.model.head.best_head), "train_seconds": trained.seconds,
                               "n_novel": trained.n_novel, "n_base_train": trained.n_base_train,
                               "n_base_val": len(val_embeddings),
                               "n_clusters_used": int(len(np.unique(predictions.clusters)))}
    if len(val_embeddings):
        head = trained.model.head.head_logits(val_embeddings)[:, :len(trained.classes)]
        val_labels = trained.data.labels[trained.n_novel + trained.n_base_train:]
        metrics["base_val_accuracy"] = float((head.argmax(1) == val_labels).float().mean())
        metrics["outlier_threshold"] = threshold
        metrics["base_val_accept_rate"] = float((val_scores <= threshold).mean())
    used = metrics["n_clusters_used"]
    if 2 <= used < len(predictions.clusters):
        metrics["silhouette"] = float(silhouette_score(predictions.embeddings, predictions.clusters, metric="cosine"))
    return metrics


def train_discovery(config: DiscoveryConfig, novel: Sequence[Region], base: Optional[Sequence[Region]] = None,
                    report_fn: Optional[Callable[[int, dict, Optional[Path]], None]] = None,
                    hooks: Optional[TrainHooks] = None) -> DiscoveryArtifacts:
    """Train on ``novel`` regions (their labels are never read) and, optionally, labelled ``base`` regions;
    then embed, assign, merge per image and score outliers. ``report_fn(epoch, metrics, checkpoint_dir)`` is
    called after every epoch."""
    _check_inputs(novel, base)
    trained = fit_discovery_model(config, novel, list(base or []), hooks or TrainHooks(), report_fn)
    device = next(trained.model.parameters()).device
    n_train = trained.n_novel + trained.n_base_train
    all_embeddings = embed(trained.model, trained.data, torch.arange(len(trained.data.labels)), trained.cache, device)
    novel_embeddings = all_embeddings[:trained.n_novel]
    prototypes, estimate = novel_prototypes(trained, novel_embeddings.numpy(), config)
    val_embeddings = all_embeddings[n_train:]
    references = all_embeddings[:n_train]
    val_scores = knn_distance_score(val_embeddings, references, k=min(config.outlier_k, n_train)) \
        if len(val_embeddings) else np.zeros(0)
    threshold = OutlierThreshold(config.outlier_accept_rate).fit(val_scores).threshold_ if len(val_scores) else None
    predictor = DiscoveryPredictor(config, trained.model.cpu(), trained.classes, prototypes, references, threshold)
    predictions = score_embeddings(predictor, novel_embeddings, exclude_self=True)
    images = merge_images(novel, predictions.probs)
    ids = [r.image_id for r in novel]
    metrics = label_free_metrics(trained, predictions, val_embeddings, val_scores, threshold)
    if threshold is None:
        metrics["notes"] = ["no base validation crops: outlier scores are given but no threshold is set"]
    return DiscoveryArtifacts(
        predictor, predictions, ids, images, {i: float(p.probs.max()) for i, p in images.items()},
        image_outlier_score(ids, predictions.outlier_score, "max"),
        prototypes.shape[0] - len(trained.classes), estimate.k if estimate else None,
        estimate.scores_by_k if estimate else None, metrics, trained.history)
