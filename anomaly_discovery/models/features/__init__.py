"""Frozen ImageNet feature extractors and coreset subsampling."""
