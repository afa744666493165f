"""Inspect: upload an image and see the model's prediction — overlay, each region's class or new / unknown,
outlier score. Nothing is stored."""

from __future__ import annotations

import hashlib

import cv2
import pandas as pd
import streamlit as st

from anomaly_discovery.data.images import UploadRejected
from anomaly_discovery.ui import widgets
from anomaly_discovery.ui.service import MAX_UPLOAD_PIXELS
from anomaly_discovery.platform.review.thumbnails import BOX_COLOUR, overlay

svc = widgets.service()
st.title("Inspect")
upload = st.file_uploader(f"an image (PNG, JPEG, BMP, TIFF or WEBP; at most {MAX_UPLOAD_PIXELS:,} pixels)",
                          key="inspect-upload")
if upload is None:
    st.caption("The prediction uses the active model and the current classes and proposals.")
    st.stop()

data = upload.getvalue()
digest = hashlib.sha256(data).hexdigest()
cached = st.session_state.get("inspection")
if cached is None or cached[0] != digest:
    try:
        with st.spinner("predicting"):
            st.session_state["inspection"] = (digest, svc.inspect(data, upload.name))
    except UploadRejected as exc:
        st.error(f"Cannot read this upload: {exc}")
        st.stop()
    except (OSError, ValueError) as exc:
        st.error(f"The model cannot run: {exc}")
        st.stop()
inspection = st.session_state["inspection"][1]
prediction = inspection.prediction

shown = overlay(inspection.image, prediction.anomaly_map, prediction.mask)
text_scale = max(0.3, min(shown.shape[:2]) / 600)
line = max(1, round(2 * text_scale))
for region, label in zip(prediction.regions, inspection.labels):
    x0, y0, x1, y1 = region.box
    cv2.rectangle(shown, (x0, y0), (x1 - 1, y1 - 1), BOX_COLOUR, line)
    cv2.putText(shown, label.name, (x0, max(12, y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX, text_scale, BOX_COLOUR, line)
left, right = st.columns(2)
left.image(inspection.image, caption=upload.name, width="stretch")
right.image(shown, caption="anomaly map, defect mask (green) and regions", width="stretch")
verdict = sorted({label.name for label in inspection.labels}) or ["no defect region"]
st.metric("image anomaly score", f"{prediction.score:.3f}")
st.write(f"Model **{inspection.model_version}** · regions: **{', '.join(verdict)}**")
if prediction.regions:
    st.dataframe(pd.DataFrame([{
        "box": str(region.box), "label": label.name, "kind": label.kind, "outlier score": label.outlier_score,
        "similarity": label.similarity, "anomaly score": region.anomaly_score}
        for region, label in zip(prediction.regions, inspection.labels)]), hide_index=True)
