"""What the review decided, read in one go (issue 15): every region with its current class and status, the
classes, the active model version and the newest audit entry, all from ONE snapshot transaction of the store
(``store.begin_snapshot``), so an export or report reflects exactly one state of the store.

Region status (``STATUSES``), from the region's current assignment:

* ``known`` / ``confirmed``: its class is a known (base) class, or a class a reviewer confirmed;
* ``proposed``: its class is a proposal still waiting for review;
* ``unknown``: no class, as the model left it (an outlier in no proposal yet);
* ``rejected``: no class because a reviewer said so (rejected its proposal, or unassigned / dropped it; the loop
  never proposes it again).

``confidence`` is the assignment's (the model's similarity, 1.0 for a reviewer's); ``decided_by`` the reviewer of
the decision that wrote the current assignment when a reviewer made it (source ``reviewer``), else ``model``;
``decided_at`` when that assignment was written. ``outlier_score`` is the review loop's k-NN score
(``platform/review/labelling.py``): 1 − cos to the k-th nearest embedding of a known / confirmed region other than
the region itself, against this snapshot's reference set; empty when the embeddings file is missing or there are
fewer than k + 1 reference regions (``outlier_note`` says which). ``model_version`` is the store's active model
version (the store records no model per region) and ``reflects_decision_id`` the newest audit entry the snapshot
holds, the same on every row so that a CSV names them by itself. Boxes are (x0, y0, x1, y1), x1 / y1 exclusive.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from anomaly_discovery.platform.review.proposals import prototype, representatives
from anomaly_discovery.platform.review.types import LoopConfig
from anomaly_discovery.platform.storage.embedding_file import EmbeddingFile
from anomaly_discovery.platform.storage.index import PrototypeIndex
from anomaly_discovery.platform.storage.models import (Assignment, AssignmentSource, ClassStatus, Dataset, Decision,
                                                       DefectClass, Image, Proposal, ProposalStatus, Region, utc_now)
from anomaly_discovery.platform.storage.store import Store, active_model_version, begin_snapshot

STATUSES = ("known", "confirmed", "proposed", "unknown", "rejected")
CLASS_STATUSES = ("known", "confirmed")
REGION_COLUMNS = ("region_id", "image_id", "image_path", "x0", "y0", "x1", "y1", "class_id", "class_name", "status",
                  "confidence", "outlier_score", "anomaly_score", "source", "decided_by", "decided_at", "decision_id",
                  "proposal_id", "dataset", "arrived_at", "mask_path", "model_version", "reflects_decision_id")
IMAGE_COLUMNS = ("image_id", "image_path", "dataset", "arrived_at")
REPRESENTATIVES = 6


@dataclass(frozen=True)
class ExportClass:
    """A class that holds regions (or a confirmed / known one that no longer does); ``representatives``: up to
    six member region ids nearest the class prototype (highest confidence without embeddings)."""

    id: int
    name: str
    status: str
    regions: int
    proposal_id: int | None
    representatives: tuple[int, ...]


@dataclass(frozen=True)
class LastDecision:
    id: int
    action: str
    reviewer: str
    at: datetime


@dataclass(frozen=True)
class ExportSnapshot:
    """One state of the store; ``regions`` has ``REGION_COLUMNS`` (one row per region, by id), ``images``
    ``IMAGE_COLUMNS`` (every image, with or without regions)."""

    created_at: datetime
    store: str
    model_version: str
    last_decision: LastDecision | None
    classes: list[ExportClass]
    regions: pd.DataFrame
    images: pd.DataFrame
    outlier_note: str

    def counts(self) -> dict[str, int]:
        """Regions per status, every status named."""
        found = self.regions["status"].value_counts()
        return {status: int(found.get(status, 0)) for status in STATUSES}

    def describe(self) -> dict:
        """What the export reflects (its manifest header)."""
        last = self.last_decision
        return {"created_at": self.created_at.isoformat(), "store": self.store, "model_version": self.model_version,
                "last_decision": None if last is None else {"id": last.id, "action": last.action,
                                                             "reviewer": last.reviewer, "at": last.at.isoformat()},
                "regions": len(self.regions), "images": len(self.images), "regions_per_status": self.counts(),
                "outlier_score": self.outlier_note}


def regions_csv(regions: pd.DataFrame) -> bytes:
    """A region table as CSV bytes (the ``csv`` export): times in ISO 8601 with their UTC offset, missing values
    empty."""
    table = regions.copy()
    for column in table.columns:
        if isinstance(table[column].dtype, pd.DatetimeTZDtype):
            table[column] = [value.isoformat() if not pd.isna(value) else "" for value in table[column]]
    return table.to_csv(index=False).encode()


def live_class(class_id: int, classes: dict[int, DefectClass]) -> DefectClass | None:
    """The class a region of ``class_id`` belongs to now: a merged class's chain followed to its end."""
    row, hops = classes.get(class_id), 0
    while row is not None and row.status == ClassStatus.MERGED and row.merged_into_id is not None and \
            hops < len(classes):
        row, hops = classes.get(row.merged_into_id), hops + 1
    return row


