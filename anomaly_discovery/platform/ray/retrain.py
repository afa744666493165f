"""Cluster-scale retraining on reviewed classes (issue 5 item 3), behind ``adisc retrain``.

Reviewers' confirmed classes become labelled base classes: every region of the detections that a confirmed
label names is moved from the novel set to the base set under its class name, the rest stay novel, and the
model is fine-tuned from the current one (backbone and projector; fresh prototype heads, since the class
list changed) with Ray Train — or tuned first with Ray Tune when ``--trials`` is given. The result is a new
model version folder ``<out>/vNNNN/`` (discover-style outputs plus ``version.json``) and, with a store, a
``model_versions`` row; ``--activate`` (with ``--workdir``, the service's work folder) serves it at once: every
region of the store is re-embedded by the new version into a new index beside the served one, then swapped.

The current model is a discovery model folder (``model/`` of ``adisc discover`` / ``adisc train``) or a
serving folder (``predictor.json`` of kind "discovery", as the store's model versions are). From a serving
folder the new version gets one too, ``vNNNN/serving/`` (the same detector and localisation, the new
discovery model), and that is what the store row points at, so ``adisc serve`` can load it.

Where the labels come from:

* ``--labels FILE``: CSV with columns ``image`` (an image id of the detect output or the image's path),
  ``class`` and optionally ``x0,y0,x1,y1`` (one region; without them every region of the image), or JSON: a
  list of such objects (``box`` as ``[x0, y0, x1, y1]``) or a mapping ``{image: class}``.
* ``--store URL``: the review store (``platform/storage/store.py``): current assignments to known or confirmed
  classes, i.e. what reviewers' decisions left; the store's active model version is the default model.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from sqlalchemy import select

from anomaly_discovery.config import config_from_dict
from anomaly_discovery.data.errors import DataError
from anomaly_discovery.models.discovery.checkpoints import CheckpointError
from anomaly_discovery.models.discovery.config import DiscoveryConfig
from anomaly_discovery.models.localisation.regions import Region
from anomaly_discovery.platform.jobs.discover import DiscoverJobConfig
from anomaly_discovery.platform.predictor import MANIFEST, build_predictor
from anomaly_discovery.platform.review.activation import activate_model
from anomaly_discovery.platform.storage.models import ClassStatus, DefectClass, Image, ModelVersion
from anomaly_discovery.platform.storage.models import Region as StoredRegion
from anomaly_discovery.platform.storage.paths import ServicePaths
from anomaly_discovery.platform.storage.store import Store, active_model_version, add_model_version, current_assignments

from .cluster import ClusterConfig, add_cluster_arguments, cluster_from_args
from .train import TrainData, add_data_arguments, discovery_settings, job_from_args, load_train_data, run_train
from .tune import TuneSettings, run_tune


VERSION_FILE = "version.json"
BOX_COLUMNS = ("x0", "y0", "x1", "y1")


@dataclass(frozen=True)
class ConfirmedLabel:
    """A reviewed region (``box``) or every region of an image (``box`` None) and its confirmed class."""
    image: str
    class_name: str
    box: Optional[tuple[int, int, int, int]] = None


def _label(path: Path, where: str, image, class_name, box) -> ConfirmedLabel:
    if not image or not class_name:
        raise DataError(path, f"{where}: needs an image and a class, got image={image!r} class={class_name!r}")
    if box is not None:
        try:
            box = tuple(int(v) for v in box)
        except (TypeError, ValueError):
            raise DataError(path, f"{where}: box {box!r} is not four integers") from None
        if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
            raise DataError(path, f"{where}: box {box!r} is not (x0, y0, x1, y1) with x1 > x0 and y1 > y0")
    return ConfirmedLabel(str(image), str(class_name), box)


def read_labels_file(path: Path | str) -> list[ConfirmedLabel]:
    """Confirmed labels from a CSV or JSON file (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "labels file not found")
    if path.suffix.lower() == ".json":
        try:
            values = json.loads(path.read_text())
        except ValueError as exc:
            raise DataError(path, f"not valid JSON ({exc})") from exc
        if isinstance(values, dict):
            return [_label(path, f"entry {image!r}", image, name, None) for image, name in values.items()]
        if not isinstance(values, list):
            raise DataError(path, "expected a list of {image, class, box} objects or an {image: class} mapping")
        return [_label(path, f"entry {i}", v.get("image"), v.get("class"), v.get("box"))
                for i, v in enumerate(values)]
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        if not {"image", "class"} <= columns:
            raise DataError(path, f"CSV needs columns image and class (and optionally {', '.join(BOX_COLUMNS)}), "
                                  f"got {sorted(columns)}")
        has_box = set(BOX_COLUMNS) <= columns
        return [_label(path, f"row {i + 2}", row["image"], row["class"],
                       [row[c] for c in BOX_COLUMNS] if has_box and row[BOX_COLUMNS[0]] else None)
                for i, row in enumerate(reader)]


