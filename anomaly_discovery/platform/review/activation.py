"""Activating another model version (``POST /v1/models``, ``adisc retrain --activate``): every stored region is
re-embedded by the new model into a new embeddings file and a new index built beside the served ones, then the
model becomes the store's active one and the index file is swapped in; or the activation is refused, with why.

1. Checks, before anything is written: the name is free; every region's image can be read (a region that cannot
   be re-embedded refuses the activation, naming its image).
2. Re-embedding: the regions of each image through ``predictor.embed_boxes`` into the new model's embeddings file
   (``mirror.embeddings_path(index, name)``; row = the region's embedding id; written whole, then renamed).
3. The new index: a loop pinned to the new model opens on a staging file beside the served index, builds the
   reference set, prototypes and thresholds from the new embeddings, and saves it.
4. Which class each of the new model's clusters stands for: the live class holding most of the regions it puts
   there (``model_classes``; none when they are all unassigned).
5. Swap: one store transaction under the loop's write lock embeds any region that arrived since step 2, adds and
   activates the model version with its classes; after the commit the staging index replaces the served one.

A crash before the commit leaves the old model active with its index and embeddings untouched: it serves on. A
crash after it leaves the new model active beside the old index file, which every loop rebuilds on open from the
new embeddings (the index names its model). Replicas see the new active model when they poll and reopen their
loop on it; an arrival that raced the swap is refused (``ingest.ModelChangedError``), never stored in the old
model's space.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select
from tqdm.auto import tqdm

from anomaly_discovery.data import DataError, load_image
from anomaly_discovery.platform.predictor import PredictedRegion, RegionPredictor
from anomaly_discovery.platform.review.actions import LoopError, serialise_writes
from anomaly_discovery.platform.review.labelling import live_class
from anomaly_discovery.platform.review.loop import DiscoveryLoop
from anomaly_discovery.platform.review.mirror import embeddings_path
from anomaly_discovery.platform.review.types import ClassInfo, LoopConfig
from anomaly_discovery.platform.storage.embedding_file import EmbeddingFile, write_embedding_file
from anomaly_discovery.platform.storage.index import sidecar_path
from anomaly_discovery.platform.storage.models import ClassStatus, DefectClass, Image, ModelClass, ModelVersion, Region
from anomaly_discovery.platform.storage.store import Store, add_model_version, current_assignments

logger = logging.getLogger(__name__)
IMAGES_PER_CALL = 8


class ActivationRefused(LoopError):
    """The model version cannot be activated; the message says why (the service answers 409)."""


@dataclass
class ActivationResult:
    name: str
    embedding_dim: int
    regions: int
    cluster_classes: dict[int, int | None]
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredRegion:
    region_id: int
    embedding_id: int
    image_path: str
    box: tuple[int, int, int, int]


def stored_regions(session, after: int = 0) -> list[StoredRegion]:
    """Regions with an embedding and an id above ``after``, by image then id."""
    rows = session.execute(select(Region.id, Region.embedding_id, Image.path, Region.x0, Region.y0, Region.x1,
                                  Region.y1).join(Image, Image.id == Region.image_id)
                           .where(Region.id > after, Region.embedding_id.is_not(None))
                           .order_by(Image.id, Region.id)).all()
    return [StoredRegion(r[0], int(r[1]), r[2], (r[3], r[4], r[5], r[6])) for r in rows]


def reembed(predictor: RegionPredictor, regions: Sequence[StoredRegion], progress: bool = False
            ) -> dict[int, PredictedRegion]:
    """The new model's description of every region, by region id; an unreadable image refuses."""
    by_image: dict[str, list[StoredRegion]] = defaultdict(list)
    for region in regions:
        by_image[region.image_path].append(region)
    paths, described = list(by_image), {}
    for start in tqdm(range(0, len(paths), IMAGES_PER_CALL), desc="re-embedding", disable=not progress):
        chunk = paths[start:start + IMAGES_PER_CALL]
        images = []
        for path in chunk:
            try:
                images.append(load_image(path))
            except DataError as exc:
                raise ActivationRefused(f"{len(by_image[path])} stored region(s) cannot be re-embedded: {exc}; "
                                        "nothing was changed") from exc
        found = predictor.embed_boxes(images, [[r.box for r in by_image[path]] for path in chunk])
        for path, regions_of_image in zip(chunk, found):
            described.update(zip((r.region_id for r in by_image[path]), regions_of_image))
    return described


def cluster_classes(described: dict[int, PredictedRegion], current: dict[int, int | None],
                    classes: dict[int, ClassInfo]) -> dict[int, int | None]:
    """Cluster → the live class holding most of the regions the model puts there and not over its threshold
    (ties: the lower class id); ``None`` when none of them has a live class."""
    votes: dict[int, Counter] = defaultdict(Counter)
    for region_id, region in described.items():
        if region.class_index is None or region.is_outlier:
            continue
        info = live_class(current.get(region_id), classes)
        votes[int(region.class_index)][info.id if info is not None else None] += 1
    mapping = {}
    for cluster, counts in sorted(votes.items()):
        live = [(n, -c) for c, n in counts.items() if c is not None]
        mapping[cluster] = -max(live)[1] if live else None
    return mapping


