"""Hand a discovery run to the service: a serving model folder, the store, the index and the first proposals.

The store's first assignment is the discovery model's own: every region in its novel cluster (``novel_<i>``, as
``assignments.csv`` names it), unassigned only when over the model's outlier threshold; every image with the
model's image class; and one open proposal per discovered class. So ``adisc discover``, the API and the
dashboard count the same. A work folder holds one product line's service state, laid out by
:class:`ServicePaths`, so that ``adisc serve`` and ``adisc ui`` need no settings after ``adisc demo``; publishing
into a folder that already holds a store is refused (``replace=True`` starts it afresh).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from anomaly_discovery.models.localisation.localise import fit_localisation
from anomaly_discovery.platform.predictor import write_discovery_model
from anomaly_discovery.platform.review.loop import DiscoveryLoop
from anomaly_discovery.platform.review.types import DiscoveredImage, DiscoveredRegion
from anomaly_discovery.platform.storage.paths import ServicePaths
from anomaly_discovery.platform.storage.store import Store

from .detect import DetectSummary
from .discover import DiscoverSummary


@dataclass
class PublishResult:
    paths: ServicePaths
    model_version: str
    n_regions: int
    proposal_ids: list[int]

    def describe(self) -> str:
        return (f"model {self.model_version} published: {self.n_regions} regions in the store and index, "
                f"{len(self.proposal_ids)} new-class proposals waiting for review\n"
                f"store {self.paths.store_url}\nindex {self.paths.index}\nserving model {self.paths.model}")


def file_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def discovered_records(discovery: DiscoverSummary, detect_images: Path
                       ) -> tuple[list[DiscoveredImage], list[DiscoveredRegion]]:
    """The run's images (with the model's image class) and regions (embedding, cluster, confidence, whether over
    the outlier threshold, and the MEBin mask ``adisc detect`` wrote for the image)."""
    artifacts, predictions = discovery.artifacts, discovery.artifacts.regions
    images = [DiscoveredImage(image_id, path, file_hash(path), "test",
                              int(artifacts.images[image_id].label) if image_id in artifacts.images else None)
              for image_id, path in discovery.image_paths.items()]
    flags = predictions.is_outlier
    regions = [DiscoveredRegion(region.image_id, tuple(int(v) for v in region.box), float(region.score),
                                predictions.embeddings[i], confidence=float(predictions.confidence[i]),
                                mask_path=str(detect_images / region.image_id / "mebin_mask.png"),
                                cluster=int(predictions.clusters[i]),
                                is_outlier=bool(flags[i]) if flags is not None else False)
               for i, region in enumerate(discovery.regions)]
    return images, regions


def publish_discovery(detection: DetectSummary, discovery: DiscoverSummary, workdir: str | Path,
                      model_version: str | None = None, replace: bool = False) -> PublishResult:
    """Write the serving model (detector + the run's map scale and MEBin level + discovery model), then load the
    run's images and regions (with their learned embeddings and the model's classes) into the store and index."""
    if detection.config.detector != "patchcore" or detection.detector is None:
        raise ValueError(f"the {detection.config.detector} detector cannot be saved for serving (the service loads a "
                         "PatchCore bank); use patchcore")
    paths = ServicePaths(Path(workdir))
    if paths.service.exists() and any(paths.service.iterdir()):
        if not replace:
            raise ValueError(f"{paths.service} already holds a published service state: publish into another work "
                             "folder, or replace it")
        shutil.rmtree(paths.service)
    paths.service.mkdir(parents=True, exist_ok=True)
    version = model_version or f"discovery-{Path(discovery.config.out).name}"
    localisation = fit_localisation([r.detection.anomaly_map for r in detection.results],
                                    [r.mebin.threshold for r in detection.results if r.mebin.n_regions > 0]
                                    or [r.mebin.threshold for r in detection.results])
    prior = {"kind": detection.config.object_prior, "sam_checkpoint": detection.config.sam_checkpoint,
             "grounding_config": detection.config.grounding_config,
             "grounding_checkpoint": detection.config.grounding_checkpoint,
             "text_encoder_path": detection.config.text_encoder, "prompt": detection.config.prior_prompt}
    write_discovery_model(paths.model, discovery.artifacts.predictor, detection.detector, localisation, version,
                          {k: str(v) if isinstance(v, Path) else v for k, v in prior.items() if v is not None})

    images, regions = discovered_records(discovery, Path(detection.config.out) / "images")
    embeddings = discovery.artifacts.regions.embeddings
    loop = DiscoveryLoop(Store(paths.store_url), paths.index, dim=embeddings.shape[1])
    try:
        loop.ingest_discovery(images, regions, model_version=version, artifact_path=str(paths.model),
                              metrics={k: v for k, v in discovery.artifacts.metrics.items()
                                       if isinstance(v, (int, float))})
        proposal_ids = sorted(loop.open_proposals.values())
        loop.flush()
    finally:
        loop.close()
        loop.store.dispose()
    return PublishResult(paths, version, len(regions), proposal_ids)
