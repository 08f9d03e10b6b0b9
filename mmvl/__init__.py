"""mmvl: medical vision-language pretraining (CLIP, MAE, report generation) for chest X-ray and CT."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

# a library configures no logging (logging HOWTO, "Configuring Logging for a Library"): the NullHandler only keeps
# Python's lastResort from printing to stderr; the application decides, the tools via mmvl.utils.setup_logging
logging.getLogger("mmvl").addHandler(logging.NullHandler())


def __getattr__(name: str):
    """``mmvl.zero_shot``, ``mmvl.predict`` and ``mmvl.grounding`` without importing torch and the model code on
    ``import mmvl``."""
    if name in ("zero_shot", "predict", "grounding"):
        from mmvl import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'mmvl' has no attribute '{name}'")
