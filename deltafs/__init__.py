"""deltafs: an S3 bucket as a directory, versioned files stored as xdelta3 deltas."""
from __future__ import annotations

__version__ = "0.1.0"

from .api import DeltaService  # noqa: E402
from .errors import DeltafsError  # noqa: E402

__all__ = ["DeltaService", "DeltafsError", "__version__"]