def write_vectors(path: Path, dim: int, described: dict[int, PredictedRegion], regions: Sequence[StoredRegion]
                  ) -> None:
    embedding_of = {r.region_id: r.embedding_id for r in regions}
    ids = np.fromiter((embedding_of[r] for r in described), np.int64, len(described))
    vectors = np.stack([d.embedding for d in described.values()]) if described else np.zeros((0, dim), np.float32)
    if vectors.shape[1] != dim:
        raise ActivationRefused(f"the model gave {vectors.shape[1]}-d embeddings but says it gives {dim}-d ones")
    write_embedding_file(path, dim, ids, vectors)


def commit(store: Store, name: str, artifact_path: str, metrics: dict | None, mapping: dict[int, int | None],
           predictor: RegionPredictor, described: dict[int, PredictedRegion], regions: list[StoredRegion],
           embeddings: Path, progress: bool) -> None:
    """Step 5's transaction: late arrivals embedded, the model version added, activated, its classes recorded."""
    with store.session() as session:
        serialise_writes(session)
        if session.scalar(select(ModelVersion.id).where(ModelVersion.name == name)) is not None:
            raise ActivationRefused(f"a model version named {name!r} already exists")
        late = stored_regions(session, after=max((r.region_id for r in regions), default=0))
        if late:
            described.update(reembed(predictor, late, progress))
            regions.extend(late)
            write_vectors(embeddings, predictor.embedding_dim, described, regions)
        model = add_model_version(session, name, artifact_path, metrics, activate=True)
        session.add_all([ModelClass(model_version_id=model.id, cluster=c, class_id=k) for c, k in mapping.items()])


def swap_index(staging: Path, index_path: Path) -> None:
    """The staging index (and its JSON sidecar) replaces the served one."""
    os.replace(staging, index_path)
    if sidecar_path(staging).is_file():
        os.replace(sidecar_path(staging), sidecar_path(index_path))


def activate_model(store: Store, index_path: str | Path, name: str, artifact_path: str, predictor: RegionPredictor,
                   metrics: dict | None = None, config: LoopConfig | None = None, progress: bool = False
                   ) -> ActivationResult:
    """Re-embed, build beside, swap (module docstring). Raises :class:`ActivationRefused` with the reason."""
    index_path, timings = Path(index_path), {}
    started = time.perf_counter()
    with store.session() as session:
        if session.scalar(select(ModelVersion.id).where(ModelVersion.name == name)) is not None:
            raise ActivationRefused(f"a model version named {name!r} already exists")
        regions = stored_regions(session)
        current = {r: a.class_id for r, a in current_assignments(session).items()}
        classes = {c.id: ClassInfo(c.id, c.name, ClassStatus(c.status), c.version, c.parent_id, c.merged_into_id)
                   for c in session.scalars(select(DefectClass))}
    described = reembed(predictor, regions, progress)
    timings["reembed"] = time.perf_counter() - started
    embeddings = embeddings_path(index_path, name)
    staging = index_path.with_name(f".{index_path.name}.{uuid.uuid4().hex[:12]}.staging")
    try:
        write_vectors(embeddings, predictor.embedding_dim, described, regions)
        started = time.perf_counter()
        builder = DiscoveryLoop(store, staging, predictor.embedding_dim, config, model_version=name,
                                served_index=index_path)
        builder.close()
        timings["index"] = time.perf_counter() - started
        mapping = cluster_classes(described, current, classes)
        commit(store, name, artifact_path, metrics, mapping, predictor, described, regions, embeddings, progress)
    except BaseException:
        for leftover in (staging, sidecar_path(staging), embeddings):
            leftover.unlink(missing_ok=True)
        raise
    swap_index(staging, index_path)
    logger.info("model %s active: %d regions re-embedded (%d-d), index swapped", name, len(described),
                predictor.embedding_dim)
    return ActivationResult(name, predictor.embedding_dim, len(described), mapping, timings)


def check_embeddings(index_path: str | Path, model_version: str, dim: int) -> None:
    """Refuse to serve ``model_version`` when its embeddings file is missing or of another dimension: it was made
    active without being activated (its regions were never re-embedded)."""
    path = embeddings_path(index_path, model_version)
    if not path.is_file():
        raise ActivationRefused(f"model {model_version!r} is active in the store but {path} does not exist: its "
                                "regions were never re-embedded; activate it with POST /v1/models or adisc retrain "
                                "--activate")
    EmbeddingFile(path, dim)
