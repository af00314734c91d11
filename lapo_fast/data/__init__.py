"""Frame datasets: format, writer/reader, window sampling, loaders and their planner, and where
data comes from."""

from .cached import CachedFrames
from .compressed import CompressedFrames
from .format import CODECS, DatasetError, Manifest
from .loader import (
    DaliDecodeLoader, DeviceResidentLoader, PrefetchLoader, dali_available, frames_at, normalize, prepare_obs,
)
from .planner import LOADERS, frames_for, make_loader, plan_loader, window_loader
from .reader import FrameDataset
from .sources import collect, import_lapo, ingest_videos
from .windows import RowSampler, WindowSampler, valid_starts
from .writer import DatasetWriter

__all__ = [
    "CODECS", "CachedFrames", "CompressedFrames", "DaliDecodeLoader", "DatasetError", "DatasetWriter",
    "DeviceResidentLoader",
    "FrameDataset", "LOADERS", "Manifest", "PrefetchLoader", "RowSampler", "WindowSampler",
    "collect", "dali_available", "frames_at", "frames_for", "import_lapo", "ingest_videos", "make_loader",
    "normalize", "plan_loader", "prepare_obs", "valid_starts", "window_loader",
]
