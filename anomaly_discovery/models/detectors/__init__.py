"""Anomaly detectors: the protocol, PatchCore, zero-shot mutual scoring, PRN and maps from other tools."""
