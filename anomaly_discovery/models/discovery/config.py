"""Settings of discovery (methods.md §1 steps 5–7, §2): :class:`DiscoveryConfig`, four groups shared by the
training loop, the model builder and a saved predictor.

* ``model`` (:class:`ModelSettings`): the network — backbone, AMGA guidance, sizes, prototype temperature;
* ``optimisation`` (:class:`OptimisationSettings`): epochs, optimiser, losses and their weights, view cache,
  augmentation, the base validation split;
* ``classes`` (:class:`ClassSettings`): how many novel classes (given or estimated) and how regions are
  assigned and flagged as unseen outliers;
* ``runtime`` (:class:`RuntimeSettings`): seed, device, checkpoints, progress bars.

Every setting's name is unique across the groups, so ``DiscoveryConfig.of(epochs=3, k=4)`` and
``config.replace(lr=0.01)`` take them flat, and a settings file may be flat (as every file before the grouping
was) or grouped. ``fingerprint()`` is the flat dict of the settings that change results, as before.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .augment import AugmentConfig
from .class_count import METHODS as CLASS_COUNT_METHODS
from .network import DEFAULT_VIT
from .outliers import OUTLIER_SCORES
from .views import IMAGE_TURNS

RESULT_FIELDS = ("progress", "checkpoint_dir", "resume", "keep_checkpoints", "device")
MODEL_KINDS = ("learned", "frozen", "transformer")
PROTOTYPE_INITS = ("regions", "images")
OWN_PROJECTIONS = ("auto", "always", "never")
TRANSFORMER_FIELDS = frozenset({"backbone", "embed_dim", "depth", "attention_heads", "n_guided_blocks",
                                "guided_pooling", "projection_hidden", "projection_dim", "n_heads"})


def _check_choice(owner: object, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(owner, name) not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(owner, name)!r}")


def _check_positive(owner: object, *names: str) -> None:
    for name in names:
        if getattr(owner, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(owner, name)}")


@dataclass(frozen=True)
class ModelSettings:
    """The model. ``kind``:

    * ``"learned"`` (default): frozen views of each region (``views``: mask-pooled depths, crop, whole image; the
      normal images' main variation removed, or the run's own images' (``own_projection``); view weights chosen
      without labels), AMGA pooling and cosine prototypes trained by neighbour consistency (``amga_pooling``,
      ``neighbour_consistency``); untrained it equals ``"frozen"``.
    * ``"frozen"``: the same views clustered by k-means, no training: the floor every table shows.
    * ``"transformer"``: the earlier model, an AMGA transformer over a stride-16 CNN map trained from scratch
      (``network``, ``model``); saved models of it still load.

    ``cnn`` is the frozen ImageNet backbone of every kind (MobileNetV2 beat EfficientNet-Lite0 on NEU-DET and
    generated data in the views' tests, .879 against .838 NMI on NEU-DET's whole images); ``view_size`` the side
    crops and images are read at, ``nuisance_components`` how many principal directions of the normal images are
    removed (chosen on generated bottles: NMI .49 → .65 with 10), ``own_projection`` whether, without normal images,
    the run's own images stand in for them (``frozen.own_image_projection``; ``auto``: only when those images do not
    form K tight groups, chosen by ``discovery_selection.py``'s part ``own_projection``; ``always``; ``never``),
    ``image_turns`` whether the image view reads the whole image as it is (1) or averages it over its 4 quarter
    turns (``benchmarks/image_turns_selection.py``: 4 raised the floor's mean NMI, K given, .711 → .734 on the
    selection tasks and .677 → .715 on fresh draws, most on NEU-DET's steel, but its three more backbone passes per
    whole and normal image take the frozen floor on MTD past its one-minute target, so 1 stays the default),
    ``adapter_width`` the hidden width of the learned model's zero-initialised residual adapter (0: none; widths 32
    and 128 lost to none in ``discovery_selection.py``'s part ``adapter``, on μ = 1: mean NMI .779 and .793 against
    .797). The transformer's fields (``backbone`` to ``projection_dim``): ``depth`` 2 (was 4) was chosen on NEU-DET
    (benchmarks/discovery_selection.py), image_size 128 and embed_dim 192 on synthetic data."""

    kind: str = "learned"
    cnn: str = "mobilenet_v2"
    view_size: int = 224
    nuisance_components: int = 10
    own_projection: str = "auto"
    image_turns: int = 1
    adapter_width: int = 0
    temperature: float = 0.1
    backbone: str = "hybrid"
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

    def __post_init__(self) -> None:
        _check_choice(self, "kind", MODEL_KINDS)
        _check_choice(self, "backbone", ("hybrid", "vit"))
        _check_choice(self, "guidance", ("none", "hard", "amga"))
        _check_choice(self, "own_projection", OWN_PROJECTIONS)
        if self.image_turns not in IMAGE_TURNS:
            raise ValueError(f"image_turns must be one of {', '.join(map(str, IMAGE_TURNS))}, got {self.image_turns!r}")
        _check_positive(self, "image_size", "n_heads", "depth", "view_size")
        for name in ("nuisance_components", "adapter_width"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")

    @property
    def uses_views(self) -> bool:
        return self.kind in ("frozen", "learned")


@dataclass(frozen=True)
class OptimisationSettings:
    """Training. The learned view model (``neighbour_consistency``, Adam) reads ``epochs``, ``batch_size``,
    ``consistency_lr`` (its prototypes; the pooling learns at a tenth of it), ``consistency_entropy_weight`` (μ of
    L_reg^u), ``marginal`` (the prior L_reg^u pulls the batch's mean assignment to: ``uniform``, the paper's, or
    ``floor``, the floor's own cluster shares), ``supervised_weight`` (the known classes' cross-entropy),
    ``neighbours`` (mined in the frozen embedding; at most half a cluster's mean size), ``consistency_views``
    (cached views per crop, the first un-augmented) and ``augment``; chosen on NEU-DET and generated data (μ = 1 by
    ``discovery_selection.py``'s part ``marginal``). The transformer reads the rest; its values were chosen on
    synthetic data: SGD lr 0.05 (momentum 0.9, cosine to lr·1e-3), 6 cached views, τ_t 0.07 → 0.04, PLC off."""

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
    neighbours: int = 10
    consistency_lr: float = 0.01
    consistency_views: int = 2
    self_label_epochs: int = 0
    consistency_entropy_weight: float = 1.0
    marginal: str = "uniform"

    def __post_init__(self) -> None:
        if isinstance(self.augment, Mapping):
            object.__setattr__(self, "augment", AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                                 for k, v in self.augment.items()}))
        object.__setattr__(self, "teacher_temperature", tuple(self.teacher_temperature))
        _check_choice(self, "optimizer", ("sgd", "adamw"))
        _check_choice(self, "marginal", ("uniform", "floor"))
        _check_positive(self, "epochs", "batch_size")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (contrastive pairs), got {self.batch_size}")
        _check_positive(self, "neighbours", "consistency_views")
        if self.cached_views == 1 or self.cached_views < 0:
            raise ValueError(f"cached_views must be 0 (augment online) or at least 2, got {self.cached_views}")
        if not 0 <= self.base_val_fraction < 1:
            raise ValueError(f"base_val_fraction must lie in [0, 1), got {self.base_val_fraction}")


@dataclass(frozen=True)
class ClassSettings:
    """How many novel classes and how regions get them. ``k``: a number, or ``"auto"``: estimated with
    ``k_method`` (``class_count``; the default ``prediction_strength_or_consensus``, prediction strength and the
    consensus where it stops at k = 2, was chosen on NEU-DET and generated data by
    ``benchmarks/class_count_floor_selection.py``: 52 of 70 estimates within ±1 on new draws against 42) in
    [2, ``k_max``], on the image level of the view models' floor embedding (the transformer: on its learned
    embeddings, then relabelled by k-means). ``outlier_score``: how far a crop lies from the known ones, ``knn`` (the
    cosine distance to its ``outlier_k``-th nearest known crop) or ``lof`` (the local outlier factor over its
    ``outlier_k`` nearest, ``outliers.local_outlier_factor_score``), whose threshold accepts ``outlier_accept_rate``
    of held-out base crops. For ``knn``, ``outlier_k`` = 1 (was 5) was chosen leaving one class out on NEU-DET and
    generated data (``benchmarks/discovery_selection.py``, part ``open_world``: mean unseen-class AUROC .869 against
    .841 for 5 and .820 for 10, over 32 held-out classes). The part ``open_world_score`` picked the local outlier
    factor at k = 10 by its rule (.883 against .860 on the same kind of tasks, .868 against .858 on fresh draws);
    it was vetoed, outside the rule and on MTD's labels, when MTD's leave-one-class-out run fell from .893 to .692
    with it (every held-out class lower; the cause is not known: MTD's images hold as many crops as NEU-DET's, 1.31
    against 1.22 to 1.33, and the rule's tasks had shown swings of a class either way, NEU-DET inclusion .959 →
    .780; one difference found, label-free: NEU-DET's view rule picks the whole image, so an image's crops share one
    embedding, and 42% of a NEU-DET draw's crops have a neighbour at distance 0, from their own image, which the
    density estimates of the rule's tasks saw; no MTD crop, region view, lies within .01 of another), so ``knn``
    stays the default. ``prototype_init``: what the view models' novel prototypes start from,
    k-means over the novel ``regions`` or over the ``images`` (each image's regions' embeddings averaged with their
    areas, as K is estimated: a class is a property of an image, and an image with several regions or a spurious
    one then pulls the centres no more than any other).
    ``regions`` stays the default by ``discovery_selection.py``'s part ``prototype_init``: the learned model ends
    where it ends from either start (mean NMI .797 both ways on the ten tasks; .765 against .755 on the small sets);
    the untrained floor gains from ``images`` (.746 → .760; small sets .742 → .761), which ``kind="frozen"`` runs
    may set."""

    k: int | str = "auto"
    k_max: int = 10
    k_method: str = "prediction_strength_or_consensus"
    prototype_init: str = "regions"
    assign: str = "kmeans"
    outlier_score: str = "knn"
    outlier_k: int = 1
    outlier_accept_rate: float = 0.95

    def __post_init__(self) -> None:
        if not (self.k == "auto" or (isinstance(self.k, int) and self.k >= 1)):
            raise ValueError(f"k must be a positive integer or 'auto', got {self.k!r}")
        if self.k == "auto" and self.k_max < 2:
            raise ValueError(f"k_max must be at least 2 with k='auto', got {self.k_max}")
        _check_choice(self, "k_method", CLASS_COUNT_METHODS)
        _check_choice(self, "assign", ("head", "kmeans"))
        _check_choice(self, "prototype_init", PROTOTYPE_INITS)
        _check_choice(self, "outlier_score", OUTLIER_SCORES)
        _check_positive(self, "outlier_k")


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how a run executes; only ``seed`` and ``compile`` are part of its fingerprint."""

    seed: int = 0
    device: str = "auto"
    compile: bool = False
    checkpoint_dir: Optional[str] = None
    resume: bool = False
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        _check_positive(self, "keep_checkpoints")


GROUPS = {"model": ModelSettings, "optimisation": OptimisationSettings, "classes": ClassSettings,
          "runtime": RuntimeSettings}
GROUP_OF = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class DiscoveryConfig:
    """Settings of ``train_discovery``, in four groups (module docstring)."""

    model: ModelSettings = field(default_factory=ModelSettings)
    optimisation: OptimisationSettings = field(default_factory=OptimisationSettings)
    classes: ClassSettings = field(default_factory=ClassSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)

    def __post_init__(self) -> None:
        for group, cls in GROUPS.items():
            value = getattr(self, group)
            if isinstance(value, Mapping):
                object.__setattr__(self, group, cls(**value))
            elif not isinstance(value, cls):
                raise ValueError(f"{group} must be {cls.__name__} settings, got {type(value).__name__}")

    @classmethod
    def of(cls, **settings: Any) -> "DiscoveryConfig":
        """Defaults with the given settings, named flat (``DiscoveryConfig.of(epochs=3, k=4)``)."""
        return cls().replace(**settings)

    def replace(self, **settings: Any) -> "DiscoveryConfig":
        """A copy with the given settings changed, named flat; an unknown name is an error naming it."""
        unknown = sorted(set(settings) - set(GROUP_OF))
        if unknown:
            raise ValueError(f"unknown discovery setting(s) {', '.join(unknown)}; known: {', '.join(sorted(GROUP_OF))}")
        groups = {}
        for group in GROUPS:
            changes = {name: value for name, value in settings.items() if GROUP_OF[name] == group}
            if changes:
                groups[group] = dataclasses.replace(getattr(self, group), **changes)
        return dataclasses.replace(self, **groups)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DiscoveryConfig":
        """Settings as written to a file: grouped (``{"model": {...}, ...}``) or flat (files written before the
        grouping), or a mix. A file that sets the transformer's own fields but no ``kind`` was written before
        there were other kinds, and is read as ``kind: transformer``."""
        flat = {}
        for key, value in values.items():
            if key in GROUPS and isinstance(value, Mapping):
                flat.update(value)
            else:
                flat[key] = value
        if "kind" not in flat and TRANSFORMER_FIELDS & set(flat):
            flat["kind"] = "transformer"
        return cls.of(**flat)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The settings that change results, grouped, as JSON-ready values: what a settings file or a saved
        model holds (``from_dict`` reads them back; where a run executes, its device, checkpoints and progress
        bars, is left out)."""
        values = json.loads(json.dumps(dataclasses.asdict(self)))
        return {group: {k: v for k, v in settings.items() if k not in RESULT_FIELDS}
                for group, settings in values.items()}

    @property
    def n_novel_prototypes(self) -> int:
        return self.classes.k_max if self.classes.k == "auto" else int(self.classes.k)

    @property
    def uses_cache(self) -> bool:
        """Cached views need a frozen patch embedding: the hybrid backbone with a frozen CNN."""
        return (self.optimisation.cached_views >= 2 and self.model.backbone == "hybrid"
                and self.model.trainable_cnn_stages == 0)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change results, flat (compared when resuming; the same keys as before the
        grouping, so older checkpoints compare too)."""
        return {name: value for group in self.to_dict().values() for name, value in group.items()}
