"""Frame datasets: format, writer/reader, window sampling, loaders, and where data comes from."""

from .format import CODECS, DatasetError, Manifest
from .loader import DaliLoader, DeviceResidentLoader, PrefetchLoader, dali_available, make_loader, normalize, prepare_obs
from .pool import PooledSampler
from .reader import FrameDataset
from .sources import checkpoint_policy, collect, import_lapo, ingest_videos, random_policy
from .windows import WindowSampler, valid_starts
from .writer import DatasetWriter

__all__ = [
    "CODECS", "DaliLoader", "DeviceResidentLoader", "DatasetError", "DatasetWriter", "FrameDataset", "Manifest", "PooledSampler", "PrefetchLoader",
    "WindowSampler", "checkpoint_policy", "collect", "dali_available", "import_lapo", "ingest_videos", "make_loader",
    "normalize", "prepare_obs", "random_policy", "valid_starts",
]
