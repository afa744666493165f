"""The defect Pareto and the trend over arrivals as tables and PNG charts: what the dashboard's Overview shows and
offers as downloads, and what the HTML report draws, computed once here.

Both take one row per region with ``class`` (the class name, or ``unknown`` / ``rejected`` for a region without a
class), ``status`` (``snapshot.STATUSES``), ``arrived_at`` (its image's arrival time, UTC) and ``batch`` (its
image's data set). Charts are drawn with matplotlib's object API (no pyplot state, safe in threads).
"""

from __future__ import annotations

import io

import matplotlib
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

TREND_GROUPINGS = ("batch", "hour", "day")
STATUS_COLOURS = {"known": "#4c78a8", "confirmed": "#54a24b", "proposed": "#f58518", "unknown": "#9d9d9d",
                  "rejected": "#e45756"}
LINE_COLOUR = "#d62728"
DPI = 110


def pareto_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Regions per class, most first (ties by name): ``class``, ``status``, ``regions``, ``share %`` and
    ``cumulative %`` (the Pareto line)."""
    if frame.empty:
        return pd.DataFrame({"class": [], "status": [], "regions": [], "share %": [], "cumulative %": []})
    counts = (frame.groupby(["class", "status"]).size().rename("regions").reset_index()
              .sort_values(["regions", "class"], ascending=[False, True], ignore_index=True))
    total = counts["regions"].sum()
    counts["share %"] = 100.0 * counts["regions"] / total
    counts["cumulative %"] = 100.0 * counts["regions"].cumsum() / total
    return counts


def trend_table(frame: pd.DataFrame, grouping: str = "batch") -> pd.DataFrame:
    """Regions per arrival period and class: ``period`` (the batch, or the UTC hour / day it started) in arrival
    order, ``class``, ``regions``."""
    if grouping not in TREND_GROUPINGS:
        raise ValueError(f"trend grouping must be one of {TREND_GROUPINGS}, got {grouping!r}")
    if frame.empty:
        return pd.DataFrame({"period": [], "class": [], "regions": []})
    arrived = pd.to_datetime(frame["arrived_at"], utc=True)
    if grouping == "batch":
        first = arrived.groupby(frame["batch"]).min().sort_values()
        period = pd.Categorical(frame["batch"], categories=first.index.tolist(), ordered=True)
    else:
        period = arrived.dt.floor("h" if grouping == "hour" else "D")
    table = (pd.DataFrame({"period": period, "class": frame["class"].to_numpy()})
             .groupby(["period", "class"], observed=True).size().rename("regions").reset_index())
    table = table.sort_values(["period", "class"], ignore_index=True)
    if grouping != "batch":
        table["period"] = table["period"].dt.strftime("%Y-%m-%d %H:%M" if grouping == "hour" else "%Y-%m-%d")
    else:
        table["period"] = table["period"].astype(str)
    return table


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _no_data(title: str) -> bytes:
    figure = Figure(figsize=(6, 1.5))
    axes = figure.add_subplot()
    axes.set_axis_off()
    axes.text(0.5, 0.5, f"{title}: no regions", ha="center", va="center")
    return _png(figure)


def pareto_png(table: pd.DataFrame, title: str = "Pareto of defect classes") -> bytes:
    """Bars of regions per class coloured by status, most first, and the cumulative-% line on a second axis."""
    if table.empty:
        return _no_data(title)
    figure = Figure(figsize=(max(6.0, 0.55 * len(table) + 2.5), 4.2))
    axes = figure.add_subplot()
    positions = range(len(table))
    axes.bar(positions, table["regions"], color=[STATUS_COLOURS.get(s, "#777777") for s in table["status"]])
    axes.set_xticks(list(positions), table["class"].tolist(), rotation=35, ha="right")
    axes.set_ylabel("regions")
    axes.set_title(title)
    line = axes.twinx()
    line.plot(list(positions), table["cumulative %"], color=LINE_COLOUR, marker="o")
    line.set_ylim(0, 105)
    line.set_ylabel("cumulative %")
    shown = [s for s in STATUS_COLOURS if s in set(table["status"])]
    handles = [Patch(color=STATUS_COLOURS[s], label=s) for s in shown]
    axes.legend(handles=handles, title="status", fontsize="small", loc="upper left", bbox_to_anchor=(1.1, 1.0))
    axes.set_ylim(0, table["regions"].max() * 1.2)
    return _png(figure)


def trend_png(table: pd.DataFrame, grouping: str = "batch", title: str = "Regions per class over arrivals") -> bytes:
    """Stacked bars: regions per arrival period, one colour per class."""
    if table.empty:
        return _no_data(title)
    wide = table.pivot_table(index="period", columns="class", values="regions", aggfunc="sum", fill_value=0,
                             sort=False)
    figure = Figure(figsize=(max(6.0, 0.6 * len(wide) + 3.0), 4.2))
    axes = figure.add_subplot()
    bottom = pd.Series(0, index=wide.index)
    colours = matplotlib.colormaps["tab20"]
    for i, name in enumerate(wide.columns):
        axes.bar(range(len(wide)), wide[name], bottom=bottom, label=str(name), color=colours(i % 20))
        bottom = bottom + wide[name]
    axes.set_xticks(list(range(len(wide))), [str(p) for p in wide.index], rotation=35, ha="right")
    axes.set_xlabel({"batch": "batch (data set, in arrival order)", "hour": "arrival hour (UTC)",
                     "day": "arrival day (UTC)"}[grouping])
    axes.set_ylabel("regions")
    axes.set_title(title)
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _png(figure)
