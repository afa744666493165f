"""``adisc export``: the reviewed state of a store as a folder-per-class data set, a CSV or COCO JSON (issue 15).

Every format is written into the output folder with ``export.json`` (format, model version, the newest decision
it reflects, regions per status, class → folder, skipped images) beside the data: ``regions.csv`` (csv),
``annotations.json`` (coco), the layout of ``folder.py`` (folder). The folder appears complete or not at all
(``output.staged_folder``). The dashboard and the API reuse ``export_bytes`` for their downloads.
"""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from anomaly_discovery.platform.export.coco import coco_document, coco_json
from anomaly_discovery.platform.export.folder import write_folder
from anomaly_discovery.platform.export.output import ExportError, check_folder, staged_folder
from anomaly_discovery.platform.export.snapshot import ExportSnapshot, read_snapshot, regions_csv
from anomaly_discovery.platform.review.mirror import active_embeddings_path
from anomaly_discovery.platform.storage.embedding_file import EmbeddingFile, stored_dim
from anomaly_discovery.platform.storage.paths import ServicePaths
from anomaly_discovery.platform.storage.store import Store

FORMATS = ("folder", "csv", "coco")
MANIFEST = "export.json"
DATA_FILES = {"csv": "regions.csv", "coco": "annotations.json"}
DOWNLOADS = {"csv": ("csv", "text/csv"), "coco": ("json", "application/json"), "folder": ("zip", "application/zip"),
             "report": ("html", "text/html")}


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise ExportError(f"unknown export format {name!r}: choose one of {', '.join(FORMATS)}")
    return name


@dataclass(frozen=True, kw_only=True)
class StoreLocation:
    """Where the store and index are: ``store`` / ``index`` when given, else the work folder's (``ServicePaths``)."""

    workdir: Path = Path("demo_out")
    store: str | None = None
    index: Path | None = None

    @property
    def store_url(self) -> str:
        return self.store or ServicePaths(self.workdir).store_url

    @property
    def index_path(self) -> Path:
        return Path(self.index or ServicePaths(self.workdir).index)


@dataclass(frozen=True, kw_only=True)
class ExportConfig(StoreLocation):
    """``copy``: copy images instead of linking them (folder); ``skip_missing``: leave out images whose files are
    gone instead of stopping."""

    format: str
    out: Path
    copy: bool = False
    overwrite: bool = False
    skip_missing: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_format(self.format)


