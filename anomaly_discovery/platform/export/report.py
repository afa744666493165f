"""``adisc report``: a one-page HTML report of the reviewed state for the weekly quality meeting (issue 15).

Counts per class (the Pareto table, and known / confirmed classes left without regions at 0), the Pareto chart,
the trend over arrivals, six representative crops per class (nearest the class prototype; for ``unknown`` and
``rejected`` the highest outlier, then anomaly, scores) with the anomaly map and mask drawn, the model version,
the newest decision reflected and the date. One self-contained file: charts and crops are embedded as data URIs,
the styles inline, no script and no link out, so it opens offline in any browser. Rendered with Jinja2
(autoescaped) from ``templates/report.html``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape

from anomaly_discovery.data import DataError
from anomaly_discovery.platform.export.charts import (TREND_GROUPINGS, pareto_png, pareto_table, trend_png,
                                                      trend_table)
from anomaly_discovery.platform.export.job import StoreLocation, load_snapshot
from anomaly_discovery.platform.export.output import ExportError, check_file, write_file
from anomaly_discovery.platform.export.snapshot import REPRESENTATIVES, ExportSnapshot
from anomaly_discovery.platform.review.thumbnails import region_thumbnail

TEMPLATES = Path(__file__).resolve().parent / "templates"
CROP_PX = 160
CROP_OVERLAY = "map + mask"


def check_trend(grouping: str) -> str:
    if grouping not in TREND_GROUPINGS:
        raise ExportError(f"unknown trend grouping {grouping!r}: choose one of {', '.join(TREND_GROUPINGS)}")
    return grouping


def region_frame(snapshot: ExportSnapshot) -> pd.DataFrame:
    """The snapshot's regions as the charts read them: ``class`` (name, or the status for a region without a
    class), ``status``, ``arrived_at``, ``batch``."""
    regions = snapshot.regions
    named = regions["class_name"].where(regions["class_name"] != "", regions["status"])
    return pd.DataFrame({"class": named, "status": regions["status"], "arrived_at": regions["arrived_at"],
                         "batch": regions["dataset"]})


def counts_table(snapshot: ExportSnapshot) -> pd.DataFrame:
    """The Pareto table plus the known / confirmed classes that hold no region now (0 regions)."""
    table = pareto_table(region_frame(snapshot))
    empty = [c for c in snapshot.classes if c.regions == 0]
    if empty:
        zeros = pd.DataFrame({"class": [c.name for c in empty], "status": [c.status for c in empty],
                              "regions": 0, "share %": 0.0, "cumulative %": 100.0 if len(table) else 0.0})
        table = pd.concat([table, zeros], ignore_index=True)
    return table


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _crop(row) -> dict:
    """A crop of one region as a data URI, or the reason it cannot be drawn (its image is gone)."""
    caption = f"#{row.region_id} · anomaly {row.anomaly_score:.2f}"
    try:
        jpeg = region_thumbnail(row.image_path, (int(row.x0), int(row.y0), int(row.x1), int(row.y1)),
                                row.mask_path, CROP_OVERLAY, CROP_PX)
    except (DataError, OSError) as exc:
        return {"src": None, "caption": caption, "missing": f"image unreadable: {exc}"}
    return {"src": data_uri(jpeg, "image/jpeg"), "caption": caption, "missing": None}


def class_sections(snapshot: ExportSnapshot, counts: pd.DataFrame) -> list[dict]:
    """One section per row of ``counts`` with regions: its crops (see the module docstring)."""
    regions = snapshot.regions.set_index("region_id", drop=False)
    by_name = {(c.name, c.status): c for c in snapshot.classes}
    sections = []
    for row in counts[counts["regions"] > 0].to_dict("records"):
        defect_class = by_name.get((row["class"], row["status"]))
        if defect_class is not None:
            chosen = regions.loc[list(defect_class.representatives)]
        else:
            members = regions[(regions["status"] == row["status"]) & (regions["class_name"] == "")]
            chosen = members.sort_values(["outlier_score", "anomaly_score"], ascending=False,
                                         na_position="last").head(REPRESENTATIVES)
        sections.append({"name": row["class"], "status": row["status"], "regions": int(row["regions"]),
                         "crops": [_crop(r) for r in chosen.itertuples()]})
    return sections


def render_report(snapshot: ExportSnapshot, trend: str = "batch") -> str:
    """The report's HTML (see the module docstring)."""
    check_trend(trend)
    counts = counts_table(snapshot)
    frame = region_frame(snapshot)
    environment = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    last = snapshot.last_decision
    return environment.get_template("report.html").render(
        created=snapshot.created_at.strftime("%Y-%m-%d %H:%M UTC"), model_version=snapshot.model_version,
        store=snapshot.store, last_decision=last,
        last_decision_at=last.at.strftime("%Y-%m-%d %H:%M UTC") if last else None,
        totals={"regions": len(snapshot.regions), "images": len(snapshot.images), **snapshot.counts(),
                "classes": sum(c.status in ("known", "confirmed") for c in snapshot.classes)},
        counts=[{"name": r["class"], "status": r["status"], "regions": int(r["regions"]), "share": r["share %"],
                 "cumulative": r["cumulative %"]} for r in counts.to_dict("records")],
        pareto=data_uri(pareto_png(pareto_table(frame)), "image/png"),
        trend=data_uri(trend_png(trend_table(frame, trend), trend), "image/png"), trend_grouping=trend,
        sections=class_sections(snapshot, counts), n_crops=REPRESENTATIVES, outlier_note=snapshot.outlier_note)


@dataclass(frozen=True, kw_only=True)
class ReportConfig(StoreLocation):
    out: Path
    trend: str = "batch"
    overwrite: bool = False


def run_report(config: ReportConfig) -> str:
    """Read the store once, render, write ``config.out`` atomically; returns a line saying what was written."""
    check_trend(config.trend)
    out = Path(config.out)
    check_file(out.absolute(), config.overwrite)
    snapshot = load_snapshot(config.store_url, config.index_path)
    html = render_report(snapshot, config.trend)
    write_file(out, html.encode(), config.overwrite)
    last = snapshot.last_decision
    return (f"report of {len(snapshot.regions)} regions in {sum(c.regions > 0 for c in snapshot.classes)} classes "
            f"written to {out} ({len(html) / 1e6:.1f} MB); model {snapshot.model_version}, newest decision "
            f"{'#' + str(last.id) if last else 'none'}")
