"""Encoders, heads and the vision-language model that combines them."""

from mmvl.models.embedders import EncoderModel, ImageEmbedder
from mmvl.models.vlm import VisionLanguageModel, build_model

__all__ = ["EncoderModel", "ImageEmbedder", "VisionLanguageModel", "build_model"]
