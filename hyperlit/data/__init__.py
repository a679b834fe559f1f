"""Data pipeline: folder and webdataset sources, A1111 captions/templates, caches, buckets, DataModules."""

from hyperlit.data.datamodule import FolderDataModule
from hyperlit.data.options import DataOptions

__all__ = ["DataOptions", "FolderDataModule"]
