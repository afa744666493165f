"""Overview: defect counts per class, their Pareto chart, the trend over arrivals (each as PNG and CSV downloads), the
model and any job."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from anomaly_discovery.platform.export.charts import TREND_GROUPINGS, pareto_png, pareto_table, trend_png, trend_table
from anomaly_discovery.ui import widgets
from anomaly_discovery.ui.service import JOB_STATUS_FILE

svc = widgets.service()
st.title("Overview")

arrivals = svc.arrivals()
counts = pareto_table(arrivals)
images_of_class = {c.name: c.images for c in svc.classes()}
counts["images (model)"] = [images_of_class.get(name, 0) for name in counts["class"]]

model = svc.model_version()
jobs = svc.job_states()
top = st.columns(4)
top[0].metric("regions", len(arrivals))
top[1].metric("classes (known + confirmed)", len(svc.reference_classes()))
top[2].metric("open proposals", len(svc.open_proposals()))
top[3].metric("model version", model["name"])


def downloads(key: str, table: pd.DataFrame, png, name: str) -> None:
    """PNG and CSV download buttons of one chart (the PNG drawn only when asked for)."""
    with st.container(horizontal=True):
        st.download_button("PNG", png, file_name=f"{name}.png", mime="image/png", key=f"{key}-png",
                           on_click="ignore", icon=":material/image:")
        st.download_button("CSV", table.to_csv(index=False).encode(), file_name=f"{name}.csv", mime="text/csv",
                           key=f"{key}-csv", on_click="ignore", icon=":material/table:")


st.subheader("Counts per defect class")
if counts.empty:
    st.info("The store holds no regions yet.")
else:
    left, right = st.columns([2, 3])
    left.dataframe(counts, hide_index=True, column_config={
        "share %": st.column_config.NumberColumn(format="%.1f%%"),
        "cumulative %": st.column_config.NumberColumn(format="%.1f%%")})
    order = counts["class"].tolist()
    bars = alt.Chart(counts).mark_bar().encode(
        x=alt.X("class:N", sort=order, title="defect class"), y=alt.Y("regions:Q", title="regions"),
        color=alt.Color("status:N"), tooltip=["class", "status", "regions"])
    line = alt.Chart(counts).mark_line(point=True, color="#d62728").encode(
        x=alt.X("class:N", sort=order), y=alt.Y("cumulative %:Q", scale=alt.Scale(domain=[0, 100]),
                                                  title="cumulative %"),
        tooltip=["class", alt.Tooltip("cumulative %:Q", format=".1f")])
    right.altair_chart(alt.layer(bars, line).resolve_scale(y="independent").properties(title="Pareto chart"),
                       width="stretch")
    with left:
        downloads("pareto", counts, lambda: pareto_png(counts), "adisc_pareto")

st.subheader("Trend over arrivals")
if not arrivals.empty:
    grouping = st.segmented_control("group by", list(TREND_GROUPINGS), default="batch", key="trend-grouping") \
        or "batch"
    trend = trend_table(arrivals, grouping)
    titles = {"batch": "batch (data set, in arrival order)", "hour": "arrival hour (UTC)", "day": "arrival day (UTC)"}
    st.altair_chart(alt.Chart(trend).mark_bar().encode(
        x=alt.X("period:N", sort=list(dict.fromkeys(trend["period"])), title=titles[grouping]), y="regions:Q",
        color="class:N", tooltip=list(trend.columns)), width="stretch")
    downloads("trend", trend, lambda: trend_png(trend, grouping), f"adisc_trend_by_{grouping}")

st.subheader("Model and jobs")
st.write(f"Active model **{model['name']}**" + (f", registered {model['created_at']:%Y-%m-%d %H:%M} UTC from "
                                                f"`{model['artifact_path']}`" if "created_at" in model else ""))
if model.get("metrics"):
    st.json(model["metrics"], expanded=False)
if jobs:
    st.dataframe(pd.DataFrame(jobs), hide_index=True)
else:
    st.caption(f"no job running (no {svc.settings.workdir / JOB_STATUS_FILE})")
