"""Frozen Stable Diffusion parts (tiny embedded model, diffusers folder, single-file checkpoint) and family facts.

Every loader reads local files only (`local_files_only=True`); nothing is downloaded.
"""

from .components import SDComponents
from .family import FAMILIES, ModelFamily, get_family
from .loader import ModelSpec, load_components, validate_model_config

__all__ = [
    "FAMILIES",
    "ModelFamily",
    "ModelSpec",
    "SDComponents",
    "get_family",
    "load_components",
    "validate_model_config",
]
