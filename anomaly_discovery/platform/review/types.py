"""Plain records of the review loop (``platform/review/loop.py``): its settings, what the discovery job and the API hand
it, and what its actions and labelling answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from anomaly_discovery.platform.review.mirror import AssignmentMirror
from anomaly_discovery.platform.review.proposals import ProposalConfig
from anomaly_discovery.platform.storage.embedding_file import EmbeddingFile
from anomaly_discovery.platform.storage.index import IndexConfig
from anomaly_discovery.platform.storage.models import ClassStatus


@dataclass(frozen=True)
class LoopConfig:
    """``k``: neighbour of the k-NN outlier score; ``accept_rate``: share of known members each threshold
    accepts; ``threshold_sample``: members scored to fit them; ``product`` / ``dataset``: where API arrivals go;
    ``background_save``: write index checkpoints in a background thread, coalescing the writes that arrive
    within ``save_delay_s`` (the store is the log: a checkpoint lost in a crash is replayed on open)."""

    k: int = 5
    accept_rate: float = 0.95
    threshold_sample: int = 2000
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    product: str = "default"
    dataset: str = "arrivals"
    use_gpu: bool = False
    cut_margin: float = 1.5
    background_save: bool = True
    save_delay_s: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.cut_margin <= 0:
            raise ValueError(f"cut_margin must be > 0, got {self.cut_margin}")
        if self.k < 1 or not 0 < self.accept_rate <= 1 or self.threshold_sample < 2:
            raise ValueError(f"LoopConfig needs k >= 1, accept_rate in (0, 1] and threshold_sample >= 2, got {self}")


@dataclass
class ClassInfo:
    id: int
    name: str
    status: ClassStatus
    version: int
    parent_id: int | None
    merged_into_id: int | None


@dataclass(frozen=True)
class RegionLabel:
    """``kind`` is ``"class"`` (a known/confirmed class), ``"new"`` (an open proposal) or ``"unknown"``;
    ``name`` the class name, ``"new"`` or ``"unknown"``; ``similarity`` the cosine to the chosen centre."""

    kind: str
    name: str
    class_id: int | None
    outlier_score: float
    similarity: float


@dataclass(frozen=True)
class ActionResult:
    decision_id: int
    action: str
    class_ids: list[int]
    n_regions: int
    seconds: float


@dataclass(frozen=True)
class DiscoveredImage:
    """An image of a discovery run; ``cluster`` the discovery model's image class (its novel cluster)."""

    key: str
    path: str
    content_hash: str
    split: str = "test"
    cluster: int | None = None


@dataclass(frozen=True)
class DiscoveredRegion:
    """A region found by the discovery job: ``class_name`` a known class the model assigned, or ``cluster`` the
    discovery model's novel cluster (``is_outlier``: over the model's outlier threshold), else neither."""

    image_key: str
    box: tuple[int, int, int, int]
    anomaly_score: float
    embedding: np.ndarray
    class_name: str | None = None
    confidence: float | None = None
    mask_path: str | None = None
    cluster: int | None = None
    is_outlier: bool = False


@dataclass(frozen=True)
class ArrivedImage:
    path: str
    content_hash: str
    split: str = "arrival"


@dataclass(frozen=True)
class IngestedImage:
    image_id: int
    region_ids: list[int]
    labels: list[RegionLabel]
    duplicate: bool


@dataclass
class Thresholds:
    """``knn`` / ``prototype``: outlier thresholds on the k-NN score and on the distance to the nearest
    prototype (also the radius of "near a proposal"); ``cut``: the clustering cut on mean pairwise cosine
    distance, ``margin`` × the members' mean pairwise distance 1 − ‖mean‖² of the reference classes."""

    knn: float | None = None
    prototype: float | None = None
    cut: float | None = None


class ReviewContext(Protocol):
    """What reviewer actions and proposals read of the loop (``DiscoveryLoop`` is one): its settings, the mirror
    of current assignments, the embeddings, and how it labels embeddings and groups outliers."""

    config: LoopConfig
    mirror: AssignmentMirror
    embeddings: EmbeddingFile

    def label_embeddings(self, vectors: np.ndarray) -> list[RegionLabel]: ...

    def near_radius(self) -> float: ...

    def proposal_config(self) -> ProposalConfig: ...
