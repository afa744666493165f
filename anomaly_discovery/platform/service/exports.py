"""``GET /v1/export``: the reviewed state as a CSV (one row per region) or COCO JSON download (issue 15), read
from the store in one snapshot. A read, open like the other reads (no token); the columns and fields are those
of ``adisc export`` (``platform/export/snapshot.py``, ``platform/export/coco.py``)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import quote

from fastapi import APIRouter, Query, Response

from anomaly_discovery.platform.export.job import DOWNLOADS, download_name, export_bytes
from anomaly_discovery.platform.export.snapshot import read_snapshot
from anomaly_discovery.platform.service.core import ServiceCore


def export_router(core: ServiceCore) -> APIRouter:
    """The export route bound to ``core``'s store and embeddings."""
    router = APIRouter()

    @router.get("/v1/export", response_class=Response, responses={200: {"content": {
        "text/csv": {}, "application/json": {}}, "description": "the export file, as an attachment"}})
    def export(format: Literal["csv", "coco"] = Query("csv", description="csv: one row per region; coco: COCO "
                                                                            "JSON with RLE masks")) -> Response:
        """The store's current, reviewed state. ``X-Adisc-Model-Version`` and ``X-Adisc-Last-Decision`` name the
        model version and the newest decision it reflects (empty when there is none)."""
        snapshot = read_snapshot(core.store, core.loop.embeddings)
        last = snapshot.last_decision
        name = download_name(snapshot.model_version, last.id if last else None, format)
        headers = {"Content-Disposition": f'attachment; filename="{name}"',
                   "X-Adisc-Model-Version": quote(snapshot.model_version),
                   "X-Adisc-Last-Decision": str(last.id) if last else ""}
        return Response(export_bytes(snapshot, format), media_type=DOWNLOADS[format][1], headers=headers)

    return router
