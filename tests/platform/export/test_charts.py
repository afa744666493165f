"""Pareto and trend tables and their PNG charts (the Overview's downloads and the report's figures)."""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from PIL import Image

from anomaly_discovery.platform.export.charts import pareto_png, pareto_table, trend_png, trend_table

T0 = datetime(2025, 3, 3, 8, 10, tzinfo=timezone.utc)


def frame(rows: list[tuple[str, str, datetime, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["class", "status", "arrived_at", "batch"])


@pytest.fixture
def regions() -> pd.DataFrame:
    rows = ([("scratch", "confirmed", T0, "line-1")] * 5 + [("dent", "known", T0, "line-1")] * 3
            + [("unknown", "unknown", T0 + timedelta(days=1, hours=2), "line-2")] * 2
            + [("dent", "known", T0 + timedelta(days=1), "line-2")] * 2)
    return frame(rows)


def test_pareto_orders_classes_by_count_and_ends_at_100_percent(regions):
    table = pareto_table(regions)
    assert table["class"].tolist() == ["dent", "scratch", "unknown"]
    assert table["regions"].tolist() == [5, 5, 2] and table["status"].tolist() == ["known", "confirmed", "unknown"]
    assert table["cumulative %"].tolist() == pytest.approx([5 / 12 * 100, 10 / 12 * 100, 100.0])
    assert table["share %"].sum() == pytest.approx(100.0)


def test_trend_groups_by_batch_in_arrival_order_and_by_day_or_hour(regions):
    by_batch = trend_table(regions, "batch")
    assert by_batch["period"].tolist() == ["line-1", "line-1", "line-2", "line-2"]
    assert by_batch["regions"].sum() == 12
    by_day = trend_table(regions, "day")
    assert sorted(set(by_day["period"])) == ["2025-03-03", "2025-03-04"]
    by_hour = trend_table(regions, "hour")
    assert set(by_hour["period"]) == {"2025-03-03 08:00", "2025-03-04 08:00", "2025-03-04 10:00"}
    with pytest.raises(ValueError, match="grouping must be one of"):
        trend_table(regions, "week")


def test_charts_are_pngs_even_without_regions(regions):
    empty = frame([])
    for png in (pareto_png(pareto_table(regions)), trend_png(trend_table(regions, "day"), "day"),
                pareto_png(pareto_table(empty)), trend_png(trend_table(empty))):
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and min(image.size) > 50
