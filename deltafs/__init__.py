"""deltafs: an S3 bucket as a directory, versioned files stored as xdelta3 deltas."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import DeltafsError
from .version import __version__

if TYPE_CHECKING:
    from .api import DeltaService

__all__ = ["DeltaService", "DeltafsError", "__version__"]


def __getattr__(name: str) -> Any:
    """``DeltaService`` on first use: importing the package stays light, so that the
    ``deltafs mount`` program can choose its allocator (and run itself again) before
    boto3 and the rest are loaded (``entry.py``)."""
    if name == "DeltaService":
        from .api import DeltaService

        return DeltaService
    raise AttributeError(f"module 'deltafs' has no attribute {name!r}")
