"""Overview: defect counts per class, their Pareto chart, the trend over arrivals, the model and any job."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from anomaly_discovery.ui import widgets
from anomaly_discovery.ui.service import JOB_STATUS_FILE

svc = widgets.service()
st.title("Overview")

arrivals = svc.arrivals()
counts = (arrivals.groupby("class").size().rename("regions").reset_index()
          .sort_values(["regions", "class"], ascending=[False, True], ignore_index=True))
live = {c.name: c for c in svc.classes()}
counts["status"] = [live[name].status if name in live else "unassigned" for name in counts["class"]]
counts["images (model)"] = [live[name].images if name in live else 0 for name in counts["class"]]

model = svc.model_version()
jobs = svc.job_states()
top = st.columns(4)
top[0].metric("regions", len(arrivals))
top[1].metric("classes (known + confirmed)", len(svc.reference_classes()))
top[2].metric("open proposals", len(svc.open_proposals()))
top[3].metric("model version", model["name"])

st.subheader("Counts per defect class")
if counts.empty:
    st.info("The store holds no regions yet.")
else:
    counts["cumulative %"] = 100 * counts["regions"].cumsum() / counts["regions"].sum()
    left, right = st.columns([2, 3])
    left.dataframe(counts, hide_index=True, column_config={
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

st.subheader("Trend over arrivals")
if not arrivals.empty:
    grouping = st.segmented_control("group by", ["batch", "hour", "day"], default="batch", key="trend-grouping")
    if grouping in ("hour", "day"):
        arrivals["when"] = pd.to_datetime(arrivals["arrived_at"], utc=True).dt.floor("h" if grouping == "hour"
                                                                                       else "D")
        trend = arrivals.groupby(["when", "class"]).size().rename("regions").reset_index()
        x = alt.X("when:T", title=f"arrival {grouping}")
    else:
        first = arrivals.groupby("batch")["arrived_at"].min().sort_values()
        trend = arrivals.groupby(["batch", "class"]).size().rename("regions").reset_index()
        x = alt.X("batch:N", sort=first.index.tolist(), title="batch (data set, in arrival order)")
    st.altair_chart(alt.Chart(trend).mark_bar().encode(x=x, y="regions:Q", color="class:N",
                                                       tooltip=list(trend.columns)), width="stretch")

st.subheader("Model and jobs")
st.write(f"Active model **{model['name']}**" + (f", registered {model['created_at']:%Y-%m-%d %H:%M} UTC from "
                                                f"`{model['artifact_path']}`" if "created_at" in model else ""))
if model.get("metrics"):
    st.json(model["metrics"], expanded=False)
if jobs:
    st.dataframe(pd.DataFrame(jobs), hide_index=True)
else:
    st.caption(f"no job running (no {svc.settings.workdir / JOB_STATUS_FILE})")
