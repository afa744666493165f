"""Errors raised on bad input: each names the file or folder at fault."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad dataset input; ``path`` is the file or folder at fault."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        """Pickled as its path and reason (Ray sends a worker's exception back to the driver this way)."""
        return type(self), (self.path, self.reason)


class ImageReadError(DataError):
    """An image or mask file that cannot be decoded (zero bytes, truncated, not an image)."""


class LayoutError(DataError):
    """A folder that does not have the layout the reader expects, or has no images."""
