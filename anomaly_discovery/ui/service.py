"""What the dashboard reads and runs, in one object per store: no Streamlit here, no rules of its own.

The dashboard talks to the store directly, through the same :class:`DiscoveryLoop` the Serve API uses: every
reviewer action is a loop method (``service.loop.confirm(...)`` and so on), which checks versions, audits and
keeps the index consistent; this module only reads (classes, proposals, regions, decisions, arrivals), runs the
predictor for the Inspect page and scores the current assignments against known labels for the Evaluation page.
Several processes may share one store and index folder (see ``platform/review/loop.py``), so the dashboard and a
running ``adisc serve`` can review the same data; ``refresh`` catches up with the others' changes.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import func, select

from anomaly_discovery.data.images import decode_upload
from anomaly_discovery.models.metrics import clustering_report
from anomaly_discovery.platform.storage.embedding_file import stored_dim
from anomaly_discovery.platform.jobs.evaluate import ground_truth
from anomaly_discovery.platform.storage.index import read_index_metadata
from anomaly_discovery.platform.review.loop import DiscoveryLoop
from anomaly_discovery.platform.export.job import export_bytes
from anomaly_discovery.platform.export.report import render_report
from anomaly_discovery.platform.export.snapshot import ExportSnapshot, read_snapshot
from anomaly_discovery.platform.review.mirror import NO_ID, SOURCE_CODE, active_embeddings_path
from anomaly_discovery.platform.review.types import LoopConfig, RegionLabel
from anomaly_discovery.platform.predictor import MANIFEST, PredictedImage, RegionPredictor, build_predictor
from anomaly_discovery.platform.review.actions import LIVE, REFERENCE
from anomaly_discovery.platform.storage.store import Store, active_model_version
from anomaly_discovery.platform.storage.models import (AssignmentSource, ClassStatus, Dataset, Decision, DefectClass,
                                                       Image, Proposal, ProposalStatus, Region)
from anomaly_discovery.ui.settings import UISettings

JOB_STATUS_FILE = "job_status.json"
ACTIVE_LOOP_FILE = "active_loop.json"
REPOSITORY_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
UNKNOWN = "unknown"
REJECTED = "rejected"
REVIEWER_CODE = SOURCE_CODE[AssignmentSource.REVIEWER]
MAX_UPLOAD_PIXELS = 40_000_000


def embedding_dim(store: Store, index_path: Path) -> int:
    """The dimension of the active model's embeddings: its embeddings file's header, else the index metadata."""
    path = active_embeddings_path(store, index_path)
    dim = stored_dim(path)
    if dim is not None:
        return dim
    if index_path.is_file():
        return int(read_index_metadata(index_path)["dim"])
    raise FileNotFoundError(f"neither {path} nor {index_path} exists: no embedding dimension to open the index with")


@dataclass(frozen=True)
class ClassRow:
    id: int
    name: str
    status: str
    size: int
    version: int
    images: int = 0


@dataclass(frozen=True)
class ProposalRow:
    id: int
    class_id: int
    name: str
    size: int
    cohesion: float
    version: int
    class_version: int
    representatives: list[int]
    created_at: datetime


@dataclass(frozen=True)
class RegionRow:
    id: int
    image_path: str
    box: tuple[int, int, int, int]
    mask_path: str | None
    anomaly_score: float


@dataclass
class Inspection:
    """An uploaded image, the predictor's output for it and the loop's label of each region."""

    image: np.ndarray
    prediction: PredictedImage
    labels: list[RegionLabel]
    model_version: str


@dataclass
class Evaluation:
    """Current assignments scored against known labels: ``metrics`` from ``models.metrics.clustering_report``,
    ``confusion`` (true label × current class, ``unknown`` for unassigned), regions scored and left out."""

    metrics: dict[str, float]
    confusion: pd.DataFrame
    n_scored: int
    n_without_label: int


class ReviewService:
    """The store, its review loop and (lazily) the predictor, for one dashboard process."""

    def __init__(self, settings: UISettings, config: LoopConfig | None = None):
        self.settings = settings
        self.store = Store(settings.store)
        self.config = config
        self.loop = DiscoveryLoop(self.store, settings.index, embedding_dim(self.store, settings.index), config)
        self._predictor: tuple[Path, RegionPredictor] | None = None
        self._predictor_lock = threading.Lock()

    def refresh(self) -> None:
        """Catch up with changes other processes (the service, another dashboard) made to the store; when another
        model version was activated, open the loop on its embeddings."""
        self.loop.sync()
        if self.loop.stale:
            old = self.loop
            self.loop = DiscoveryLoop(self.store, self.settings.index, embedding_dim(self.store, self.settings.index),
                                      self.config)
            old.close()

    # ------------------------------------------------------------------ classes and proposals
    def classes(self, statuses=LIVE) -> list[ClassRow]:
        sizes, images = self.loop.class_sizes(), self.loop.image_counts()
        with self.loop.lock:
            return [ClassRow(c.id, c.name, ClassStatus(c.status).value, sizes.get(c.id, 0), c.version,
                             images.get(c.id, 0))
                    for c in sorted(self.loop.classes.values(), key=lambda c: c.id) if c.status in statuses]

    def reference_classes(self) -> list[ClassRow]:
        """Known and confirmed classes (what a region or a proposal can be merged or moved into)."""
        return self.classes(REFERENCE)

    def open_proposals(self) -> list[ProposalRow]:
        """Open proposals, largest first."""
        with self.store.session() as session:
            rows = session.execute(select(Proposal, DefectClass).join(DefectClass, DefectClass.id == Proposal.class_id)
                                   .where(Proposal.status == ProposalStatus.OPEN)).all()
            proposals = [ProposalRow(p.id, c.id, c.name, p.size, p.cohesion, p.version, c.version,
                                     list(p.representative_region_ids), p.created_at) for p, c in rows]
        return sorted(proposals, key=lambda p: (-p.size, p.id))

    def members(self, class_id: int) -> list[int]:
        with self.loop.lock:
            return self.loop.mirror.members(int(class_id)).tolist()

    def nearest_classes(self, class_id: int, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` known/confirmed classes whose prototypes are nearest the class's centroid (cosine)."""
        with self.loop.lock:
            centre = self.loop.centroids.get(int(class_id))
            count = self.loop.index.count("prototype")
            if centre is None or count == 0:
                return []
            similarities, ids = self.loop.index.search(centre[None], min(k + 1, count), kind="prototype")
            names = {c.id: c.name for c in self.loop.classes.values()}
        return [(names.get(int(i), f"class {i}"), float(s)) for s, i in zip(similarities[0], ids[0])
                if i >= 0 and int(i) != int(class_id)][:k]

    def regions(self, region_ids: list[int]) -> list[RegionRow]:
        """Regions in the order given (ids the store does not hold are left out)."""
        if not region_ids:
            return []
        with self.store.session() as session:
            rows = session.execute(select(Region.id, Image.path, Region.x0, Region.y0, Region.x1, Region.y1,
                                          Region.mask_path, Region.anomaly_score)
                                   .join(Image, Image.id == Region.image_id)
                                   .where(Region.id.in_([int(r) for r in region_ids]))).all()
        found = {r[0]: RegionRow(r[0], r[1], (r[2], r[3], r[4], r[5]), r[6], r[7]) for r in rows}
        return [found[int(r)] for r in region_ids if int(r) in found]

    # ------------------------------------------------------------------ overview
    def model_version(self) -> dict:
        with self.store.session() as session:
            active = active_model_version(session)
            if active is None:
                return {"name": "none"}
            return {"name": active.name, "created_at": active.created_at, "artifact_path": active.artifact_path,
                    "metrics": dict(active.metrics or {})}

    def job_states(self) -> list[dict]:
        """Training / tuning jobs from ``<workdir>/job_status.json`` (one object or a list of them)."""
        path = self.settings.workdir / JOB_STATUS_FILE
        if not path.is_file():
            return []
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return [{"job": str(path), "state": f"unreadable status file ({exc})"}]
        return [payload] if isinstance(payload, dict) else [p for p in payload if isinstance(p, dict)]

    def arrivals(self) -> pd.DataFrame:
        """One row per region: arrival time and batch (data set) of its image, its current class name and status
        (``unknown`` / ``rejected`` as both for a region without a class: see ``platform/export/snapshot.py``), the
        frame ``platform/export/charts.py`` draws."""
        with self.store.session() as session:
            rows = session.execute(select(Region.id, Image.arrived_at, Dataset.name)
                                   .join(Image, Image.id == Region.image_id)
                                   .join(Dataset, Dataset.id == Image.dataset_id)).all()
        frame = pd.DataFrame(rows, columns=["region_id", "arrived_at", "batch"])
        frame["class"], frame["status"] = self.current_labels(frame["region_id"].to_numpy())
        return frame

    def current_labels(self, region_ids: np.ndarray) -> tuple[list[str], list[str]]:
        """(class name, status) of each region; a region without a live class is ``rejected`` when a reviewer
        took it out (or its class is no longer live), else ``unknown``."""
        with self.loop.lock:
            mirror = self.loop.mirror
            live = {c.id: (c.name, ClassStatus(c.status).value) for c in self.loop.classes.values()
                    if c.status in LIVE}
            labels = []
            for region in region_ids:
                class_id = int(mirror.class_id[region]) if region < len(mirror.class_id) else NO_ID
                if class_id in live:
                    labels.append(live[class_id])
                elif class_id != NO_ID or (region < len(mirror.source) and mirror.source[region] == REVIEWER_CODE):
                    labels.append((REJECTED, REJECTED))
                else:
                    labels.append((UNKNOWN, UNKNOWN))
        return [name for name, _ in labels], [status for _, status in labels]

    def current_class_names(self, region_ids: np.ndarray) -> list[str]:
        """Name of each region's current live class, ``unknown`` for the unassigned."""
        with self.loop.lock:
            class_ids = self.loop.mirror.class_id
            names = {c.id: c.name for c in self.loop.classes.values() if c.status in LIVE}
            return [names.get(int(class_ids[r]), UNKNOWN) if r < len(class_ids) else UNKNOWN for r in region_ids]

    # ------------------------------------------------------------------ export
    def export_snapshot(self) -> ExportSnapshot:
        """The store's reviewed state in one snapshot (``platform/export/snapshot.py``)."""
        return read_snapshot(self.store, self.loop.embeddings)

    def export_file(self, kind: str) -> bytes:
        """A download of the current state: ``csv``, ``coco`` or ``folder`` (a ZIP), as ``adisc export`` writes."""
        return export_bytes(self.export_snapshot(), kind)

    def report_file(self) -> bytes:
        """The HTML report of the current state, as ``adisc report`` writes it."""
        return render_report(self.export_snapshot()).encode()

    def newest_decision_id(self) -> int | None:
        with self.store.session() as session:
            return session.scalar(select(func.max(Decision.id)))

    # ------------------------------------------------------------------ audit
    def decisions(self) -> pd.DataFrame:
        """Every decision, newest first: who, what, when, on which class / proposal, regions changed, undone."""
        with self.store.session() as session:
            rows = session.execute(select(Decision.id, Decision.created_at, Decision.reviewer, Decision.action,
                                          Decision.proposal_id, Decision.class_id, Decision.reverts_id,
                                          Decision.after).order_by(Decision.id.desc())).all()
        names = {c.id: c.name for c in self.loop.classes.values()}
        reverted = {r.reverts_id for r in rows if r.reverts_id is not None}
        return pd.DataFrame([{
            "id": r.id, "time": r.created_at, "reviewer": r.reviewer, "action": r.action,
            "class": names.get(r.class_id, "") if r.class_id is not None else "", "class_id": r.class_id,
            "proposal_id": r.proposal_id, "regions": len((r.after or {}).get("assignments", {}).get("region_ids", [])),
            "undoes": r.reverts_id, "undone": r.id in reverted} for r in rows],
            columns=["id", "time", "reviewer", "action", "class", "class_id", "proposal_id", "regions", "undoes",
                     "undone"])

    def next_undo(self) -> tuple[int, str, str] | None:
        """(id, action, reviewer) of the decision ``undo`` reverts now: the newest one not undone that is not
        itself an undo."""
        with self.store.session() as session:
            undone = select(Decision.reverts_id).where(Decision.reverts_id.is_not(None))
            row = session.execute(select(Decision.id, Decision.action, Decision.reviewer)
                                  .where(Decision.action != "undo", Decision.id.not_in(undone))
                                  .order_by(Decision.id.desc()).limit(1)).first()
        return tuple(row) if row is not None else None

    # ------------------------------------------------------------------ inspect
    def model_folder(self) -> Path | None:
        """The active model's folder when it holds a predictor, else the configured one (if it does)."""
        artifact = self.model_version().get("artifact_path")
        for folder in (artifact, self.settings.model):
            if folder and (Path(folder) / MANIFEST).is_file():
                return Path(folder)
        return None

    def predictor(self) -> RegionPredictor:
        """The predictor of :meth:`model_folder`, loaded again when the active model changes."""
        folder = self.model_folder()
        if folder is None:
            raise FileNotFoundError(f"no predictor folder: neither the active model nor {self.settings.model} holds "
                                    f"a {MANIFEST}")
        with self._predictor_lock:
            if self._predictor is None or self._predictor[0] != folder:
                predictor = build_predictor(folder)
                if predictor.embedding_dim != self.loop.dim:
                    raise ValueError(f"model {folder} gives {predictor.embedding_dim}-d embeddings but the index "
                                     f"holds {self.loop.dim}-d ones")
                self._predictor = (folder, predictor)
            return self._predictor[1]

    def inspect(self, data: bytes, filename: str) -> Inspection:
        """Predict one uploaded image and label its regions (the model's class where it gives one, a known class,
        ``new`` or ``unknown``: ``platform/review/labelling.py``); nothing is stored. Raises ``UploadRejected`` for
        a file that is not a readable image."""
        image, _ = decode_upload(data, filename, MAX_UPLOAD_PIXELS)
        predictor = self.predictor()
        prediction = predictor.predict([image])[0]
        labels = self.loop.label_predictions(prediction.regions)
        return Inspection(image, prediction, labels, predictor.model_version)

    # ------------------------------------------------------------------ evaluation
    def labelled_data(self) -> Path | None:
        return self.settings.data if self.settings.data.is_dir() else None

    def evaluate(self, data: Path) -> Evaluation:
        """Score every region whose image the labelled data set holds: true label = its image's label, prediction
        = its current class (``unknown`` when unassigned)."""
        truth = ground_truth({}, Path(data), "auto", None)
        with self.store.session() as session:
            rows = session.execute(select(Region.id, Image.path).join(Image, Image.id == Region.image_id)
                                   .order_by(Region.id)).all()
        labels = [truth.get(str(Path(path).resolve())) for _, path in rows]
        keep = [i for i, sample in enumerate(labels) if sample is not None and sample.label is not None]
        if not keep:
            raise ValueError(f"no region's image is in the labelled data set {data}")
        y_true = [labels[i].label for i in keep]
        y_pred = self.current_class_names(np.array([rows[i][0] for i in keep], np.int64))
        report = clustering_report(np.array(y_true, dtype=object), np.array(y_pred, dtype=object))
        metrics = {k: float(report[k]) for k in ("nmi", "ari", "f1", "f1_macro", "accuracy")}
        confusion = pd.crosstab(pd.Series(y_true, name="true label"), pd.Series(y_pred, name="current class"))
        return Evaluation(metrics, confusion, len(keep), len(rows) - len(keep))

    def active_loop_curve(self) -> pd.DataFrame | None:
        """The active-loop curve: ``<workdir>/active_loop.json``, else ``benchmarks/results/active_loop.json``;
        a list of rows, or an object whose ``curve`` is one."""
        for path in (self.settings.workdir / ACTIVE_LOOP_FILE, REPOSITORY_RESULTS / ACTIVE_LOOP_FILE):
            if path.is_file():
                try:
                    payload = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                rows = payload.get("curve") if isinstance(payload, dict) else payload
                if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
                    return pd.DataFrame(rows)
        return None
