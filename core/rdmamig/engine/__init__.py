"""The live-migration engine: RAM blocks, the source (pre-copy) and the destination."""

from ..memory import PAGE_SIZE, ChecksumTracker, RamBlock
from .config import SourceConfig, SourceResult, Workload
from .destination import Destination, DestinationResult
from .source import Source

__all__ = [
    "PAGE_SIZE",
    "ChecksumTracker",
    "Destination",
    "DestinationResult",
    "RamBlock",
    "Source",
    "SourceConfig",
    "SourceResult",
    "Workload",
]
