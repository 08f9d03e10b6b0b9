"""Image and text encoders; importing this package registers them in ``mmvl.registry.ENCODERS``."""

from mmvl.models.encoders.base import EncoderOutput
from mmvl.models.encoders.bert_text import HFTextEncoder
from mmvl.models.encoders.vit2d import TimmImageEncoder, TimmSwinEncoder

__all__ = ["EncoderOutput", "HFTextEncoder", "TimmImageEncoder", "TimmSwinEncoder"]
