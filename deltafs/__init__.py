"""deltafs: an S3 bucket as a directory, versioned files stored as xdelta3 deltas."""
from __future__ import annotations

from .api import DeltaService
from .errors import DeltafsError
from .version import __version__

__all__ = ["DeltaService", "DeltafsError", "__version__"]
