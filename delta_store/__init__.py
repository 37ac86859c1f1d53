"""deltaserve.delta_store: the delta file format, compression methods, tenant registry and memory tiers."""

from .compress import compress
from .format import DeltaFile, DeltaFormatError, load_delta

__all__ = ["DeltaFile", "DeltaFormatError", "compress", "load_delta"]
