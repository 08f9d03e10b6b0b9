"""Encoders, heads and the vision-language model that combines them."""

from mmvl.models.vlm import VisionLanguageModel, build_model

__all__ = ["VisionLanguageModel", "build_model"]
