"""mmvl: medical vision-language pretraining (CLIP, MAE, report generation) for chest X-ray and CT."""

from __future__ import annotations

__version__ = "0.1.0"
