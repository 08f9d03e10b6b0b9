"""Pretraining heads; importing this package registers them in ``mmvl.registry.HEADS``."""

from mmvl.models.heads.contrastive import ContrastiveHead

__all__ = ["ContrastiveHead"]