def region_status(row: DefectClass | None, source: AssignmentSource | None) -> str:
    """One of ``STATUSES`` (see the module docstring). A class that is no longer live (rejected, or merged into
    nothing) holds no current assignment after a loop action; a region left in one reads as rejected."""
    if row is None:
        return "rejected" if source == AssignmentSource.REVIEWER else "unknown"
    if row.status in (ClassStatus.REJECTED, ClassStatus.MERGED):
        return "rejected"
    return ClassStatus(row.status).value


def knn_outlier_scores(embeddings: EmbeddingFile | None, embedding_ids: np.ndarray, reference: np.ndarray,
                       k: int) -> tuple[np.ndarray, str]:
    """(score per region, NaN where there is none; a note saying how they were computed) — the loop's leave-one-out
    k-NN score against the reference regions (``reference``: a mask over ``embedding_ids``, -1 = no embedding)."""
    scores = np.full(len(embedding_ids), np.nan)
    if embeddings is None:
        return scores, "not computed: the embeddings file beside the index is missing"
    with_vector = embedding_ids >= 0
    reference_ids = embedding_ids[reference & with_vector]
    if len(reference_ids) < k + 1:
        return scores, (f"not computed: {len(reference_ids)} known/confirmed regions, the k-NN score needs at least "
                        f"k + 1 = {k + 1}")
    index = PrototypeIndex(embeddings.dim)
    index.add(reference_ids, embeddings.get(reference_ids), kind="region")
    queries = embedding_ids[with_vector]
    if len(queries):
        scores[with_vector] = index.knn_outlier_scores(embeddings.get(queries), k, exclude_ids=queries)
    return scores, (f"k-NN outlier score, k = {k}: 1 - cosine to the k-th nearest of {len(reference_ids)} "
                    "known/confirmed regions (the region itself left out)")


def _representatives(members: pd.DataFrame, embeddings: EmbeddingFile | None) -> tuple[int, ...]:
    ids = members["region_id"].to_numpy(np.int64)
    embedding_ids = members["embedding_id"].to_numpy(np.int64)
    if embeddings is not None and len(ids) and (embedding_ids >= 0).all():
        vectors = embeddings.get(embedding_ids)
        return tuple(representatives(vectors, prototype(vectors), ids, REPRESENTATIVES))
    ranked = members.sort_values(["confidence", "anomaly_score"], ascending=False, na_position="last")
    return tuple(int(r) for r in ranked["region_id"].head(REPRESENTATIVES))


