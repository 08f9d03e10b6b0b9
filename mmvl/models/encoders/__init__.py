"""Image and text encoders; importing this package registers them in ``mmvl.registry.ENCODERS``."""

from mmvl.models.encoders.base import EncoderOutput, drop_tokens
from mmvl.models.encoders.bert_text import HFTextEncoder
from mmvl.models.encoders.open_clip_tower import OpenCLIPVisionEncoder, ProjectedHFTextEncoder
from mmvl.models.encoders.vit2d import TimmImageEncoder, TimmSwinEncoder
from mmvl.models.encoders.vit3d import MonaiResNetEncoder, MonaiSwinEncoder, MonaiViTEncoder

__all__ = ["EncoderOutput", "HFTextEncoder", "MonaiResNetEncoder", "MonaiSwinEncoder", "MonaiViTEncoder",
           "OpenCLIPVisionEncoder", "ProjectedHFTextEncoder", "TimmImageEncoder", "TimmSwinEncoder", "drop_tokens"]
