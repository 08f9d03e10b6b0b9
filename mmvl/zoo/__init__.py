"""Load trained models (work directories and checkpoints) with their preprocessing."""

from mmvl.zoo.load import LoadedModel, load_pretrained

__all__ = ["LoadedModel", "load_pretrained"]
