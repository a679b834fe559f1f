"""Data pipeline: folder and webdataset sources, A1111 captions/templates, caches, buckets, DataModules."""

from hyperlit.data.datamodule import FolderDataModule
from hyperlit.data.options import DataOptions
from hyperlit.data.shards import make_shards
from hyperlit.data.webdatamodule import WebDataModule

__all__ = ["DataOptions", "FolderDataModule", "WebDataModule", "make_shards"]
