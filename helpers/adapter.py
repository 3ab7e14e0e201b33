"""The old name of the loading entry points, kept for one release (0.2): use helpers.model instead
(`from helpers.model import load_pipeline, save_adapter`). This module will be removed in 0.3."""

from .model.adapter_file import AdapterFileError, save_adapter  # noqa: F401  (re-export for one release)
from .model.pipeline import load_pipeline, load_unet  # noqa: F401  (re-export for one release)
