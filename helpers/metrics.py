"""The old name of the metrics entry points, kept for one release (0.2): use helpers.evaluate instead
(`from helpers.evaluate import clip_t, clip_i`). This module will be removed in 0.3."""

from .evaluate.metrics import clip_i, clip_t, dino  # noqa: F401  (re-export for one release)
