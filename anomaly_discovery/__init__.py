"""anomaly-discovery: find, name and track the kinds of defects on industrial products."""

__version__ = "0.1.0"
