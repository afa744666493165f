"""Evaluation (when labels are known): the current classes against the true labels — confusion matrix with
``unknown``, NMI / ARI / F1 — and the active-loop curve."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import streamlit as st

from anomaly_discovery.data import DataError
from anomaly_discovery.ui import widgets

svc = widgets.service()
st.title("Evaluation")
default = svc.labelled_data()
folder = st.text_input("labelled data set (folder)", value=str(default) if default else "", key="evaluation-data",
                       help="the data set the images came from; its labels are read only here")
if not folder:
    st.info("Labels are unknown: give the labelled data set's folder to score the current classes.")
else:
    try:
        evaluation = svc.evaluate(Path(folder))
    except (DataError, ValueError, OSError) as exc:
        st.error(f"Cannot evaluate against {folder}: {exc}")
    else:
        columns = st.columns(5)
        for column, name in zip(columns, ("nmi", "ari", "f1", "f1_macro", "accuracy")):
            column.metric(name.upper().replace("_", " "), f"{evaluation.metrics[name]:.3f}")
        st.caption(f"{evaluation.n_scored} regions scored, {evaluation.n_without_label} without a label left out; "
                   "F1 and accuracy after Hungarian matching of classes to labels")
        cells = evaluation.confusion.stack().rename("regions").reset_index()
        heat = alt.Chart(cells).encode(x=alt.X("current class:N"), y=alt.Y("true label:N"))
        st.altair_chart(heat.mark_rect().encode(color=alt.Color("regions:Q", scale=alt.Scale(scheme="blues")),
                                                tooltip=list(cells.columns))
                        + heat.mark_text().encode(text="regions:Q"), width="stretch")
        st.dataframe(evaluation.confusion)

st.subheader("Active-loop curve")
curve = svc.active_loop_curve()
if curve is None:
    st.caption("no active-loop results yet (active_loop.json in the work folder or benchmarks/results)")
else:
    scores = [c for c in curve.columns[1:] if curve[c].dtype.kind == "f" and curve[c].between(0, 1).all()]
    st.line_chart(curve, x=curve.columns[0], y=scores)
    st.dataframe(curve, hide_index=True)
