"""Export: the reviewed state as downloads, the same files as ``adisc export`` / ``adisc report`` (issue 15): the
region CSV, COCO JSON, the folder-per-class data set as a ZIP (images copied) and the one-page HTML report. Each
file is built from one store snapshot when its button is clicked, not on every page run."""

from __future__ import annotations

import streamlit as st

from anomaly_discovery.platform.export.job import DOWNLOADS, download_name
from anomaly_discovery.platform.export.snapshot import STATUSES
from anomaly_discovery.ui import widgets

svc = widgets.service()
st.title("Export")
st.caption("What the review decided — confirmed, renamed, merged, split and moved classes — not the model's first "
           "guess. Each file names the model version and the newest decision it reflects.")

arrivals = svc.arrivals()
model = svc.model_version()["name"]
decision = svc.newest_decision_id()
columns = st.columns(len(STATUSES) + 1)
columns[0].metric("regions", len(arrivals))
for column, status in zip(columns[1:], STATUSES):
    column.metric(status, int((arrivals["status"] == status).sum()))
st.write(f"Model **{model}** · newest decision " + (f"**#{decision}**" if decision else "none yet"))

FILES = (("csv", "Regions (CSV)", "one row per region: image, box, class, status, confidence, outlier score, who "
                                   "decided and when, model version"),
         ("coco", "COCO JSON", "images, categories = the classes, annotations = regions with RLE masks and scores"),
         ("folder", "Folder per class (ZIP)", "images/classes/<class>/ for torchvision ImageFolder and anomalib "
                                              "Folder, masks/ beside, proposed / unknown / rejected kept apart"))
for kind, label, description in FILES:
    st.download_button(label, lambda kind=kind: svc.export_file(kind), file_name=download_name(model, decision, kind),
                       mime=DOWNLOADS[kind][1], key=f"export-{kind}", on_click="ignore", help=description,
                       icon=":material/download:")
st.download_button("Report (HTML)", svc.report_file, file_name=download_name(model, decision, "report"),
                   mime=DOWNLOADS["report"][1], key="export-report", on_click="ignore", icon=":material/summarize:",
                   help="counts per class, Pareto chart, trend, six representative crops per class; opens offline")
st.caption(f"Large stores: `adisc export --workdir {svc.settings.workdir} --format folder --out OUT` links the images "
           "instead of copying them into a ZIP.")