def open_store(url: str) -> Store:
    """The store at ``url``, read as it is (no migration); a SQLite file that does not exist is refused rather
    than created."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ExportError(f"{url!r} is not a database URL: {exc}") from exc
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:") and \
            not Path(parsed.database).is_file():
        raise ExportError(f"no store at {parsed.database}: run `adisc demo` first, or pass --workdir / --store")
    try:
        return Store(url, upgrade=False)
    except (SQLAlchemyError, ImportError) as exc:
        raise ExportError(f"cannot open the store {parsed.render_as_string(hide_password=True)}: {exc}") from exc


def open_embeddings(store: Store, index_path: Path) -> EmbeddingFile | None:
    """The active model's embeddings file beside ``index_path``, or ``None`` when there is none (outlier scores
    stay empty then)."""
    path = active_embeddings_path(store, index_path)
    dim = stored_dim(path)
    return EmbeddingFile(path, dim) if dim is not None else None


def load_snapshot(store_url: str, index_path: Path) -> ExportSnapshot:
    """Open the store and embeddings, read one snapshot, close them."""
    store = open_store(store_url)
    try:
        return read_snapshot(store, open_embeddings(store, index_path))
    except SQLAlchemyError as exc:
        shown = store.engine.url.render_as_string(hide_password=True)
        raise ExportError(f"cannot read the store {shown} (is it an adisc store?): "
                          f"{str(exc).splitlines()[0]}") from exc
    finally:
        store.dispose()


def write_export(snapshot: ExportSnapshot, root: Path, kind: str, copy: bool = False, skip_missing: bool = False,
                 progress: bool = False) -> dict:
    """Write the ``kind`` export of ``snapshot`` and its ``export.json`` into the folder ``root``; returns the
    manifest."""
    manifest = {"format": check_format(kind), **snapshot.describe(),
                "classes": [{"id": c.id, "name": c.name, "status": c.status, "regions": c.regions}
                            for c in snapshot.classes]}
    if kind == "csv":
        (root / DATA_FILES["csv"]).write_bytes(regions_csv(snapshot.regions))
        manifest["files"] = {DATA_FILES["csv"]: len(snapshot.regions)}
    elif kind == "coco":
        document = coco_document(snapshot, skip_missing, progress)
        (root / DATA_FILES["coco"]).write_bytes(coco_json(document))
        manifest["files"] = {DATA_FILES["coco"]: len(document["annotations"])}
        manifest["skipped_images"] = document["skipped_images"]
    else:
        summary = write_folder(snapshot, root, copy, skip_missing, progress)
        manifest.update(files=summary.images, class_folders=summary.class_folders,
                        skipped_images=summary.skipped_images, images_linked=not copy)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    return manifest


@dataclass(frozen=True)
class ExportResult:
    out: Path
    manifest: dict

    def describe(self) -> str:
        m = self.manifest
        last = m["last_decision"]
        per_status = ", ".join(f"{n} {s}" for s, n in m["regions_per_status"].items() if n)
        lines = [f"{m['format']} export of {m['regions']} regions ({per_status or 'none'}) written to {self.out}",
                 f"model version {m['model_version']}; newest decision reflected: "
                 + (f"#{last['id']} {last['action']} by {last['reviewer']} at {last['at']}" if last else "none")]
        if m["format"] == "folder":
            lines.append(f"ImageFolder root: {self.out / 'images' / 'classes'} "
                         f"({sum(c['status'] in ('known', 'confirmed') and c['regions'] > 0 for c in m['classes'])}"
                         " classes)")
        if m.get("skipped_images"):
            lines.append(f"{len(m['skipped_images'])} unreadable image(s) left out (see {MANIFEST})")
        return "\n".join(lines)


def run_export(config: ExportConfig) -> ExportResult:
    """Check the output, read the store once, write the export into a staged folder, move it to ``config.out``."""
    check_folder(Path(config.out).absolute(), config.overwrite)
    snapshot = load_snapshot(config.store_url, config.index_path)
    with staged_folder(config.out, config.overwrite) as staging:
        manifest = write_export(snapshot, staging, config.format, config.copy, config.skip_missing, config.progress)
    return ExportResult(Path(config.out), manifest)


def zip_folder(root: Path) -> bytes:
    """Every file under ``root`` in a ZIP archive (paths relative to ``root``)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(root).as_posix())
    return buffer.getvalue()


def download_name(model_version: str, last_decision_id: int | None, kind: str) -> str:
    """``adisc_<kind>_<model version>_d<newest decision>.<ext>`` (a kind of ``DOWNLOADS``), safe as a file name."""
    if kind not in DOWNLOADS:
        raise ExportError(f"no download named {kind!r}: choose one of {', '.join(DOWNLOADS)}")
    extension = DOWNLOADS[kind][0]
    model = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in model_version)
    return f"adisc_{kind}_{model}_d{last_decision_id or 0}.{extension}"


def export_bytes(snapshot: ExportSnapshot, kind: str) -> bytes:
    """One file of the export, for a download: the CSV, the COCO JSON (unreadable images left out and listed in
    ``skipped_images``), or the folder export with copied images as a ZIP archive (with its ``export.json``)."""
    if check_format(kind) == "csv":
        return regions_csv(snapshot.regions)
    if kind == "coco":
        return coco_json(coco_document(snapshot, skip_missing=True))
    with tempfile.TemporaryDirectory(prefix="adisc-export-") as folder:
        write_export(snapshot, Path(folder), "folder", copy=True, skip_missing=True)
        return zip_folder(Path(folder))
