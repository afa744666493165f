"""Settings of discovery training (methods.md §1 steps 5–7, §2): :class:`DiscoveryConfig`, shared by the training
loop, the model builder and a saved predictor."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from .augment import AugmentConfig
from .network import DEFAULT_VIT

RESULT_FIELDS = ("progress", "checkpoint_dir", "resume", "keep_checkpoints", "device")


@dataclass
class DiscoveryConfig:
    """Settings of ``train_discovery``. Defaults chosen on SYNTHETIC data (generator, seed 0; see the
    platform report / docs/benchmarks.md): image_size 128, embed_dim 192, 30 epochs, SGD lr 0.05
    (momentum 0.9, cosine to lr·1e-3), batch 64, 6 cached views, τ_t 0.07 → 0.04, PLC off (it pulls
    weakly scored crops of real defects into one cluster when no normal crops are among them). ``depth`` 2
    (was 4) was chosen on NEU-DET (benchmarks/discovery_selection.py: zero-shot NEU-DET crops as the novel set,
    selection score .463 against .405 for depth 4, confirmed on a second subset .421 against .352), and
    halves the training time.

    ``k``: number of novel classes, or ``"auto"`` (train ``k_max`` prototypes, estimate K with ``k_method``
    on the learned embeddings, relabel by k-means with K clusters). ``k_method`` "gap": on the demo's task
    (generated bottle defects, metal-plate classes as the base, seeds 1 and 2) silhouette chose K = 2 both times
    (NMI .326 / .335), gap and prototype wins K = 4 and 6 (NMI .545 / .609); prototype wins also needs a head
    confident enough to win assignments, which a short run (the quick demo's 2 epochs) does not have.
    """

    k: int | str = "auto"
    k_max: int = 10
    k_method: str = "gap"
    assign: str = "kmeans"
    backbone: str = "hybrid"
    cnn: str = "mobilenet_v2"
    cnn_weights: Optional[str] = None
    vit_model: str = DEFAULT_VIT
    vit_weights: Optional[str] = None
    trainable_blocks: int = 1
    embed_dim: int = 192
    depth: int = 2
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
