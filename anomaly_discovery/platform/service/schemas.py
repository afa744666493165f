"""Typed request and response bodies of the prediction and review API (``platform/service/app.py``).

Masks come back in one of two encodings (``?mask_format=``):

* ``png`` (default): ``png_base64`` is a base64 8-bit grey PNG of the image's size, 255 = defect, 0 = normal.
* ``rle``: ``counts`` are run lengths over the mask flattened in row-major (C) order, starting with a run of
  normal pixels (0 when the first pixel is defect); the runs alternate normal / defect and sum to H·W.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class Mask(BaseModel):
    format: Literal["png", "rle"]
    size: tuple[int, int] = Field(description="(height, width)")
    png_base64: Optional[str] = None
    counts: Optional[list[int]] = None


class RegionOut(BaseModel):
    box: tuple[int, int, int, int] = Field(description="x0, y0, x1, y1 (x1, y1 exclusive)")
    anomaly_score: float
    label: str = Field(description="class name, or 'new' (an open proposal) or 'unknown'")
    kind: Literal["class", "new", "unknown"]
    class_id: Optional[int] = None
    proposal_id: Optional[int] = None
    outlier_score: float = Field(description="k-NN cosine distance to known/confirmed regions (higher = less known)")
    similarity: float = Field(description="cosine to the chosen prototype / proposal centre")
    model_cluster: Optional[int] = Field(None, description="the discovery model's novel cluster of the region")
    model_outlier_score: Optional[float] = Field(None, description="the discovery model's outlier score of the region "
                                                 "(its outlier_score setting: the k-NN distance by default)")
    model_confidence: Optional[float] = None


class ImagePredictionOut(BaseModel):
    filename: str
    width: int
    height: int
    anomaly_score: float
    mask: Mask
    regions: list[RegionOut]


class PredictResponse(BaseModel):
    model_version: str
    images: list[ImagePredictionOut]


class IngestedRegionOut(RegionOut):
    region_id: int


class IngestedImageOut(BaseModel):
    filename: str
    image_id: int
    duplicate: bool = Field(description="the same bytes were ingested before; nothing new was stored")
    anomaly_score: float
    regions: list[IngestedRegionOut]


class IngestResponse(BaseModel):
    model_version: str
    images: list[IngestedImageOut]


class ClassOut(BaseModel):
    id: int
    name: str
    status: str
    version: int
    size: int = Field(description="regions now in the class")
    images: int = Field(0, description="images whose class the discovery model said this one is (merges followed)")
    parent_id: Optional[int] = None
    merged_into_id: Optional[int] = None


class ProposalOut(BaseModel):
    id: int
    class_id: int
    name: str
    status: str
    version: int
    size: int
    cohesion: float
    representative_region_ids: list[int]


class Reviewed(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reviewer: str = Field("api", min_length=1, max_length=200)


class ProposalDecision(Reviewed):
    """``confirm`` (needs ``name``), ``reject``, or ``merge`` into ``target_class_id``."""

    action: Literal["confirm", "reject", "merge"]
    expected_version: int = Field(ge=1, description="the proposal's version the reviewer saw")
    name: Optional[str] = Field(None, min_length=1, max_length=200)
    target_class_id: Optional[int] = None
    target_version: Optional[int] = Field(None, ge=1)


class ClassDecision(Reviewed):
    """``rename`` (needs ``name``), ``merge`` into ``target_class_id``, ``split`` into ``k`` parts."""

    action: Literal["rename", "merge", "split"]
    expected_version: int = Field(ge=1, description="the class's version the reviewer saw")
    name: Optional[str] = Field(None, min_length=1, max_length=200)
    target_class_id: Optional[int] = None
    target_version: Optional[int] = Field(None, ge=1)
    k: Optional[int] = Field(None, ge=2, le=64)


class MoveRequest(Reviewed):
    region_ids: list[int] = Field(min_length=1, max_length=10_000)
    class_id: Optional[int] = Field(None, description="target class; null = unassigned")
    expected_version: Optional[int] = Field(None, ge=1, description="the target class's version")


class DecisionOut(BaseModel):
    decision_id: int
    action: str
    class_ids: list[int]
    n_regions: int
    seconds: float


class ModelRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(min_length=1, max_length=200)
    artifact_path: str = Field(min_length=1, max_length=2048, description="a folder build_predictor can load")


class ModelOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_version: str
    embedding_dim: int
    store_active_version: Optional[str] = None


class Health(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    status: Literal["ok"]
    model_version: str
    regions: int
    classes: int
    open_proposals: int
    index: str
    writes_enabled: bool


class ErrorOut(BaseModel):
    detail: str