def read_store_labels(url: str) -> tuple[list[ConfirmedLabel], Optional[str]]:
    """Current assignments to known or confirmed classes (image path, box, class name) and the artifact path
    of the active model version (None without one)."""
    store = Store(url)
    try:
        with store.session() as session:
            names = {c.id: c.name for c in session.scalars(select(DefectClass).where(
                DefectClass.status.in_([ClassStatus.KNOWN, ClassStatus.CONFIRMED])))}
            current = current_assignments(session, class_ids=list(names))
            rows = session.execute(select(StoredRegion.id, StoredRegion.x0, StoredRegion.y0, StoredRegion.x1,
                                          StoredRegion.y1, Image.path).join(Image, Image.id == StoredRegion.image_id)
                                   .where(StoredRegion.id.in_(list(current))))
            labels = [ConfirmedLabel(path, names[current[rid].class_id], (x0, y0, x1, y1))
                      for rid, x0, y0, x1, y1, path in rows]
            active = active_model_version(session)
            return labels, active.artifact_path if active is not None else None
    finally:
        store.dispose()


def _overlap(a: Sequence[int], b: Sequence[int]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def apply_labels(novel: Sequence[Region], image_paths: dict[str, str], labels: Sequence[ConfirmedLabel],
                 min_overlap: float = 0.5) -> tuple[list[Region], list[Region], int]:
    """Split ``novel`` into (still novel, newly labelled base regions, labels that matched no region). A label
    names its image by id or path; with a box it takes the regions overlapping it by IoU ≥ ``min_overlap``."""
    by_image: dict[str, list[ConfirmedLabel]] = {}
    for label in labels:
        by_image.setdefault(label.image, []).append(label)
        by_image.setdefault(str(Path(label.image).resolve()), []).append(label)
    used: set[int] = set()
    remaining, labelled = [], []
    for region in novel:
        candidates = by_image.get(region.image_id, [])
        path = image_paths.get(region.image_id)
        if not candidates and path is not None:
            candidates = by_image.get(str(Path(path).resolve()), [])
        match = next((label for label in candidates
                      if label.box is None or _overlap(label.box, region.box) >= min_overlap), None)
        if match is None:
            remaining.append(region)
        else:
            used.add(id(match))
            labelled.append(replace(region, class_name=match.class_name))
    return remaining, labelled, sum(1 for label in labels if id(label) not in used)


def next_version_folder(root: Path) -> Path:
    """``root/vNNNN`` one past the highest existing version."""
    numbers = [int(p.name[1:]) for p in Path(root).glob("v[0-9][0-9][0-9][0-9]") if p.name[1:].isdigit()]
    return Path(root) / f"v{max(numbers, default=0) + 1:04d}"


def discovery_model_folder(model: Path | str) -> Path:
    """The discovery model inside a serving folder (``predictor.json``), or ``model`` itself."""
    model = Path(model)
    manifest_path = model / MANIFEST
    if not manifest_path.is_file():
        return model
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("kind") != "discovery":
        raise CheckpointError(f"{manifest_path} describes a {manifest.get('kind')!r} predictor, not a discovery "
                              "model to fine-tune")
    return model / manifest.get("discovery", "discovery")


def write_serving_folder(parent: Path, model: Path, target: Path, name: str) -> Optional[Path]:
    """The parent's serving folder with the new discovery model in it (None when the parent is no serving
    folder)."""
    manifest_path = Path(parent) / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text()) | {"name": name, "discovery": "discovery"}
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(parent) / manifest["detector"], target / manifest["detector"])
    shutil.copytree(model, target / "discovery", dirs_exist_ok=True)
    (target / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return target


def model_settings(model: Path) -> DiscoveryConfig:
    """The DiscoveryConfig a saved model (``model.json``) was trained with."""
    path = discovery_model_folder(model) / "model.json"
    try:
        values = json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{model} is not a saved discovery model: {path} is missing or unreadable ({exc})") \
            from exc
    return config_from_dict(DiscoveryConfig, values, str(path))


@dataclass
class RetrainOutcome:
    version: Path
    record: dict

    def describe(self) -> str:
        record = self.record
        classes = ", ".join(f"{name} ({n})" for name, n in record["confirmed_classes"].items())
        lines = [f"new model version {self.version.name}: fine-tuned from {record['parent_model']}",
                 f"confirmed classes as base classes: {classes}; {record['n_novel']} regions still novel",
                 f"written to {self.version}"]
        if record["unmatched_labels"]:
            lines.insert(2, f"{record['unmatched_labels']} labels matched no region of the detections")
        if record.get("model_version_id") is not None:
            lines.append(f"registered in the store as model version {record['model_version_id']}")
        return "\n".join(lines)


def check_activation(store_url: Optional[str], index: Optional[Path], model: Optional[Path]) -> None:
    """``--activate`` needs the store, the served index (``--workdir``) and a serving folder to start from; said
    before any training."""
    if store_url is None or index is None:
        raise ValueError("--activate needs --store and --workdir (the service work folder whose index is rebuilt)")
    if model is None or not (Path(model) / MANIFEST).is_file():
        raise ValueError(f"--activate needs a serving model folder (with {MANIFEST}) as the current model, got "
                         f"{model}: only a serving folder gives the new version one")


def run_retrain(job: DiscoverJobConfig, cluster: ClusterConfig, labels: Sequence[ConfirmedLabel],
                model: Optional[Path], labels_source: str, trials: int = 0, max_concurrent: Optional[int] = None,
                store_url: Optional[str] = None, activate: bool = False, data: Optional[TrainData] = None,
                index: Optional[Path] = None) -> RetrainOutcome:
    """Relabel the detections with the confirmed classes and fine-tune ``model`` on the cluster into
    ``<job.out>/vNNNN``; with ``trials`` ≥ 1 tune first and keep the best trial's model. With ``activate`` the
    new version is activated on the store and the served ``index`` (every region re-embedded into a new index
    beside it, then swapped: ``platform/review/activation.py``)."""
    if activate:
        check_activation(store_url, index, model)
    data = data or load_train_data(job)
    remaining, labelled, unmatched = apply_labels(data.novel, data.image_paths, labels)
    if not labelled:
        raise ValueError(f"none of the {len(labels)} confirmed labels ({labels_source}) matches a region of "
                         f"the detections {job.detections}")
    if not remaining:
        raise ValueError("every region is labelled: nothing is left to discover (retrain needs novel regions)")
    version = next_version_folder(Path(job.out))
    data = replace(data, novel=remaining, base=list(data.base or []) + labelled,
                   base_description=f"{data.base_description} + {len(labelled)} confirmed crops ({labels_source})")
    init = str(discovery_model_folder(model)) if model is not None else None
    versioned = replace(job, out=version)
    if trials:
        outcome = run_tune(replace(job, out=version / "tune"), cluster, TuneSettings(
            trials=trials, max_concurrent=max_concurrent, name=f"retrain-{version.name}"), data, init_model=init)
        shutil.copytree(outcome.out / "best", version, dirs_exist_ok=True)
        metrics = {"selection_score": outcome.best_score}
    else:
        metrics = run_train(versioned, cluster, data, init_model=init).metrics
    counts: dict[str, int] = {}
    for region in labelled:
        counts[region.class_name] = counts.get(region.class_name, 0) + 1
    record = {"version": version.name, "parent_model": str(model) if model is not None else None,
              "labels_source": labels_source,
              "confirmed_classes": dict(sorted(counts.items())), "n_labelled": len(labelled),
              "unmatched_labels": unmatched, "n_novel": len(remaining), "tuned_trials": trials,
              "metrics": metrics, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    name = f"retrain-{version.name}-{int(time.time())}"
    serving = write_serving_folder(Path(model), version / "model", version / "serving", name) if model else None
    record["artifact_path"] = str((serving or version / "model").resolve())
    if store_url:
        store = Store(store_url)
        try:
            if activate:
                activated = activate_model(store, index, name, record["artifact_path"],
                                           build_predictor(record["artifact_path"]), metrics, progress=True)
                record["reembedded_regions"] = activated.regions
            else:
                with store.session() as session:
                    add_model_version(session, name, record["artifact_path"], metrics, activate=False)
            with store.session() as session:
                record["model_version_id"] = session.scalar(select(ModelVersion.id).where(ModelVersion.name == name))
        finally:
            store.dispose()
    (version / VERSION_FILE).write_text(json.dumps(record, indent=1))
    return RetrainOutcome(version, record)


def add_retrain_arguments(parser) -> None:
    add_data_arguments(parser)
    add_cluster_arguments(parser)
    group = parser.add_argument_group("retraining")
    source = group.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", type=Path, help="CSV/JSON of image (id or path) [+ box] → confirmed class")
    source.add_argument("--store", help="review store URL (confirmed classes, reviewers' assignments)")
    group.add_argument("--model", type=Path, default=None,
                       help="current model folder to fine-tune (default: the store's active model version)")
    group.add_argument("--trials", type=int, default=0, help="tune with this many Ray Tune trials first")
    group.add_argument("--max-concurrent", type=int, default=None, help="Tune trials at once")
    group.add_argument("--activate", action="store_true",
                       help="serve the new version: re-embed every region of the store into a new index beside the "
                            "work folder's, then swap (needs --store and --workdir)")
    group.add_argument("--workdir", type=Path, default=None,
                       help="the service work folder whose index --activate rebuilds (what `adisc serve --workdir` "
                            "serves)")


def run_retrain_cli(args) -> int:
    """``adisc retrain``: labels (file or store) → fine-tuned model version on the cluster."""
    if args.labels is not None:
        labels, active, source = read_labels_file(args.labels), None, str(args.labels)
    else:
        (labels, active), source = read_store_labels(args.store), "store"
    model = args.model or (Path(active) if active else None)
    if model is None:
        raise ValueError("no current model: pass --model MODEL_DIR (or activate a model version in the store)")
    discovery = discovery_settings(args.config, args.epochs) if args.config else model_settings(model)
    if args.epochs is not None:
        discovery = discovery.replace(epochs=args.epochs)
    outcome = run_retrain(job_from_args(args, discovery), cluster_from_args(args), labels, model, source,
                          trials=args.trials, max_concurrent=args.max_concurrent, store_url=args.store,
                          activate=args.activate, index=ServicePaths(args.workdir).index if args.workdir else None)
    print(outcome.describe())
    return 0