def _region_frame(session: Session, classes: dict[int, DefectClass], open_proposals: dict[int, int]) -> pd.DataFrame:
    rows = session.execute(
        select(Region.id, Region.image_id, Image.path, Region.x0, Region.y0, Region.x1, Region.y1,
               Assignment.class_id, Assignment.confidence, Region.anomaly_score, Assignment.source,
               Decision.reviewer, Assignment.created_at, Assignment.decision_id, Dataset.name, Image.arrived_at,
               Region.mask_path, Region.embedding_id)
        .join(Image, Image.id == Region.image_id).join(Dataset, Dataset.id == Image.dataset_id)
        .outerjoin(Assignment, and_(Assignment.region_id == Region.id, Assignment.is_current.is_(True)))
        .outerjoin(Decision, Decision.id == Assignment.decision_id)
        .order_by(Region.id)).all()
    records = []
    for (region_id, image_id, path, x0, y0, x1, y1, class_id, confidence, anomaly_score, source, reviewer, at,
         decision_id, dataset, arrived_at, mask_path, embedding_id) in rows:
        source = AssignmentSource(source) if source is not None else None
        row = live_class(class_id, classes) if class_id is not None else None
        status = region_status(row, source)
        live = row if status not in ("unknown", "rejected") else None
        records.append((region_id, image_id, path, x0, y0, x1, y1, live.id if live else None,
                        live.name if live else "", status, confidence, np.nan, anomaly_score,
                        source.value if source else "", reviewer if source == AssignmentSource.REVIEWER and reviewer
                        else "model", at, decision_id, open_proposals.get(live.id) if live else None, dataset,
                        arrived_at, mask_path or "", -1 if embedding_id is None else embedding_id))
    frame = pd.DataFrame.from_records(records, columns=[*REGION_COLUMNS[:-2], "embedding_id"])
    for column in ("class_id", "decision_id", "proposal_id"):
        frame[column] = frame[column].astype("Int64")
    for column in ("confidence", "outlier_score", "anomaly_score"):
        frame[column] = frame[column].astype(float)
    return frame


def read_snapshot(store: Store, embeddings: EmbeddingFile | None = None, k: int = LoopConfig.k) -> ExportSnapshot:
    """The store's current state (see the module docstring); ``embeddings``: the loop's embeddings file, for the
    outlier scores and representatives."""
    with store.session() as session:
        begin_snapshot(session)
        classes = {row.id: row for row in session.scalars(select(DefectClass).order_by(DefectClass.id))}
        open_proposals = dict(session.execute(select(Proposal.class_id, Proposal.id)
                                              .where(Proposal.status == ProposalStatus.OPEN)).all())
        regions = _region_frame(session, classes, open_proposals)
        images = pd.DataFrame(session.execute(
            select(Image.id, Image.path, Dataset.name, Image.arrived_at).join(Dataset, Dataset.id == Image.dataset_id)
            .order_by(Image.id)).all(), columns=list(IMAGE_COLUMNS))
        last = session.execute(select(Decision.id, Decision.action, Decision.reviewer, Decision.created_at)
                               .order_by(Decision.id.desc()).limit(1)).first()
        active = active_model_version(session)
        model_version = active.name if active is not None else "none"
    embedding_ids = regions["embedding_id"].to_numpy(np.int64)
    scores, note = knn_outlier_scores(embeddings, embedding_ids, regions["status"].isin(CLASS_STATUSES).to_numpy(), k)
    regions["outlier_score"] = scores
    regions["model_version"] = model_version
    regions["reflects_decision_id"] = pd.array([last[0] if last is not None else None] * len(regions), "Int64")
    members = {class_id: group for class_id, group in regions.groupby("class_id")}
    shown = [row for row in classes.values() if row.id in members or row.status in
             (ClassStatus.KNOWN, ClassStatus.CONFIRMED)]
    export_classes = [ExportClass(row.id, row.name, ClassStatus(row.status).value, len(members.get(row.id, ())),
                                  open_proposals.get(row.id),
                                  _representatives(members[row.id], embeddings) if row.id in members else ())
                      for row in shown]
    return ExportSnapshot(utc_now(), store.engine.url.render_as_string(hide_password=True), model_version,
                          LastDecision(*last) if last is not None else None, export_classes,
                          regions[list(REGION_COLUMNS)].reset_index(drop=True), images, note)
